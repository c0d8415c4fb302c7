"""Spiking neurons: functional core, surrogate gradients, multi-step modules and backend choice."""

from .backend import get_backend, register_backend, set_backend, supported_backends, use_backend
from .functional import LIFParameters, LIFState, lif_multistep, lif_step, run_multistep
from .integrate_fire import IFNeuron, if_neuron
from .lif import LIF
from .multilevel import IELIF, IELIFParameters, Rectify, ielif_multistep, ielif_step, to_spike_train
from .registry import ReLUNeuron, get_neuron, is_spiking_neuron, neuron_option_names, register_neuron
from .surrogate import ATan, Sigmoid, Surrogate, get_surrogate
from .ternary import TernaryNeuron, TernaryParameters, ternary_multistep, ternary_step

register_neuron("ielif", IELIF)
register_neuron("ternary", TernaryNeuron)

__all__ = [
    "IELIF",
    "LIF",
    "ATan",
    "IELIFParameters",
    "IFNeuron",
    "LIFParameters",
    "LIFState",
    "ReLUNeuron",
    "Rectify",
    "Sigmoid",
    "Surrogate",
    "TernaryNeuron",
    "TernaryParameters",
    "get_backend",
    "get_neuron",
    "get_surrogate",
    "ielif_multistep",
    "ielif_step",
    "if_neuron",
    "is_spiking_neuron",
    "lif_multistep",
    "lif_step",
    "neuron_option_names",
    "register_backend",
    "register_neuron",
    "run_multistep",
    "set_backend",
    "supported_backends",
    "ternary_multistep",
    "ternary_step",
    "to_spike_train",
    "use_backend",
]
