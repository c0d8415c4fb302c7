"""The BESTformer family and its counterparts, one topology (Fig. 3 of the BESTformer paper):

- ``bestformer_*``: 1-bit weights (Eq. 5-6), binary attention maps (Eq. 8-9), the reversible encoder
  (Eq. 12) and two heads, classification on ``X^{S,0}`` and distillation on ``X^{S,1}`` (Eq. 15).
- ``spikformer_*``: the full-precision counterpart: same spiking stem and blocks, Spikformer's attention
  (integer map), standard residuals, one head.
- ``ann_*``: the same topology as an ANN (ReLU instead of LIF, full precision, one time step), used as a
  distillation teacher.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..layers import PatchSplitting, ResidualBlock, ReversibleBlock, SpikingMLP, auto_pool_stages, get_attention
from ..layers.memory import spike_packing
from ..neurons import get_neuron
from ..quant import QuantLinear, bits_to_quantizer
from ._registry import InputConfig, register_family
from .base import BaseModel, check_finite, mlp_width


class SpikingTransformer(BaseModel):
    """Spiking transformer with switchable binarization, attention form, coupling and heads.

    Args:
        num_classes, in_channels, img_size, time_steps: data options (``time_steps`` is ``T``; a static image
            is repeated ``T`` times, an event tensor ``[T, B, C, H, W]`` must have ``T`` frames).
        embed_dim, depth, num_heads, mlp_ratio: width ``D``, number of encoder blocks, heads, MLP ratio.
        weight_bits: bits of every weight in the stem stages and encoder (1: Eq. 5-6, 2-8: LSQ, 32: float).
        first_bits, head_bits: bits of the first convolution and of the heads (full precision in the paper).
        attention: ``"token"`` / ``"channel"`` (binary attention maps, Eq. 8-9), ``"ssa"`` (Spikformer), or a
            registered form such as ``"a2os2a"``.
        neuron: ``"lif"`` or ``"relu"`` (ANN counterpart) or a registered neuron; ``neuron_kwargs`` go to it.
        reversible: Eq. 12 coupling (True) or standard residuals (False).
        distill_head: a second (distillation) head. With two heads the model returns both logits in training
            mode and their mean in eval mode. With ``reversible=True`` and one head, the head reads the mean of
            the two streams (our choice: reading only ``X^{S,0}`` would leave the last MLP without gradient).
        pool_stages: which of the four stem stages max-pool; ``None`` chooses from ``img_size``.
        attn_scale: the attention's constant factor (0.125 in the reference).
        stem_widths: the stem's five channel counts (default: the reference's ``D/8, D/4, D/2, D, D``).
    """

    supports_grad_checkpointing = True

    def __init__(self, num_classes: int = 10, in_channels: int = 3, img_size: int = 32, time_steps: int = 4,
                 embed_dim: int = 384, depth: int = 4, num_heads: int = 8, mlp_ratio: float = 4.0,
                 weight_bits: int = 1, first_bits: int = 32, head_bits: int = 32, attention: str = "token",
                 neuron: str = "lif", neuron_kwargs: dict[str, Any] | None = None, reversible: bool = True,
                 distill_head: bool = True, pool_stages: Sequence[bool] | None = None,
                 attn_scale: float = 0.125, stem_widths: Sequence[int] | None = None) -> None:
        super().__init__()
        self._set_data_options(num_classes, in_channels, img_size, time_steps, embed_dim=embed_dim, depth=depth,
                               num_heads=num_heads)
        check_finite(positive=True, attn_scale=attn_scale)
        self.num_features = self.embed_dim = embed_dim
        self.built_time_steps = time_steps
        self.weight_bits, self.reversible, self.distill_head = weight_bits, reversible, distill_head
        self.attention = attention
        neuron_layer = get_neuron(neuron, **(neuron_kwargs or {}))
        pools = tuple(pool_stages) if pool_stages is not None else auto_pool_stages(img_size)
        self.patch_embed = PatchSplitting(in_channels, embed_dim, time_steps, neuron_layer, weight_bits,
                                          first_bits, pools, stem_widths)
        attn_factory = get_attention(attention)
        block_cls = ReversibleBlock if reversible else ResidualBlock
        self.blocks = nn.ModuleList(
            block_cls(
                attn_factory(dim=embed_dim, heads=num_heads, mode=attention, time_steps=time_steps,
                             neuron_layer=neuron_layer, weight_bits=weight_bits, attn_scale=attn_scale),
                SpikingMLP(embed_dim, mlp_width(embed_dim, mlp_ratio), neuron_layer, weight_bits),
            )
            for _ in range(depth)
        )
        self.head_bits = head_bits
        self.head = self._make_head(num_classes)
        self.head_dist = self._make_head(num_classes) if distill_head else None
        self.spike_packing = True

    def _make_head(self, num_classes: int) -> nn.Module:
        if num_classes == 0:
            return nn.Identity()
        return QuantLinear(self.embed_dim, num_classes, weight_quantizer=bits_to_quantizer(self.head_bits))

    def set_time_steps(self, time_steps: int) -> None:
        """Run static images for ``time_steps`` steps, at most the built ``T`` (a time-step schedule trains at a
        smaller ``T`` first; the attention then uses the first ``time_steps`` lambdas of Eq. 9)."""
        if not isinstance(time_steps, int) or isinstance(time_steps, bool) \
                or not 1 <= time_steps <= self.built_time_steps:
            raise ConfigError(f"time_steps must be an integer in [1, {self.built_time_steps}] (the model was built "
                              f"for T={self.built_time_steps}), got {time_steps!r}")
        self.time_steps = self.patch_embed.time_steps = time_steps

    def set_spike_packing(self, enable: bool = True) -> None:
        """Keep the binary activations that autograd saves as bits instead of float32 (on by default; exact: see
        :func:`bestformer.layers.memory.spike_packing`)."""
        self.spike_packing = bool(enable)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head(s) for ``num_classes`` outputs (0: no head, ``forward`` returns the features, one tensor
        in training mode too)."""
        super().reset_classifier(num_classes)
        if self.head_dist is not None:
            self.head_dist = self._make_head(num_classes)

    def get_classifier(self) -> nn.Module | tuple[nn.Module, nn.Module]:
        """The head, or ``(head, head_dist)`` with the distillation head (as timm's distilled DeiT)."""
        return self.head if self.head_dist is None else (self.head, self.head_dist)

    def forward_streams(self, x: Tensor) -> list[Tensor]:
        """Stem and encoder; the final stream(s) as tokens ``[T, B, N, D]`` (two when reversible)."""
        self.check_input(x)
        with spike_packing(self.spike_packing and torch.is_grad_enabled()):
            h = self.patch_embed(x)
            if self.reversible:
                x0 = x1 = h  # Eq. 12: both streams start from the stem output
                for blk in self.blocks:
                    x0, x1 = self._block(blk, x0, x1)
                return [x0, x1]
            for blk in self.blocks:
                h = self._block(blk, h)
            return [h]

    def forward_features(self, x: Tensor) -> Tensor:
        """Pooled features ``[B, S, D]``: each stream averaged over tokens then time (S = 2 when reversible)."""
        return torch.stack([s.mean(dim=(0, 2)) for s in self.forward_streams(x)], dim=1)

    def forward_head(self, feats: Tensor, pre_logits: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """One head: :meth:`BaseModel.forward_head`. Two heads (Eq. 15): classification on ``X^{S,0}``,
        distillation on ``X^{S,1}``; both logits in training mode, their mean in eval mode."""
        if pre_logits or self.head_dist is None or self.num_classes == 0:  # no heads: the features, as documented
            return super().forward_head(feats, pre_logits)
        logits, logits_dist = self.head(feats[:, 0]), self.head_dist(feats[:, -1])
        if self.training:
            return logits, logits_dist
        return (logits + logits_dist) / 2


# ----------------------------------------------------------------------------------------------- registry
_SIZES: dict[str, tuple[dict[str, Any], InputConfig]] = {
    "tiny": (dict(embed_dim=64, depth=1, num_heads=4), InputConfig(28, 1, 10, 4, "mnist")),
    "2_256": (dict(embed_dim=256, depth=2, num_heads=16), InputConfig(128, 2, 10, 16, "cifar10dvs")),
    "2_384": (dict(embed_dim=384, depth=2, num_heads=8), InputConfig(32, 3, 10, 4, "cifar10")),
    "4_384": (dict(embed_dim=384, depth=4, num_heads=8), InputConfig(32, 3, 10, 4, "cifar10")),
    "6_384": (dict(embed_dim=384, depth=6, num_heads=8), InputConfig(32, 3, 10, 4, "cifar10")),
    "8_512": (dict(embed_dim=512, depth=8, num_heads=8, attention="channel"),
              InputConfig(224, 3, 1000, 4, "imagenet")),
    # ours, for time-to-accuracy on a CPU (recipe cifar10-fast, docs/training.md): a narrow stem that pools in its
    # first three stages, so no binary convolution runs at 32 x 32, then 4 x 4 tokens of width 256
    "cifar_fast": (dict(embed_dim=256, depth=2, num_heads=8, pool_stages=(True, True, True, False),
                        stem_widths=(32, 64, 128, 256, 256)), InputConfig(32, 3, 10, 4, "cifar10")),
}

_FAMILIES: dict[str, dict[str, Any]] = {
    "bestformer": dict(weight_bits=1, attention="token", reversible=True, distill_head=True),
    "spikformer": dict(weight_bits=32, attention="ssa", reversible=False, distill_head=False),
    "ann": dict(weight_bits=32, attention="ssa", reversible=False, distill_head=False, neuron="relu"),
}

# the channel attention of 8_512 is BESTformer's: the other families keep "ssa"; the ANN runs one time step
for _family, _defaults in _FAMILIES.items():
    register_family(SpikingTransformer, _family, {
        size: ({k: v for k, v in arch.items() if _family == "bestformer" or k != "attention"},
               replace(inp, time_steps=1) if _family == "ann" else inp)
        for size, (arch, inp) in _SIZES.items()
    }, _defaults)
