"""Layers the models are built from: stem, attention forms, MLP and encoder blocks."""

from .attention import SpikingSelfAttention, get_attention, merge_heads, register_attention, split_heads
from .basic import ConvBN, LinearBN, TimeMaxPool2d
from .blocks import ResidualBlock, ReversibleBlock
from .mlp import SpikingMLP
from .stem import PatchSplitting, auto_pool_stages

__all__ = [
    "ConvBN",
    "LinearBN",
    "PatchSplitting",
    "ResidualBlock",
    "ReversibleBlock",
    "SpikingMLP",
    "SpikingSelfAttention",
    "TimeMaxPool2d",
    "auto_pool_stages",
    "get_attention",
    "merge_heads",
    "register_attention",
    "split_heads",
]
