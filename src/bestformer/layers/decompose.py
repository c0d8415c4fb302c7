"""Temporal decomposition: products of two spike trains and max-pooling computed step by step, exactly.

The paper (CSDformer, seed 004) names the technique; the formulas below are the design of SPEC.md.

Product of two variables. With spike trains ``a_t`` and ``b_t`` (``t = 1..T``) and totals ``A = sum_t a_t``,
``B = sum_t b_t``::

    A B = sum_t [ a_t (sum_{t' <= t} b_t')  +  (sum_{t' < t} a_t') b_t ]

Every pair ``(t, t')`` is counted once: at step ``max(t, t')``, by the first term when the ``a`` spike is the
later (or simultaneous) one, by the second otherwise. Each step's current needs only what has arrived so far
(causal), and each term multiplies a spike (0/1) by an integer count, so it is computed with additions.

Max-pooling of spike counts: with running counts ``c_t = sum_{t' <= t} s_t'`` the pooled running count
``M_t = maxpool(c_t)`` grows by at most one per step, so ``M_t - M_{t-1}`` is again a spike train whose count
is ``maxpool(c_T)``, the max-pooling of the ANN's levels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def spike_matmul(a: Tensor, b: Tensor) -> Tensor:
    """Per-step currents of the product of two spike trains ``a [T, ..., n, k]`` and ``b [T, ..., k, m]``.

    Returns ``p [T, ..., n, m]`` with ``p_t = a_t @ cumsum(b)_t + (cumsum(a)_t - a_t) @ b_t``, so that
    ``p.sum(0) == a.sum(0) @ b.sum(0)`` exactly (integers).
    """
    b_sofar = b.cumsum(dim=0)  # sum_{t' <= t} b_t'
    a_before = a.cumsum(dim=0) - a  # sum_{t' < t} a_t'
    return a @ b_sofar + a_before @ b


def spike_maxpool2d(s: Tensor, kernel_size: int = 3, stride: int = 2, padding: int = 1) -> Tensor:
    """Max-pooling of the spike counts of ``s [T, B, C, H, W]`` as a spike train: the increments of the
    running maximum of the running counts. Counts are non-negative, so the zero padding of the count map
    and ``max_pool2d``'s ``-inf`` padding agree."""
    counts = s.cumsum(dim=0)
    pooled = F.max_pool2d(counts.flatten(0, 1), kernel_size, stride, padding)
    pooled = pooled.view(*s.shape[:2], *pooled.shape[1:])
    return torch.diff(pooled, dim=0, prepend=torch.zeros_like(pooled[:1]))


class SpikeMaxPool2d(nn.Module):
    """:func:`spike_maxpool2d` as a module (the converted ``MaxPool2d(3, 2, 1)`` of the tokenizer)."""

    def __init__(self, kernel_size: int = 3, stride: int = 2, padding: int = 1) -> None:
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

    def forward(self, s: Tensor) -> Tensor:
        return spike_maxpool2d(s, self.kernel_size, self.stride, self.padding)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"
