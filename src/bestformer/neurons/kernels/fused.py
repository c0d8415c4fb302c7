"""The ``"fused"`` LIF backend: one autograd node for all ``T`` steps, dispatched to a compiled engine.

- CUDA float32 tensors with Triton installed: :mod:`~bestformer.neurons.kernels.triton_lif`.
- CPU float32 / float64 tensors: :mod:`~bestformer.neurons.kernels.cpu` (numba).
- anything else: :mod:`~bestformer.neurons.kernels.generic` (tensor operations).

Every engine computes the membrane with the plain path's operations in the same order, so the spikes are
identical to :func:`~bestformer.neurons.functional.lif_multistep`; gradients follow the hand-written
backward-through-time recursion (derived in :mod:`~bestformer.neurons.kernels.cpu`) and agree with autograd on
the plain path to float rounding. What is kept for backward is the pre-spike membrane ``H`` only (the spikes are
recomputed from it as ``H >= V_th``), against two float tensors per step in the plain path.

Memory layout: the kernels see ``x`` as a ``[T, M]`` matrix whose rows are the time steps in the tensor's own
memory order, so channels-last activations and a static image repeated over ``T`` with stride 0 (the stem's direct
encoding) are read in place, and the outputs keep the input's layout.
"""

from __future__ import annotations

import importlib.util
import weakref
from types import ModuleType
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ...errors import InputError
from ..functional import LIFParameters, LIFState, check_time_first
from ..surrogate import Surrogate
from . import cpu, generic
from .spec import KernelSpec, kernel_spec

_HAS_TRITON = importlib.util.find_spec("triton") is not None


class TimeMajor:
    """View ``x`` ``[T, *rest]`` as ``[T, M]`` with the ``rest`` dimensions in memory order (outermost first).

    When one time step of ``x`` is not dense in any order (a strided slice), the matrix is a contiguous copy.
    """

    def __init__(self, x: Tensor) -> None:
        rest = sorted(range(1, x.dim()), key=lambda d: -x.stride(d))
        if not x.permute(0, *rest)[0].is_contiguous():
            rest = list(range(1, x.dim()))
        self.perm = [0, *rest]
        self.inverse = [self.perm.index(d) for d in range(x.dim())]
        self.shape = tuple(x.permute(self.perm).shape)

    def flat(self, y: Tensor) -> Tensor:
        """``[T, *rest]`` -> ``[T, M]`` with unit stride along ``M`` (a view when the layout allows it; a time
        stride of 0 is kept). The kernels index a row as dense: a strided view would be read wrongly."""
        m = y.permute(self.perm).reshape(y.shape[0], -1)
        return m if m.shape[1] <= 1 or m.stride(1) == 1 else m.contiguous()

    def unflat(self, y2d: Tensor) -> Tensor:
        return y2d.view(self.shape).permute(self.inverse)

    def flat_state(self, v: Tensor) -> Tensor:
        """One time step ``[*rest]`` -> ``[M]``."""
        return v.permute([d - 1 for d in self.perm[1:]]).reshape(-1)

    def unflat_state(self, v1d: Tensor) -> Tensor:
        return v1d.view(self.shape[1:]).permute([d - 1 for d in self.inverse[1:]])


# storages written by the fused LIF (spikes: 0/1 by construction), so that spike packing on GPU needs no value check
_binary: dict[int, tuple[weakref.ref, int]] = {}


def mark_binary(t: Tensor) -> None:
    """Record that ``t``'s storage holds only 0 and 1 (at its current version)."""
    if len(_binary) > 4096:  # forget storages that were freed
        for key in [k for k, (ref, _) in _binary.items() if ref() is None]:
            del _binary[key]
    storage = t.untyped_storage()
    _binary[storage.data_ptr()] = (weakref.ref(storage), t._version)


def is_marked_binary(t: Tensor) -> bool:
    """Whether ``t`` views a storage written by the fused LIF and not modified in place since."""
    storage = t.untyped_storage()
    hit = _binary.get(storage.data_ptr())
    return hit is not None and hit[0]() is storage and hit[1] == t._version


def select_engine(x: Tensor) -> ModuleType:
    """The engine that runs ``x``: Triton on CUDA float32, numba on CPU float32/64, tensor operations otherwise."""
    if _HAS_TRITON and x.device.type == "cuda" and x.dtype == torch.float32:
        from . import triton_lif

        return triton_lif
    return cpu if cpu.supports(x) else generic


class FusedLIFFunction(torch.autograd.Function):
    """``(x, v0) -> (spikes, v_final)`` over all time steps with one saved tensor, ``H``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, v0: Tensor | None, spec: KernelSpec, surrogate: Surrogate,
                engine: ModuleType) -> tuple[Tensor, Tensor]:
        layout = TimeMajor(x)
        spikes, h, v = engine.forward(layout.flat(x), None if v0 is None else layout.flat_state(v0), spec, True)
        ctx.save_for_backward(h)
        ctx.set_materialize_grads(False)
        ctx.layout, ctx.spec, ctx.surrogate, ctx.engine = layout, spec, surrogate, engine
        mark_binary(spikes)
        return layout.unflat(spikes), layout.unflat_state(v)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_s: Tensor | None, grad_v: Tensor | None) -> tuple[Tensor | None, ...]:
        (h,) = ctx.saved_tensors
        layout, spec = ctx.layout, ctx.spec
        gs = torch.zeros_like(h) if grad_s is None else layout.flat(grad_s)
        gv = None if grad_v is None else layout.flat_state(grad_v)
        grad_x, grad_v0 = ctx.engine.backward(gs, h, gv, ctx.surrogate, spec)
        grad_v0 = layout.unflat_state(grad_v0) if ctx.needs_input_grad[1] else None
        return layout.unflat(grad_x), grad_v0, None, None, None


def fused_lif_multistep(x: Tensor, p: LIFParameters, surrogate: Surrogate, state: LIFState | None = None,
                        engine: ModuleType | None = None) -> tuple[Tensor, LIFState]:
    """Drop-in for :func:`~bestformer.neurons.functional.lif_multistep` (the ``"fused"`` backend).

    ``engine`` forces one of :mod:`.cpu`, :mod:`.triton_lif`, :mod:`.generic` (tests); by default
    :func:`select_engine` picks it from the tensor's device and dtype.
    """
    check_time_first(x, "LIF")
    if not x.is_floating_point():
        raise InputError(f"LIF expects a floating-point input, got {x.dtype}")
    v0 = None
    if state is not None:
        if state.v.dtype != x.dtype:  # as the plain path computes: in the promoted type (bf16 input, float32 state)
            x = x.to(torch.promote_types(x.dtype, state.v.dtype))
        try:
            v0 = state.v.to(x.dtype).expand(x.shape[1:])
        except RuntimeError as err:
            raise InputError(f"LIF state of shape {tuple(state.v.shape)} does not fit one time step "
                             f"{tuple(x.shape[1:])} of the input") from err
    engine = engine or select_engine(x)
    spec = kernel_spec(p, surrogate)
    if torch.is_grad_enabled() and (x.requires_grad or (v0 is not None and v0.requires_grad)):
        spikes, v = FusedLIFFunction.apply(x, v0, spec, surrogate, engine)
        return spikes, LIFState(v)
    layout = TimeMajor(x)  # inference: nothing to keep for backward
    spikes, _, v = engine.forward(layout.flat(x), None if v0 is None else layout.flat_state(v0), spec, False)
    return layout.unflat(spikes), LIFState(layout.unflat_state(v))
