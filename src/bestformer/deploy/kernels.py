"""Compiled kernels of the packed runtime (numba; no torch).

Bit conventions: a spike or +1 weight is a set bit; element ``c`` of a row lives in word ``c // 64`` at bit
``c % 64``. For ``s`` in {0,1} and ``w`` in {-1,+1} packed as ``w+`` (bit set where ``w = +1``)::

    sum_c s_c w_c = 2 popcount(s AND w+) - popcount(s)

so a binary layer's accumulator ``z`` is an exact integer. Everything after it repeats PyTorch's float32
arithmetic operation by operation, so that every spike equals the PyTorch model's in eval mode:

- BatchNorm, folded into a per-channel affine ``X = alpha z + b``, evaluated with one rounding (``fma``),
  as PyTorch's CPU kernel does; the exporter checks this on every integer ``z`` the layer can produce and
  records ``"mul_add"`` instead where the exporting machine's PyTorch rounds twice.
- the LIF charge ``H = V + (X - (V - V_reset)) / tau`` (decay_input) or ``H = beta V + X`` in float32 in the
  same order as :func:`bestformer.neurons.functional.lif_charge`; fire ``H >= V_th`` (PyTorch fires where
  ``H - V_th >= 0``, the same set since a float difference is zero only when the operands are equal); reset to
  ``V_reset`` (hard) or ``H - V_th`` (soft).

Numba is compiled without fast-math, so LLVM keeps each rounding and never contracts a multiply-add.

Every kernel is serial, releases the GIL and works on a range ``[lo, hi)`` of its outer loop; the runtime splits
that range over a thread pool. (Serial kernels compile several times faster than numba's ``prange`` ones, which
matters on a first run and in CI, and the thread count stays a plain argument.)
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, types
from numba.extending import intrinsic

#: output modes of the binary layers
OUT_FLOAT, OUT_BITS, OUT_BYTES = 0, 1, 2


@intrinsic
def popcount(typingctx, x):  # pragma: no cover - compiled
    """Number of set bits of a uint64 (LLVM ``ctpop``: the POPCNT instruction on x86-64)."""
    sig = types.uint64(types.uint64)

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return sig, codegen


@intrinsic
def fma32(typingctx, a, b, c):  # pragma: no cover - compiled
    """``a * b + c`` with a single float32 rounding (LLVM ``fma``)."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        return builder.fma(*args)

    return sig, codegen


@njit(cache=True)
def _affine(z, a, b, use_fma):  # pragma: no cover - compiled
    if use_fma:
        return fma32(z, a, b)
    return z * a + b


@njit(cache=True)
def _lif_update(h, v, f, n, lif):  # pragma: no cover - compiled
    """One LIF step of ``n`` neurons, in place: ``h[:n]`` holds the input ``X`` and becomes ``H``, ``v[:n]`` the
    membrane, ``f[:n]`` the spikes (0/1 bytes). Float32 operation for operation as ``lif_charge`` /
    ``lif_reset``; division by a power-of-two ``tau`` is a multiplication by ``1/tau`` (both are the correctly
    rounded value of the same real number, so identical). Written as simple loops that LLVM vectorizes into
    branch-free blends: a branch per spike mispredicts at realistic firing rates (~10x slower)."""
    tau, beta, vth, vr, soft, decay, inv_tau, pow2 = lif
    if decay and pow2:
        for i in range(n):
            h[i] = v[i] + (h[i] - (v[i] - vr)) * inv_tau
    elif decay:
        for i in range(n):
            h[i] = v[i] + (h[i] - (v[i] - vr)) / tau
    elif vr == 0:
        for i in range(n):
            h[i] = beta * v[i] + h[i]
    else:
        for i in range(n):
            h[i] = beta * (v[i] - vr) + vr + h[i]
    if soft:
        for i in range(n):
            fired = h[i] >= vth
            f[i] = fired
            v[i] = (h[i] - vth) if fired else h[i]
    else:
        for i in range(n):
            fired = h[i] >= vth
            f[i] = fired
            v[i] = vr if fired else h[i]


_GATHER = np.uint64(0x0102040810204080)


@njit(cache=True)
def _pack64(f, f8, start, n):  # pragma: no cover - compiled
    """The word whose bit ``j`` is ``f[start + j]`` (0/1 bytes), ``n <= 64``; ``f8`` is ``f`` viewed as uint64.
    Eight flags at a time: for a little-endian word of eight 0/1 bytes, ``(w * 0x0102040810204080) >> 56`` has
    bit ``k`` equal to byte ``k``."""
    bits = np.uint64(0)
    if start % 8 == 0:
        g0 = start // 8
        for g in range((n + 7) // 8):
            bits |= ((f8[g0 + g] * _GATHER) >> np.uint64(56)) << np.uint64(8 * g)
        if n < 64:
            bits &= (np.uint64(1) << np.uint64(n)) - np.uint64(1)
    else:
        for j in range(n):
            bits |= np.uint64(f[start + j]) << np.uint64(j)
    return bits


@njit(cache=True)
def _flags(n):  # pragma: no cover - compiled
    """A zeroed byte buffer for ``n`` spike flags and its uint64 view (padded to whole words for :func:`_pack64`)."""
    f8 = np.zeros((n + 71) // 8, np.uint64)
    return f8.view(np.uint8), f8


@njit(cache=True)
def unpack_lif(lif):  # pragma: no cover - compiled
    """The constants of :func:`lif_vector` as typed scalars."""
    return lif[0], lif[1], lif[2], lif[3], lif[4] != 0, lif[5] != 0, lif[6], lif[7] != 0


def lif_vector(tau: float, v_threshold: float, v_reset: float, soft: bool, decay_input: bool) -> np.ndarray:
    """The float32 constants the kernels read: ``[tau, beta, V_th, V_reset, soft, decay_input, 1/tau, pow2]``.

    ``beta = 1 - 1/tau`` is computed in double and rounded once, as PyTorch rounds a Python scalar operand;
    ``pow2`` marks a ``tau`` whose reciprocal is exact (a power of two)."""
    beta = 1.0 - 1.0 / tau
    mantissa, _ = math.frexp(tau) if math.isfinite(tau) else (0.0, 0)
    pow2 = mantissa == 0.5 and 1.0 / tau >= 2.0**-126
    return np.array([tau, beta, v_threshold, v_reset, float(soft), float(decay_input), 1.0 / tau, float(pow2)],
                    dtype=np.float32)


# ------------------------------------------------------------------------------------------------ packing
@njit(nogil=True, cache=True)
def pack_bytes(s, out, lo, hi):  # pragma: no cover - compiled
    """Spikes ``uint8 [T, R, C]`` -> words ``out uint64 [T, R, ceil(C/64)]`` (zeroed), rows ``lo..hi``."""
    t_steps, _, c = s.shape
    f, f8 = _flags(c)
    for r in range(lo, hi):
        for t in range(t_steps):
            f[:c] = s[t, r]
            for w0 in range(0, c, 64):
                out[t, r, w0 >> 6] = _pack64(f, f8, w0, min(64, c - w0))


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
    f, f8 = _flags(c)
    for r in range(lo, hi):
        v[:] = p[3]
        for t in range(t_steps):
            src = x[t if tx > 1 else 0, r]
            if use_affine:
                for j in range(c):
                    h[j] = _affine(src[j], alpha[j], beta[j], use_fma)
            else:
                h[:] = src
            _lif_update(h, v, f, c, p)
            for w0 in range(0, c, 64):
                out[t, r, w0 >> 6] = _pack64(f, f8, w0, min(64, c - w0))


@njit(nogil=True, cache=True)
def affine(x, alpha, beta, use_fma):  # pragma: no cover - compiled
    """The folded BatchNorm ``alpha x + b`` on ``x [..., C]`` (the exporter checks the folding against PyTorch
    with it; the runtime applies it inside :func:`affine_lif_pack` and :func:`binary_linear`)."""
    flat = x.reshape(-1, x.shape[-1])
    out = np.empty_like(flat)
    for r in range(flat.shape[0]):
        for j in range(flat.shape[1]):
            out[r, j] = _affine(flat[r, j], alpha[j], beta[j], use_fma)
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
def _accumulate(s, w, r0, r1, z):  # pragma: no cover - compiled
    """``z[r - r0, t, o] = sum_k popcount(s[t, r, k] AND w[o, k])`` for the rows ``r0..r1`` of a tile, four outputs
    at a time (one spike word in a register serves four weight rows)."""
    t_steps, _, kw = s.shape
    n_out = w.shape[0]
    o = 0
    while o + 4 <= n_out:
        for r in range(r0, r1):
            for t in range(t_steps):
                a0 = a1 = a2 = a3 = 0
                for k in range(kw):
                    sk = s[t, r, k]
                    a0 += popcount(sk & w[o, k])
                    a1 += popcount(sk & w[o + 1, k])
                    a2 += popcount(sk & w[o + 2, k])
                    a3 += popcount(sk & w[o + 3, k])
                z[r - r0, t, o], z[r - r0, t, o + 1], z[r - r0, t, o + 2], z[r - r0, t, o + 3] = a0, a1, a2, a3
        o += 4
    while o < n_out:
        for r in range(r0, r1):
            for t in range(t_steps):
                acc = 0
                for k in range(kw):
                    acc += popcount(s[t, r, k] & w[o, k])
                z[r - r0, t, o] = acc
        o += 1


@njit(nogil=True, cache=True)
def binary_linear(s, w, alpha, beta, use_fma, mode, lif, group, out_f32, out_bits, out_u8, lo, hi):  # pragma: no cover
    """``z = W s`` for packed spikes ``s [T, R, Kw]`` and packed +-1 weights ``w [O, Kw]``, then the folded BN
    ``X = alpha z + beta`` and, for ``mode`` bits/bytes, the LIF that follows over T (``mode`` float: ``X`` to
    ``out_f32 [T, R, O]``). Packed outputs group channels by ``group`` (a head's width): channel ``o`` goes to
    word ``(o // group) * ceil(group / 64) + (o % group) // 64`` of ``out_bits``. Rows ``lo..hi``."""
    t_steps, _, kw = s.shape
    n_out = w.shape[0]
    gw = (group + 63) // 64
    p = unpack_lif(lif)
    z = np.empty((ROW_TILE, t_steps, n_out), np.int32)
    pc = np.empty(t_steps, np.int32)
    h = np.empty(n_out, np.float32)
    v = np.empty(n_out, np.float32)
    f, f8 = _flags(n_out)
    for r0 in range(lo, hi, ROW_TILE):
        r1 = min(r0 + ROW_TILE, hi)
        _accumulate(s, w, r0, r1, z)
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
                    h[o] = _affine(np.float32(np.int32(2 * zr[t, o] - pct)), alpha[o], beta[o], use_fma)
                if mode == OUT_FLOAT:
                    out_f32[t, r] = h
                    continue
                _lif_update(h, v, f, n_out, p)
                if mode == OUT_BYTES:
                    out_u8[t, r] = f[:n_out]
                    continue
                for g0 in range(0, n_out, group):
                    for c0 in range(0, group, 64):
                        out_bits[t, r, (g0 // group) * gw + c0 // 64] = _pack64(f, f8, g0 + c0, min(64, group - c0))


# --------------------------------------------------------------------------------------------- attention
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


@njit(nogil=True, cache=True)
def attention_token(q, k, v, heads, scale, lif_attn, lif_out, out, trace, trace_map, lo, hi):  # pragma: no cover
    """BESTformer's token-form attention (Eq. 8-9) per (batch, head) on spikes ``q, k, v`` (``uint8 [T, B, N, D]``).

    ``A = Q K^T`` (popcount of two packed rows) -> soft-reset LIF over T -> binary map ``B_A``;
    ``P = B_A V`` (popcount of a map row and a packed column of V); ``Y = P * scale[t, head]`` (lambda * 0.125,
    one float32 rounding as PyTorch) -> output LIF over T -> spikes to ``out [T, B, N, D]``. With ``trace`` the
    binary map goes to ``trace_map [T, B, heads, N, N]``. Work items ``batch * heads + head`` in ``lo..hi``.
    """
    t_steps, _, n, dim = q.shape
    d = dim // heads
    dw, nw = (d + 63) // 64, (n + 63) // 64
    pa, po = unpack_lif(lif_attn), unpack_lif(lif_out)
    qp = np.zeros((t_steps, n, dw), np.uint64)
    kp = np.zeros((t_steps, n, dw), np.uint64)
    vt = np.zeros((t_steps, d, nw), np.uint64)
    row = np.zeros((t_steps, nw), np.uint64)
    h = np.empty(max(n, d), np.float32)
    f, f8 = _flags(max(n, d))
    va = np.empty(n, np.float32)
    vo = np.empty(d, np.float32)
    for bh in range(lo, hi):
        bi, hd = bh // heads, bh % heads
        c0 = hd * d
        qp[:] = 0
        kp[:] = 0
        vt[:] = 0
        for t in range(t_steps):
            _pack_rows(q, t, bi, 0, n, c0, c0 + d, qp[t])
            _pack_rows(k, t, bi, 0, n, c0, c0 + d, kp[t])
            _pack_cols(v, t, bi, n, c0, c0 + d, vt[t])
        for i in range(n):
            va[:] = pa[3]
            for t in range(t_steps):  # row i of Q K^T, binarized over time
                for j in range(n):
                    cnt = 0
                    for kk in range(dw):
                        cnt += popcount(qp[t, i, kk] & kp[t, j, kk])
                    h[j] = np.float32(cnt)
                _lif_update(h, va, f, n, pa)
                for w0 in range(0, n, 64):
                    row[t, w0 >> 6] = _pack64(f, f8, w0, min(64, n - w0))
                if trace:
                    trace_map[t, bi, hd, i] = f[:n]
            vo[:] = po[3]
            for t in range(t_steps):  # row i of B_A V, scaled, through the output neuron
                sc = scale[t, hd]
                for c in range(d):
                    cnt = 0
                    for kk in range(nw):
                        cnt += popcount(row[t, kk] & vt[t, c, kk])
                    h[c] = np.float32(cnt) * sc
                _lif_update(h, vo, f, d, po)
                out[t, bi, i, c0:c0 + d] = f[:d]


@njit(nogil=True, cache=True)
def attention_channel(q, k, v, heads, scale, lif_attn, lif_out, out, trace, trace_map, lo, hi):  # pragma: no cover
    """The channel form (the reference's ImageNet variant) per (batch, head): ``KV = K^T V`` (popcount of packed
    columns of K and V) -> soft-reset LIF over T -> binary ``B_KV [d, d]``; ``P = Q B_KV`` -> ``Y = P * scale`` ->
    output LIF -> ``out``. ``trace_map`` is ``[T, B, heads, d, d]``. Work items as :func:`attention_token`."""
    t_steps, _, n, dim = q.shape
    d = dim // heads
    dw, nw = (d + 63) // 64, (n + 63) // 64
    pa, po = unpack_lif(lif_attn), unpack_lif(lif_out)
    qp = np.zeros((t_steps, n, dw), np.uint64)
    kt = np.zeros((t_steps, d, nw), np.uint64)
    vt = np.zeros((t_steps, d, nw), np.uint64)
    kv = np.zeros((t_steps, d, dw), np.uint64)  # binary K^T V by columns: kv[t, c2] holds the bits over c1
    h = np.empty(d, np.float32)
    f, _ = _flags(d)
    vm = np.empty(d, np.float32)
    for bh in range(lo, hi):
        bi, hd = bh // heads, bh % heads
        c0 = hd * d
        qp[:] = 0
        kt[:] = 0
        vt[:] = 0
        kv[:] = 0
        for t in range(t_steps):
            _pack_rows(q, t, bi, 0, n, c0, c0 + d, qp[t])
            _pack_cols(k, t, bi, n, c0, c0 + d, kt[t])
            _pack_cols(v, t, bi, n, c0, c0 + d, vt[t])
        for c1 in range(d):
            vm[:] = pa[3]
            for t in range(t_steps):  # row c1 of K^T V, binarized over time
                for c2 in range(d):
                    cnt = 0
                    for kk in range(nw):
                        cnt += popcount(kt[t, c1, kk] & vt[t, c2, kk])
                    h[c2] = np.float32(cnt)
                _lif_update(h, vm, f, d, pa)
                for c2 in range(d):
                    kv[t, c2, c1 >> 6] |= np.uint64(f[c2]) << np.uint64(c1 & 63)
                if trace:
                    trace_map[t, bi, hd, c1] = f[:d]
        for i in range(n):
            vm[:] = po[3]
            for t in range(t_steps):  # row i of Q B_KV, scaled, through the output neuron
                for c in range(d):
                    cnt = 0
                    for kk in range(dw):
                        cnt += popcount(qp[t, i, kk] & kv[t, c, kk])
                    h[c] = np.float32(cnt) * scale[t, hd]
                _lif_update(h, vm, f, d, po)
                out[t, bi, i, c0:c0 + d] = f[:d]
