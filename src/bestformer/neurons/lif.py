"""Multi-step LIF neuron module: a thin wrapper over the functional core (no hidden state)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..errors import InputError
from .backend import get_impl
from .functional import LIFParameters, LIFState
from .surrogate import Surrogate, get_surrogate


class LIF(nn.Module):
    """Leaky integrate-and-fire neurons over a time-first tensor ``[T, B, ...]`` (Eq. 1-4, Eq. 9).

    State lives only inside one call: each forward starts at rest (or from ``state``), so no
    ``reset_net`` is needed between batches.

    Args:
        tau: membrane time constant (the reference: 2.0).
        v_threshold: firing threshold (1.0; 0.5 for the attention output neuron of the reference).
        reset: ``"hard"`` (HR-LIF, Eq. 4) or ``"soft"`` (SR-LIF, Eq. 9: subtract the threshold).
        v_reset: reset potential of the hard reset.
        decay_input: reference charge ``H = V + (X - (V - v_reset))/tau`` (True) or Eq. 1 (False).
        detach_reset: stop the gradient through the reset.
        surrogate: pseudo-gradient of the firing step (default ``Sigmoid(alpha=4)``).
        backend: ``"plain"`` / ``"fused"`` for this module; ``None`` follows :func:`~bestformer.neurons.use_backend`
            (:mod:`~bestformer.neurons.backend`).
    """

    def __init__(
        self,
        tau: float = 2.0,
        v_threshold: float = 1.0,
        reset: str = "hard",
        v_reset: float = 0.0,
        decay_input: bool = True,
        detach_reset: bool = True,
        surrogate: Surrogate | str | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.params = LIFParameters(
            float(tau), float(v_threshold), float(v_reset), reset, bool(decay_input), bool(detach_reset)
        ).validate()
        self.surrogate = get_surrogate(surrogate)
        if backend is not None:
            get_impl(backend)  # validate early
        self.backend = backend

    @property
    def v_threshold(self) -> float:
        return self.params.v_threshold

    @property
    def reset(self) -> str:
        return self.params.reset

    def forward(
        self, x: Tensor, state: LIFState | None = None, return_state: bool = False
    ) -> Tensor | tuple[Tensor, LIFState]:
        if x.dim() < 2:
            raise InputError(f"LIF expects a time-first tensor [T, B, ...], got shape {tuple(x.shape)}")
        spikes, final = get_impl(self.backend)(x, self.params, self.surrogate, state)
        return (spikes, final) if return_state else spikes

    def config(self) -> dict[str, Any]:
        return {**self.params._asdict(), "surrogate": self.surrogate.config()}

    def extra_repr(self) -> str:
        p = self.params
        return (
            f"tau={p.tau:g}, v_threshold={p.v_threshold:g}, reset={p.reset}, decay_input={p.decay_input}, "
            f"surrogate={self.surrogate!r}"
        )
