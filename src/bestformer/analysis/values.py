"""What an operand really is, read from its values: binary, ternary or multi-level spikes, or real numbers.

The accounting of :mod:`bestformer.analysis` never asks a model what its activations are; it looks at the
tensors that reach each product. This is our design (the papers state their operand types in prose):

==============  ====================================================  ======  ======================
kind            values                                                event   bits
==============  ====================================================  ======  ======================
``binary``      ``{0, 1}`` (LIF spikes, BESTformer's B_Attn)            yes     1
``ternary``     ``{-1, 0, 1}`` (A2OS2A's V)                             yes     2
``multilevel``  ``k / D`` with ``2 <= D <=`` :data:`MAX_DENOMINATOR`     yes     ``ceil(log2 L)``
                (QSD's IE-LIF ``{0, 1/4, ..., 1}``, its attention
                neuron ``{0, 1/2, ..., 2}``)
``integer``     integers (Spikformer's ``Q K^T`` counts, the sums of    yes     ``ceil(log2 L)``
                a 1-bit layer); ``L >`` :data:`MAX_LEVELS`: a value      (no)
``real``        anything else                                         no      full precision
==============  ====================================================  ======  ======================

``L`` is the number of grid levels between ``min(0, x)`` and ``max(0, x)`` in the tensor at hand. An *event*
operand drives accumulations: a zero costs nothing, and a level ``k`` is ``k`` binary spikes over virtual steps
(QSD-Transformer's "4-1-4" argument), so any small grid is spike-like; NS-ACE charges its ``ceil(log2 L)`` bits.
The grid test is exact up to float rounding, so a BatchNorm output (an integer times ``0.999995`` at
initialisation) is real. The model's input is an event only when it is binary or ternary (event frames of
0/1); integer pixels or event counts and images quantized to a grid stay values, as the field charges the
encoding layer at E_MAC. A spike with a learned, irrational amplitude (``{-a, 0, a}``) is not recognised: fold
the amplitude into the next layer first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

#: Largest denominator ``D`` of a multi-level spike ``k / D``.
MAX_DENOMINATOR = 32
#: Most levels an operand may have to be spike-like (8 bits); more is a value.
MAX_LEVELS = 256
#: Tolerance of the grid test on ``D x``, per unit of ``D`` (float32 rounding of ``k / D``).
GRID_TOLERANCE = 1e-6
#: Entries tested first (a fast rejection of real-valued tensors).
_PROBE = 4096


@dataclass(frozen=True)
class ValueKind:
    """The kind of a tensor's values (module docstring), the ``levels`` of its grid (0: real) and whether it
    is an ``event`` operand (zeros skip the accumulation)."""

    kind: str
    levels: int = 0
    event: bool = False

    @property
    def bits(self) -> int:
        """``ceil(log2 levels)`` (0 for real: the caller decides what full precision costs)."""
        return 0 if self.kind == "real" else max(1, math.ceil(math.log2(max(self.levels, 2))))

    def __str__(self) -> str:
        return f"{self.kind}{self.levels}" if self.kind in ("multilevel", "integer") else self.kind


BINARY = ValueKind("binary", 2, True)
TERNARY = ValueKind("ternary", 3, True)
REAL = ValueKind("real")


def _levels(k: Tensor) -> int:
    """Levels of the integer grid spanned by the integers ``k`` and 0."""
    return int(max(k.max().item(), 0.0) - min(k.min().item(), 0.0)) + 1


def _denominator(values: Tensor) -> int | None:
    """The smallest ``D <= MAX_DENOMINATOR`` with every value a multiple of ``1 / D``, or ``None``."""
    for d in range(2, MAX_DENOMINATOR + 1):
        q = values * d
        if bool(((q - torch.round(q)).abs() <= GRID_TOLERANCE * d).all()):
            return d
    return None


def _grid(x: Tensor) -> int | None:
    """``D`` of a non-integer grid with at most ``MAX_LEVELS`` distinct values, or ``None``."""
    values = torch.unique(x.double())
    return None if values.numel() > MAX_LEVELS else _denominator(values)


def _only(x: Tensor, values: tuple[float, ...]) -> bool:
    inside = x == values[0]
    for v in values[1:]:
        inside |= x == v
    return bool(inside.all())


def _integral(x: Tensor) -> bool:
    return bool((x == torch.round(x)).all())


def classify_values(x: Tensor, model_input: bool = False) -> ValueKind:
    """Classify the values of ``x`` (module docstring); ``model_input=True`` for the model's own input (and a
    value :class:`~bestformer.analysis.ops.OpCounter` follows from it).

    Each test runs on the first :data:`_PROBE` entries before the whole tensor, so a real-valued tensor (the
    common case: every BatchNorm and linear output) is rejected after a few thousand entries.
    """
    x = x.detach()
    if x.numel() == 0 or x.dtype == torch.bool:
        return BINARY
    flat = x.reshape(-1)
    probe = flat[:_PROBE]
    if not x.is_floating_point():
        probe = flat = flat.double()
    if _only(probe, (0, 1)) and _only(flat, (0, 1)):
        return BINARY
    if _only(probe, (-1, 0, 1)) and _only(flat, (-1, 0, 1)):
        return TERNARY
    if _integral(probe) and _integral(flat) and bool(torch.isfinite(flat).all()):
        levels = _levels(flat.double())
        return ValueKind("integer", levels, event=not model_input and levels <= MAX_LEVELS)
    if model_input or _grid(probe) is None:
        return REAL
    if not bool(torch.isfinite(flat).all()) or flat.abs().max().item() > MAX_LEVELS:
        return REAL
    d = _grid(flat)
    if d is None:
        return REAL
    levels = _levels(torch.round(flat.double() * d))
    return ValueKind("multilevel", levels, event=True) if levels <= MAX_LEVELS else REAL
