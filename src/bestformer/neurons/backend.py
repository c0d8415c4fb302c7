"""Choice of the implementation that runs multi-step LIF neurons (SpikingJelly's ``backend``).

``"plain"`` is the pure-torch reference (:func:`~bestformer.neurons.functional.lif_multistep`), one autograd node
per operation and step. ``"fused"`` (the default) is :func:`~bestformer.neurons.kernels.fused_lif_multistep`: one
autograd node for all steps, Triton on CUDA, numba on CPU, identical spikes and gradients equal to float rounding.
Other implementations register themselves with :func:`register_backend` and must agree with the plain path (tests
check).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from ..errors import check_choice
from .functional import LIFParameters, LIFState, lif_multistep
from .kernels import fused_lif_multistep
from .surrogate import Surrogate

#: ``impl(x, params, surrogate, state) -> (spikes, final_state)``
LIFImpl = Callable[[Tensor, LIFParameters, Surrogate, "LIFState | None"], tuple[Tensor, LIFState]]

_BACKENDS: dict[str, LIFImpl] = {"plain": lif_multistep, "fused": fused_lif_multistep}
_current = "fused"


def register_backend(name: str, impl: LIFImpl) -> None:
    """Make ``impl`` selectable as ``set_backend(name)``."""
    _BACKENDS[name] = impl


def supported_backends() -> tuple[str, ...]:
    return tuple(_BACKENDS)


def set_backend(name: str) -> None:
    """Select the implementation used by every :class:`~bestformer.neurons.LIF` whose ``backend`` is None."""
    global _current
    _current = check_choice("neuron backend", name, _BACKENDS)


def get_backend() -> str:
    return _current


def get_impl(name: str | None = None) -> LIFImpl:
    """The implementation for ``name`` (the global choice when ``None``)."""
    return _BACKENDS[check_choice("neuron backend", name or _current, _BACKENDS)]
