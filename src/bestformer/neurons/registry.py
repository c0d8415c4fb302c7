"""Neuron factory: blocks take a ``neuron_layer`` given as a name or a class (timm's ``get_act_layer``)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

from ..errors import check_choice
from .lif import LIF


class ReLUNeuron(nn.ReLU):
    """The ANN counterpart of a spiking neuron (``ann_*`` models): ReLU, ignoring neuron options."""

    def __init__(self, **_: object) -> None:
        super().__init__()


_NEURONS: dict[str, Callable[..., nn.Module]] = {"lif": LIF, "relu": ReLUNeuron}


def register_neuron(name: str, factory: Callable[..., nn.Module]) -> None:
    """Make a neuron selectable by name in every model (``neuron="name"``)."""
    _NEURONS[name] = factory


def get_neuron(spec: str | Callable[..., nn.Module], **defaults: object) -> Callable[..., nn.Module]:
    """Resolve ``spec`` to a factory ``f(**kwargs) -> nn.Module`` with ``defaults`` pre-bound."""
    factory = _NEURONS[check_choice("neuron", spec, _NEURONS)] if isinstance(spec, str) else spec
    return partial(factory, **defaults) if defaults else factory
