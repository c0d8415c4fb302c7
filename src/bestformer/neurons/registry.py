"""Neuron factory: blocks take a ``neuron_layer`` given as a name or a class (timm's ``get_act_layer``)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial

from torch import nn

from ..errors import ConfigError, check_choice, close_matches
from .lif import LIF


class ReLUNeuron(nn.ReLU):
    """The ANN counterpart of a spiking neuron (``ann_*`` models): a ReLU.

    Blocks pass the options of the spiking neuron they stand for (``v_threshold=``, ``reset=``, ``amplitude=``, ...)
    and a model's ``neuron_kwargs`` are shared with its spiking twin, so it accepts and ignores the option names of
    every registered spiking neuron; any other name is a mistake and raises :class:`~bestformer.errors.ConfigError`.
    """

    def __init__(self, **options: object) -> None:
        super().__init__()
        known = sorted(spiking_neuron_options()) if options else []
        for key in options:
            if key not in known:
                raise ConfigError(f"neuron 'relu' has no option {key!r}{close_matches(key, known)}; it takes (and "
                                  f"ignores) the spiking neurons' options: {', '.join(sorted(known))}")


_NEURONS: dict[str, Callable[..., nn.Module]] = {"lif": LIF, "relu": ReLUNeuron}


def is_spiking_neuron(module: nn.Module) -> bool:
    """A module that follows the neuron contract (``forward(x, state=None, return_state=False)``: LIF, IE-LIF,
    ternary); ReLU layers of ANN counterparts do not."""
    try:
        return "return_state" in inspect.signature(type(module).forward).parameters
    except (TypeError, ValueError):
        return False


def register_neuron(name: str, factory: Callable[..., nn.Module]) -> None:
    """Make a neuron selectable by name in every model (``neuron="name"``)."""
    _NEURONS[name] = factory


def get_neuron(spec: str | Callable[..., nn.Module], **defaults: object) -> Callable[..., nn.Module]:
    """Resolve ``spec`` to a factory ``f(**kwargs) -> nn.Module`` with ``defaults`` pre-bound."""
    factory = _NEURONS[check_choice("neuron", spec, _NEURONS)] if isinstance(spec, str) else spec
    return partial(factory, **defaults) if defaults else factory


def _keyword_options(factory: Callable[..., nn.Module]) -> tuple[set[str], bool]:
    """The keyword options ``factory``'s signature names, and whether it takes ``**kwargs`` too (an unreadable
    signature names none and takes any)."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return set(), True
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


def neuron_option_names(spec: str) -> set[str] | None:
    """The keyword options the neuron registered as ``spec`` takes (``None``: not known, or it takes any)."""
    if spec not in _NEURONS:
        return None
    names, any_more = _keyword_options(_NEURONS[spec])
    return None if any_more else names


def spiking_neuron_options() -> set[str]:
    """The keyword options of every registered neuron factory other than ReLU (read from their signatures)."""
    return set().union(*(_keyword_options(f)[0] for f in _NEURONS.values() if f is not ReLUNeuron))
