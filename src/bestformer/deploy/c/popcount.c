/* ---- AND + popcount: the binary multiply-accumulate, one path chosen at compile time --------------------------
 * Every binary product of the model is one "block" product: z[t][l] = sum_k popcount(x_t[k] AND w[k][l]) for
 * the 8 output lanes l of a weight block stored [K][8] (8 consecutive words per input word k), for each of nt
 * input rows x_t. The lanes are what the vector units count in parallel; the counts are exact integers, so every
 * path (and every summation order) gives the same z.
 *   BF_PATH_AVX512: AVX-512 VPOPCNTDQ, the 8 lanes in one zmm register, 64-bit counts (-mavx512vpopcntdq, or
 *                   -march=native on a CPU that has it);
 *   BF_PATH_AVX2:   AVX2, two ymm registers, popcount by nibble lookup (vpshufb) into byte counters that are
 *                   summed into 64-bit lanes (vpsadbw) every 31 words, before a byte can overflow (31 * 8 < 256);
 *   BF_PATH_NEON:   ARM NEON (aarch64, or ARMv7 with NEON), four q registers, vcnt byte counts, same scheme;
 *   BF_PATH_PORTABLE: plain C99 (Cortex-M, anything else): the compiler's popcount, or the bit trick where the
 *                   target has no popcount instruction.
 * Define BF_FORCE_PORTABLE to take the portable path on any target. bestformer_popcount_path() names the path. */
#if defined(BF_FORCE_PORTABLE)
#define BF_PATH_PORTABLE 1
#elif defined(__AVX512F__) && defined(__AVX512VPOPCNTDQ__)
#define BF_PATH_AVX512 1
#include <immintrin.h>
#elif defined(__AVX2__)
#define BF_PATH_AVX2 1
#include <immintrin.h>
#elif defined(__ARM_NEON) || defined(__ARM_NEON__)
#define BF_PATH_NEON 1
#include <arm_neon.h>
#else
#define BF_PATH_PORTABLE 1
#endif

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__POPCNT__) || defined(__aarch64__) || defined(__ARM_NEON))
/* the compiler's builtin: one instruction (or a NEON cnt) where the target has one (x86 with -mpopcnt or
 * -march=native, aarch64, ARM with NEON) */
#define BF_POPCOUNT64(x) ((int)__builtin_popcountll((unsigned long long)(x)))
#else
/* the bit trick: elsewhere the builtin is a libgcc call, slower than this on x86 without POPCNT (8.4 vs 6.1 ms
 * measured); on Cortex-M (no popcount instruction) it is a dozen 32-bit operations per word */
static int bf_popcount64_portable(uint64_t x) {
    x = x - ((x >> 1) & UINT64_C(0x5555555555555555));
    x = (x & UINT64_C(0x3333333333333333)) + ((x >> 2) & UINT64_C(0x3333333333333333));
    x = (x + (x >> 4)) & UINT64_C(0x0F0F0F0F0F0F0F0F);
    return (int)((x * UINT64_C(0x0101010101010101)) >> 56);
}
#define BF_POPCOUNT64(x) bf_popcount64_portable(x)
#endif

#define BF_LANES 8
#define BF_PAD8(n) (((n) + 7) / 8 * 8)

static int bf_popcount_words(const uint64_t *a, int n) {
    int k, acc = 0;
    for (k = 0; k < n; k++) acc += BF_POPCOUNT64(a[k]);
    return acc;
}

#if defined(BF_PATH_AVX512)
#define BF_PATH_NAME "avx512-vpopcntdq"
/* 4 rows at a time share each weight load: 4 accumulators, one broadcast, AND, popcount and add per row */
static void bf_block8(const uint64_t *x, size_t xs, const uint64_t *w, size_t ws, int nt, int kw, int *z, int zs) {
    int t = 0, k;
    if (ws == 0)
        for (; t + 4 <= nt; t += 4) {
            const uint64_t *x0 = x + (size_t)t * xs, *x1 = x0 + xs, *x2 = x1 + xs, *x3 = x2 + xs;
            __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
            for (k = 0; k < kw; k++) {
                const __m512i wv = _mm512_loadu_si512((const void *)(w + (size_t)k * 8));
                a0 = _mm512_add_epi64(a0, _mm512_popcnt_epi64(_mm512_and_si512(_mm512_set1_epi64((long long)x0[k]), wv)));
                a1 = _mm512_add_epi64(a1, _mm512_popcnt_epi64(_mm512_and_si512(_mm512_set1_epi64((long long)x1[k]), wv)));
                a2 = _mm512_add_epi64(a2, _mm512_popcnt_epi64(_mm512_and_si512(_mm512_set1_epi64((long long)x2[k]), wv)));
                a3 = _mm512_add_epi64(a3, _mm512_popcnt_epi64(_mm512_and_si512(_mm512_set1_epi64((long long)x3[k]), wv)));
            }
            _mm256_storeu_si256((__m256i *)(void *)(z + (size_t)t * zs), _mm512_cvtepi64_epi32(a0));
            _mm256_storeu_si256((__m256i *)(void *)(z + (size_t)(t + 1) * zs), _mm512_cvtepi64_epi32(a1));
            _mm256_storeu_si256((__m256i *)(void *)(z + (size_t)(t + 2) * zs), _mm512_cvtepi64_epi32(a2));
            _mm256_storeu_si256((__m256i *)(void *)(z + (size_t)(t + 3) * zs), _mm512_cvtepi64_epi32(a3));
        }
    for (; t < nt; t++) {
        const uint64_t *xt = x + (size_t)t * xs, *wt = w + (size_t)t * ws;
        __m512i a = _mm512_setzero_si512();
        for (k = 0; k < kw; k++)
            a = _mm512_add_epi64(a, _mm512_popcnt_epi64(_mm512_and_si512(
                    _mm512_set1_epi64((long long)xt[k]), _mm512_loadu_si512((const void *)(wt + (size_t)k * 8)))));
        _mm256_storeu_si256((__m256i *)(void *)(z + (size_t)t * zs), _mm512_cvtepi64_epi32(a));
    }
}

#elif defined(BF_PATH_AVX2)
#define BF_PATH_NAME "avx2"
/* byte counts of v: the nibble lookup (Mula, Kurz and Lemire) */
static __m256i bf_cnt8_avx2(__m256i v) {
    const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                         0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i low = _mm256_set1_epi8(0x0f);
    return _mm256_add_epi8(_mm256_shuffle_epi8(lut, _mm256_and_si256(v, low)),
                           _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v, 4), low)));
}

static void bf_store_lanes_avx2(__m256i lo, __m256i hi, int *z) { /* 2 x 4 64-bit counts -> 8 ints */
    const __m256i idx = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
    __m256i a = _mm256_permutevar8x32_epi32(lo, idx), b = _mm256_permutevar8x32_epi32(hi, idx);
    _mm256_storeu_si256((__m256i *)(void *)z, _mm256_blend_epi32(a, b, 0xF0));
}

static void bf_block8(const uint64_t *x, size_t xs, const uint64_t *w, size_t ws, int nt, int kw, int *z, int zs) {
    const __m256i zero = _mm256_setzero_si256();
    int t, k, k0;
    for (t = 0; t < nt; t++) {
        const uint64_t *xt = x + (size_t)t * xs, *wt = w + (size_t)t * ws;
        __m256i s0 = zero, s1 = zero;
        for (k0 = 0; k0 < kw; k0 += 31) {
            __m256i c0 = zero, c1 = zero;
            const int k1 = kw - k0 < 31 ? kw : k0 + 31;
            for (k = k0; k < k1; k++) {
                const __m256i xv = _mm256_set1_epi64x((long long)xt[k]);
                c0 = _mm256_add_epi8(c0, bf_cnt8_avx2(_mm256_and_si256(xv,
                         _mm256_loadu_si256((const __m256i *)(const void *)(wt + (size_t)k * 8)))));
                c1 = _mm256_add_epi8(c1, bf_cnt8_avx2(_mm256_and_si256(xv,
                         _mm256_loadu_si256((const __m256i *)(const void *)(wt + (size_t)k * 8 + 4)))));
            }
            s0 = _mm256_add_epi64(s0, _mm256_sad_epu8(c0, zero));
            s1 = _mm256_add_epi64(s1, _mm256_sad_epu8(c1, zero));
        }
        bf_store_lanes_avx2(s0, s1, z + (size_t)t * zs);
    }
}

#elif defined(BF_PATH_NEON)
#define BF_PATH_NAME "neon"
static uint32x2_t bf_sum_bytes_neon(uint8x16_t c) { /* 16 byte counts -> 2 lanes (one per 64-bit word) */
    return vmovn_u64(vpaddlq_u32(vpaddlq_u16(vpaddlq_u8(c))));
}

static void bf_block8(const uint64_t *x, size_t xs, const uint64_t *w, size_t ws, int nt, int kw, int *z, int zs) {
    int t, k, k0, l;
    for (t = 0; t < nt; t++) {
        const uint64_t *xt = x + (size_t)t * xs, *wt = w + (size_t)t * ws;
        uint32x2_t s[4];
        for (l = 0; l < 4; l++) s[l] = vdup_n_u32(0);
        for (k0 = 0; k0 < kw; k0 += 31) {
            uint8x16_t c0 = vdupq_n_u8(0), c1 = c0, c2 = c0, c3 = c0;
            const int k1 = kw - k0 < 31 ? kw : k0 + 31;
            for (k = k0; k < k1; k++) {
                const uint64x2_t xv = vdupq_n_u64(xt[k]);
                const uint64_t *wk = wt + (size_t)k * 8;
                c0 = vaddq_u8(c0, vcntq_u8(vreinterpretq_u8_u64(vandq_u64(xv, vld1q_u64(wk)))));
                c1 = vaddq_u8(c1, vcntq_u8(vreinterpretq_u8_u64(vandq_u64(xv, vld1q_u64(wk + 2)))));
                c2 = vaddq_u8(c2, vcntq_u8(vreinterpretq_u8_u64(vandq_u64(xv, vld1q_u64(wk + 4)))));
                c3 = vaddq_u8(c3, vcntq_u8(vreinterpretq_u8_u64(vandq_u64(xv, vld1q_u64(wk + 6)))));
            }
            s[0] = vadd_u32(s[0], bf_sum_bytes_neon(c0));
            s[1] = vadd_u32(s[1], bf_sum_bytes_neon(c1));
            s[2] = vadd_u32(s[2], bf_sum_bytes_neon(c2));
            s[3] = vadd_u32(s[3], bf_sum_bytes_neon(c3));
        }
        for (l = 0; l < 4; l++) {
            uint32_t two[2];
            vst1_u32(two, s[l]);
            z[(size_t)t * zs + 2 * l] = (int)two[0];
            z[(size_t)t * zs + 2 * l + 1] = (int)two[1];
        }
    }
}

#else
#define BF_PATH_NAME "portable"
static void bf_block8(const uint64_t *x, size_t xs, const uint64_t *w, size_t ws, int nt, int kw, int *z, int zs) {
    int t, k, l;
    for (t = 0; t < nt; t++) {
        const uint64_t *xt = x + (size_t)t * xs, *wt = w + (size_t)t * ws;
        int acc[BF_LANES] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (k = 0; k < kw; k++) {
            const uint64_t xk = xt[k];
            const uint64_t *wk = wt + (size_t)k * BF_LANES;
            for (l = 0; l < BF_LANES; l++) acc[l] += BF_POPCOUNT64(xk & wk[l]);
        }
        for (l = 0; l < BF_LANES; l++) z[(size_t)t * zs + l] = acc[l];
    }
}
#endif

/* z[t * zs + o] = sum_k popcount(x[t * xs + k] AND W[o][k]) for t < nt, o < BF_PAD8(n_out): W stored as blocks of 8
 * outputs [BF_PAD8(n_out) / 8][kw][8] (zero words pad the last block); row t of W is at w + t * ws (ws = 0: the
 * same weights for every row, as in a layer; ws > 0: one matrix per time step, as in attention). */
static void bf_gemm(const uint64_t *x, size_t xs, const uint64_t *w, size_t ws, int nt, int kw, int n_out, int *z,
                    int zs) {
    int b;
    for (b = 0; b < BF_PAD8(n_out) / BF_LANES; b++)
        bf_block8(x, xs, w + (size_t)b * kw * BF_LANES, ws, nt, kw, z + b * BF_LANES, zs);
}
