"""The conversion-oriented ANN of CSDformer (seed 004, Zhang et al. 2025): ``csd_*`` models.

From the paper (abstract and summaries, SPEC.md): a convolutional tokenizer, ReLU instead of GELU, BatchNorm
instead of LayerNorm (after linear layers, folded into them at conversion), NReLU instead of softmax in the
self-attention, activations quantized and trained, then converted (``bestformer.convert``).

Our design where the paper is silent (its method section is not public):

- every activation is a :class:`~bestformer.quant.QuantReLU` with ``L = levels`` levels (QCFS form), so the
  converted model is exact after ``T = L`` steps; the attention map is ``QuantNReLU(Q K^T) = q(Q K^T / N)``;
- tokenizer: four stages ``Conv3x3 -> BN -> q -> [MaxPool 3/2/1]`` with widths ``D/8, D/4, D/2, D`` and the
  pooling stages chosen from the image size as in BESTformer's stem (28 px -> 7 x 7 tokens, 32 px -> 8 x 8,
  224 px -> 14 x 14, 8 px -> 8 x 8); no positional encoding;
- pre-activation residual blocks ``x + Attn(x)``, ``x + MLP(x)``: the residual stream is real-valued (in the
  spiking model, a sum of synaptic currents) and each branch starts with a quantized ReLU, so every linear
  layer reads quantized values (spikes after conversion);
- attention: ``s = q(x)``; ``Q, K, V = q(BN(W s))``; ``A = q(Q K^T / N)``; ``O = q(A V)``; ``BN(W_o O)``.
  The quantizer on ``A V`` (ours) makes the output projection read spikes instead of integer counts;
- head: ``q(x)`` averaged over tokens, then a linear classifier.

The model runs time-first with one step (``[1, B, N, D]`` tokens), the library's ANN convention; an event input
``[F, B, C, H, W]`` (``F = input_frames`` frames) is averaged over its frames (rate coding). ``F`` is named
apart from the converted model's time steps ``T`` (``bestformer.convert.convert(ann, time_steps=T)``).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ...errors import ConfigError
from ...layers import ConvBN, LinearBN, ResidualBlock, TimeMaxPool2d, auto_pool_stages, merge_heads, split_heads
from ...quant import QuantNReLU, QuantReLU
from ..base import BaseModel, check_finite, mlp_width


class CSDStemStage(nn.Module):
    """``Conv3x3 -> BN -> QuantReLU -> [MaxPool 3/2/1]`` over ``[T, B, C, H, W]``."""

    def __init__(self, in_channels: int, out_channels: int, levels: int, pool: bool) -> None:
        super().__init__()
        self.conv = ConvBN(in_channels, out_channels, weight_bits=None)
        self.act = QuantReLU(levels)
        self.pool = TimeMaxPool2d() if pool else None

    def forward(self, x: Tensor) -> Tensor:
        y = self.act(self.conv(x))
        return y if self.pool is None else self.pool(y)


class NReLUAttention(nn.Module):
    """Self-attention without softmax (tokens ``[T, B, N, C]``, ``T = 1`` for the ANN)::

        s = q(x);  Q, K, V = q(BN(W_{q,k,v} s));  A = q(Q K^T * c)  (NReLU);  O = q(A V);  out = BN(W_o O)

    ``q`` are quantized ReLUs with ``L`` levels; ``c = 1/N`` by default.
    """

    def __init__(self, dim: int, heads: int, levels: int, attn_scale: float) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"embed_dim {dim} is not divisible by num_heads {heads}")
        self.heads = heads
        self.in_act = QuantReLU(levels)
        self.q, self.k, self.v = (LinearBN(dim, dim, weight_bits=None) for _ in range(3))
        self.q_act, self.k_act, self.v_act = (QuantReLU(levels) for _ in range(3))
        self.attn_act = QuantNReLU(attn_scale, levels)
        self.out_act = QuantReLU(levels)
        self.proj = LinearBN(dim, dim, weight_bits=None)

    def forward(self, x: Tensor) -> Tensor:
        s = self.in_act(x)
        q = split_heads(self.q_act(self.q(s)), self.heads)
        k = split_heads(self.k_act(self.k(s)), self.heads)
        v = split_heads(self.v_act(self.v(s)), self.heads)
        a = self.attn_act(q @ k.transpose(-1, -2))
        return self.proj(merge_heads(self.out_act(a @ v)))

    def extra_repr(self) -> str:
        return f"heads={self.heads}, nrelu_scale={self.attn_act.scale:.4g}"


class CSDMLP(nn.Module):
    """``q(x) -> BN(W1) -> q -> BN(W2)``: ReLU instead of GELU, BN instead of LayerNorm, quantized."""

    def __init__(self, dim: int, hidden: int, levels: int) -> None:
        super().__init__()
        self.in_act = QuantReLU(levels)
        self.fc1 = LinearBN(dim, hidden, weight_bits=None)
        self.hidden_act = QuantReLU(levels)
        self.fc2 = LinearBN(hidden, dim, weight_bits=None)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.hidden_act(self.fc1(self.in_act(x))))


def token_grid(img_size: int, pool_stages: Sequence[bool]) -> int:
    """Side of the token grid after the tokenizer (each ``MaxPool(3, 2, 1)`` maps ``h`` to ``ceil(h / 2)``)."""
    side = img_size
    for pool in pool_stages:
        side = (side - 1) // 2 + 1 if pool else side
    return side


def frames_option(input_frames: int, time_steps: int | None) -> int:
    """``input_frames``, or its deprecated alias ``time_steps`` when only that one is given."""
    if time_steps is None:
        return input_frames
    if input_frames not in (1, time_steps):
        raise ConfigError(f"input_frames={input_frames!r} and its alias time_steps={time_steps!r} disagree; "
                          "give input_frames only")
    return time_steps


class CSDTransformer(BaseModel):
    """CSDformer's conversion-oriented, activation-quantized ANN (module docstring).

    Args:
        num_classes, in_channels, img_size: data options.
        input_frames: ``F``, the frames of an event tensor ``[F, B, C, H, W]`` (averaged); 1 for images. The
            converted model's ``T`` is chosen at conversion (``bestformer.convert.convert``). The model's
            ``time_steps`` (the contract's name for the frames a model takes) is ``F``.
        time_steps: deprecated alias of ``input_frames``.
        embed_dim, depth, num_heads, mlp_ratio: width ``D`` (divisible by 8), blocks, heads, MLP ratio.
        levels: ``L``, levels of every quantized activation (``T = L`` makes the conversion exact).
        attn_scale: NReLU's constant ``c``; ``None``: ``1 / N`` for ``N`` tokens.
        pool_stages: which of the four tokenizer stages max-pool; ``None`` chooses from ``img_size``.
    """

    supports_grad_checkpointing = True

    def __init__(self, num_classes: int = 10, in_channels: int = 3, img_size: int = 32, input_frames: int = 1,
                 embed_dim: int = 384, depth: int = 4, num_heads: int = 8, mlp_ratio: float = 4.0,
                 levels: int = 8, attn_scale: float | None = None, pool_stages: Sequence[bool] | None = None,
                 time_steps: int | None = None) -> None:
        super().__init__()
        frames = frames_option(input_frames, time_steps)
        self._set_data_options(num_classes, in_channels, img_size, frames, embed_dim=embed_dim, depth=depth,
                               num_heads=num_heads, levels=levels)
        self.input_frames = frames
        if embed_dim % 8:
            raise ConfigError(f"embed_dim must be divisible by 8 (tokenizer widths D/8..D), got {embed_dim}")
        pools = tuple(bool(p) for p in pool_stages) if pool_stages is not None else auto_pool_stages(img_size)
        if len(pools) != 4:
            raise ConfigError(f"pool_stages needs 4 booleans, got {pool_stages!r}")
        self.num_features = self.embed_dim = embed_dim
        self.levels, self.pool_stages = levels, pools
        self.num_tokens = token_grid(img_size, pools) ** 2
        if attn_scale is not None:
            check_finite(positive=True, attn_scale=attn_scale)
        self.attn_scale = 1.0 / self.num_tokens if attn_scale is None else float(attn_scale)
        widths = [in_channels, embed_dim // 8, embed_dim // 4, embed_dim // 2, embed_dim]
        self.stem = nn.ModuleList(CSDStemStage(widths[i], widths[i + 1], levels, pools[i]) for i in range(4))
        self.blocks = nn.ModuleList(
            ResidualBlock(NReLUAttention(embed_dim, num_heads, levels, self.attn_scale),
                          CSDMLP(embed_dim, mlp_width(embed_dim, mlp_ratio), levels))
            for _ in range(depth)
        )
        self.final_act = QuantReLU(levels)
        self.head = self._make_head(num_classes)

    def _make_head(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.embed_dim, num_classes) if num_classes else nn.Identity()

    def forward_tokens(self, x: Tensor) -> Tensor:
        """Tokenizer and encoder: the residual stream ``[1, B, N, D]`` after the last block."""
        self.check_input(x)
        x = x.unsqueeze(0) if x.dim() == 4 else x.mean(dim=0, keepdim=True)
        for stage in self.stem:
            x = stage(x)
        h = x.flatten(3).transpose(-1, -2)
        for blk in self.blocks:
            h = self._block(blk, h)
        return h

    def forward_features(self, x: Tensor) -> Tensor:
        """Pooled features ``[B, 1, D]``: the quantized final stream averaged over tokens."""
        return self.final_act(self.forward_tokens(x)).mean(dim=(0, 2)).unsqueeze(1)
