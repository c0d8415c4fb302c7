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

const char *bestformer_popcount_path(void) {
    return BF_PATH_NAME;
}
