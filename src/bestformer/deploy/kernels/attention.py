"""Kernels of the binary attention forms: BESTformer's token form (Eq. 8-9) and the channel form, per (batch,
head) on packed spikes."""

from __future__ import annotations

import numpy as np
from numba import njit

from .core import flags, lif_update, pack64, popcount, unpack_lif


@njit(cache=True)
def _pack_rows(src, t, bi, n0, n1, c0, c1, dst):  # pragma: no cover - compiled
    """dst[i, word] <- bits of src[t, bi, n0 + i, c0:c1] (rows are tokens, bits are channels)."""
    for i in range(n1 - n0):
        for c in range(c1 - c0):
            dst[i, c >> 6] |= np.uint64(src[t, bi, n0 + i, c0 + c]) << np.uint64(c & 63)


@njit(cache=True)
def _pack_cols(src, t, bi, n, c0, c1, dst):  # pragma: no cover - compiled
    """dst[c, word] <- bits of src[t, bi, 0:n, c0 + c] (rows are channels, bits are tokens)."""
    for i in range(n):
        for c in range(c1 - c0):
            dst[c, i >> 6] |= np.uint64(src[t, bi, i, c0 + c]) << np.uint64(i & 63)


@njit(cache=True)
def _head_buffers(q, heads, k_by_rows):  # pragma: no cover - compiled
    """``(T, N, d)`` of one head and its zeroed packed buffers: Q by tokens ``[T, N, ceil(d/64)]``, K by tokens
    (``k_by_rows``) or by channels ``[T, d, ceil(N/64)]``, V by channels."""
    t_steps, _, n, dim = q.shape
    d = dim // heads
    dw, nw = (d + 63) // 64, (n + 63) // 64
    k_shape = (t_steps, n, dw) if k_by_rows else (t_steps, d, nw)
    return (t_steps, n, d, np.zeros((t_steps, n, dw), np.uint64), np.zeros(k_shape, np.uint64),
            np.zeros((t_steps, d, nw), np.uint64))


@njit(cache=True)
def _pack_head(q, k, v, bi, c0, qp, kp, vt, k_by_rows):  # pragma: no cover - compiled
    """Pack channels ``c0:c0 + d`` of batch ``bi`` into the buffers of :func:`_head_buffers` (overwritten)."""
    n, d = q.shape[2], vt.shape[1]
    qp[:] = 0
    kp[:] = 0
    vt[:] = 0
    for t in range(qp.shape[0]):
        _pack_rows(q, t, bi, 0, n, c0, c0 + d, qp[t])
        if k_by_rows:
            _pack_rows(k, t, bi, 0, n, c0, c0 + d, kp[t])
        else:
            _pack_cols(k, t, bi, n, c0, c0 + d, kp[t])
        _pack_cols(v, t, bi, n, c0, c0 + d, vt[t])


@njit(cache=True, inline="always")  # inlined: called in the innermost loops
def _popcount_lif(a, m, sc, lif, h, v, f):  # pragma: no cover - compiled
    """One step of one row of a product of two binary matrices, through its LIF: ``h[j] = popcount(a AND m[j]) *
    sc`` summed over the words (an exact integer count, then one float32 rounding as PyTorch; ``sc = 1`` for a
    binary map is exact), then :func:`lif_update` of the ``len(m)`` neurons, spikes to ``f``."""
    n, words = m.shape
    for j in range(n):
        cnt = 0
        for kk in range(words):
            cnt += popcount(a[kk] & m[j, kk])
        h[j] = np.float32(cnt) * sc
    lif_update(h, v, f, n, lif)


@njit(cache=True, inline="always")  # inlined: called in the innermost loops
def _output_row(a, m, scale, hd, lif, h, v, f, out, bi, i, c0):  # pragma: no cover - compiled
    """Row ``i`` of head ``hd``'s output: ``a [T, W]`` (a packed row) times the binary ``m [T, d, W]``, scaled by
    ``scale[t, hd]`` (lambda * 0.125), through the output LIF over T; spikes to ``out[t, bi, i, c0:c0 + d]``."""
    t_steps, d, _ = m.shape
    v[:] = lif[3]
    for t in range(t_steps):
        _popcount_lif(a[t], m[t], scale[t, hd], lif, h, v, f)
        out[t, bi, i, c0:c0 + d] = f[:d]


@njit(nogil=True, cache=True)
def attention_token(q, k, v, heads, scale, lif_attn, lif_out, out, trace, trace_map, lo, hi):  # pragma: no cover
    """BESTformer's token-form attention (Eq. 8-9) per (batch, head) on spikes ``q, k, v`` (``uint8 [T, B, N, D]``).

    ``A = Q K^T`` (popcount of two packed rows) -> soft-reset LIF over T -> binary map ``B_A``;
    ``P = B_A V`` (popcount of a map row and a packed column of V); ``Y = P * scale[t, head]`` (lambda * 0.125,
    one float32 rounding as PyTorch) -> output LIF over T -> spikes to ``out [T, B, N, D]``. With ``trace`` the
    binary map goes to ``trace_map [T, B, heads, N, N]``. Work items ``batch * heads + head`` in ``lo..hi``.
    """
    t_steps, n, d, qp, kp, vt = _head_buffers(q, heads, True)
    pa, po = unpack_lif(lif_attn), unpack_lif(lif_out)
    row = np.zeros((t_steps, vt.shape[2]), np.uint64)  # row i of B_A, packed over tokens
    h = np.empty(max(n, d), np.float32)
    f, f8 = flags(max(n, d))
    va = np.empty(n, np.float32)
    vo = np.empty(d, np.float32)
    for bh in range(lo, hi):
        bi, hd = bh // heads, bh % heads
        _pack_head(q, k, v, bi, hd * d, qp, kp, vt, True)
        for i in range(n):
            va[:] = pa[3]
            for t in range(t_steps):  # row i of Q K^T, binarized over time
                _popcount_lif(qp[t, i], kp[t], np.float32(1), pa, h, va, f)
                for w0 in range(0, n, 64):
                    row[t, w0 >> 6] = pack64(f, f8, w0, min(64, n - w0))
                if trace:
                    trace_map[t, bi, hd, i] = f[:n]
            _output_row(row, vt, scale, hd, po, h, vo, f, out, bi, i, hd * d)  # row i of B_A V


@njit(nogil=True, cache=True)
def attention_channel(q, k, v, heads, scale, lif_attn, lif_out, out, trace, trace_map, lo, hi):  # pragma: no cover
    """The channel form (the reference's ImageNet variant) per (batch, head): ``KV = K^T V`` (popcount of packed
    columns of K and V) -> soft-reset LIF over T -> binary ``B_KV [d, d]``; ``P = Q B_KV`` -> ``Y = P * scale`` ->
    output LIF -> ``out``. ``trace_map`` is ``[T, B, heads, d, d]``. Work items as :func:`attention_token`."""
    t_steps, n, d, qp, kt, vt = _head_buffers(q, heads, False)
    pa, po = unpack_lif(lif_attn), unpack_lif(lif_out)
    kv = np.zeros((t_steps, d, qp.shape[2]), np.uint64)  # binary K^T V by columns: kv[t, c2] holds the bits over c1
    h = np.empty(d, np.float32)
    f, _ = flags(d)
    vm = np.empty(d, np.float32)
    for bh in range(lo, hi):
        bi, hd = bh // heads, bh % heads
        _pack_head(q, k, v, bi, hd * d, qp, kt, vt, False)
        kv[:] = 0
        for c1 in range(d):
            vm[:] = pa[3]
            for t in range(t_steps):  # row c1 of K^T V, binarized over time
                _popcount_lif(kt[t, c1], vt[t], np.float32(1), pa, h, vm, f)
                for c2 in range(d):
                    kv[t, c2, c1 >> 6] |= np.uint64(f[c2]) << np.uint64(c1 & 63)
                if trace:
                    trace_map[t, bi, hd, c1] = f[:d]
        for i in range(n):  # row i of Q B_KV
            _output_row(qp[:, i], kv, scale, hd, po, h, vm, f, out, bi, i, hd * d)
