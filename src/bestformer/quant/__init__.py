"""Quantization: weight quantizers and the layers that use them, quantized activations, and the
straight-through estimators behind them (the bottom layer: it imports no other bestformer package but errors)."""

from .activation import QuantNReLU, QuantReLU
from .layers import (
    BinaryConv1d,
    BinaryConv2d,
    BinaryLinear,
    QuantConv1d,
    QuantConv2d,
    QuantLinear,
    QuantMixin,
    weight_bits_of,
)
from .quantizers import LSQQuantizer, Quantizer, SignBinarizer, bits_to_quantizer, get_weight_quantizer
from .ste import STE, straight_through

__all__ = [
    "STE",
    "BinaryConv1d",
    "BinaryConv2d",
    "BinaryLinear",
    "LSQQuantizer",
    "QuantConv1d",
    "QuantConv2d",
    "QuantLinear",
    "QuantMixin",
    "QuantNReLU",
    "QuantReLU",
    "Quantizer",
    "SignBinarizer",
    "bits_to_quantizer",
    "get_weight_quantizer",
    "straight_through",
    "weight_bits_of",
]
