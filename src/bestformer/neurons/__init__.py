"""Spiking neurons: functional core, surrogate gradients, multi-step modules and backend choice."""

from .backend import get_backend, register_backend, set_backend, supported_backends
from .functional import LIFParameters, LIFState, lif_multistep, lif_step
from .lif import LIF
from .registry import get_neuron, register_neuron
from .surrogate import ATan, Sigmoid, Surrogate, get_surrogate

__all__ = [
    "LIF",
    "ATan",
    "LIFParameters",
    "LIFState",
    "Sigmoid",
    "Surrogate",
    "get_backend",
    "get_neuron",
    "get_surrogate",
    "lif_multistep",
    "lif_step",
    "register_backend",
    "register_neuron",
    "set_backend",
    "supported_backends",
]
