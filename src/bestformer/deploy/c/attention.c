/* ---- spiking self-attention on packed spikes (Eq. 8-9): block products with the keys / values as lanes -------- */

/* One query's output: the counts z [T][zs] of its map row against the values (token form) or of the query
 * against B_KV (channel form), scaled by scale[t * heads + hd] (lambda * 0.125: one float32 rounding), through
 * the output LIF; the spikes are OR-ed into out [T][N][ow] at channels c0..c0+d of token i. */
static void bf_attn_output(const int *z, int zs, int d, const float *scale, int heads, int hd, const bf_lif_t *lif,
                           uint64_t *out, size_t n_tok, int ow, size_t i, int c0, const bf_scratch_t *s) {
    int t, c;
    bf_fill(s->v2, lif->vr, d);
    for (t = 0; t < BF_T; t++) {
        const float sc = scale[t * heads + hd];
        for (c = 0; c < d; c++) s->h[c] = (float)z[(size_t)t * zs + c] * sc;
        bf_lif_step(lif, s->h, s->v2, s->f, d);
        for (c = 0; c < d; c++)
            if (s->f[c]) out[((size_t)t * n_tok + i) * ow + (c0 + c) / 64] |= (uint64_t)1 << ((c0 + c) % 64);
    }
}

#if !BF_ATTENTION_CHANNEL
/* ---- token form: A = LIF(Q K^T) (binary, Eq. 8), out = LIF(A V * lambda / 8) (Eq. 9) --------------------------
 * q: [T][N][heads * dw]; kb: the keys with tokens as lanes [heads][T][N8 / 8][dw][8] (bf_block_rows);
 * vt: the values with channels as lanes [heads][T][d8 / 8][nw][8] (bf_transpose_heads); out (zeroed): [T][N][ow]. */
static void bf_attention_token(const uint64_t *q, const uint64_t *kb, const uint64_t *vt, size_t n_tok, int heads,
                               int d, const float *scale, const bf_lif_t *lif_attn, const bf_lif_t *lif_out,
                               uint64_t *out, int ow, const bf_scratch_t *sc) {
    const int dw = BF_WORDS(d), nw = BF_WORDS((int)n_tok), hw = heads * dw, n8 = BF_PAD8((int)n_tok), d8 = BF_PAD8(d);
    const size_t kstep = (size_t)n8 * dw, vstep = (size_t)d8 * nw; /* one step of a head's keys / values */
    long i;
    BF_PARALLEL_FOR
    for (i = 0; i < (long)n_tok; i++) { /* the queries in parallel: each writes only its own token's words */
        const bf_scratch_t *s = sc + bf_thread();
        int hd, t;
        size_t j;
        for (hd = 0; hd < heads; hd++) {
            const uint64_t *kh = kb + (size_t)hd * BF_T * kstep, *vh = vt + (size_t)hd * BF_T * vstep;
            /* row i of Q K^T at every step, binarized over time */
            bf_gemm(q + (size_t)i * hw + (size_t)hd * dw, n_tok * hw, kh, kstep, BF_T, dw, (int)n_tok, s->z, n8);
            bf_fill(s->v, lif_attn->vr, (int)n_tok);
            for (t = 0; t < BF_T; t++) {
                for (j = 0; j < n_tok; j++) s->h[j] = (float)s->z[(size_t)t * n8 + j] * 1.0f;
                bf_lif_step(lif_attn, s->h, s->v, s->f, (int)n_tok);
                bf_pack_row(s->f, (int)n_tok, s->row + t * nw);
            }
            bf_gemm(s->row, (size_t)nw, vh, vstep, BF_T, nw, d, s->z, d8); /* times V */
            bf_attn_output(s->z, d8, d, scale, heads, hd, lif_out, out, n_tok, ow, (size_t)i, hd * d, s);
        }
    }
}

#else
/* ---- channel form: B_KV = LIF(K^T V) (binary), out = LIF(Q B_KV * lambda / 8) -----------------------------------
 * q: [T][N][heads * dw]; kt, vt: channels as lanes [heads][T][d8 / 8][nw][8] (bf_transpose_heads);
 * out (zeroed): [T][N][ow]; kv: the map B_KV of one head [T][d8 / 8][dw][8] (bits over the rows c1). */
static void bf_attention_channel(const uint64_t *q, const uint64_t *kt, const uint64_t *vt, size_t n_tok,
                                 int heads, int d, const float *scale, const bf_lif_t *lif_attn,
                                 const bf_lif_t *lif_out, uint64_t *out, int ow, uint64_t *kv,
                                 const bf_scratch_t *sc) {
    const int dw = BF_WORDS(d), nw = BF_WORDS((int)n_tok), hw = heads * dw, d8 = BF_PAD8(d);
    const size_t vstep = (size_t)d8 * nw, kvstep = (size_t)d8 * dw;
    int hd;
    for (hd = 0; hd < heads; hd++) {
        const uint64_t *kh = kt + (size_t)hd * BF_T * vstep, *vh = vt + (size_t)hd * BF_T * vstep;
        long cw, i;
        memset(kv, 0, sizeof(uint64_t) * BF_T * kvstep);
        BF_PARALLEL_FOR
        for (cw = 0; cw < dw; cw++) { /* 64 rows c1 of K^T V per task: each task writes only its own bit word */
            const bf_scratch_t *s = sc + bf_thread();
            int c1, c2, t, k;
            for (c1 = 64 * (int)cw; c1 < d && c1 < 64 * (int)cw + 64; c1++) {
                /* row c1 of K^T at every step (lane c1 % 8 of its block), times V, binarized over time */
                for (t = 0; t < BF_T; t++)
                    for (k = 0; k < nw; k++)
                        s->patch[t * nw + k] = kh[t * vstep + ((size_t)(c1 / 8) * nw + k) * 8 + c1 % 8];
                bf_gemm(s->patch, (size_t)nw, vh, vstep, BF_T, nw, d, s->z, d8);
                bf_fill(s->v, lif_attn->vr, d);
                for (t = 0; t < BF_T; t++) {
                    for (c2 = 0; c2 < d; c2++) s->h[c2] = (float)s->z[t * d8 + c2] * 1.0f;
                    bf_lif_step(lif_attn, s->h, s->v, s->f, d);
                    for (c2 = 0; c2 < d; c2++) /* B_KV[c1][c2] as lane c2 of word c1 / 64 */
                        if (s->f[c2]) kv[t * kvstep + ((size_t)(c2 / 8) * dw + c1 / 64) * 8 + c2 % 8] |=
                                          (uint64_t)1 << (c1 % 64);
                }
            }
        }
        BF_PARALLEL_FOR
        for (i = 0; i < (long)n_tok; i++) { /* row i of Q B_KV */
            const bf_scratch_t *s = sc + bf_thread();
            bf_gemm(q + (size_t)i * hw + (size_t)hd * dw, n_tok * hw, kv, kvstep, BF_T, dw, d, s->z, d8);
            bf_attn_output(s->z, d8, d, scale, heads, hd, lif_out, out, n_tok, ow, (size_t)i, hd * d, s);
        }
    }
}

#endif
