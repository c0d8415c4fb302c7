"""Quantized activations of the conversion-oriented ANN (CSDformer, seed 004).

Every activation of a ``csd_*`` model is a quantized ReLU with ``L`` levels, so that after conversion it
becomes an integrate-and-fire neuron whose spike count over ``T = L`` steps is exactly the ANN's level.

- :class:`QuantReLU`: the clip-floor-shift quantizer of QCFS (Bu et al., ICLR 2022), which SPEC.md gives
  as the principled form of the paper's quantized activation (the paper's method section is not public):
  ``q(x) = theta / L * clamp(floor(x L / theta + 1/2), 0, L)`` with a learnable ``theta`` (one per layer).
- :class:`QuantNReLU`: the paper's NReLU, which replaces softmax in self-attention: a ReLU followed by a
  constant normalisation ``c`` (no exponent, no data-dependent division), quantized like any activation.
  The paper names NReLU; the constant (``1/N`` over ``N`` tokens) is our choice, following SPEC.md.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .ste import ste_floor

#: lower bound of ``theta``: keeps the quantization step and the converted threshold positive
MIN_THETA = 1e-3


class QuantReLU(nn.Module):
    """Quantized ReLU with ``L`` levels and a learnable clipping value ``theta`` (QCFS form).

    ``q(x) = theta / L * clamp(floor(x L / theta + 1/2), 0, L)``. The ``+ 1/2`` shift is the rounding offset
    that a converted IF neuron gets as its initial membrane ``theta / 2`` (``floor(v + 1/2)`` rounds ties
    up, as an IF neuron that fires at ``V >= theta`` does; ``torch.round`` would round ties to even).

    Gradients: straight-through ``floor``, so ``dq/dx = 1`` inside the clipping range and 0 outside, and
    ``dq/dtheta = n / L - x / theta`` inside, 1 above ``theta`` (QCFS).

    ``theta`` starts at ``theta`` and, unless the module was already initialised (a loaded checkpoint),
    is set on the first forward in training mode to ``mean + 3 std`` of ``relu(x)`` over that batch (our
    choice: the attention map's scale depends on the width and the token count, so a fixed starting value
    would leave some layers all-zero or all-clipped).

    Args:
        levels: ``L``, the number of non-zero levels (the converted model needs ``T = L`` steps to be exact).
        theta: initial clipping value.
    """

    emits_values = True  # an ANN activation: its outputs are values, not spikes (bestformer.analysis.ops)

    def __init__(self, levels: int = 8, theta: float = 1.0) -> None:
        super().__init__()
        if not isinstance(levels, int) or isinstance(levels, bool) or levels < 1:
            raise ConfigError(f"levels (L, the activation's quantization levels) must be an integer >= 1, "
                              f"got {levels!r}")
        if not math.isfinite(theta) or theta < MIN_THETA:
            raise ConfigError(f"theta must be a finite number >= {MIN_THETA}, got {theta!r}")
        self.levels = levels
        self.theta = nn.Parameter(torch.tensor(float(theta)))
        self.register_buffer("initialized", torch.tensor(False))

    @property
    def precision(self) -> int:
        """Bits of one activation (levels 0..L), as an ANN value or a multi-level spike."""
        return max(1, math.ceil(math.log2(self.levels + 1)))

    def threshold(self) -> Tensor:
        """The clipping value in use, ``theta`` bounded below by ``MIN_THETA`` (the converted threshold)."""
        return self.theta.clamp_min(MIN_THETA)

    @torch.no_grad()
    def _init_theta(self, x: Tensor) -> None:
        pos = x.detach().clamp_min(0).float()
        value = float(pos.mean() + 3 * pos.std()) if pos.numel() > 1 else float("nan")
        if math.isfinite(value) and value > MIN_THETA:  # an all-negative first batch keeps the default
            self.theta.fill_(value)
        self.initialized.fill_(True)

    def forward(self, x: Tensor) -> Tensor:
        if self.training and not bool(self.initialized):
            self._init_theta(x)
        theta = self.threshold()
        # clamped before the straight-through floor: the gradient window is the clipping range [0, theta] itself
        # (clamping after it let gradient through on [-theta / 2L, theta (1 + 1/2L)), where floor sits on a bound)
        n = ste_floor(torch.clamp(x * (self.levels / theta), 0, self.levels) + 0.5)
        return n * (theta / self.levels)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, theta={float(self.theta.detach()):.4g}"


class QuantNReLU(QuantReLU):
    """NReLU (the paper's softmax replacement), quantized: ``q(c * x)``, i.e. ``ReLU(x) * c`` with ``L`` levels.

    ``c`` is a constant (``1/N`` for ``N`` tokens by default in the ``csd_*`` models), so the attention map
    needs neither an exponent nor a row-wise division; after conversion ``c`` is folded into the threshold
    of the IF neuron that binarizes the map (:mod:`bestformer.convert`).
    """

    def __init__(self, scale: float, levels: int = 8, theta: float = 1.0) -> None:
        super().__init__(levels, theta)
        if not math.isfinite(scale) or scale <= 0:
            raise ConfigError(f"NReLU scale must be a finite number > 0, got {scale!r}")
        self.scale = float(scale)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x * self.scale)

    def extra_repr(self) -> str:
        return f"scale={self.scale:.4g}, {super().extra_repr()}"
