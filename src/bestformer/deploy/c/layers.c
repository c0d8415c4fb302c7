/* ---- the LIF neuron ----------------------------------------------------------------------------------------- */
typedef struct {
    float tau, beta, vth, vr, inv_tau;
    int soft, decay, pow2;
} bf_lif_t;

/* One step of n neurons in place (Eq. 1-3, PyTorch's float32 order): h holds X and becomes H, v the membranes,
 * f the spikes (0/1). */
static void bf_lif_step(const bf_lif_t *p, float *h, float *v, unsigned char *f, int n) {
    int i;
    const float vr = p->vr, vth = p->vth, beta = p->beta, inv_tau = p->inv_tau, tau = p->tau;
    if (p->decay && p->pow2) {
        for (i = 0; i < n; i++) h[i] = v[i] + (h[i] - (v[i] - vr)) * inv_tau;
    } else if (p->decay) {
        for (i = 0; i < n; i++) h[i] = v[i] + (h[i] - (v[i] - vr)) / tau;
    } else if (vr == 0.0f) {
        for (i = 0; i < n; i++) h[i] = beta * v[i] + h[i];
    } else {
        for (i = 0; i < n; i++) h[i] = beta * (v[i] - vr) + vr + h[i];
    }
    if (p->soft) { /* written as selects, which -O3 vectorizes into blends (a branch per spike mispredicts) */
        for (i = 0; i < n; i++) {
            const int fired = h[i] >= vth;
            f[i] = (unsigned char)fired;
            v[i] = fired ? h[i] - vth : h[i];
        }
    } else {
        for (i = 0; i < n; i++) {
            const int fired = h[i] >= vth;
            f[i] = (unsigned char)fired;
            v[i] = fired ? vr : h[i];
        }
    }
}

static void bf_fill(float *v, float x, int n) {
    int i;
    for (i = 0; i < n; i++) v[i] = x;
}

/* word of flags f[0..n), n <= 64: bit j = f[j]. Eight flags at a time: with the eight 0/1 bytes as a
 * little-endian word b (assembled byte by byte, so any byte order works), (b * 0x0102040810204080) >> 56 has
 * bit j = byte j: the constant's byte 7 - j carries byte j to bit 56 + j, and 0/1 bytes make no carries. */
static uint64_t bf_pack(const unsigned char *f, int n) {
    uint64_t w = 0;
    int j = 0;
    for (; j + 8 <= n; j += 8) {
        const unsigned char *p = f + j;
        const uint64_t b = (uint64_t)p[0] | (uint64_t)p[1] << 8 | (uint64_t)p[2] << 16 | (uint64_t)p[3] << 24 |
                           (uint64_t)p[4] << 32 | (uint64_t)p[5] << 40 | (uint64_t)p[6] << 48 | (uint64_t)p[7] << 56;
        w |= ((b * UINT64_C(0x0102040810204080)) >> 56) << j;
    }
    for (; j < n; j++) w |= (uint64_t)f[j] << j;
    return w;
}

/* the flags f[0..n) as BF_WORDS(n) words: bit j of word k = f[64 k + j] */
static void bf_pack_row(const unsigned char *f, int n, uint64_t *out) {
    int k;
    for (k = 0; 64 * k < n; k++) out[k] = bf_pack(f + 64 * k, n - 64 * k < 64 ? n - 64 * k : 64);
}

static float bf_affine(float z, float a, float b) {
#if BF_BN_FMA
    return bf_fmaf(z, a, b);
#else
    return z * a + b;
#endif
}

#define BF_WORDS(n) (((n) + 63) / 64)

/* the scratch vectors of one row, carved from the arena by bestformer_predict */
typedef struct {
    float *h, *v, *v2;     /* [BF_MAXW] */
    unsigned char *f;      /* [BF_MAXW] */
    int *z;                /* [T][BF_PAD8(BF_MAXW)]: the counts of one row */
    int *pc;               /* [T] */
    double *acc;           /* [width of the first convolution] */
    float *y;              /* [width of the first convolution] */
    uint64_t *patch;       /* [T][9 * kw]: a pixel's 3x3 neighbourhood of packed spikes / a gathered row */
    uint64_t *row;         /* attention: the map rows of one query [T][nw] */
} bf_scratch_t; /* one per thread (BF_THREADS): the layers' row loops run in parallel when built with OpenMP */

/* ---- stem: first convolution (full precision) + folded BN + LIF -> packed spikes -----------------------------
 * img: [tx][C][H][W] (tx = 1: a static image repeated at every step; tx = T: event frames);
 * w: [C][3][3][O] (outputs innermost, so that the accumulation vectorizes over them; each output still sums in
 * the order c, dy, dx); out: [T][H*W][BF_WORDS(O)]. */
static void bf_stem_conv(const float *img, int tx, int c_in, int hgt, int wid, const float *w, const float *alpha,
                         const float *beta, int n_out, const bf_lif_t *lif, uint64_t *out, const bf_scratch_t *sc) {
    long r;
    BF_PARALLEL_FOR
    for (r = 0; r < (long)hgt * wid; r++) {
        const bf_scratch_t *s = sc + bf_thread();
        const int y = (int)(r / wid), x = (int)(r % wid), ow = BF_WORDS(n_out);
        int t, o, c, dy, dx;
        bf_fill(s->v, lif->vr, n_out);
        for (t = 0; t < BF_T; t++) {
            if (t < tx) { /* the convolution of frame t (static: frame 0 once) */
                const float *frame = img + (size_t)t * c_in * hgt * wid;
                for (o = 0; o < n_out; o++) s->acc[o] = 0.0;
                for (c = 0; c < c_in; c++)
                    for (dy = 0; dy < 3; dy++) {
                        const int yy = y + dy - 1;
                        if (yy < 0 || yy >= hgt) continue;
                        for (dx = 0; dx < 3; dx++) {
                            const int xx = x + dx - 1;
                            const float *wk = w + ((size_t)(c * 3 + dy) * 3 + dx) * n_out;
                            double xv;
                            if (xx < 0 || xx >= wid) continue;
                            xv = (double)frame[((size_t)c * hgt + yy) * wid + xx];
                            for (o = 0; o < n_out; o++) s->acc[o] += xv * (double)wk[o];
                        }
                    }
                for (o = 0; o < n_out; o++) s->y[o] = (float)s->acc[o];
            }
            for (o = 0; o < n_out; o++) s->h[o] = bf_affine(s->y[o], alpha[o], beta[o]);
            bf_lif_step(lif, s->h, s->v, s->f, n_out);
            bf_pack_row(s->f, n_out, out + ((size_t)t * hgt * wid + (size_t)r) * ow);
        }
    }
}

#if BF_POOL
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
#endif

/* output modes of the binary layers */
#define BF_OUT_BITS 0  /* LIF, spikes packed by groups of `group` channels (a head's width): [T][rows][words] */
#define BF_OUT_FLOAT 1 /* X to out_f [T][rows][O] */
#define BF_OUT_REV 2   /* out_f = X + (out_f + other) / 2 (Eq. 12, the reversible coupling, in place) */
#define BF_OUT_RES 3   /* out_f = out_f + X (residual, in place) */

/* The epilogue of a binary layer for one row: z [T][zs] (AND counts), pc [T] (popcount of the inputs); the
 * product with the {-1, +1} weights is 2 z - pc (Eq. 5-6), then the folded BatchNorm and the mode's output. */
static void bf_epilogue(const int *z, int zs, const int *pc, size_t r, size_t rows, const float *alpha,
                        const float *beta, int n_out, int mode, const bf_lif_t *lif, int group, uint64_t *out_b,
                        float *out_f, const float *other, const bf_scratch_t *s) {
    int t, o, g;
    const int gw = BF_WORDS(group), n_groups = n_out / (group > 0 ? group : 1);
    if (mode == BF_OUT_BITS) bf_fill(s->v, lif->vr, n_out);
    for (t = 0; t < BF_T; t++) {
        const int *zt = z + (size_t)t * zs, p = pc[t];
        for (o = 0; o < n_out; o++) s->h[o] = bf_affine((float)(2 * zt[o] - p), alpha[o], beta[o]);
        if (mode != BF_OUT_BITS) {
            float *dst = out_f + ((size_t)t * rows + r) * n_out;
            const float *oth = other ? other + ((size_t)t * rows + r) * n_out : dst;
            if (mode == BF_OUT_FLOAT) memcpy(dst, s->h, sizeof(float) * (size_t)n_out);
            else if (mode == BF_OUT_REV) for (o = 0; o < n_out; o++) dst[o] = s->h[o] + (dst[o] + oth[o]) / 2.0f;
            else for (o = 0; o < n_out; o++) dst[o] = dst[o] + s->h[o];
            continue;
        }
        bf_lif_step(lif, s->h, s->v, s->f, n_out);
        for (g = 0; g < n_groups; g++)
            bf_pack_row(s->f + g * group, group, out_b + ((size_t)t * rows + r) * (n_groups * gw) + g * gw);
    }
}

/* ---- binary 3x3 convolution on packed spikes in: [T][H][W][kw], weights blocked [O/8][9 * kw][8] ---------------
 * Each pixel's neighbourhood is gathered into a patch [T][9][kw] (zero words outside the image: the zero padding
 * adds nothing to either count), so that the convolution is one block product per pixel, all T steps at once. */
static void bf_conv3x3(const uint64_t *in, int hgt, int wid, int kw, const uint64_t *w, const float *alpha,
                       const float *beta, int n_out, int mode, const bf_lif_t *lif, uint64_t *out_b, float *out_f,
                       const bf_scratch_t *sc) {
    long r;
    BF_PARALLEL_FOR
    for (r = 0; r < (long)hgt * wid; r++) {
        const bf_scratch_t *s = sc + bf_thread();
        const int y = (int)(r / wid), x = (int)(r % wid), pk = 9 * kw, zs = BF_PAD8(n_out);
        int t, dy, dx, k;
        for (t = 0; t < BF_T; t++) {
            uint64_t *p = s->patch + (size_t)t * pk;
            for (dy = 0; dy < 3; dy++)
                for (dx = 0; dx < 3; dx++, p += kw) {
                    const int yy = y + dy - 1, xx = x + dx - 1;
                    if (yy < 0 || yy >= hgt || xx < 0 || xx >= wid) {
                        for (k = 0; k < kw; k++) p[k] = 0;
                    } else {
                        memcpy(p, in + (((size_t)t * hgt + yy) * wid + xx) * kw, sizeof(uint64_t) * (size_t)kw);
                    }
                }
            s->pc[t] = bf_popcount_words(s->patch + (size_t)t * pk, pk);
        }
        bf_gemm(s->patch, (size_t)pk, w, 0, BF_T, pk, n_out, s->z, zs);
        bf_epilogue(s->z, zs, s->pc, (size_t)r, (size_t)hgt * wid, alpha, beta, n_out, mode, lif, n_out, out_b,
                    out_f, NULL, s);
    }
}

/* ---- binary linear layer on packed spikes in: [T][rows][kw], weights blocked [O/8][kw][8] -------------------- */
static void bf_linear(const uint64_t *in, size_t rows, int kw, const uint64_t *w, const float *alpha,
                      const float *beta, int n_out, int mode, const bf_lif_t *lif, int group, uint64_t *out_b,
                      float *out_f, const float *other, const bf_scratch_t *sc) {
    long r;
    BF_PARALLEL_FOR
    for (r = 0; r < (long)rows; r++) {
        const bf_scratch_t *s = sc + bf_thread();
        const int zs = BF_PAD8(n_out);
        int t;
        for (t = 0; t < BF_T; t++) s->pc[t] = bf_popcount_words(in + ((size_t)t * rows + (size_t)r) * kw, kw);
        bf_gemm(in + (size_t)r * kw, rows * kw, w, 0, BF_T, kw, n_out, s->z, zs);
        bf_epilogue(s->z, zs, s->pc, (size_t)r, rows, alpha, beta, n_out, mode, lif, group, out_b, out_f, other, s);
    }
}

/* ---- LIF of a real-valued stream x [T][rows][n] -> packed spikes [T][rows][BF_WORDS(n)] ---------------------- */
static void bf_lif_stream(const float *x, size_t rows, int n, const bf_lif_t *lif, uint64_t *out,
                          const bf_scratch_t *sc) {
    long r;
    BF_PARALLEL_FOR
    for (r = 0; r < (long)rows; r++) {
        const bf_scratch_t *s = sc + bf_thread();
        const int ow = BF_WORDS(n);
        int t;
        bf_fill(s->v, lif->vr, n);
        for (t = 0; t < BF_T; t++) {
            memcpy(s->h, x + ((size_t)t * rows + (size_t)r) * n, sizeof(float) * (size_t)n);
            bf_lif_step(lif, s->h, s->v, s->f, n);
            bf_pack_row(s->f, n, out + ((size_t)t * rows + (size_t)r) * ow);
        }
    }
}

/* ---- layouts for the attention's block products ----------------------------------------------------------------
 * in: spikes [T][rows][heads][gw] (a BF_OUT_BITS output, group = d, gw = BF_WORDS(d)). */

#if !BF_ATTENTION_CHANNEL
/* -> [heads][T][BF_PAD8(rows) / 8][gw][8]: rows as the lanes (the keys of token attention) */
static void bf_block_rows(const uint64_t *in, size_t rows, int heads, int gw, uint64_t *out) {
    const size_t rb = (size_t)BF_PAD8(rows) / 8;
    size_t j;
    int hd, t, k;
    for (hd = 0; hd < heads; hd++)
        for (t = 0; t < BF_T; t++)
            for (j = 0; j < rb * 8; j++)
                for (k = 0; k < gw; k++)
                    out[((((size_t)hd * BF_T + t) * rb + j / 8) * gw + k) * 8 + j % 8] =
                        j < rows ? in[((size_t)t * rows + j) * heads * gw + (size_t)hd * gw + k] : 0;
}
#endif

/* -> [heads][T][BF_PAD8(d) / 8][BF_WORDS(rows)][8]: bits over rows, channels as the lanes (values; channel-form
 * keys) */
static void bf_transpose_heads(const uint64_t *in, size_t rows, int heads, int d, uint64_t *out) {
    const int gw = BF_WORDS(d), db = BF_PAD8(d) / 8, rw = BF_WORDS((int)rows);
    size_t r;
    int hd, t, c;
    memset(out, 0, sizeof(uint64_t) * (size_t)heads * BF_T * db * rw * 8);
    for (t = 0; t < BF_T; t++)
        for (r = 0; r < rows; r++)
            for (hd = 0; hd < heads; hd++) {
                const uint64_t *src = in + ((size_t)t * rows + r) * heads * gw + (size_t)hd * gw;
                uint64_t *dst = out + (((size_t)hd * BF_T + t) * db * rw + r / 64) * 8;
                for (c = 0; c < d; c++)
                    dst[(size_t)(c / 8) * rw * 8 + c % 8] |= ((src[c / 64] >> (c % 64)) & 1u) << (r % 64);
            }
}
