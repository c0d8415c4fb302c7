"""Fused multi-step LIF kernels (the ``"fused"`` neuron backend): Triton on CUDA, numba on CPU, a tensor-operation
fallback elsewhere, all checked against the plain path :func:`~bestformer.neurons.functional.lif_multistep`."""

from .fused import FusedLIFFunction, fused_lif_multistep, select_engine
from .spec import KernelSpec, kernel_spec

__all__ = ["FusedLIFFunction", "KernelSpec", "fused_lif_multistep", "kernel_spec", "select_engine"]
