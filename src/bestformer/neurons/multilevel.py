"""IE-LIF: the multi-level ("information-enhanced") spiking neuron of QSD-Transformer (Li et al., ICLR 2025).

Training form (the authors' code): a spike carries one of ``D + 1`` levels,
``s = floor(clamp(D h / V_th, 0, D) + 1/2) / D`` (``D = 4``: 0, .25, .5, .75, 1), with a straight-through
gradient ``ds/dh = 1 / V_th`` where ``0 < D h / V_th < D``.

Inference form (the paper's "4-1-4"): a level ``k`` is emitted as ``k`` binary spikes over ``D`` virtual
time steps (:func:`to_spike_train`), each carrying ``amplitude / D`` (folded into the next layer's weights),
so every synaptic operation has a 1-bit spike as one operand and the downstream sums are identical.

Ours, where the code and the paper are silent:

- Membrane across real time steps. The authors train with one real step (``T = 1``), where the neuron is
  the quantizer above. For ``T > 1`` we give it the LIF charge of Eq. 1 (``h = beta v + x``, ``beta = 1 -
  1/tau``) and a soft reset that subtracts exactly the emitted charge (``v = h - V_th s``: the quantization
  error carries to the next step). At ``T = 1`` this is exactly the authors' neuron.
- Rectification (:class:`Rectify`). The paper's figure shows a "Rectify" step that maps the zero-centred
  membrane into the neuron's ``[0, V_th]`` range before the q/k/v IE-LIFs; its formula is not public. Ours
  is a learnable per-channel affine map ``y = a_c x + b_c`` initialised so that a standard-normal input
  (what the preceding BatchNorm produces at initialisation) gives the maximum-entropy ``D + 1``-level
  output: ``b = V_th / 2`` and ``a`` the scale maximising that entropy (0.449 V_th for ``D = 4``: 2.320
  bits of the possible log2(5) = 2.322, against 1.845 bits without rectification, where 55 % of the
  inputs are silenced and 19 % saturate). It folds into the preceding BatchNorm at deployment.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..errors import ConfigError, InputError, check_choice
from ..quant.ste import MultiLevelSTE
from .functional import LIFParameters, lif_charge, run_multistep


class IELIFParameters(NamedTuple):
    """Parameters of the IE-LIF neuron.

    Attributes:
        levels: ``D``, the number of non-zero levels (= virtual binary steps at inference; 4 in the paper).
        tau: membrane time constant of the charge over real steps (Eq. 1 form; irrelevant at ``T = 1``).
        v_threshold: the input at which the neuron saturates at level ``D``.
        reset: ``"soft"`` (subtract the emitted charge, default) or ``"hard"`` (to 0 after any emission).
        detach_reset: no gradient through the reset.
    """

    levels: int = 4
    tau: float = 2.0
    v_threshold: float = 1.0
    reset: str = "soft"
    detach_reset: bool = True

    def validate(self) -> IELIFParameters:
        check_levels(self.levels)
        check_choice("IE-LIF reset", self.reset, ("soft", "hard"))
        self.lif().validate()  # tau > 1, 0 < v_threshold < inf
        return self

    def lif(self) -> LIFParameters:
        return LIFParameters(tau=self.tau, v_threshold=self.v_threshold, decay_input=False)


class IELIFState(NamedTuple):
    """Membrane potential after a step."""

    v: Tensor


def ielif_fire(h: Tensor, p: IELIFParameters) -> Tensor:
    """Multi-level spike ``floor(clamp(D h / V_th, 0, D) + 1/2) / D`` in ``[0, 1]``, straight-through inside."""
    return MultiLevelSTE(p.levels)(h / p.v_threshold)


def ielif_step(x: Tensor, state: IELIFState, p: IELIFParameters) -> tuple[Tensor, IELIFState]:
    """One real time step: charge (Eq. 1 form), multi-level fire, reset."""
    h = lif_charge(x, state.v, p.lif())
    s = ielif_fire(h, p)
    r = s.detach() if p.detach_reset else s
    v = h - p.v_threshold * r if p.reset == "soft" else h * (r == 0).to(h.dtype)
    return s, IELIFState(v)


def ielif_multistep(x: Tensor, p: IELIFParameters, state: IELIFState | None = None
                    ) -> tuple[Tensor, IELIFState]:
    """Run :func:`ielif_step` over the leading time axis of ``x`` (``[T, ...]``) from rest (or ``state``)."""
    return run_multistep(lambda st, x_t: ielif_step(x_t, st, p), x, state,
                         lambda x0: IELIFState(torch.zeros_like(x0)), "IE-LIF")


def to_spike_train(s: Tensor, levels: int, amplitude: float = 1.0) -> Tensor:
    """Inference form: multi-level spikes ``s = amplitude k / D`` -> binary spikes ``[D, *s.shape]``.

    Virtual step ``j`` carries a spike where ``j < k`` (level ``k`` = ``k`` spikes, earliest first); each
    spike is worth ``amplitude / D``, so ``to_spike_train(s).sum(0) * amplitude / D == s``.
    """
    k = torch.round(s.detach() * levels / amplitude)
    if bool(((k < 0) | (k > levels)).any()):
        raise InputError(f"multi-level spikes must lie in [0, {amplitude:g}] (levels 0..{levels})")
    steps = torch.arange(levels, device=s.device).view(-1, *([1] * s.dim()))
    return (steps < k.unsqueeze(0)).to(s.dtype)


#: the most levels a multi-level spike may have (8-bit spikes); a file cannot ask for more
MAX_LEVELS = 255


def check_levels(levels: object) -> int:
    if not isinstance(levels, int) or isinstance(levels, bool) or not 1 <= levels <= MAX_LEVELS:
        raise ConfigError(f"IE-LIF levels must be an integer in [1, {MAX_LEVELS}], got {levels!r}")
    return levels


@functools.lru_cache(maxsize=16)
def max_entropy_scale(levels: int) -> float:
    """The scale ``a`` maximising the entropy of ``floor(D clamp(a z + 1/2, 0, 1) + 1/2)`` for ``z ~ N(0, 1)``
    (a grid search on the closed-form level probabilities; 0.449 for ``D = 4``). With ``D = 1`` every scale
    gives 1 bit; we take 0.5 (one standard deviation to each end of the range)."""
    if check_levels(levels) == 1:
        return 0.5
    a = torch.linspace(0.01, 2.0, 3981, dtype=torch.float64, device="cpu").unsqueeze(1)
    edges = (torch.arange(levels, dtype=torch.float64, device="cpu") + 0.5) / levels  # boundaries between levels
    cdf = torch.special.ndtr((edges - 0.5) / a)
    p = torch.diff(cdf, dim=1, prepend=torch.zeros_like(a), append=torch.ones_like(a))
    entropy = -(p * torch.log2(p.clamp_min(1e-300))).sum(1)
    return float(a[int(entropy.argmax()), 0])


class Rectify(nn.Module):
    """Per-channel affine ``y = a_c x + b_c`` that moves a zero-centred membrane into ``[0, V_th]`` (ours;
    the module docstring gives the design). Initialised at ``a = max_entropy_scale(D) V_th``, ``b = V_th/2``.

    Args:
        channels: number of channels; channel_dim: their axis in the input (2 for ``[T, B, C, H, W]``,
        -1 for tokens ``[T, B, N, C]``); levels, v_threshold: those of the neuron it feeds.
    """

    def __init__(self, channels: int, levels: int = 4, v_threshold: float = 1.0, channel_dim: int = 2) -> None:
        super().__init__()
        self.channel_dim = channel_dim
        self.scale = nn.Parameter(torch.full((channels,), max_entropy_scale(levels) * v_threshold))
        self.shift = nn.Parameter(torch.full((channels,), 0.5 * v_threshold))

    def forward(self, x: Tensor) -> Tensor:
        dim = self.channel_dim % x.dim()
        if x.shape[dim] != self.scale.numel():
            raise InputError(f"Rectify was built for {self.scale.numel()} channels on axis {self.channel_dim}, "
                             f"got shape {tuple(x.shape)}")
        shape = [1] * x.dim()
        shape[dim] = -1
        return x * self.scale.view(shape) + self.shift.view(shape)

    def extra_repr(self) -> str:
        return f"channels={self.scale.numel()}, channel_dim={self.channel_dim}"


class IELIF(nn.Module):
    """Multi-step IE-LIF neurons over ``[T, B, ...]`` (module docstring), no hidden state between calls.

    Args:
        levels: ``D`` (4). tau, v_threshold, reset, detach_reset: see :class:`IELIFParameters`.
        amplitude: the value of the top level (1; 2 for the attention neuron of Q-SDSA, the code's
            "levels / 2"); folded into the next layer's weights at deployment.
        rectify_channels: when given, a :class:`Rectify` over that many channels precedes the neuron.
        channel_dim: the channel axis for the rectification.
    """

    def __init__(self, levels: int = 4, tau: float = 2.0, v_threshold: float = 1.0, reset: str = "soft",
                 detach_reset: bool = True, amplitude: float = 1.0, rectify_channels: int | None = None,
                 channel_dim: int = 2) -> None:
        super().__init__()
        self.params = IELIFParameters(levels, float(tau), float(v_threshold), reset, bool(detach_reset)).validate()
        if not (math.isfinite(amplitude) and amplitude > 0):
            raise ConfigError(f"IE-LIF amplitude must be a finite number > 0, got {amplitude!r}")
        self.amplitude = float(amplitude)
        self.rectify = (Rectify(rectify_channels, levels, v_threshold, channel_dim)
                        if rectify_channels is not None else None)

    @property
    def levels(self) -> int:
        return self.params.levels

    @property
    def spike_levels(self) -> int:
        """``D``, declared: an output stands for up to ``D`` binary spikes (what the accounting charges)."""
        return self.params.levels

    @property
    def spike_unit(self) -> float:
        """The value of one binary spike of the inference form, ``amplitude / D``."""
        return self.amplitude / self.params.levels

    def forward(self, x: Tensor, state: IELIFState | None = None,
                return_state: bool = False) -> Tensor | tuple[Tensor, IELIFState]:
        if x.dim() < 2:
            raise InputError(f"IE-LIF expects a time-first tensor [T, B, ...], got shape {tuple(x.shape)}")
        if self.rectify is not None:
            x = self.rectify(x)
        s, final = ielif_multistep(x, self.params, state)
        if self.amplitude != 1.0:
            s = s * self.amplitude
        return (s, final) if return_state else s

    def spike_train(self, x: Tensor) -> Tensor:
        """The inference form of ``forward(x)``: binary spikes ``[D, *x.shape]``, each worth ``amplitude / D``."""
        return to_spike_train(self.forward(x), self.levels, self.amplitude)

    def config(self) -> dict[str, Any]:
        return {**self.params._asdict(), "amplitude": self.amplitude, "rectify": self.rectify is not None}

    def extra_repr(self) -> str:
        p = self.params
        return (f"levels={p.levels}, v_threshold={p.v_threshold:g}, tau={p.tau:g}, reset={p.reset}, "
                f"amplitude={self.amplitude:g}")
