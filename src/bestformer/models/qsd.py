"""QSD-Transformer (Li et al., ICLR 2025): a Spike-driven Transformer v2 MetaFormer with b-bit LSQ weights,
IE-LIF multi-level neurons and Q-SDSA, plus its ANN teacher of the same layout.

- ``qsd_*``: LSQ weights on every convolution and linear layer, the first and the head included
  (``weight_bits``, 4 by default); BatchNorm, biases, layer-scales and the rectification in full precision.
- ``ann_qsd_*``: the same layout with ReLU instead of IE-LIF, full precision, one time step: the teacher
  of the fine-grained distillation (:mod:`bestformer.training.fgd`).

Layout (the authors' code; widths ``[e0, e1, e2, e3]``): Conv7x7/2 to ``e0/2`` + ConvBlock; Conv3x3/2 to
``e0`` + ConvBlock; Conv3x3/2 to ``e1`` + 2 ConvBlocks; Conv3x3/2 to ``e2`` + 6 transformer blocks;
Conv3x3/1 to ``e3`` + 2 transformer blocks; IE-LIF, global average pooling over tokens and time, Linear.
Time: the authors train with one real time step (``T = 1``) and 4-level spikes, which run as 1-bit spikes
over ``D = 4`` virtual steps at inference: the paper's "4-1-4" (4-bit weights, 1-bit spikes, 4 steps).

Ours: Q-SDSA averages ``k^T v`` over the tokens (``attn_token_mean``; the code sums, which saturates the
attention neuron); for inputs smaller than ImageNet the number of stride-2 downsamplings follows the image size (the
first ``k`` of the four, ``k = round(log2(img_size / 8))``: 224 px -> 14 x 14 tokens, 32 px -> 8 x 8,
28 px -> 7 x 7, 8 px -> 8 x 8); ``strides`` overrides it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from ..errors import ConfigError, check_choice
from ..layers.qsd import ConvBlock, Downsample, QSDBlock
from ..layers.stem import auto_pool_stages
from ..neurons import get_neuron
from ..quant import QuantLinear, bits_to_quantizer
from ._registry import InputConfig, register_default_change, register_family
from .base import BaseModel, check_finite, mlp_width


class QSDTransformer(BaseModel):
    """Quantized spike-driven MetaFormer (module docstring); the model contract of
    :class:`~bestformer.models.base.BaseModel` (``forward_features -> [B, 1, D]``, one stream).

    Args:
        num_classes, in_channels, img_size, time_steps: data options; a static image ``[B, C, H, W]`` is
            encoded once and repeated over ``T``, an event tensor ``[T, B, C, H, W]`` must have ``T`` frames.
        embed_dims: the four widths ``[e0, e1, e2, e3]``.
        conv_depths: ConvBlocks in the three convolutional stages (1, 1, 2).
        depths: transformer blocks in the two transformer stages (6, 2).
        num_heads, mlp_ratio: heads of Q-SDSA (8) and MLP ratio (4) of every block.
        weight_bits: LSQ bits of every weight (2-8; 32 for full precision).
        neuron: ``"ielif"`` (spiking) or ``"relu"`` (ANN teacher); ``neuron_kwargs`` go to it (e.g.
            ``{"levels": 4}``).
        rectify: the rectification before the q/k/v neurons (an ablation switch).
        layer_scale_init: initial layer-scale of both residual branches (1e-6).
        attn_scale: Q-SDSA's constant (0.25).
        attn_token_mean: divide Q-SDSA's ``k^T v`` by the number of tokens (ours; off by default, the
            paper's formula and the authors' code: see :class:`~bestformer.layers.qsd.QSDSA`). Checkpoints of
            bestformer < 0.2.0, whose default it was, load with it on.
        strides: strides of the four downsampling convolutions before the last stage (each 1 or 2);
            ``None`` chooses from ``img_size``.
    """

    supports_grad_checkpointing = True

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, img_size: int = 224, time_steps: int = 1,
                 embed_dims: Sequence[int] = (128, 256, 512, 640), conv_depths: Sequence[int] = (1, 1, 2),
                 depths: Sequence[int] = (6, 2), num_heads: int = 8, mlp_ratio: float = 4.0,
                 weight_bits: int = 4, neuron: str = "ielif", neuron_kwargs: dict[str, Any] | None = None,
                 rectify: bool = True, layer_scale_init: float = 1e-6, attn_scale: float = 0.25,
                 attn_token_mean: bool = False, strides: Sequence[int] | None = None) -> None:
        super().__init__()
        self._set_data_options(num_classes, in_channels, img_size, time_steps, num_heads=num_heads)
        check_finite(layer_scale_init=layer_scale_init)
        check_finite(positive=True, attn_scale=attn_scale)
        embed_dims, conv_depths, depths = tuple(embed_dims), tuple(conv_depths), tuple(depths)
        if len(embed_dims) != 4 or any(not isinstance(e, int) or e < 2 or e % 2 for e in embed_dims):
            raise ConfigError(f"embed_dims needs 4 even integers [e0, e1, e2, e3], got {embed_dims!r}")
        if len(conv_depths) != 3 or len(depths) != 2 or any(d < 0 for d in conv_depths + depths):
            raise ConfigError(f"conv_depths needs 3 and depths 2 integers >= 0, got {conv_depths!r} and {depths!r}")
        if embed_dims[2] % num_heads or embed_dims[3] % num_heads:
            raise ConfigError(f"num_heads={num_heads} must divide the transformer widths {embed_dims[2:]}")
        if strides is None:
            strides = tuple(2 if p else 1 for p in reversed(auto_pool_stages(img_size)))
        strides = tuple(strides)
        if len(strides) != 4 or any(s not in (1, 2) for s in strides):
            raise ConfigError(f"strides needs 4 values, each 1 or 2, got {strides!r}")
        self.weight_bits, self.embed_dims = weight_bits, embed_dims
        self.num_features = embed_dims[3]
        self.strides = strides
        neuron_layer = get_neuron(check_choice("QSD-Transformer neuron", neuron, ("ielif", "relu")),
                                  **(neuron_kwargs or {}))
        e0, e1, e2, e3 = embed_dims
        for width, blocks in zip((e0 // 2, e0, e1, e2, e3), (*conv_depths, *depths)):
            if blocks:  # every block's MLP at least 1 wide
                mlp_width(width, mlp_ratio)

        def conv_stage(cin: int, cout: int, kernel: int, stride: int, n: int) -> nn.Sequential:
            return nn.Sequential(Downsample(cin, cout, kernel, stride, neuron_layer, weight_bits),
                                 *(ConvBlock(cout, neuron_layer, weight_bits, mlp_ratio) for _ in range(n)))

        def attn_stage(cin: int, cout: int, stride: int, n: int) -> nn.Sequential:
            return nn.Sequential(Downsample(cin, cout, 3, stride, neuron_layer, weight_bits),
                                 *(QSDBlock(cout, num_heads, neuron_layer, weight_bits, mlp_ratio, layer_scale_init,
                                            rectify, attn_scale, attn_token_mean) for _ in range(n)))

        # the first convolution sees the real-valued image (no neuron before it): encode once, repeat over T
        self.stem = Downsample(in_channels, e0 // 2, 7, strides[0], None, weight_bits)
        self.stages = nn.ModuleList([
            nn.Sequential(*(ConvBlock(e0 // 2, neuron_layer, weight_bits, mlp_ratio) for _ in range(conv_depths[0]))),
            conv_stage(e0 // 2, e0, 3, strides[1], conv_depths[1]),
            conv_stage(e0, e1, 3, strides[2], conv_depths[2]),
            attn_stage(e1, e2, strides[3], depths[0]),
            attn_stage(e2, e3, 1, depths[1]),
        ])
        self.head_neuron = neuron_layer()
        self.head = self._make_head(num_classes)

    def _make_head(self, num_classes: int) -> nn.Module:
        if num_classes == 0:
            return nn.Identity()
        return QuantLinear(self.num_features, num_classes, weight_quantizer=bits_to_quantizer(self.weight_bits))

    def forward_maps(self, x: Tensor) -> Tensor:
        """Stem and stages: the last feature map ``[T, B, e3, H', W']`` (real-valued, before the head neuron)."""
        self.check_input(x)
        y = self.stem(x.unsqueeze(0) if x.dim() == 4 else x)
        y = y.expand(self.time_steps, *y.shape[1:])
        for stage in self.stages:
            if self._checkpointing():  # block by block: each recomputed in backward
                for block in stage:
                    y = self._block(block, y)
            else:
                y = stage(y)  # the stage module itself, so that hooks on it see the call
        return y

    def forward_features(self, x: Tensor) -> Tensor:
        """Pooled features ``[B, 1, D]``: head neuron, then the mean over tokens and time (one stream)."""
        return self.head_neuron(self.forward_maps(x)).mean(dim=(0, 3, 4)).unsqueeze(1)


# ----------------------------------------------------------------------------------------------- registry
_IMAGENET = InputConfig(224, 3, 1000, 1, "imagenet")
_SIZES: dict[str, tuple[dict[str, Any], InputConfig]] = {
    "8_256": (dict(embed_dims=(48, 96, 192, 256)), _IMAGENET),
    "8_15m": (dict(embed_dims=(64, 128, 256, 360)), _IMAGENET),
    "8_384": (dict(embed_dims=(96, 192, 384, 480)), _IMAGENET),
    "8_512": (dict(embed_dims=(128, 256, 512, 640)), _IMAGENET),
    # ours: trains in about a minute on MNIST / digits on 2 CPU cores
    "tiny": (dict(embed_dims=(16, 32, 64, 64), conv_depths=(1, 1, 1), depths=(1, 1), num_heads=4),
             InputConfig(28, 1, 10, 1, "mnist")),
}
_FAMILIES: dict[str, dict[str, Any]] = {
    "qsd": dict(weight_bits=4, neuron="ielif"),
    "ann_qsd": dict(weight_bits=32, neuron="relu"),
}


for _family, _defaults in _FAMILIES.items():
    register_family(QSDTransformer, _family, _SIZES, _defaults)
# issue 21: the authors' Q-SDSA (no token mean) became the default in 0.2.0
register_default_change("*qsd_*", "attn_token_mean", True, since="0.2.0")
