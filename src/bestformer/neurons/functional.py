"""Functional core of the spiking neurons: pure step functions with explicit state (Norse style).

Tensors are time-first, ``[T, B, ...]``. Nothing here keeps state between calls: a multi-step call starts
from ``v_reset`` (or a given state) and returns the final state, so streaming inference can carry it.
Every neuron's multi-step form (LIF, IE-LIF, ternary, IF) is its one-step update run by :func:`run_multistep`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple, TypeVar

import torch
from torch import Tensor

from ..errors import ConfigError, InputError
from .surrogate import Surrogate

S = TypeVar("S")


def check_time_first(x: Tensor, neuron: str) -> None:
    """Multi-step neurons take a time-first tensor ``[T, ...]`` with at least one step."""
    if x.dim() < 1 or x.shape[0] < 1:
        raise InputError(f"{neuron} expects a time-first tensor [T, ...] with T >= 1, got shape {tuple(x.shape)}")


def run_multistep(step: Callable[[S, Tensor], tuple[Tensor, S]], x: Tensor, state: S | None,
                  rest: Callable[[Tensor], S], neuron: str) -> tuple[Tensor, S]:
    """The one time loop of every neuron: ``s[t], state = step(state, x[t])`` over the leading axis of ``x``.

    ``state=None`` starts from ``rest(x[0])``. Returns the stacked outputs ``[T, ...]`` and the final state.
    Unrolled in Python, one autograd node per operation and step (the fused kernels replace it for LIF).
    """
    check_time_first(x, neuron)
    state = rest(x[0]) if state is None else state
    out = []
    for t in range(x.shape[0]):
        s, state = step(state, x[t])
        out.append(s)
    return torch.stack(out), state


class LIFParameters(NamedTuple):
    """Parameters of the leaky integrate-and-fire neuron.

    Attributes:
        tau: membrane time constant (> 1, or ``inf`` for a non-leaky IF neuron with ``decay_input=False``).
        v_threshold: firing threshold ``V_th``.
        v_reset: reset potential of the hard reset (and the resting potential of the leak).
        reset: ``"hard"`` (Eq. 4: back to ``v_reset``) or ``"soft"`` (subtract ``V_th``, the SR-LIF of Eq. 9).
        decay_input: ``True``: the reference code's charge ``H = V + (X - (V - v_reset)) / tau``;
            ``False``: the paper's Eq. 1, ``H = beta (V - v_reset) + v_reset + X`` with ``beta = 1 - 1/tau``
            (``tau = 2`` gives the paper's decay factor 0.5).
        detach_reset: no gradient through the reset term (the reference's ``detach_reset=True``).
    """

    tau: float = 2.0
    v_threshold: float = 1.0
    v_reset: float = 0.0
    reset: str = "hard"
    decay_input: bool = True
    detach_reset: bool = True

    @property
    def beta(self) -> float:
        """Decay factor of Eq. 1 (``1 - 1/tau``)."""
        return 1.0 - 1.0 / self.tau

    def validate(self) -> LIFParameters:
        if not (self.tau > 1.0 or (math.isinf(self.tau) and self.tau > 0)):
            raise ConfigError(f"LIF tau must be > 1 (or inf for IF), got {self.tau!r}")
        if math.isinf(self.tau) and self.decay_input:
            raise ConfigError("LIF tau=inf (an IF neuron) needs decay_input=False; got decay_input=True")
        if self.reset not in ("hard", "soft"):
            raise ConfigError(f"LIF reset must be 'hard' or 'soft', got {self.reset!r}")
        if not math.isfinite(self.v_threshold) or self.v_threshold <= self.v_reset:
            raise ConfigError(
                f"LIF v_threshold must be finite and above v_reset={self.v_reset}, got {self.v_threshold!r}"
            )
        return self


class LIFState(NamedTuple):
    """State of a LIF population after a step: the membrane potential ``V``."""

    v: Tensor


def lif_charge(x: Tensor, v: Tensor, p: LIFParameters) -> Tensor:
    """Charge (Eq. 1 / the reference's decay_input form): the membrane ``H[t]`` before firing."""
    if p.decay_input:
        return v + (x - (v - p.v_reset)) / p.tau
    if p.v_reset == 0.0:
        return p.beta * v + x
    return p.beta * (v - p.v_reset) + p.v_reset + x


def lif_reset(h: Tensor, s: Tensor, p: LIFParameters) -> Tensor:
    """Reset after firing: Eq. 4 (hard) or ``V = H - V_th S`` (soft, Eq. 9's SR-LIF)."""
    if p.detach_reset:
        s = s.detach()
    if p.reset == "hard":
        return h * (1.0 - s) + p.v_reset * s
    return h - p.v_threshold * s


def lif_step(x: Tensor, state: LIFState, p: LIFParameters, surrogate: Surrogate) -> tuple[Tensor, LIFState]:
    """One time step: charge (Eq. 1), fire (Eq. 3) with the surrogate gradient, reset (Eq. 4 or soft)."""
    h = lif_charge(x, state.v, p)
    s = surrogate(h - p.v_threshold)
    return s, LIFState(lif_reset(h, s, p))


def initial_state(x_t: Tensor, p: LIFParameters) -> LIFState:
    """The resting state ``V = v_reset`` shaped like one time step of ``x``."""
    return LIFState(torch.full_like(x_t, p.v_reset))


def lif_multistep(
    x: Tensor, p: LIFParameters, surrogate: Surrogate, state: LIFState | None = None
) -> tuple[Tensor, LIFState]:
    """Run :func:`lif_step` over the leading time axis of ``x`` (``[T, ...]``); return spikes and final state.

    This is the plain reference path: one autograd node per step. Fused backends must match it.
    """
    return run_multistep(lambda st, x_t: lif_step(x_t, st, p, surrogate), x, state,
                         lambda x0: initial_state(x0, p), "LIF")
