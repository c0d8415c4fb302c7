"""Fused kernels for CPU tensors (float32 / float64), compiled with numba: the LIF over all ``T`` steps, and the
bit packing of binary activations used by :func:`bestformer.training.memory.spike_packing`.

One pass over memory per direction: a thread takes a range of neurons and, block by block, loops over all ``T``
steps inside, keeping the membrane in cache, instead of the plain path's ~10 tensor operations (and as many autograd
nodes) per step. The arithmetic repeats :func:`~bestformer.neurons.functional.lif_charge` operation by operation in
the tensor's own dtype (the constants are passed as that dtype, never as Python floats, which numba would promote to
float64), so the membrane and the spikes are bit-identical to the plain path.

Threads: the kernels are compiled single-threaded and release the GIL; ranges of neurons run on a small pool of
Python threads (as many as ``torch.get_num_threads()``), which sleep when idle. (numba's own OpenMP layer would keep
a second spinning thread pool beside torch's and slowed every later small torch operation ~100x in our tests.)

Backward through time (our derivation; the paper trains with plain autograd). With ``H[t] = a V[t-1] + b X[t]``
(``a = 1 - 1/tau, b = 1/tau`` with decay_input, else ``a = beta, b = 1``), ``S[t] = Theta(H[t] - V_th)`` whose
pseudo-derivative is ``g[t] = surrogate'(H[t] - V_th)``, and ``V[t] = R(H[t], S[t])``, going backwards from
``dL/dV[T-1]`` (the gradient of the returned final state, 0 if unused)::

    dL/dH[t]   = dL/dS[t] g[t] + dL/dV[t] dV/dH[t]
    dL/dX[t]   = b dL/dH[t]
    dL/dV[t-1] = a dL/dH[t]            (at t = 0: the gradient of the given initial state)

    hard reset  V = H (1 - S) + V_reset S:  dV/dH = (1 - S) + (V_reset - H) g   (detach_reset: 1 - S)
    soft reset  V = H - V_th S:             dV/dH = 1 - V_th g                  (detach_reset: 1)

written as ``dL/dH = (dL/dS + dL/dV (V_reset - H)) g + dL/dV (1 - S)`` (hard) and
``(dL/dS - V_th dL/dV) g + dL/dV`` (soft) so that ``S`` is recomputed as ``H >= V_th`` from the stored ``H``:
the only tensor kept for backward is ``H`` in the input's dtype (no spike tensor is stored at all).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..surrogate import Surrogate
from .spec import ATAN, SIGMOID, KernelSpec

#: neurons per block inside a thread's range: ``x, s, h, v`` of one block stay in L2 across the T loop
CHUNK = 4096
#: below this many elements per step one thread does all the work (a thread hand-off costs ~50 us)
PARALLEL_MIN = 1 << 16

_kernels: dict[str, Any] = {}
_pool: tuple[int, ThreadPoolExecutor] | None = None  # (owning process id, pool): a forked child makes its own


def supports(x: Tensor) -> bool:
    """Whether this engine runs ``x`` (CPU float32 / float64)."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)


def _compiled() -> dict[str, Any]:
    """Compile on first use (importing numba costs ~0.5 s; ``cache=True`` keeps the machine code on disk)."""
    if _kernels:
        return _kernels
    import numba

    # Inner loops run over 1-D row slices of one block: numba then emits no negative-index handling and LLVM
    # vectorizes them (~1.4 ns per element and step for the forward on one core, against ~5.5 ns with 2-D indexing).
    @numba.njit(cache=True, nogil=True)
    def lif_forward(x, v0, spikes, h_out, v_out, c, decay_input, hard, has_v0, lo, hi):  # pragma: no cover
        x_rows = x.shape[0]  # 1: the same input at every step (a static image repeated over T)
        t_steps = spikes.shape[0]
        tau, beta, vth, vr, zero, one = c[0], c[1], c[2], c[3], c[7], c[8]
        vr_zero = vr == zero
        store_h = h_out.shape[1] > 0
        for b_lo in range(lo, hi, CHUNK):
            b_hi = min(b_lo + CHUNK, hi)
            n = b_hi - b_lo
            vb = v_out[b_lo:b_hi]
            v0b = v0[b_lo:b_hi]
            for i in range(n):
                vb[i] = v0b[i] if has_v0 else vr
            for t in range(t_steps):
                xr = x[t if x_rows > 1 else 0, b_lo:b_hi]
                sr = spikes[t, b_lo:b_hi]
                hr = h_out[t, b_lo:b_hi]  # empty when H is not stored
                for i in range(n):
                    v = vb[i]
                    if decay_input:  # same operations, same order as functional.lif_charge
                        h = v + (xr[i] - (v - vr)) / tau
                    elif vr_zero:
                        h = beta * v + xr[i]
                    else:
                        h = beta * (v - vr) + vr + xr[i]
                    fire = h - vth >= zero
                    sr[i] = one if fire else zero
                    if store_h:
                        hr[i] = h
                    if fire:
                        vb[i] = vr if hard else h - vth
                    else:
                        vb[i] = h
        return 0

    @numba.njit(cache=True, nogil=True)
    def lif_backward(grad_s, h, sg_in, grad_v, grad_x, c, decay_input, hard, detach, kind, lo, hi):  # pragma: no cover
        t_steps = h.shape[0]
        tau, beta, vth, vr, alpha, k, half_alpha, zero, one = c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8]
        for b_lo in range(lo, hi, CHUNK):
            b_hi = min(b_lo + CHUNK, hi)
            n = b_hi - b_lo
            gvb = grad_v[b_lo:b_hi]
            for t in range(t_steps - 1, -1, -1):
                hr = h[t, b_lo:b_hi]
                gsr = grad_s[t, b_lo:b_hi]
                gxr = grad_x[t, b_lo:b_hi]
                sgr = sg_in[t, b_lo:b_hi]  # empty for ATAN
                for i in range(n):
                    hh = hr[i]
                    u = hh - vth
                    if kind == 1:  # SIGMOID: sgr holds sigmoid(alpha u); the rest as Sigmoid.derivative
                        sig = sgr[i]
                        sg = alpha * sig * (one - sig)
                    elif kind == 2:  # ATAN, as ATan.derivative
                        z = k * u
                        sg = half_alpha / (one + z * z)
                    else:
                        sg = sgr[i]
                    gv = gvb[i]
                    gs = gsr[i]
                    if hard:
                        keep = zero if u >= zero else gv  # dL/dV (1 - S)
                        gh = (gs * sg + keep) if detach else ((gs + gv * (vr - hh)) * sg + keep)
                    else:
                        gh = (gs * sg + gv) if detach else ((gs - vth * gv) * sg + gv)
                    if decay_input:  # autograd's order: dX = dH / tau, dV = dH - dX
                        gx = gh / tau
                        gvb[i] = gh - gx
                    else:
                        gx = gh
                        gvb[i] = beta * gh
                    gxr[i] = gx
        return 0

    @numba.njit(cache=True, nogil=True)
    def pack_bits(flat, bits, zero, one, lo, hi):  # pragma: no cover
        """Bytes ``lo:hi`` of ``bits`` from ``flat``; returns how many elements were neither 0 nor 1."""
        n = flat.shape[0]
        bad = 0
        for j in range(lo, hi):
            byte = 0
            for b in range(8):
                idx = 8 * j + b
                if idx < n:
                    val = flat[idx]
                    if val == one:
                        byte |= 1 << b
                    elif val != zero:
                        bad += 1
            bits[j] = byte
        return bad

    @numba.njit(cache=True, nogil=True)
    def unpack_bits(bits, out, zero, one, lo, hi):  # pragma: no cover
        n = out.shape[0]
        for j in range(lo, hi):
            byte = bits[j]
            for b in range(8):
                idx = 8 * j + b
                if idx < n:
                    out[idx] = one if (byte >> b) & 1 else zero
        return 0

    _kernels.update(forward=lif_forward, backward=lif_backward, pack=pack_bits, unpack=unpack_bits)
    return _kernels


def _run(kernel: Callable[..., int], n: int, *args: Any) -> int:
    """``kernel(*args, lo, hi)`` over ``range(n)`` split among ``torch.get_num_threads()`` threads; sums results."""
    global _pool
    threads = max(1, min(torch.get_num_threads(), n // PARALLEL_MIN))
    if threads == 1:
        return kernel(*args, 0, n)
    if _pool is None or _pool[0] != os.getpid():
        _pool = (os.getpid(), ThreadPoolExecutor(max_workers=os.cpu_count() or 1,
                                                 thread_name_prefix="bestformer-kernels"))
    step = -(-n // threads // 64) * 64  # 64-element aligned ranges
    futures = [_pool[1].submit(kernel, *args, lo, min(lo + step, n)) for lo in range(0, n, step)]
    return sum(f.result() for f in futures)


def _constants(spec: KernelSpec, dtype: torch.dtype) -> np.ndarray:
    """Every scalar the kernels use, in the data's dtype (as torch casts a Python scalar for a float32 tensor)."""
    p, a = spec.params, spec.alpha
    values = [p.tau, p.beta, p.v_threshold, p.v_reset, a, math.pi / 2 * a, a / 2, 0.0, 1.0]
    return np.array(values, dtype=np.float32 if dtype == torch.float32 else np.float64)


def forward(x: Tensor, v0: Tensor | None, spec: KernelSpec, store_h: bool) -> tuple[Tensor, Tensor | None, Tensor]:
    """``x`` ``[T, M]`` (rows may repeat with stride 0), ``v0`` ``[M]`` or None -> spikes, ``H`` (if ``store_h``),
    final membrane."""
    k = _compiled()
    t_steps, m = x.shape
    # one compiled layout (C-contiguous): a repeated input is passed once, anything else strided is copied
    x = x[:1] if t_steps > 1 and x.stride(0) == 0 and x[0].is_contiguous() else x.contiguous()
    p = spec.params
    spikes = torch.empty(t_steps, m, dtype=x.dtype)
    h = torch.empty(t_steps, m if store_h else 0, dtype=x.dtype)
    v = torch.empty(m, dtype=x.dtype)
    v0_np = v0.detach().contiguous().numpy() if v0 is not None else v.numpy()
    _run(k["forward"], m, x.detach().numpy(), v0_np, spikes.numpy(), h.numpy(), v.numpy(),
         _constants(spec, x.dtype), p.decay_input, p.reset == "hard", v0 is not None)
    return spikes, (h if store_h else None), v


def backward(grad_s: Tensor, h: Tensor, grad_v: Tensor | None, surrogate: Surrogate, spec: KernelSpec
             ) -> tuple[Tensor, Tensor]:
    """Gradients of ``x`` ``[T, M]`` and of the initial membrane ``[M]`` (see the module docstring).

    The sigmoid itself is evaluated by torch (vectorized; numba would call a scalar ``expf`` per element, 3x slower
    than the whole rest of the kernel) with the same operations as :meth:`Sigmoid.derivative`; ATan is evaluated
    in the kernel; any other surrogate's ``derivative`` runs in torch.
    """
    k = _compiled()
    p = spec.params
    grad_x = torch.empty_like(h)
    gv = torch.zeros(h.shape[1], dtype=h.dtype)
    if grad_v is not None:  # dL/dV[T-1] in, dL/dV[-1] out
        gv.copy_(grad_v)
    if spec.surrogate == ATAN:
        pre = h.new_empty(h.shape[0], 0)
    elif spec.surrogate == SIGMOID:
        pre = (h - p.v_threshold).mul_(spec.alpha).sigmoid_()  # Sigmoid.derivative: sigmoid(alpha (H - V_th))
    else:
        pre = surrogate.derivative(h - p.v_threshold).contiguous()
    _run(k["backward"], h.shape[1], grad_s.detach().to(h.dtype).contiguous().numpy(), h.numpy(), pre.numpy(),
         gv.numpy(), grad_x.numpy(), _constants(spec, h.dtype), p.decay_input, p.reset == "hard", p.detach_reset,
         spec.surrogate)
    return grad_x, gv


def pack_binary(flat: Tensor) -> Tensor | None:
    """``[n]`` float tensor -> ``[ceil(n / 8)]`` uint8 bits (element ``i`` in bit ``i % 8`` of byte ``i // 8``),
    or None if some element is neither 0 nor 1. One pass."""
    k = _compiled()
    bits = torch.empty(-(-flat.numel() // 8), dtype=torch.uint8)
    c = _constants_01(flat.dtype)
    bad = _run(k["pack"], bits.numel(), flat.detach().numpy(), bits.numpy(), c[0], c[1])
    return None if bad else bits


def unpack_binary(bits: Tensor, numel: int, dtype: torch.dtype) -> Tensor:
    """Inverse of :func:`pack_binary`."""
    k = _compiled()
    out = torch.empty(numel, dtype=dtype)
    c = _constants_01(dtype)
    _run(k["unpack"], bits.numel(), bits.numpy(), out.numpy(), c[0], c[1])
    return out


def _constants_01(dtype: torch.dtype) -> np.ndarray:
    return np.array([0.0, 1.0], dtype=np.float32 if dtype == torch.float32 else np.float64)
