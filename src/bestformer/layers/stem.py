"""Binary Spiking Patch Splitting (BSPS), the stem of BESTformer and Spikformer (Fig. 3)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from torch import Tensor, nn

from ..errors import ConfigError
from .basic import ConvBN, TimeMaxPool2d


def auto_pool_stages(img_size: int, stages: int = 4) -> tuple[bool, ...]:
    """Pool in the last ``k`` stages, ``k = round(log2(img_size / 8))`` clipped to ``[0, stages]``.

    Reproduces the reference settings: 32 px -> pooling in stages 3-4 (8 x 8 tokens), 224 px and 128 px
    -> all four stages (14 x 14 and 8 x 8); and gives 7 x 7 tokens for 28 px, 8 x 8 for 8 px.
    """
    k = min(stages, max(0, round(math.log2(max(img_size, 1) / 8))))
    return tuple(i >= stages - k for i in range(stages))


class PatchSplitting(nn.Module):
    """Stem: ``Conv3x3 (full precision) -> BN``, then four stages ``neuron -> [MaxPool] -> Conv3x3 -> BN``
    with channels ``D/8 -> D/4 -> D/2 -> D -> D`` (the reference's BSPS; binary convolutions when
    ``weight_bits=1``). Returns real-valued tokens ``[T, B, N, D]``.

    ``widths`` replaces the reference channels (five numbers: the first convolution's output, then each
    stage's; the last must be ``D``), e.g. a narrow stem that pools early (``pool_stages=(True, True, False,
    False)``) so that no binary convolution runs at full resolution (ours, for CPU training; ``cifar10-fast``).

    A static image ``[B, C, H, W]`` goes through the first convolution once and is then repeated over
    ``T`` (direct encoding: the first layer's output is identical at every step, so computing it once is
    exact, BatchNorm batch statistics included; only the running variance's ``n / (n - 1)`` correction
    counts ``B`` samples instead of ``T * B`` copies).
    """

    def __init__(self, in_channels: int, embed_dim: int, time_steps: int, neuron_layer: Callable[..., nn.Module],
                 weight_bits: int | str | None = 1, first_bits: int | str | None = 32,
                 pool_stages: Sequence[bool] = (False, False, True, True),
                 widths: Sequence[int] | None = None) -> None:
        super().__init__()
        if widths is None:
            if embed_dim % 8:
                raise ConfigError(f"embed_dim must be divisible by 8 (stem widths D/8..D), got {embed_dim}")
            widths = [embed_dim // 8, embed_dim // 4, embed_dim // 2, embed_dim, embed_dim]
        widths = list(widths)
        if len(widths) != 5 or any(not isinstance(w, int) or isinstance(w, bool) or w < 1 for w in widths) \
                or widths[-1] != embed_dim:
            raise ConfigError(f"stem widths must be 5 integers >= 1 ending with embed_dim={embed_dim}, got {widths!r}")
        if len(pool_stages) != 4:
            raise ConfigError(f"pool_stages needs 4 booleans, got {pool_stages!r}")
        self.time_steps = time_steps
        self.proj = ConvBN(in_channels, widths[0], weight_bits=first_bits)
        self.stages = nn.ModuleList()
        for i in range(4):
            layers: list[nn.Module] = [neuron_layer()]
            if pool_stages[i]:
                layers.append(TimeMaxPool2d())
            layers.append(ConvBN(widths[i], widths[i + 1], weight_bits=weight_bits))
            self.stages.append(nn.Sequential(*layers))
        self.pool_stages = tuple(bool(p) for p in pool_stages)

    @property
    def reduction(self) -> int:
        return 2 ** sum(self.pool_stages)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 4:  # static image: encode once, repeat over T
            y = self.proj(x.unsqueeze(0))
            y = y.expand(self.time_steps, *y.shape[1:])
        else:
            y = self.proj(x)
        for stage in self.stages:
            y = stage(y)
        return y.flatten(3).transpose(-1, -2)  # [T, B, N, D]
