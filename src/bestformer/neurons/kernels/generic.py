"""The fused LIF's fallback engine in plain tensor operations: any device, any floating dtype.

It runs where no compiled kernel applies (half / bfloat16 tensors, CUDA without Triton, other devices). It still
saves the plain path's autograd nodes and float copies (one ``[T, M]`` tensor ``H`` is kept for backward, and the
backward is the recursion of :mod:`bestformer.neurons.kernels.cpu`), but it does one operation per formula term
per step rather than one pass per direction.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..functional import lif_charge, lif_reset
from ..surrogate import Surrogate
from .spec import KernelSpec


def supports(x: Tensor) -> bool:
    return x.is_floating_point()


def forward(x: Tensor, v0: Tensor | None, spec: KernelSpec, store_h: bool) -> tuple[Tensor, Tensor | None, Tensor]:
    """Same contract as :func:`bestformer.neurons.kernels.cpu.forward`."""
    p = spec.params
    v = v0 if v0 is not None else torch.full_like(x[0], p.v_reset, memory_format=torch.contiguous_format)
    spikes = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    h_all = torch.empty_like(spikes) if store_h else None
    for t in range(x.shape[0]):
        h = lif_charge(x[t], v, p)  # the plain path's own charge and reset: identical rounding
        torch.ge(h - p.v_threshold, 0, out=spikes[t])
        if h_all is not None:
            h_all[t] = h
        v = lif_reset(h, spikes[t], p)
    return spikes, h_all, v


def backward(grad_s: Tensor, h: Tensor, grad_v: Tensor | None, surrogate: Surrogate, spec: KernelSpec
             ) -> tuple[Tensor, Tensor]:
    """Same contract as :func:`bestformer.neurons.kernels.cpu.backward`."""
    p = spec.params
    sg = surrogate.derivative(h - p.v_threshold)
    gv = grad_v.to(h.dtype) if grad_v is not None else torch.zeros_like(h[0])
    grad_x = torch.empty_like(h)
    for t in range(h.shape[0] - 1, -1, -1):
        fire = h[t] - p.v_threshold >= 0
        keep = gv.masked_fill(fire, 0.0) if p.reset == "hard" else gv
        if p.detach_reset:
            gh = grad_s[t] * sg[t] + keep
        elif p.reset == "hard":
            gh = (grad_s[t] + gv * (p.v_reset - h[t])) * sg[t] + keep
        else:
            gh = (grad_s[t] - p.v_threshold * gv) * sg[t] + keep
        if p.decay_input:
            torch.div(gh, p.tau, out=grad_x[t])
            gv = gh - grad_x[t]
        else:
            grad_x[t] = gh
            gv = p.beta * gh
    return grad_x, gv
