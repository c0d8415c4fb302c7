"""Building blocks shared by every model: quantized projections with BatchNorm over time-first tensors."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..quant import QuantConv2d, QuantLinear, bits_to_quantizer


class LinearBN(nn.Module):
    """``(quantized) Linear -> BatchNorm`` on tokens ``[T, B, N, C]`` (the reference's Conv1d-1x1 + BN1d:
    the same parameters, statistics over ``T * B * N``)."""

    def __init__(self, in_features: int, out_features: int, weight_bits: int | str | None = 1,
                 bias: bool = False) -> None:
        super().__init__()
        self.linear = QuantLinear(in_features, out_features, bias=bias,
                                  weight_quantizer=bits_to_quantizer(weight_bits))
        self.bn = nn.BatchNorm1d(out_features)

    def forward(self, x: Tensor) -> Tensor:
        y = self.linear(x)
        return self.bn(y.reshape(-1, y.shape[-1])).view_as(y)


class ConvBN(nn.Module):
    """``(quantized) Conv2d 3x3 -> BatchNorm2d`` applied to every time step of ``[T, B, C, H, W]``."""

    def __init__(self, in_channels: int, out_channels: int, weight_bits: int | str | None = 1,
                 kernel_size: int = 3, **conv_kw: Any) -> None:
        super().__init__()
        self.conv = QuantConv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False,
                                weight_quantizer=bits_to_quantizer(weight_bits), **conv_kw)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-3]
        y = self.bn(self.conv(x.flatten(0, len(lead) - 1)))
        return y.view(*lead, *y.shape[1:])


class TimeMaxPool2d(nn.MaxPool2d):
    """``MaxPool2d(3, 2, 1)`` (the reference's stem pooling) over every step of ``[T, B, C, H, W]``."""

    def __init__(self) -> None:
        super().__init__(kernel_size=3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x.flatten(0, 1))
        return y.view(*x.shape[:2], *y.shape[1:])
