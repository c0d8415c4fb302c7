"""Building blocks of the packed runtime's kernels: popcount (scalar, and the vector block product of 8 outputs),
the folded BatchNorm and the LIF step in PyTorch's float32 operation order, and packing spike flags into 64-bit
words (conventions: :mod:`bestformer.deploy.kernels`)."""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core.errors import TypingError
from numba.extending import intrinsic


@intrinsic
def popcount(typingctx, x):  # pragma: no cover - compiled
    """Number of set bits of a uint64 (LLVM ``ctpop``: the POPCNT instruction on x86-64)."""
    sig = types.uint64(types.uint64)

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return sig, codegen


#: output lanes of a weight block: the 8 uint64 words one AVX-512 register holds
LANES = 8


@intrinsic
def and_popcount8(typingctx, x, w, out, o0):  # pragma: no cover - compiled
    """``out[o0 + l] = sum_k popcount(x[k] AND w[k, l])`` for the 8 lanes ``l`` of a weight block ``w [K, 8]`` and
    a packed row ``x [K]`` (uint64), into ``out`` (int32, ``o0 + 8 <= len(out)``); all three C-contiguous.

    Written as LLVM vector code: one ``<8 x i64>`` AND and ``llvm.ctpop`` per input word, which LLVM lowers to this
    CPU's vector popcount (``vpopcntq`` with AVX-512 VPOPCNTDQ, a ``vpshufb`` nibble lookup with AVX2 or SSSE3,
    ``cnt`` on NEON). The scalar form of the same sum (one ``popcnt`` per word) is not vectorized by LLVM."""
    if not all(isinstance(a, types.Array) and a.layout == "C" for a in (x, w, out)):
        raise TypingError("and_popcount8 needs C-contiguous arrays x [K], w [K, 8], out")
    sig = types.void(x, w, out, types.intp)

    def codegen(context, builder, signature, args):
        xa, wa, oa = (context.make_array(ty)(context, builder, a) for ty, a in zip(signature.args[:3], args[:3],
                                                                                   strict=True))
        i32, i64 = ir.IntType(32), ir.IntType(64)
        v8, v8i32 = ir.VectorType(i64, LANES), ir.VectorType(i32, LANES)
        name = "llvm.ctpop.v8i64"
        ctpop = builder.module.globals.get(name) or ir.Function(builder.module, ir.FunctionType(v8, [v8]), name)
        n = builder.extract_value(xa.shape, 0)
        rows = builder.bitcast(wa.data, v8.as_pointer())
        zero = ir.Constant(v8, None)
        entry = builder.basic_block
        loop, done = builder.append_basic_block("block.loop"), builder.append_basic_block("block.done")
        builder.cbranch(builder.icmp_signed(">", n, ir.Constant(i64, 0)), loop, done)
        builder.position_at_end(loop)
        k, acc = builder.phi(i64), builder.phi(v8)
        xk = builder.load(builder.gep(xa.data, [k]))
        splat = builder.shuffle_vector(builder.insert_element(ir.Constant(v8, ir.Undefined), xk, ir.Constant(i32, 0)),
                                       ir.Constant(v8, ir.Undefined), ir.Constant(v8i32, [0] * LANES))
        wk = builder.load(builder.gep(rows, [k]), align=8)
        nxt = builder.add(acc, builder.call(ctpop, [builder.and_(splat, wk)]))
        k1 = builder.add(k, ir.Constant(i64, 1))
        k.add_incoming(ir.Constant(i64, 0), entry)
        k.add_incoming(k1, loop)
        acc.add_incoming(zero, entry)
        acc.add_incoming(nxt, loop)
        builder.cbranch(builder.icmp_signed("<", k1, n), loop, done)
        builder.position_at_end(done)
        total = builder.phi(v8)
        total.add_incoming(zero, entry)
        total.add_incoming(nxt, loop)
        dst = builder.bitcast(builder.gep(oa.data, [args[3]]), v8i32.as_pointer())
        builder.store(builder.trunc(total, v8i32), dst, align=4)
        return context.get_dummy_value()

    return sig, codegen


def block_weights(words: np.ndarray) -> np.ndarray:
    """Packed weights ``[O, K]`` (uint64 words per output) -> blocks of 8 outputs ``[ceil(O/8), K, 8]``, zero
    words padding the last block: the layout of :func:`and_popcount8` (and of the C library's ``bf_gemm``)."""
    o, k = words.shape
    full = np.zeros((-(-o // LANES) * LANES, k), np.uint64)
    full[:o] = words
    return np.ascontiguousarray(full.reshape(full.shape[0] // LANES, LANES, k).transpose(0, 2, 1))


@intrinsic
def fma32(typingctx, a, b, c):  # pragma: no cover - compiled
    """``a * b + c`` with a single float32 rounding (LLVM ``fma``)."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        return builder.fma(*args)

    return sig, codegen


@njit(cache=True)
def affine_step(z, a, b, use_fma):  # pragma: no cover - compiled
    if use_fma:
        return fma32(z, a, b)
    return z * a + b


@njit(cache=True)
def lif_update(h, v, f, n, lif):  # pragma: no cover - compiled
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
def pack64(f, f8, start, n):  # pragma: no cover - compiled
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
def flags(n):  # pragma: no cover - compiled
    """A zeroed byte buffer for ``n`` spike flags and its uint64 view (padded to whole words for :func:`pack64`)."""
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
