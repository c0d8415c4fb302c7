"""A2OS2A spiking transformers (Guo et al., CVPR 2025): the Spikformer-like backbone of
:class:`~bestformer.models.SpikingTransformer` with the addition-only attention
(:mod:`bestformer.layers.a2os2a`).

The paper's: the attention (binary Q, ReLU K, ternary V, no softmax, no scale), a Spikformer-like
backbone, the sizes 2-384 and 2-512 on CIFAR (reported 95.70 and 96.42 % on CIFAR-10, from third-party
notes). Ours, where the method section was not available: the backbone is this library's spiking stem
(full-precision ``PatchSplitting``) with standard residuals and one head, full-precision weights, LIF
neurons, 8 heads, MLP ratio 4, ``T = 4``; ``a2os2a_tiny`` (D = 64, one block, 4 heads, MNIST-sized) is ours.
``attention="a2os2a_lif"`` swaps V's ternary neuron for the LIF form.
"""

from __future__ import annotations

from typing import Any

from ._registry import InputConfig, register_family
from .spiking_transformer import SpikingTransformer

_CIFAR10 = InputConfig(32, 3, 10, 4, "cifar10")
_SIZES: dict[str, tuple[dict[str, Any], InputConfig]] = {
    "tiny": (dict(embed_dim=64, depth=1, num_heads=4), InputConfig(28, 1, 10, 4, "mnist")),
    "2_384": (dict(embed_dim=384, depth=2, num_heads=8), _CIFAR10),
    "2_512": (dict(embed_dim=512, depth=2, num_heads=8), _CIFAR10),
}
_FAMILY = dict(attention="a2os2a", weight_bits=32, reversible=False, distill_head=False, neuron="lif")

register_family(SpikingTransformer, "a2os2a", _SIZES, _FAMILY, title="A2OS2A")
