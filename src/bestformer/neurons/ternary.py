"""Ternary spiking neuron {-1, 0, +1} (the V branch of A2OS2A; Guo et al., CVPR 2025).

The A2OS2A paper says only that V uses ternary spiking neurons. Two forms are known, both offered here
(``variant=``):

- ``"ternary_spike"`` (default): the Ternary Spike neuron of the same first author (Guo et al., AAAI 2024,
  official code). Charge ``u[t] = 0.25 u[t-1] + x[t]``; fire ``s = sign(u)`` where ``|u| / V_th >= 0.5``,
  else 0; hard reset ``u <- u (1 - |s|)``; straight-through gradient through ``clamp(u / V_th, -1, 1)``.
  It is the default because it is the published neuron of the paper's own group, the most likely one in
  A2OS2A.
- ``"lif"``: the LIF charge of the rest of the library (``tau = 2``, the reference's decay-input form)
  with two thresholds ``+-V_th`` and the LIF surrogate gradient on both (a third-party re-implementation).

An optional learnable amplitude ``a`` (Ternary Spike's "trainable amplitude") makes the output
``{-a, 0, a}``; it is one scalar per layer and folds into the next layer's weights at deployment, so the
synaptic operations stay additions and subtractions.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..errors import ConfigError, InputError, check_choice
from ..quant.ste import TernarySTE
from .functional import LIFParameters, lif_charge, run_multistep
from .surrogate import Surrogate, get_surrogate

VARIANTS = ("ternary_spike", "lif")
#: variant -> (membrane time constant tau, decay_input, firing threshold as a fraction of V_th); ternary_spike
#: charges in BESTformer Eq. 1's form without input decay, lif in the decay-input form of the reference code
_VARIANT_DEFAULTS: dict[str, tuple[float, bool, float]] = {
    "ternary_spike": (4.0 / 3.0, False, 0.5),  # beta = 1 - 1/tau = 0.25: u <- 0.25 u + x
    "lif": (2.0, True, 1.0),
}


class TernaryParameters(NamedTuple):
    """Parameters of the ternary neuron.

    Attributes:
        variant: ``"ternary_spike"`` or ``"lif"`` (module docstring).
        tau: membrane time constant; ``None`` takes the variant's (4/3, i.e. decay 0.25, or 2).
        v_threshold: ``V_th``; the neuron fires at ``|u| >= 0.5 V_th`` (ternary_spike) or ``|u| >= V_th`` (lif).
        reset: ``"hard"`` (``u <- u (1 - |s|)``) or ``"soft"`` (``u <- u - theta s``, theta the firing level).
        detach_reset: no gradient through the reset.
    """

    variant: str = "ternary_spike"
    tau: float | None = None
    v_threshold: float = 1.0
    reset: str = "hard"
    detach_reset: bool = True

    def validate(self) -> TernaryParameters:
        check_choice("ternary neuron variant", self.variant, VARIANTS)
        check_choice("ternary neuron reset", self.reset, ("hard", "soft"))
        self.lif().validate()  # tau > 1, 0 < v_threshold < inf
        return self

    def lif(self) -> LIFParameters:
        """The charge of this variant as LIF parameters (reused: :func:`~bestformer.neurons.functional.lif_charge`)."""
        tau, decay_input, _ = _VARIANT_DEFAULTS[self.variant]
        return LIFParameters(tau=tau if self.tau is None else float(self.tau), v_threshold=self.v_threshold,
                             decay_input=decay_input)

    @property
    def theta(self) -> float:
        """The firing level: ``|u| >= theta`` emits ``sign(u)``."""
        return _VARIANT_DEFAULTS[self.variant][2] * self.v_threshold


class TernaryState(NamedTuple):
    """Membrane potential after a step."""

    v: Tensor


def ternary_fire(h: Tensor, p: TernaryParameters, surrogate: Surrogate) -> Tensor:
    """``s = sign(h) 1[|h| >= theta]`` in {-1, 0, 1} with the variant's pseudo-gradient.

    ternary_spike: ``ds/dh = 1[|h| <= V_th] / V_th`` (straight through ``clamp(h / V_th, -1, 1)``);
    lif: ``s = H(h - theta) - H(-h - theta)`` with the surrogate on both steps.
    """
    if p.variant == "lif":
        return surrogate(h - p.theta) - surrogate(-h - p.theta)
    return TernarySTE(p.v_threshold, p.theta)(h)


def ternary_step(x: Tensor, state: TernaryState, p: TernaryParameters,
                 surrogate: Surrogate) -> tuple[Tensor, TernaryState]:
    """One step: charge (the variant's LIF form), fire (:func:`ternary_fire`), reset."""
    h = lif_charge(x, state.v, p.lif())
    s = ternary_fire(h, p, surrogate)
    r = s.detach() if p.detach_reset else s
    v = h * (1.0 - r.abs()) if p.reset == "hard" else h - p.theta * r
    return s, TernaryState(v)


def ternary_multistep(x: Tensor, p: TernaryParameters, surrogate: Surrogate,
                      state: TernaryState | None = None) -> tuple[Tensor, TernaryState]:
    """Run :func:`ternary_step` over the leading time axis of ``x`` (``[T, ...]``) from rest (or ``state``)."""
    return run_multistep(lambda st, x_t: ternary_step(x_t, st, p, surrogate), x, state,
                         lambda x0: TernaryState(torch.zeros_like(x0)), "ternary neuron")


class TernaryNeuron(nn.Module):
    """Multi-step ternary spiking neurons over ``[T, B, ...]`` with no hidden state between calls.

    Args:
        variant: ``"ternary_spike"`` (default, Guo et al. AAAI 2024) or ``"lif"`` (module docstring).
        v_threshold: ``V_th`` (1.0).
        tau: membrane time constant; ``None`` takes the variant's.
        reset: ``"hard"`` (both known forms) or ``"soft"``.
        detach_reset: stop the gradient through the reset.
        learnable_amplitude: output ``{-a, 0, a}`` with a learnable scalar ``a`` (initialised to 1).
        surrogate: pseudo-gradient of the ``"lif"`` variant (default ``Sigmoid(alpha=4)``).
    """

    def __init__(self, variant: str = "ternary_spike", v_threshold: float = 1.0, tau: float | None = None,
                 reset: str = "hard", detach_reset: bool = True, learnable_amplitude: bool = False,
                 surrogate: Surrogate | str | None = None) -> None:
        super().__init__()
        self.params = TernaryParameters(variant, tau, float(v_threshold), reset, bool(detach_reset)).validate()
        if surrogate is not None and variant != "lif":
            raise ConfigError(f"a surrogate applies to the 'lif' ternary variant only; {variant!r} uses the "
                              "straight-through clamp gradient")
        self.surrogate = get_surrogate(surrogate)
        self.amplitude = nn.Parameter(torch.ones(())) if learnable_amplitude else None

    def forward(self, x: Tensor, state: TernaryState | None = None,
                return_state: bool = False) -> Tensor | tuple[Tensor, TernaryState]:
        if x.dim() < 2:
            raise InputError(f"ternary neuron expects a time-first tensor [T, B, ...], got shape {tuple(x.shape)}")
        s, final = ternary_multistep(x, self.params, self.surrogate, state)
        if self.amplitude is not None:
            s = s * self.amplitude
        return (s, final) if return_state else s

    def config(self) -> dict[str, Any]:
        return {**self.params._asdict(), "learnable_amplitude": self.amplitude is not None}

    def extra_repr(self) -> str:
        p = self.params
        return (f"variant={p.variant}, v_threshold={p.v_threshold:g}, tau={p.lif().tau:g}, reset={p.reset}, "
                f"learnable_amplitude={self.amplitude is not None}")
