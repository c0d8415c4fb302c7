"""Quantized layers: the stock torch layer plus a ``weight_quantizer`` (larq's pattern).

With ``weight_quantizer=None`` a layer is exactly its full-precision torch counterpart. Every layer
says its bit-width (:attr:`weight_bits`), which size, energy and export tooling read.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from .quantizers import Quantizer, get_weight_quantizer


class QuantMixin:
    """Shared behaviour of quantized layers: ``weight_bits`` and the quantized weight."""

    weight: nn.Parameter
    weight_quantizer: Quantizer | None

    def _init_quantizer(self, spec: str | int | Quantizer | None) -> None:
        self.weight_quantizer = get_weight_quantizer(spec, self.weight.detach())

    @property
    def weight_bits(self) -> int:
        """Bits per stored weight: the quantizer's precision, 32 for full precision."""
        return self.weight_quantizer.precision if self.weight_quantizer is not None else 32

    def quantized_weight(self) -> Tensor:
        """The weight used in forward: quantized with its pseudo-gradient, or the latent weight."""
        q = self.weight_quantizer
        return self.weight if q is None else q(self.weight)


class QuantLinear(QuantMixin, nn.Linear):
    """``nn.Linear`` with an optional weight quantizer."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, weight_quantizer: Any = None, **kw: Any
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, **kw)
        self._init_quantizer(weight_quantizer)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.quantized_weight(), self.bias)


class _QuantConv(QuantMixin):
    """A torch convolution (the next base class) with an optional weight quantizer."""

    _conv_forward: Any  # nn.Conv1d / nn.Conv2d's
    bias: Tensor | None

    def __init__(self, *args: Any, weight_quantizer: Any = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._init_quantizer(weight_quantizer)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.quantized_weight(), self.bias)


class QuantConv2d(_QuantConv, nn.Conv2d):
    """``nn.Conv2d`` with an optional weight quantizer."""


class QuantConv1d(_QuantConv, nn.Conv1d):
    """``nn.Conv1d`` with an optional weight quantizer."""


class BinaryLinear(QuantLinear):
    """1-bit ``Linear`` (Eq. 5-6); no bias by default, as every binary layer of the reference."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, **kw: Any) -> None:
        super().__init__(in_features, out_features, bias=bias, weight_quantizer="binary", **kw)


class BinaryConv2d(QuantConv2d):
    """1-bit ``Conv2d`` (Eq. 5-6); no bias by default."""

    def __init__(self, *args: Any, bias: bool = False, **kw: Any) -> None:
        super().__init__(*args, bias=bias, weight_quantizer="binary", **kw)


class BinaryConv1d(QuantConv1d):
    """1-bit ``Conv1d`` (Eq. 5-6); no bias by default."""

    def __init__(self, *args: Any, bias: bool = False, **kw: Any) -> None:
        super().__init__(*args, bias=bias, weight_quantizer="binary", **kw)


def weight_bits_of(module: nn.Module) -> int | None:
    """Bits per weight of a layer with weights (32 for plain torch layers), ``None`` if it has none."""
    if isinstance(module, QuantMixin):
        return module.weight_bits
    if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return 32
    return None
