"""Weight quantization: quantizer objects and the layers that use them."""

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
from .quantizers import LSQQuantizer, Quantizer, SignBinarizer, get_weight_quantizer

__all__ = [
    "BinaryConv1d",
    "BinaryConv2d",
    "BinaryLinear",
    "LSQQuantizer",
    "QuantConv1d",
    "QuantConv2d",
    "QuantLinear",
    "QuantMixin",
    "Quantizer",
    "SignBinarizer",
    "get_weight_quantizer",
    "weight_bits_of",
]
