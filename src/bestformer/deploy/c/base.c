/* ---------------------------------------------------------------------------------------------------------------
 * bestformer C runtime: the layer kernels of a packed 1-bit spiking transformer (template text of
 * bestformer.deploy.c_export, which pastes base.c, popcount.c, layers.c, attention.c and head.c into model.c
 * before the weights).
 *
 * It computes what the numba runtime (bestformer.deploy.kernels) computes, operation for operation:
 *   - binary layers: z = 2 popcount(s AND w+) - popcount(s), an exact integer, then the folded BatchNorm
 *     X = fma(z, alpha, b) (one rounding; BF_BN_FMA = 0: z * alpha + b, two roundings), then the LIF;
 *   - LIF (float32, PyTorch's order): H = V + (X - (V - V_reset)) * (1/tau) (power-of-two tau) or / tau,
 *     H = beta V + X (decay_input false, V_reset = 0) or beta (V - V_reset) + V_reset + X; fire H >= V_th;
 *     reset to V_reset (hard) or H - V_th (soft);
 *   - attention counts: float(popcount) * (lambda * 0.125), one float32 rounding;
 *   - 3x3 binary convolutions: the 9 neighbour words of each pixel (zero words outside the image);
 *     max pooling of spikes: the OR of the 3x3 / stride 2 / padding 1 window;
 *   - the first (full-precision) convolution in double, rounded once to float; the token/time mean and the heads
 *     in double, rounded once (the numba runtime does the same with numpy/BLAS: see docs/deploy.md).
 * Compile with -std=c99 -O2 -ffp-contract=off: nothing but the explicit bf_fmaf may be fused (-O3 -march=native
 * for speed: the same bits).
 * ------------------------------------------------------------------------------------------------------------- */

#if defined(FLT_EVAL_METHOD) && FLT_EVAL_METHOD != 0 && FLT_EVAL_METHOD != -1
#error "bestformer needs float arithmetic evaluated in float (FLT_EVAL_METHOD 0), e.g. SSE2 instead of x87 (-mfpmath=sse)"
#endif
#ifdef __FAST_MATH__
#error "bestformer must not be compiled with -ffast-math (it reorders and fuses float operations)"
#endif
#if defined(__FINITE_MATH_ONLY__) && __FINITE_MATH_ONLY__
#error "bestformer must not be compiled with -ffinite-math-only (inf and NaN tests would be folded away)"
#endif
#if INT_MAX != 2147483647
#error "bestformer needs a 32-bit int (the vector paths store 32-bit counts into int arrays)"
#endif
/* Built with OpenMP (-fopenmp), the row loops of the layers run on up to BF_THREADS threads (one scratch set each
 * in the arena; OMP_NUM_THREADS or omp_set_num_threads can ask for fewer); without it the pragmas vanish and
 * everything runs on the caller's thread. Every row is computed the same way on any thread: the same bits. */
#ifdef _OPENMP
#include <omp.h>
#define BF_PARALLEL_FOR _Pragma("omp parallel for num_threads(bf_threads()) schedule(static)")
#define bf_thread() omp_get_thread_num()
static int bf_threads(void) { /* OMP_NUM_THREADS / omp_set_num_threads, at most the arena's scratch sets */
    const int n = omp_get_max_threads();
    return n < BF_THREADS ? n : BF_THREADS;
}
#else
#define BF_PARALLEL_FOR
#define bf_thread() 0
#endif
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF /* clang contracts a * b + c by default; GCC does not in ISO C modes (-std=c99) */
#endif

/* 1 when the compiler fused a * b + c behind our back (-ffp-contract=fast, gnu99 with an FMA target): the
 * operands are volatile so that nothing is folded; a fused result is 2^-24, the two-rounding one 0. */
static int bf_contracted(void) {
    volatile float a = 1.0f + 0x1p-12f, c = -(1.0f + 0x1p-11f);
    float x = a, y = a, z = c;
    return x * y + z != 0.0f;
}

/* ---- fmaf: a * b + c with one rounding, without libm -------------------------------------------------------
 * With a hardware FMA (__FP_FAST_FMAF: aarch64, x86 with -mfma / -march=native) the compiler builtin, which is one
 * instruction; BF_USE_LIBM_FMAF: libm's fmaf; otherwise an exact emulation in double: the product of two floats is
 * exact in double, s = p + c rounds once, and s rounded to float is the correctly rounded fma unless s is exactly
 * halfway between two floats while p + c is not (the double rounding case), which the exact error of the sum
 * (TwoSum) decides. Needs IEEE double, round-to-nearest and FLT_EVAL_METHOD 0 (checked above). */
#if defined(BF_USE_LIBM_FMAF)
#include <math.h>
#define bf_fmaf(a, b, c) fmaf((a), (b), (c))
#elif defined(__FP_FAST_FMAF) && (defined(__GNUC__) || defined(__clang__))
#define bf_fmaf(a, b, c) __builtin_fmaf((a), (b), (c))
#else
#define BF_SOFT_FMAF 1
#define bf_fmaf(a, b, c) bf_fmaf_soft((a), (b), (c))
#endif

#if (defined(BF_SOFT_FMAF) && BF_BN_FMA) || defined(BESTFORMER_TEST_HOOKS) /* only the BatchNorm uses fma */
static float bf_fmaf_soft(float a, float b, float c) {
    double p = (double)a * (double)b, s = p + (double)c, rd, gd, bb, err;
    float r = (float)s, g;
    uint32_t bits;
    uint64_t u;
    memcpy(&u, &s, sizeof u);
    /* the common case: s in the normal float range and not halfway between two floats (a float midpoint has the
     * low 29 of the 52 mantissa bits equal to 1 followed by zeros) */
    if ((u & UINT64_C(0x1FFFFFFF)) != UINT64_C(0x10000000) &&
        (u & UINT64_C(0x7FF0000000000000)) >= UINT64_C(0x3810000000000000)) return r; /* |s| >= 2^-126 */
    rd = (double)r;
    if (rd == s) return r; /* s is a float: then r is exact enough */
    if (r - r != 0.0f) {   /* inf: s is at or beyond the overflow threshold 2^128 - 2^103 (halfway to 2^128) */
        if ((s < 0.0 ? -s : s) == 0x1.ffffffp127) { /* exactly at it: p + c may lie below, then it is FLT_MAX */
            bb = s - p;
            err = (p - (s - bb)) + ((double)c - bb);
            if (err != 0.0 && (err > 0.0) != (s > 0.0)) return s > 0.0 ? FLT_MAX : -FLT_MAX;
        }
        return r;
    }
    if (r == 0.0f) {
        g = s > 0.0 ? BF_FLT_TRUE_MIN : -BF_FLT_TRUE_MIN;
    } else {
        memcpy(&bits, &r, sizeof bits);
        if ((s < 0.0 ? -s : s) > (rd < 0.0 ? -rd : rd)) bits += 1u; else bits -= 1u; /* the neighbour beyond s */
        memcpy(&g, &bits, sizeof g);
    }
    gd = (double)g;
    if (gd - s != s - rd) return r; /* not a midpoint: rounding s is rounding p + c */
    bb = s - p;
    err = (p - (s - bb)) + ((double)c - bb); /* p + c = s + err exactly */
    if (err == 0.0) return r;               /* a true tie: round-half-even already chose */
    return ((err > 0.0) == (gd > s)) ? g : r;
}
#endif

