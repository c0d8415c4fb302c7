"""What a fused LIF kernel needs to know: the neuron's parameters and which surrogate it back-propagates."""

from __future__ import annotations

from typing import NamedTuple

from ..functional import LIFParameters
from ..surrogate import ATan, Sigmoid, Surrogate

#: surrogate codes understood by the compiled kernels; GENERIC means "derivative computed by torch and passed in"
GENERIC, SIGMOID, ATAN = 0, 1, 2


class KernelSpec(NamedTuple):
    """A LIF population as the kernels see it.

    Attributes:
        params: the neuron's :class:`~bestformer.neurons.LIFParameters`.
        surrogate: ``SIGMOID`` / ``ATAN`` (the kernel evaluates the derivative itself) or ``GENERIC`` (any other
            :class:`~bestformer.neurons.Surrogate`: its ``derivative`` runs in torch and the kernel reads the result).
        alpha: the surrogate's sharpness.
    """

    params: LIFParameters
    surrogate: int
    alpha: float


def kernel_spec(params: LIFParameters, surrogate: Surrogate) -> KernelSpec:
    """The kernel description of ``params`` and ``surrogate`` (exact types only: a subclass may override
    ``derivative``, so it takes the generic route)."""
    code = {Sigmoid: SIGMOID, ATan: ATAN}.get(type(surrogate), GENERIC)
    return KernelSpec(params, code, surrogate.alpha)
