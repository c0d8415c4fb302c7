"""Kernels of the packed runtime's layers: spike packing, the first layer's LIF, pooling, the 3x3 neighbourhood of
a convolution and the binary linear layer (popcount, folded BatchNorm, LIF)."""

from __future__ import annotations

import numpy as np
from numba import njit

from .core import LANES, affine_step, and_popcount8, flags, lif_update, pack64, popcount, unpack_lif

#: output modes of the binary layers
OUT_FLOAT, OUT_BITS, OUT_BYTES = 0, 1, 2


# ------------------------------------------------------------------------------------------------ packing
@njit(nogil=True, cache=True)
def pack_bytes(s, out, lo, hi):  # pragma: no cover - compiled
    """Spikes ``uint8 [T, R, C]`` -> words ``out uint64 [T, R, ceil(C/64)]`` (zeroed), rows ``lo..hi``."""
    t_steps, _, c = s.shape
    f, f8 = flags(c)
    for r in range(lo, hi):
        for t in range(t_steps):
            f[:c] = s[t, r]
            for w0 in range(0, c, 64):
                out[t, r, w0 >> 6] = pack64(f, f8, w0, min(64, c - w0))


@njit(nogil=True, cache=True)
def affine_lif_pack(x, alpha, beta, use_affine, use_fma, lif, out, lo, hi):  # pragma: no cover - compiled
    """LIF over ``T`` on a real tensor ``x [Tx, R, C]`` (``Tx = 1``: the same input at every step, as a static
    image), optionally after the folded BatchNorm ``alpha x + beta``; spikes to ``out uint64 [T, R, Cw]`` (zeroed),
    rows ``lo..hi``."""
    tx, _, c = x.shape
    t_steps = out.shape[0]
    p = unpack_lif(lif)
    h = np.empty(c, np.float32)
    v = np.empty(c, np.float32)
    f, f8 = flags(c)
    for r in range(lo, hi):
        v[:] = p[3]
        for t in range(t_steps):
            src = x[t if tx > 1 else 0, r]
            if use_affine:
                for j in range(c):
                    h[j] = affine_step(src[j], alpha[j], beta[j], use_fma)
            else:
                h[:] = src
            lif_update(h, v, f, c, p)
            for w0 in range(0, c, 64):
                out[t, r, w0 >> 6] = pack64(f, f8, w0, min(64, c - w0))


@njit(nogil=True, cache=True)
def affine(x, alpha, beta, use_fma):  # pragma: no cover - compiled
    """The folded BatchNorm ``alpha x + b`` on ``x [..., C]`` (the exporter checks the folding against PyTorch
    with it; the runtime applies it inside :func:`affine_lif_pack` and :func:`binary_linear`)."""
    flat = x.reshape(-1, x.shape[-1])
    out = np.empty_like(flat)
    for r in range(flat.shape[0]):
        for j in range(flat.shape[1]):
            out[r, j] = affine_step(flat[r, j], alpha[j], beta[j], use_fma)
    return out.reshape(x.shape)


@njit(nogil=True, cache=True)
def maxpool3s2(s, out, lo, hi):  # pragma: no cover - compiled
    """MaxPool(3, stride 2, padding 1) of packed spikes ``s [T, B, H, W, Cw]``: the OR of each window, to
    ``out [T, B, (H-1)//2+1, (W-1)//2+1, Cw]`` (zeroed); work items ``t * B + b`` in ``lo..hi``."""
    _, b, h, w, cw = s.shape
    ho, wo = out.shape[2], out.shape[3]
    for tb in range(lo, hi):
        t, bi = tb // b, tb % b
        for y in range(ho):
            for x in range(wo):
                for yy in range(max(2 * y - 1, 0), min(2 * y + 2, h)):
                    for xx in range(max(2 * x - 1, 0), min(2 * x + 2, w)):
                        for k in range(cw):
                            out[t, bi, y, x, k] |= s[t, bi, yy, xx, k]


@njit(nogil=True, cache=True)
def im2col3x3(s, out, lo, hi):  # pragma: no cover - compiled
    """Packed spikes ``s [T, B, H, W, Kw]`` -> the 3x3 neighbourhood of every pixel, ``out [T, B*H*W, 9*Kw]``
    (zeroed: outside the image the words stay 0, which is the convolution's zero padding for both popcount
    terms); image rows ``b * H + y`` in ``lo..hi``. Word ``(3 dy + dx) * Kw + k`` matches the weight layout."""
    t_steps, _, h, w, kw = s.shape
    for by in range(lo, hi):
        bi, y = by // h, by % h
        for x in range(w):
            r = by * w + x
            for dy in range(3):
                yy = y + dy - 1
                if yy < 0 or yy >= h:
                    continue
                for dx in range(3):
                    xx = x + dx - 1
                    if xx < 0 or xx >= w:
                        continue
                    base = (dy * 3 + dx) * kw
                    for t in range(t_steps):
                        for k in range(kw):
                            out[t, r, base + k] = s[t, bi, yy, xx, k]


# ------------------------------------------------------------------------------------------------ layers
#: rows per tile of the binary layers: a tile's spike words stay in L1 while each weight row is reused for all of
#: its rows and time steps (weights are read from L2 once per tile instead of once per row)
ROW_TILE = 8


@njit(cache=True)
def _accumulate(s, wb, r0, r1, z):  # pragma: no cover - compiled
    """``z[r - r0, t, o] = sum_k popcount(s[t, r, k] AND w[o, k])`` for the rows ``r0..r1`` of a tile, by blocks of
    8 outputs (``wb``: :func:`~.core.block_weights`), each one vector product per row and step."""
    t_steps = s.shape[0]
    for b in range(wb.shape[0]):
        block = wb[b]
        for r in range(r0, r1):
            for t in range(t_steps):
                and_popcount8(s[t, r], block, z[r - r0, t], LANES * b)


@njit(nogil=True, cache=True)
def binary_linear(s, wb, alpha, beta, use_fma, mode, lif, group, out_f32, out_bits, out_u8, lo, hi):  # pragma: no cover
    """``z = W s`` for packed spikes ``s [T, R, Kw]`` and packed +-1 weights ``W [O, Kw]`` in blocks of 8 outputs
    (``wb [ceil(O/8), Kw, 8]``, :func:`~.core.block_weights`), then the folded BN
    ``X = alpha z + beta`` and, for ``mode`` bits/bytes, the LIF that follows over T (``mode`` float: ``X`` to
    ``out_f32 [T, R, O]``). Packed outputs group channels by ``group`` (a head's width): channel ``o`` goes to
    word ``(o // group) * ceil(group / 64) + (o % group) // 64`` of ``out_bits``. Rows ``lo..hi``."""
    t_steps, _, kw = s.shape
    n_out = alpha.shape[0]
    gw = (group + 63) // 64
    p = unpack_lif(lif)
    z = np.empty((ROW_TILE, t_steps, LANES * wb.shape[0]), np.int32)
    pc = np.empty(t_steps, np.int32)
    h = np.empty(n_out, np.float32)
    v = np.empty(n_out, np.float32)
    f, f8 = flags(n_out)
    for r0 in range(lo, hi, ROW_TILE):
        r1 = min(r0 + ROW_TILE, hi)
        _accumulate(s, wb, r0, r1, z)
        for r in range(r0, r1):
            zr = z[r - r0]
            for t in range(t_steps):
                acc = 0
                for k in range(kw):
                    acc += popcount(s[t, r, k])
                pc[t] = acc
            v[:] = p[3]
            for t in range(t_steps):  # time outer: the membranes of the row's channels live in ``v``
                pct = pc[t]
                for o in range(n_out):  # the int32 cast lets LLVM vectorize the conversion to float
                    h[o] = affine_step(np.float32(np.int32(2 * zr[t, o] - pct)), alpha[o], beta[o], use_fma)
                if mode == OUT_FLOAT:
                    out_f32[t, r] = h
                    continue
                lif_update(h, v, f, n_out, p)
                if mode == OUT_BYTES:
                    out_u8[t, r] = f[:n_out]
                    continue
                for g0 in range(0, n_out, group):
                    for c0 in range(0, group, 64):
                        out_bits[t, r, (g0 // group) * gw + c0 // 64] = pack64(f, f8, g0 + c0, min(64, group - c0))
