"""Integrate-and-fire neurons of the converted CSDformer model, with its delayed IF (DIF) neuron.

A quantized ReLU ``q(x) = theta / L * clamp(floor(x L / theta + 1/2), 0, L)`` becomes an IF neuron with
threshold ``theta``, soft reset and initial membrane ``theta / 2`` (the rounding offset). With a constant
input current ``x`` it fires ``clamp(floor(T x / theta + 1/2), 0, T)`` spikes in ``T`` steps: the level of
``q`` when ``T = L``. Deeper in the network the input is a spike train, not a constant, and an IF neuron
that fires as soon as its membrane crosses the threshold can fire too early (a later negative input cannot
take a spike back) or too late (it runs out of steps): the paper's "uneven spike timing" error.

Delayed IF (the paper names DIF neurons; the exact rule below is our design, following SPEC.md): the neuron
integrates the first ``d`` steps of its input window without firing, then keeps integrating and fires at
most one spike per step during the ``T`` steps of its output window, which starts ``d`` steps after its input
window. ``d = 0`` is the plain IF neuron; ``d = T`` integrates the whole input first, so its spike count is
``clamp(floor(sum(x) / theta + 1/2), 0, T)``: exactly the quantized ANN's level. Within a step the neuron charges
before it fires (as every IF neuron), so ``d = T - 1`` is exact too: the last input arrives in the step of the
first possible spike (one step less latency per layer than ``d = T``). Each DIF layer adds ``d``
steps of latency; parallel paths (the residual shortcut, the value branch of attention) get delay lines of
the matching length so that streams that meet are aligned.

Representation: every stream is stored as its ``T``-step window ``[T, B, ...]``. Aligned streams have equal
windows, so adding two windows element-wise is the same as adding the aligned streams (the delay lines are
implicit) and the ``delay`` only shifts where a window lies in absolute time
(:attr:`bestformer.convert.SpikingCSD.latency`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .functional import LIFParameters, LIFState, check_time_first, lif_multistep
from .surrogate import Sigmoid

# The converted model is not trained: the surrogate only satisfies the LIF core's signature.
_HEAVISIDE = Sigmoid()


def check_delay(delay: int, time_steps: int) -> int:
    """``delay`` must be an integer in ``[0, T]``."""
    if not isinstance(delay, int) or isinstance(delay, bool) or not 0 <= delay <= time_steps:
        raise ConfigError(f"DIF delay must be an integer from 0 to time_steps={time_steps}, got {delay!r}")
    return delay


def if_neuron(x: Tensor, threshold: Tensor | float, delay: int = 0) -> Tensor:
    """Delayed integrate-and-fire over the input window ``x`` (``[T, ...]`` currents); returns the spikes
    ``[T, ...]`` (0/1) of the output window, ``delay`` steps later (module docstring).

    The neuron is the library's LIF core with ``tau = inf`` (no leak), soft reset (subtract the threshold)
    and the initial membrane ``threshold / 2 + sum(x[:delay])``; from then on it sees ``x[delay:]`` followed
    by ``delay`` steps without input.
    """
    check_time_first(x, "IF neuron")
    steps = x.shape[0]
    check_delay(delay, steps)
    v_th = float(threshold)
    params = LIFParameters(tau=math.inf, v_threshold=v_th, v_reset=0.0, reset="soft", decay_input=False)
    v0 = v_th / 2 + x[:delay].sum(dim=0)
    drive = torch.cat([x[delay:], x.new_zeros(delay, *x.shape[1:])]) if delay else x
    spikes, _ = lif_multistep(drive, params.validate(), _HEAVISIDE, LIFState(v0))
    return spikes


class IFNeuron(nn.Module):
    """A (delayed) IF neuron population with one threshold: :func:`if_neuron` as a module.

    The threshold is a buffer (saved with the converted model); ``delay`` is fixed at conversion.
    """

    def __init__(self, threshold: Tensor | float, delay: int = 0) -> None:
        super().__init__()
        threshold = torch.as_tensor(threshold).detach().clone()
        if threshold.numel() != 1 or not bool(torch.isfinite(threshold)) or float(threshold) <= 0:
            raise ConfigError(f"IF threshold must be one finite number > 0, got {threshold.tolist()!r}")
        self.register_buffer("threshold", threshold.reshape(()))
        self.delay = delay

    def forward(self, x: Tensor) -> Tensor:
        return if_neuron(x, self.threshold, self.delay)

    def extra_repr(self) -> str:
        return f"threshold={float(self.threshold):.4g}, delay={self.delay}"
