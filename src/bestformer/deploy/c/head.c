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
    uint32_t u;
    for (i = 0; i < n; i++) {
        memcpy(&u, &x[i], sizeof u); /* the bits: no float flag can fold this test away */
        if ((u & 0x7F800000u) == 0x7F800000u) return 0; /* all exponent bits set: NaN or inf */
    }
    return 1;
}

const char *bestformer_popcount_path(void) {
    return BF_PATH_NAME;
}

#ifdef BESTFORMER_BENCH_HOOKS /* for benchmarks (bestformer.deploy.c_build): the block product's throughput */
#define BF_BENCH_SCRATCH_BYTES ((4 * 16 + 128 * 16) * 8 + 4 * 128 * 4)
double bestformer_bench_popcount(int reps, void *scratch);
/* reps block products of 4 rows x 16 words against 128 outputs (16 KB of weights: L1-resident), in the caller's
 * scratch (BF_BENCH_SCRATCH_BYTES, 8-aligned: one per concurrent caller); returns the number of AND+popcount
 * words. Each product feeds the next (x[0] ^= z[0]), so none can be skipped. */
double bestformer_bench_popcount(int reps, void *scratch) {
    uint64_t *x = (uint64_t *)scratch, *w = x + 4 * 16;
    int *z = (int *)(void *)(w + 128 * 16);
    int i;
    for (i = 0; i < 4 * 16; i++) x[i] = UINT64_C(0x9E3779B97F4A7C15) * (uint64_t)(i + 1);
    for (i = 0; i < 128 * 16; i++) w[i] = UINT64_C(0xC2B2AE3D27D4EB4F) * (uint64_t)(i + 7);
    for (i = 0; i < reps; i++) {
        bf_gemm(x, 16, w, 0, 4, 16, 128, z, 128);
        x[0] ^= (uint64_t)z[0];
    }
    return (double)reps * 4 * 16 * 128;
}
#endif
