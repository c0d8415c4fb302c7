"""Exact counts of the synaptic operations of an event operand, and the declared levels of multi-level spikes.

Two counts per product with an event operand (conventions in :mod:`bestformer.analysis.ops`):

- *event operations*: the products whose event operands are all non-zero (each entry counted once). NS-ACE
  charges them ``b_w x b_a`` (Shen et al., CVPR 2024), with ``b_a`` the operand's bits;
- *SOPs*: the same with every multi-level spike counted as the binary spikes it stands for. A level ``k`` of a
  neuron with ``D`` levels is ``k`` binary spikes over ``D`` virtual steps (QSD-Transformer's "4-1-4" inference
  form, :func:`bestformer.neurons.multilevel.to_spike_train`), so it costs ``k`` accumulations (E_AC each).

A neuron whose spikes have several levels declares them (``spike_levels`` = ``D`` and ``spike_unit``, the value
of one binary spike, ``amplitude / D``: :class:`~bestformer.neurons.IELIF`). Its bits are then
``ceil(log2(D + 1))`` whatever a batch happens to contain, and the level of an entry ``x`` is
``round(|x| / spike_unit)``. A declaration follows the spikes through the functions that only move or copy them
(reshape, transpose, padding with zeros, concatenation, ...: :data:`SHAPE_FUNCS`).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .values import ValueKind

#: functions (by name) whose outputs hold the same spikes as their inputs, moved, copied or zero-padded
SHAPE_FUNCS = frozenset({
    "flatten", "unflatten", "reshape", "reshape_as", "view", "view_as", "transpose", "permute", "movedim", "t",
    "contiguous", "clone", "detach", "expand", "expand_as", "repeat", "unsqueeze", "squeeze", "narrow", "flip",
    "__getitem__", "chunk", "split", "unbind", "pad", "cat", "stack", "to",
})

#: functions that make their output from every tensor they take: it carries a tag only if all of them have it
ALL_INPUTS = frozenset({"cat", "stack", "add", "__add__", "__radd__", "sub", "__sub__", "__rsub__", "mul", "__mul__",
                        "__rmul__", "div", "__truediv__", "__rtruediv__"})
#: functions whose output is a value when their inputs are (arithmetic, means, pooling, normalisation): how a
#: value operand (the model's input, a quantized ANN activation) is followed
VALUE_FUNCS = SHAPE_FUNCS | ALL_INPUTS | {"mean", "sum", "batch_norm", "max_pool1d", "max_pool2d", "max_pool3d",
                                          "avg_pool1d", "avg_pool2d", "adaptive_avg_pool1d", "adaptive_avg_pool2d"}


def declared_levels(module: nn.Module) -> tuple[int, float] | None:
    """``(D, spike_unit)`` of a neuron that declares multi-level spikes, else ``None``."""
    levels, unit = getattr(module, "spike_levels", None), getattr(module, "spike_unit", None)
    return (int(levels), float(unit)) if levels is not None and unit is not None else None


def multilevel_kind(levels: int) -> ValueKind:
    """The kind of a declared ``D``-level spike: ``D + 1`` values, ``ceil(log2(D + 1))`` bits."""
    return ValueKind("multilevel", levels + 1, event=True)


class TensorTags:
    """A tag (a multi-level spike's declared ``(D, spike_unit)``; that a tensor holds values) on the tensors of
    one batch, by tensor object (weakly held), carried to the outputs of the ``follows`` functions made from them."""

    def __init__(self, follows: frozenset[str] = SHAPE_FUNCS) -> None:
        self.follows = follows
        self._items: dict[int, tuple[weakref.ref[Tensor], Any]] = {}

    def clear(self) -> None:
        self._items.clear()

    def declare(self, x: Any, tag: Any) -> None:
        for t in (x if isinstance(x, (tuple, list)) else (x,)):
            if isinstance(t, Tensor):
                self._items[id(t)] = (weakref.ref(t), tag)

    def get(self, x: Tensor) -> Any:
        hit = self._items.get(id(x))
        return hit[1] if hit is not None and hit[0]() is x else None

    def follow(self, func: Any, args: tuple[Any, ...], out: Any) -> None:
        """Tag ``out`` like the tensors it was made from when ``func`` is one of :attr:`follows`."""
        name = getattr(func, "__name__", None)
        if name not in self.follows:
            return
        inputs = [t for a in args for t in (a if isinstance(a, (tuple, list)) else (a,)) if isinstance(t, Tensor)]
        if not inputs:
            return
        found = [self.get(t) for t in (inputs if name in ALL_INPUTS else inputs[:1])]
        if found and all(f is not None and f == found[0] for f in found):
            self.declare(out, found[0])


def event_counts(x: Tensor, kind: ValueKind, declared: tuple[int, float] | None) -> tuple[Tensor, Tensor]:
    """Per entry: 1 where an event operand is non-zero (all ones for a value operand: every entry is accumulated),
    and the binary spikes it stands for (its level for a declared multi-level spike, else the same mask)."""
    if not kind.event:
        ones = torch.ones_like(x, dtype=torch.float32)
        return ones, ones
    mask = (x != 0).float()
    if declared is None:
        return mask, mask
    return mask, torch.round(x.detach().abs().float() / declared[1])


def exact_sum(t: Tensor) -> int:
    """Exact integer sum of a tensor of counts."""
    return round(t.sum(dtype=torch.float64).item())


def conv_products(counts: Tensor, weight: Tensor, conv: Callable[..., Tensor], a: dict[str, Any]) -> int:
    """Exact sum of ``count x (weight taps)`` of a convolution: the per-entry counts (a non-zero mask, or spike
    levels) are summed per group and convolved with an all-ones kernel, which counts the taps of every output
    position (a zero-padded border adds nothing)."""
    groups = int(a["groups"])
    spatial = weight.dim() - 2
    batched = counts if counts.dim() == spatial + 2 else counts.unsqueeze(0)
    m = batched.view(batched.shape[0], groups, batched.shape[1] // groups, *batched.shape[2:]).sum(2)
    ones = torch.ones(groups, 1, *weight.shape[2:], dtype=m.dtype, device=m.device)
    taps = conv(m, ones, None, a["stride"], a["padding"], a["dilation"], groups)
    return exact_sum(taps) * (weight.shape[0] // groups)


def product_counts(combine: Callable[[Tensor, Tensor], Tensor], counts: list[tuple[Tensor, Tensor]],
                   kinds: list[ValueKind]) -> tuple[int, int]:
    """``(event operations, SOPs)`` of an activation x activation product: the non-zero pairs, and the same with
    the driving operand's spikes expanded (the lower-precision event operand drives, the first on a tie; the
    other is accumulated as a value)."""
    (mask_a, spikes_a), (mask_b, spikes_b) = counts
    events = exact_sum(combine(mask_a, mask_b))
    bits = [k.bits if k.event else math.inf for k in kinds]
    driven = combine(spikes_a, mask_b) if bits[0] <= bits[1] else combine(mask_a, spikes_b)
    return events, exact_sum(driven)
