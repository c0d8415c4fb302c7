"""Fused LIF kernels in Triton for CUDA float32 tensors (forward and backward fused over ``T``).

One program per block of ``BLOCK`` neurons loops over the time steps inside, keeping the membrane in registers:
the forward reads ``X`` once and writes the spikes and ``H`` once; the backward reads ``dL/dS`` and ``H`` once and
writes ``dL/dX`` once. The recursion is the one derived in :mod:`bestformer.neurons.kernels.cpu`.

Bit-exactness with the plain torch path: the charge is written with the same operations in the same order, and
the kernels are launched with ``enable_fp_fusion=False`` so that no ``a * b + c`` is contracted into an FMA (torch
rounds after each operation). The division by the Python scalar ``tau`` is done as torch does it on the tensor's
device: on CUDA torch multiplies by a reciprocal (``BinaryDivTrueKernel.cu``: one bit may be lost; computed in float32
or, since late 2025, in double), which the kernel takes from torch itself; on the CPU it divides, correctly rounded
(``div_rn``; a plain ``/`` may compile to an approximate division). Scalars reach the kernels as float32, as torch
casts a Python scalar for a float32 tensor. The launches run on the tensors' own GPU (Triton launches on the current
device). Tests run these kernels on CPU tensors with ``TRITON_INTERPRET=1``; on a GPU they compile to PTX.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..surrogate import Surrogate
from .spec import ATAN, SIGMOID, KernelSpec

#: neurons per program
BLOCK = 1024


def supports(x: Tensor) -> bool:
    """CUDA float32 tensors (other dtypes take the generic engine, which rounds as torch does)."""
    return x.device.type == "cuda" and x.dtype == torch.float32


@triton.jit
def _lif_forward(x_ptr, v0_ptr, s_ptr, h_ptr, v_ptr, T, M, stride_xt, tau, inv_tau, beta, vth, vr,
                 DECAY_INPUT: tl.constexpr, RECIP: tl.constexpr, HARD: tl.constexpr, VR_ZERO: tl.constexpr,
                 HAS_V0: tl.constexpr, STORE_H: tl.constexpr, BLOCK: tl.constexpr):  # pragma: no cover
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    v = tl.load(v0_ptr + offs, mask=mask, other=0.0) if HAS_V0 else tl.zeros([BLOCK], dtype=tl.float32) + vr
    for t in range(T):
        x = tl.load(x_ptr + t * stride_xt + offs, mask=mask, other=0.0)
        if DECAY_INPUT and RECIP:
            h = v + (x - (v - vr)) * inv_tau
        elif DECAY_INPUT:
            h = v + tl.math.div_rn(x - (v - vr), tl.zeros([BLOCK], dtype=tl.float32) + tau)
        elif VR_ZERO:
            h = beta * v + x
        else:
            h = beta * (v - vr) + vr + x
        fire = h - vth >= 0.0
        tl.store(s_ptr + t * M + offs, tl.where(fire, 1.0, 0.0), mask=mask)
        if STORE_H:
            tl.store(h_ptr + t * M + offs, h, mask=mask)
        v = tl.where(fire, vr, h) if HARD else tl.where(fire, h - vth, h)
    tl.store(v_ptr + offs, v, mask=mask)


@triton.jit
def _lif_backward(gs_ptr, h_ptr, sg_ptr, gv_ptr, gx_ptr, T, M, tau, inv_tau, beta, vth, vr, alpha, k, half_alpha,
                  DECAY_INPUT: tl.constexpr, RECIP: tl.constexpr, HARD: tl.constexpr, DETACH: tl.constexpr,
                  KIND: tl.constexpr, BLOCK: tl.constexpr):  # pragma: no cover
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    gv = tl.load(gv_ptr + offs, mask=mask, other=0.0)  # dL/dV[T-1] in, dL/dV[-1] out
    for i in range(T):
        t = T - 1 - i
        hh = tl.load(h_ptr + t * M + offs, mask=mask, other=0.0)
        gs = tl.load(gs_ptr + t * M + offs, mask=mask, other=0.0)
        u = hh - vth
        if KIND == 1:  # SIGMOID
            sig = 1.0 / (1.0 + tl.exp(-(alpha * u)))
            sg = alpha * sig * (1.0 - sig)
        elif KIND == 2:  # ATAN
            z = k * u
            sg = half_alpha / (1.0 + z * z)
        else:
            sg = tl.load(sg_ptr + t * M + offs, mask=mask, other=0.0)
        if HARD:
            keep = tl.where(u >= 0.0, 0.0, gv)
            gh = gs * sg + keep if DETACH else (gs + gv * (vr - hh)) * sg + keep
        else:
            gh = gs * sg + gv if DETACH else (gs - vth * gv) * sg + gv
        if DECAY_INPUT:  # torch's backward of ``/ tau`` is ``grad / tau``, rounded as in the forward
            gx = gh * inv_tau if RECIP else tl.math.div_rn(gh, tl.zeros([BLOCK], dtype=tl.float32) + tau)
            gv = gh - gx
        else:
            gx = gh
            gv = beta * gh
        tl.store(gx_ptr + t * M + offs, gx, mask=mask)
    tl.store(gv_ptr + offs, gv, mask=mask)


def _on_device(x: Tensor) -> contextlib.AbstractContextManager[object]:
    """Launch on ``x``'s GPU: Triton picks the current device, not the tensors' (``cuda:1`` with current 0)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


@functools.cache
def _inverse_tau(tau: float, device: torch.device) -> float:
    """The reciprocal torch multiplies by for ``x / tau`` on a CUDA ``device`` (its rounding depends on the torch
    version): ``1 / tau`` computed by torch there (unused on the CPU). Cached: one synchronisation per tau and GPU."""
    return float(torch.ones((), device=device).div(tau))


def forward(x: Tensor, v0: Tensor | None, spec: KernelSpec, store_h: bool) -> tuple[Tensor, Tensor | None, Tensor]:
    """Same contract as :func:`bestformer.neurons.kernels.cpu.forward`; ``x`` ``[T, M]`` with unit inner stride."""
    t_steps, m = x.shape
    p = spec.params
    spikes = torch.empty(t_steps, m, dtype=x.dtype, device=x.device)
    h = torch.empty(t_steps, m, dtype=x.dtype, device=x.device) if store_h else spikes
    v = torch.empty(m, dtype=x.dtype, device=x.device)
    if m == 0:  # no program to launch
        return spikes, (h if store_h else None), v
    v0_ = v0.contiguous() if v0 is not None else v
    with _on_device(x):
        _lif_forward[(triton.cdiv(m, BLOCK),)](
            x, v0_, spikes, h, v, t_steps, m, x.stride(0), p.tau, _inverse_tau(p.tau, x.device), p.beta,
            p.v_threshold, p.v_reset, DECAY_INPUT=p.decay_input, RECIP=x.is_cuda, HARD=p.reset == "hard",
            VR_ZERO=p.v_reset == 0.0, HAS_V0=v0 is not None, STORE_H=store_h, BLOCK=BLOCK, enable_fp_fusion=False)
    return spikes, (h if store_h else None), v


def backward(grad_s: Tensor, h: Tensor, grad_v: Tensor | None, surrogate: Surrogate, spec: KernelSpec
             ) -> tuple[Tensor, Tensor]:
    """Same contract as :func:`bestformer.neurons.kernels.cpu.backward`; sigmoid and atan are evaluated in the
    kernel, any other surrogate's ``derivative`` by torch."""
    t_steps, m = h.shape
    p, a = spec.params, spec.alpha
    grad_x = torch.empty_like(h)
    gv = torch.zeros(m, dtype=h.dtype, device=h.device)
    if grad_v is not None:  # dL/dV[T-1] in, dL/dV[-1] out
        gv.copy_(grad_v)
    if m == 0:
        return grad_x, gv
    native = spec.surrogate in (SIGMOID, ATAN)
    sg = h if native else surrogate.derivative(h - p.v_threshold).contiguous()
    with _on_device(h):
        _lif_backward[(triton.cdiv(m, BLOCK),)](
            grad_s.to(h.dtype).contiguous(), h, sg, gv, grad_x, t_steps, m, p.tau, _inverse_tau(p.tau, h.device),
            p.beta, p.v_threshold, p.v_reset, a, math.pi / 2 * a, a / 2, DECAY_INPUT=p.decay_input, RECIP=h.is_cuda,
            HARD=p.reset == "hard", DETACH=p.detach_reset, KIND=spec.surrogate, BLOCK=BLOCK, enable_fp_fusion=False)
    return grad_x, gv
