"""Choice of the implementation that runs multi-step LIF neurons (SpikingJelly's ``backend``).

``"plain"`` is the pure-torch reference (:func:`~bestformer.neurons.functional.lif_multistep`), one autograd node
per operation and step. ``"fused"`` (the default) is :func:`~bestformer.neurons.kernels.fused_lif_multistep`: one
autograd node for all steps, Triton on CUDA, numba on CPU, identical spikes and gradients equal to float rounding.
Other implementations register themselves with :func:`register_backend` and must agree with the plain path (tests
check).

Which one runs, first match wins: the neuron's own ``backend`` (``LIF(backend="plain")``); the innermost
``with use_backend(name):`` block around the call (a context variable: it holds for this thread or task only and
ends with the block); the process-wide default, ``"fused"`` unless changed with the deprecated :func:`set_backend`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from torch import Tensor

from ..errors import check_choice
from .functional import LIFParameters, LIFState, lif_multistep
from .kernels import fused_lif_multistep
from .surrogate import Surrogate

#: ``impl(x, params, surrogate, state) -> (spikes, final_state)``
LIFImpl = Callable[[Tensor, LIFParameters, Surrogate, "LIFState | None"], tuple[Tensor, LIFState]]

_BACKENDS: dict[str, LIFImpl] = {"plain": lif_multistep, "fused": fused_lif_multistep}
_default = "fused"
_scoped: ContextVar[str | None] = ContextVar("bestformer_neuron_backend", default=None)


def register_backend(name: str, impl: LIFImpl) -> None:
    """Make ``impl`` selectable by name (``use_backend(name)``, ``LIF(backend=name)``)."""
    _BACKENDS[name] = impl


def supported_backends() -> tuple[str, ...]:
    return tuple(_BACKENDS)


@contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Run every :class:`~bestformer.neurons.LIF` whose ``backend`` is None with ``name`` inside the block::

        with use_backend("plain"):  # e.g. for an exporter that cannot trace the compiled kernels
            model(x)
    """
    token = _scoped.set(check_choice("neuron backend", name, _BACKENDS))
    try:
        yield name
    finally:
        _scoped.reset(token)


def set_backend(name: str) -> None:
    """Deprecated: change the process-wide default backend; prefer ``with use_backend(name):`` or
    ``LIF(backend=name)``, which leave no global behind."""
    global _default
    _default = check_choice("neuron backend", name, _BACKENDS)


def get_backend() -> str:
    """The backend a LIF with ``backend=None`` uses here: the innermost :func:`use_backend`, else the default."""
    return _scoped.get() or _default


def get_impl(name: str | None = None) -> LIFImpl:
    """The implementation for ``name`` (:func:`get_backend`'s choice when ``None``)."""
    return _BACKENDS[check_choice("neuron backend", name or get_backend(), _BACKENDS)]
