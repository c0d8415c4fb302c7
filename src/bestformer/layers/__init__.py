"""Layers the models are built from: stem, attention forms, MLP and encoder blocks, and the cross-rank BatchNorm."""

from .a2os2a import A2OS2A
from .attention import SpikingSelfAttention, get_attention, merge_heads, register_attention, split_heads
from .basic import ConvBN, LinearBN, TimeMaxPool2d
from .blocks import ResidualBlock, ReversibleBlock
from .deploy_form import FoldedConv2d, deployment_form, has_deploy_form
from .mlp import SpikingMLP
from .norm import DistributedBatchNorm, convert_distributed_batchnorm
from .qsd import QSDSA, ConvBlock, QSDBlock, RepConvBN, SepConv
from .stem import PatchSplitting, auto_pool_stages

__all__ = [
    "A2OS2A",
    "QSDSA",
    "ConvBN",
    "ConvBlock",
    "DistributedBatchNorm",
    "FoldedConv2d",
    "LinearBN",
    "PatchSplitting",
    "QSDBlock",
    "RepConvBN",
    "ResidualBlock",
    "ReversibleBlock",
    "SepConv",
    "SpikingMLP",
    "SpikingSelfAttention",
    "TimeMaxPool2d",
    "auto_pool_stages",
    "convert_distributed_batchnorm",
    "deployment_form",
    "get_attention",
    "has_deploy_form",
    "merge_heads",
    "register_attention",
    "split_heads",
]
