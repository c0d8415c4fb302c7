/* ---------------------------------------------------------------------------------------------------------------
 * bestformer C runtime: the layer kernels of a packed 1-bit spiking transformer (template text of
 * bestformer.deploy.c_export; the exporter pastes it into model.c after the weights).
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
 * Compile with -std=c99 -O2 -ffp-contract=off: nothing but the explicit bf_fmaf may be fused.
 * ------------------------------------------------------------------------------------------------------------- */

#if defined(FLT_EVAL_METHOD) && FLT_EVAL_METHOD != 0 && FLT_EVAL_METHOD != -1
#error "bestformer needs float arithmetic evaluated in float (FLT_EVAL_METHOD 0), e.g. SSE2 instead of x87 (-mfpmath=sse)"
#endif
#ifdef __FAST_MATH__
#error "bestformer must not be compiled with -ffast-math (it reorders and fuses float operations)"
#endif
#if INT_MAX < 2147483647
#error "bestformer needs an int of at least 32 bits"
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

/* ---- popcount: one portable scalar function chosen at compile time ------------------------------------------
 * Hook for vector paths (AVX-512 VPOPCNTDQ, AVX2 nibble lookup, NEON vcnt): define BF_AND_POPCOUNT(a, b, n)
 * before this point (or with -D) as an expression summing popcount(a[k] & b[k]) for k < n over uint64_t arrays;
 * every binary product of this file goes through bf_and_popcount, and bf_popcount_words for popcount(s). E.g.
 *     my_popcount.h:  static int my_and_popcount(const uint64_t *a, const uint64_t *b, int n);  (AVX-512:
 *                     _mm512_popcnt_epi64 over 8 words at a time, then the scalar tail)
 *     cc -std=c99 -O2 -ffp-contract=off -mavx512vpopcntdq -include my_popcount.h \
 *        -DBF_AND_POPCOUNT=my_and_popcount -c model.c
 * The counts are exact integers, so any summation order gives the same result. */
#ifndef BF_POPCOUNT64
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__POPCNT__) || !(defined(__x86_64__) || defined(__i386__)))
/* the compiler's builtin: one instruction where the target has one (x86 with -mpopcnt / -march=native, aarch64) */
#define BF_POPCOUNT64(x) ((int)__builtin_popcountll((unsigned long long)(x)))
#else
/* the bit trick: on x86 without POPCNT the builtin is a libgcc call, slower than this (8.4 vs 6.1 ms measured) */
static int bf_popcount64_portable(uint64_t x) {
    x = x - ((x >> 1) & UINT64_C(0x5555555555555555));
    x = (x & UINT64_C(0x3333333333333333)) + ((x >> 2) & UINT64_C(0x3333333333333333));
    x = (x + (x >> 4)) & UINT64_C(0x0F0F0F0F0F0F0F0F);
    return (int)((x * UINT64_C(0x0101010101010101)) >> 56);
}
#define BF_POPCOUNT64(x) bf_popcount64_portable(x)
#endif
#endif

static int bf_and_popcount(const uint64_t *a, const uint64_t *b, int n) {
#ifdef BF_AND_POPCOUNT
    return BF_AND_POPCOUNT(a, b, n);
#else
    int k, acc = 0;
    for (k = 0; k < n; k++) acc += BF_POPCOUNT64(a[k] & b[k]);
    return acc;
#endif
}

static int bf_popcount_words(const uint64_t *a, int n) {
    int k, acc = 0;
    for (k = 0; k < n; k++) acc += BF_POPCOUNT64(a[k]);
    return acc;
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

#if defined(BF_SOFT_FMAF) || defined(BESTFORMER_TEST_HOOKS)
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
    if (rd == s || r - r != 0.0f) return r; /* s is a float (then r is exact enough), or overflow to inf */
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

/* ---- the LIF neuron ----------------------------------------------------------------------------------------- */
typedef struct {
    float tau, beta, vth, vr, inv_tau;
    int soft, decay, pow2;
} bf_lif_t;

/* One step of n neurons in place: h holds X and becomes H, v the membranes, f the spikes (0/1). */
static void bf_lif_step(const bf_lif_t *p, float *h, float *v, unsigned char *f, int n) {
    int i;
    const float vr = p->vr, vth = p->vth;
    if (p->decay && p->pow2) {
        for (i = 0; i < n; i++) h[i] = v[i] + (h[i] - (v[i] - vr)) * p->inv_tau;
    } else if (p->decay) {
        for (i = 0; i < n; i++) h[i] = v[i] + (h[i] - (v[i] - vr)) / p->tau;
    } else if (vr == 0.0f) {
        for (i = 0; i < n; i++) h[i] = p->beta * v[i] + h[i];
    } else {
        for (i = 0; i < n; i++) h[i] = p->beta * (v[i] - vr) + vr + h[i];
    }
    if (p->soft) {
        for (i = 0; i < n; i++) {
            int fired = h[i] >= vth;
            f[i] = (unsigned char)fired;
            v[i] = fired ? h[i] - vth : h[i];
        }
    } else {
        for (i = 0; i < n; i++) {
            int fired = h[i] >= vth;
            f[i] = (unsigned char)fired;
            v[i] = fired ? vr : h[i];
        }
    }
}

static void bf_fill(float *v, float x, int n) {
    int i;
    for (i = 0; i < n; i++) v[i] = x;
}

/* word of flags f[0..n), n <= 64: bit j = f[j] */
static uint64_t bf_pack(const unsigned char *f, int n) {
    uint64_t w = 0;
    int j;
    for (j = 0; j < n; j++) w |= (uint64_t)f[j] << j;
    return w;
}

static float bf_affine(float z, float a, float b) {
#if BF_BN_FMA
    return bf_fmaf(z, a, b);
#else
    return z * a + b;
#endif
}

#define BF_WORDS(n) (((n) + 63) / 64)

/* scratch vectors, carved from the arena by bestformer_predict */
typedef struct {
    float *h, *v, *v2;     /* [BF_MAXW] */
    unsigned char *f;      /* [BF_MAXW + 64] */
    int *z;                /* [T * BF_MAXW] */
    int *pc;               /* [T] */
    float *y;              /* [BF_MAXW]: first convolution outputs of one pixel */
    uint64_t *row, *kv;    /* attention: a map row [T][nw] / the channel map [T][d][dw] */
} bf_scratch_t;

/* ---- stem: first convolution (full precision) + folded BN + LIF -> packed spikes -----------------------------
 * img: [tx][C][H][W] (tx = 1: a static image repeated at every step; tx = T: event frames);
 * w: [O][C][3][3]; out: [T][H*W][BF_WORDS(O)]. */
static void bf_stem_conv(const float *img, int tx, int c_in, int hgt, int wid, const float *w, const float *alpha,
                         const float *beta, int n_out, const bf_lif_t *lif, uint64_t *out, const bf_scratch_t *s) {
    int y, x, t, o, c, dy, dx, g;
    const int ow = BF_WORDS(n_out);
    for (y = 0; y < hgt; y++) {
        for (x = 0; x < wid; x++) {
            size_t r = (size_t)y * wid + x;
            bf_fill(s->v, lif->vr, n_out);
            for (t = 0; t < BF_T; t++) {
                if (t < tx) { /* the convolution of frame t (static: frame 0 once) */
                    const float *frame = img + (size_t)t * c_in * hgt * wid;
                    for (o = 0; o < n_out; o++) {
                        double acc = 0.0;
                        for (c = 0; c < c_in; c++)
                            for (dy = 0; dy < 3; dy++) {
                                int yy = y + dy - 1;
                                if (yy < 0 || yy >= hgt) continue;
                                for (dx = 0; dx < 3; dx++) {
                                    int xx = x + dx - 1;
                                    if (xx < 0 || xx >= wid) continue;
                                    acc += (double)frame[((size_t)c * hgt + yy) * wid + xx] *
                                           (double)w[(((size_t)o * c_in + c) * 3 + dy) * 3 + dx];
                                }
                            }
                        s->y[o] = (float)acc;
                    }
                }
                for (o = 0; o < n_out; o++) s->h[o] = bf_affine(s->y[o], alpha[o], beta[o]);
                bf_lif_step(lif, s->h, s->v, s->f, n_out);
                for (g = 0; g < ow; g++) {
                    int n = n_out - 64 * g;
                    out[((size_t)t * hgt * wid + r) * ow + g] = bf_pack(s->f + 64 * g, n < 64 ? n : 64);
                }
            }
        }
    }
}

/* ---- max pooling (3, stride 2, padding 1) of packed spikes: the OR of each window ----------------------------
 * in: [T][H][W][kw] -> out: [T][(H-1)/2+1][(W-1)/2+1][kw] */
static void bf_maxpool(const uint64_t *in, int hgt, int wid, int kw, uint64_t *out) {
    const int ho = (hgt - 1) / 2 + 1, wo = (wid - 1) / 2 + 1;
    int t, y, x, yy, xx, k;
    for (t = 0; t < BF_T; t++)
        for (y = 0; y < ho; y++)
            for (x = 0; x < wo; x++) {
                uint64_t *dst = out + (((size_t)t * ho + y) * wo + x) * kw;
                for (k = 0; k < kw; k++) dst[k] = 0;
                for (yy = (2 * y - 1 > 0 ? 2 * y - 1 : 0); yy < 2 * y + 2 && yy < hgt; yy++)
                    for (xx = (2 * x - 1 > 0 ? 2 * x - 1 : 0); xx < 2 * x + 2 && xx < wid; xx++) {
                        const uint64_t *src = in + (((size_t)t * hgt + yy) * wid + xx) * kw;
                        for (k = 0; k < kw; k++) dst[k] |= src[k];
                    }
            }
}

/* output modes of the binary layers */
#define BF_OUT_BITS 0   /* LIF, spikes packed by groups of `group` channels (a head's width) */
#define BF_OUT_BITS_T 1 /* LIF, spikes transposed per head: [heads][T][group][BF_WORDS(rows)], bits over rows */
#define BF_OUT_FLOAT 2  /* X to out_f [T][rows][O] */
#define BF_OUT_REV 3    /* out_f = X + (out_f + other) / 2 (reversible coupling, in place) */
#define BF_OUT_RES 4    /* out_f = out_f + X (residual, in place) */

/* The epilogue of a binary layer for one row: z [T][O] (AND counts), pc [T] (popcount of the inputs). */
static void bf_epilogue(const int *z, const int *pc, size_t r, size_t rows, const float *alpha, const float *beta,
                        int n_out, int mode, const bf_lif_t *lif, int group, uint64_t *out_b, float *out_f,
                        const float *other, const bf_scratch_t *s) {
    int t, o, g, c0;
    const int gw = BF_WORDS(group), n_groups = n_out / (group > 0 ? group : 1);
    if (mode == BF_OUT_BITS || mode == BF_OUT_BITS_T) bf_fill(s->v, lif->vr, n_out);
    for (t = 0; t < BF_T; t++) {
        for (o = 0; o < n_out; o++) s->h[o] = bf_affine((float)(2 * z[t * n_out + o] - pc[t]), alpha[o], beta[o]);
        if (mode == BF_OUT_FLOAT || mode == BF_OUT_REV || mode == BF_OUT_RES) {
            float *dst = out_f + ((size_t)t * rows + r) * n_out;
            const float *oth = other ? other + ((size_t)t * rows + r) * n_out : dst;
            for (o = 0; o < n_out; o++) {
                if (mode == BF_OUT_FLOAT) dst[o] = s->h[o];
                else if (mode == BF_OUT_REV) dst[o] = s->h[o] + (dst[o] + oth[o]) / 2.0f;
                else dst[o] = dst[o] + s->h[o];
            }
            continue;
        }
        bf_lif_step(lif, s->h, s->v, s->f, n_out);
        if (mode == BF_OUT_BITS) {
            for (g = 0; g < n_groups; g++)
                for (c0 = 0; c0 < group; c0 += 64) {
                    int n = group - c0;
                    out_b[((size_t)t * rows + r) * (n_groups * gw) + g * gw + c0 / 64] =
                        bf_pack(s->f + g * group + c0, n < 64 ? n : 64);
                }
        } else { /* transposed: bit r of word [head][t][c] */
            const int rw = BF_WORDS((int)rows);
            for (o = 0; o < n_out; o++)
                if (s->f[o])
                    out_b[(((size_t)(o / group) * BF_T + t) * group + o % group) * rw + r / 64] |=
                        (uint64_t)1 << (r % 64);
        }
    }
}

/* ---- binary 3x3 convolution on packed spikes in: [T][H][W][kw], weights [O][9][kw] (neighbour major) -------- */
static void bf_conv3x3(const uint64_t *in, int hgt, int wid, int kw, const uint64_t *w, const float *alpha,
                       const float *beta, int n_out, int mode, const bf_lif_t *lif, uint64_t *out_b, float *out_f,
                       const bf_scratch_t *s) {
    int y, x, t, o, dy, dx;
    const size_t rows = (size_t)hgt * wid;
    for (y = 0; y < hgt; y++)
        for (x = 0; x < wid; x++) {
            for (t = 0; t < BF_T; t++) {
                s->pc[t] = 0;
                for (o = 0; o < n_out; o++) s->z[t * n_out + o] = 0;
                for (dy = 0; dy < 3; dy++) {
                    int yy = y + dy - 1;
                    if (yy < 0 || yy >= hgt) continue; /* zero words: no contribution to either count */
                    for (dx = 0; dx < 3; dx++) {
                        int xx = x + dx - 1;
                        const uint64_t *src;
                        if (xx < 0 || xx >= wid) continue;
                        src = in + (((size_t)t * hgt + yy) * wid + xx) * kw;
                        s->pc[t] += bf_popcount_words(src, kw);
                        for (o = 0; o < n_out; o++)
                            s->z[t * n_out + o] += bf_and_popcount(src, w + ((size_t)o * 9 + dy * 3 + dx) * kw, kw);
                    }
                }
            }
            bf_epilogue(s->z, s->pc, (size_t)y * wid + x, rows, alpha, beta, n_out, mode, lif, n_out, out_b, out_f,
                        NULL, s);
        }
}

/* ---- binary linear layer on packed spikes in: [T][rows][kw], weights [O][kw] ------------------------------- */
static void bf_linear(const uint64_t *in, size_t rows, int kw, const uint64_t *w, const float *alpha,
                      const float *beta, int n_out, int mode, const bf_lif_t *lif, int group, uint64_t *out_b,
                      float *out_f, const float *other, const bf_scratch_t *s) {
    size_t r;
    int t, o;
    for (r = 0; r < rows; r++) {
        for (t = 0; t < BF_T; t++) {
            const uint64_t *src = in + ((size_t)t * rows + r) * kw;
            s->pc[t] = bf_popcount_words(src, kw);
            for (o = 0; o < n_out; o++) s->z[t * n_out + o] = bf_and_popcount(src, w + (size_t)o * kw, kw);
        }
        bf_epilogue(s->z, s->pc, r, rows, alpha, beta, n_out, mode, lif, group, out_b, out_f, other, s);
    }
}

/* ---- LIF of a real-valued stream x [T][rows][n] -> packed spikes [T][rows][BF_WORDS(n)] ---------------------- */
static void bf_lif_stream(const float *x, size_t rows, int n, const bf_lif_t *lif, uint64_t *out,
                          const bf_scratch_t *s) {
    size_t r;
    int t, g, o;
    const int ow = BF_WORDS(n);
    for (r = 0; r < rows; r++) {
        bf_fill(s->v, lif->vr, n);
        for (t = 0; t < BF_T; t++) {
            const float *src = x + ((size_t)t * rows + r) * n;
            for (o = 0; o < n; o++) s->h[o] = src[o];
            bf_lif_step(lif, s->h, s->v, s->f, n);
            for (g = 0; g < ow; g++) {
                int m = n - 64 * g;
                out[((size_t)t * rows + r) * ow + g] = bf_pack(s->f + 64 * g, m < 64 ? m : 64);
            }
        }
    }
}

/* One output row of a head: a [T] packed rows (stride a_stride words, aw words each) times the binary m
 * [T][d][aw], scaled by scale[t * heads + hd], through the output LIF; spikes OR-ed into out [T][N][ow] at
 * channels c0..c0+d of token i. */
static void bf_output_row(const uint64_t *a, size_t a_stride, const uint64_t *m, int d, int aw, const float *scale,
                          int heads, int hd, const bf_lif_t *lif, uint64_t *out, size_t n_tok, int ow, size_t i,
                          int c0, const bf_scratch_t *s) {
    int t, c;
    bf_fill(s->v2, lif->vr, d);
    for (t = 0; t < BF_T; t++) {
        const float sc = scale[t * heads + hd];
        for (c = 0; c < d; c++)
            s->h[c] = (float)bf_and_popcount(a + t * a_stride, m + ((size_t)t * d + c) * aw, aw) * sc;
        bf_lif_step(lif, s->h, s->v2, s->f, d);
        for (c = 0; c < d; c++)
            if (s->f[c]) out[((size_t)t * n_tok + i) * ow + (c0 + c) / 64] |= (uint64_t)1 << ((c0 + c) % 64);
    }
}

#if !BF_ATTENTION_CHANNEL
/* ---- token-form attention (Eq. 8-9) ------------------------------------------------------------------------
 * q, k: [T][N][heads * dw] (head hd at word hd * dw); vt: [heads][T][d][nw]; out (zeroed): [T][N][ow]. */
static void bf_attention_token(const uint64_t *q, const uint64_t *k, const uint64_t *vt, size_t n_tok, int heads,
                               int d, const float *scale, const bf_lif_t *lif_attn, const bf_lif_t *lif_out,
                               uint64_t *out, int ow, const bf_scratch_t *s) {
    const int dw = BF_WORDS(d), nw = BF_WORDS((int)n_tok), hw = heads * dw;
    int hd, t, g;
    size_t i, j;
    for (hd = 0; hd < heads; hd++) {
        const uint64_t *vh = vt + (size_t)hd * BF_T * d * nw;
        for (i = 0; i < n_tok; i++) {
            bf_fill(s->v, lif_attn->vr, (int)n_tok);
            for (t = 0; t < BF_T; t++) { /* row i of Q K^T, binarized over time */
                const uint64_t *qi = q + ((size_t)t * n_tok + i) * hw + hd * dw;
                for (j = 0; j < n_tok; j++)
                    s->h[j] = (float)bf_and_popcount(qi, k + ((size_t)t * n_tok + j) * hw + hd * dw, dw) * 1.0f;
                bf_lif_step(lif_attn, s->h, s->v, s->f, (int)n_tok);
                for (g = 0; g < nw; g++) {
                    int m = (int)n_tok - 64 * g;
                    s->row[t * nw + g] = bf_pack(s->f + 64 * g, m < 64 ? m : 64);
                }
            }
            bf_output_row(s->row, (size_t)nw, vh, d, nw, scale, heads, hd, lif_out, out, n_tok, ow, i, hd * d, s);
        }
    }
}

#else
/* ---- channel-form attention ---------------------------------------------------------------------------------
 * q: [T][N][heads * dw]; kt, vt: [heads][T][d][nw]; out (zeroed): [T][N][ow]. */
static void bf_attention_channel(const uint64_t *q, const uint64_t *kt, const uint64_t *vt, size_t n_tok,
                                 int heads, int d, const float *scale, const bf_lif_t *lif_attn,
                                 const bf_lif_t *lif_out, uint64_t *out, int ow, const bf_scratch_t *s) {
    const int dw = BF_WORDS(d), nw = BF_WORDS((int)n_tok), hw = heads * dw;
    int hd, t, c1, c2;
    size_t i, k;
    for (hd = 0; hd < heads; hd++) {
        const uint64_t *kh = kt + (size_t)hd * BF_T * d * nw, *vh = vt + (size_t)hd * BF_T * d * nw;
        for (k = 0; k < (size_t)BF_T * d * dw; k++) s->kv[k] = 0;
        for (c1 = 0; c1 < d; c1++) {
            bf_fill(s->v, lif_attn->vr, d);
            for (t = 0; t < BF_T; t++) { /* row c1 of K^T V, binarized over time */
                for (c2 = 0; c2 < d; c2++)
                    s->h[c2] = (float)bf_and_popcount(kh + ((size_t)t * d + c1) * nw, vh + ((size_t)t * d + c2) * nw,
                                                      nw) * 1.0f;
                bf_lif_step(lif_attn, s->h, s->v, s->f, d);
                for (c2 = 0; c2 < d; c2++)
                    if (s->f[c2]) s->kv[((size_t)t * d + c2) * dw + c1 / 64] |= (uint64_t)1 << (c1 % 64);
            }
        }
        for (i = 0; i < n_tok; i++) /* row i of Q B_KV */
            bf_output_row(q + i * hw + hd * dw, n_tok * hw, s->kv, d, dw, scale, heads, hd, lif_out, out, n_tok, ow,
                          i, hd * d, s);
    }
}

#endif

/* ---- pooled features and heads (double, one rounding at the end, as the numba runtime) ---------------------- */
static void bf_mean_tokens(const float *x, size_t n_tok, int d, double *feat) {
    int t, c;
    size_t n;
    for (c = 0; c < d; c++) feat[c] = 0.0;
    for (t = 0; t < BF_T; t++) /* numpy's order: time, then tokens */
        for (n = 0; n < n_tok; n++)
            for (c = 0; c < d; c++) feat[c] += (double)x[((size_t)t * n_tok + n) * d + c];
    for (c = 0; c < d; c++) feat[c] = feat[c] / (double)((size_t)BF_T * n_tok);
}

static double bf_head_logit(const double *feat, const float *w, const float *b, int d, int cls) {
    double acc = 0.0;
    int c;
    for (c = 0; c < d; c++) acc += feat[c] * (double)w[(size_t)cls * d + c];
    return acc + (double)b[cls];
}

static int bf_check_input(const float *x, size_t n) {
    size_t i;
    for (i = 0; i < n; i++)
        if (!(x[i] - x[i] == 0.0f)) return 0; /* NaN or inf */
    return 1;
}
