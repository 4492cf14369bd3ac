/* dsv4's fused CPU kernels (float32), called through ctypes by dsv4.native: for inference, and the
 * mHC Sinkhorn's forward and backward for training too (bit for bit PyTorch's arithmetic).
 *
 * Each kernel replaces a chain of small PyTorch ops whose dispatch and memory traffic dominate a
 * CPU decode step: sink attention over rows read in place from the paged KV pool, block
 * compression and the lightning indexer's streamed top-k (spec §5), the mHC pre/post mixes (§4), RMSNorm and
 * RoPE (§2, §3), the MoE router and routed experts (§6), and the pool's slot lookup. The arithmetic
 * is the PyTorch paths' in another summation order; tests compare them. (The Sinkhorn kernels keep
 * PyTorch's order exactly.) Kernels that index storage
 * by caller-provided ids check them and return a nonzero status instead of reading out of bounds.
 * Plain C with GCC/Clang vector extensions (no intrinsics): the compiler maps a 16-float vector to
 * one AVX-512 register, two AVX2 registers, or NEON quads.
 *
 * Threads: OpenMP, which in a torch process is torch's own runtime (same libgomp soname), so the
 * kernels follow torch.set_num_threads.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define DSV4_NATIVE_ABI 4

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));

static inline v16 ld(const float* p) { return *(const v16u*)p; }
static inline void st(float* p, v16 v) { *(v16u*)p = v; }
typedef int32_t i16 __attribute__((vector_size(64)));
static inline v16 splat(float x) { return (v16){0} + x; }
static inline v16 vmax(v16 a, v16 b) { /* lane-wise max (vector ?: is C++ only) */
    const i16 m = a > b;
    return (v16)((m & (i16)a) | (~m & (i16)b));
}

/* Sums of 8 vectors' lanes, as lanes 0-7 (a transpose-and-add tree: 8 adds, no scalar work). */
static inline v16 hsum8(const v16 a[8]) {
#define SV __builtin_shufflevector
    v16 b[4], c[2];
    for (int i = 0; i < 4; i++)
        b[i] = SV(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
               SV(a[2 * i], a[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    for (int i = 0; i < 2; i++)
        c[i] = SV(b[2 * i], b[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
               SV(b[2 * i], b[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    v16 d = SV(c[0], c[1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
            SV(c[0], c[1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
    return SV(d, d, 0, 2, 4, 6, 8, 10, 12, 14, 0, 2, 4, 6, 8, 10, 12, 14) +
           SV(d, d, 1, 3, 5, 7, 9, 11, 13, 15, 1, 3, 5, 7, 9, 11, 13, 15);
#undef SV
}

/* e^y for y in [-87, 88]: Cody-Waite reduction and Cephes' degree-6 polynomial, ~1 ulp. Scalar code
 * the compiler vectorises in `omp simd` loops. */
static inline float exp_core(float y) {
    const float n = floorf(y * 1.44269504088896341f + 0.5f);
    const float r = y - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* e^x for x <= 0 (softmax after subtracting the max); x < -87 gives 0 (libm: a denormal). */
static inline float fexp(float x) { return x < -87.0f ? 0.0f : exp_core(x); }

/* e^x over the whole float range, clamped to [-87, 88] (SiLU's e^-g). */
static inline float fexp_any(float x) { return exp_core(x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x)); }

int dsv4_native_abi(void) { return DSV4_NATIVE_ABI; }

/* ---------------------------------------------------------------------------------------------
 * Sink attention over gathered rows (decode-shaped tokens reading a paged pool).
 *
 * q [T, H, D] contiguous; two parts, each a store [*, D] addressed per token by slots [T, J] with
 * valid [T, J] (0/1). o[t, h] = sum_j e^{s_j} row_j / (sum_j e^{s_j} + e^{sink_h}), s_j = scale q.row_j
 * over valid j of both parts. D must be a multiple of 16.
 */
/* Appends the rows store[slots[j]] of valid j to rows (count n); returns how many valid slots lie
 * outside the store's S rows (skipped, never read). */
static int64_t collect_rows(const float** rows, int64_t* n, const float* store, int64_t S, int64_t D,
                            const int64_t* slots, const uint8_t* valid, int64_t J) {
    int64_t missing = 0;
    for (int64_t j = 0; j < J; j++)
        if (valid[j]) {
            if (slots[j] >= 0 && slots[j] < S) rows[(*n)++] = store + slots[j] * D;
            else missing++;
        }
    return missing;
}

#define HB 8
int64_t dsv4_sink_attention(int64_t T, int64_t H, int64_t D, const float* q, float scale, const float* sink,
                            const float* store_a, int64_t Sa, const int64_t* slots_a, const uint8_t* valid_a,
                            int64_t Ja, const float* store_b, int64_t Sb, const int64_t* slots_b,
                            const uint8_t* valid_b, int64_t Jb, float* out) {
    const int64_t J = Ja + Jb, C = D / 16, Hp = (H + HB - 1) / HB * HB;
    int64_t bad = 0; /* a valid slot outside its store: reported, never read */
#pragma omp parallel
    {
        /* Scores of a block of 8 heads as [row][8] (+1 spare row: 16-lane stores), rows padded to even. */
        float* s = (float*)malloc(sizeof(float) * (size_t)(HB * (J + 3)));
        const float** rows = (const float**)malloc(sizeof(float*) * (size_t)(J + 1));
        float* qpad = (float*)calloc((size_t)(Hp * D), sizeof(float));
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) {
            memcpy(qpad, q + t * H * D, sizeof(float) * (size_t)(H * D)); /* heads padded to HB */
            int64_t n = 0;
            int64_t missing = collect_rows(rows, &n, store_a, Sa, D, slots_a + t * Ja, valid_a + t * Ja, Ja);
            if (Jb) missing += collect_rows(rows, &n, store_b, Sb, D, slots_b + t * Jb, valid_b + t * Jb, Jb);
            if (missing) {
#pragma omp atomic write
                bad = 1;
            }
            const int64_t n2 = (n + 1) / 2 * 2;
            for (int64_t h0 = 0; h0 < Hp; h0 += HB) {
                /* Scores, and each head's running max (lanes 0-7; sinks included). */
                v16 mx = splat(-INFINITY);
                for (int h = 0; h < HB; h++) mx[h] = h0 + h < H ? sink[h0 + h] : 0.f;
                for (int64_t j = 0; j < n; j += 2) { /* two rows at a time: q loads shared */
                    const float* r0 = rows[j];
                    const float* r1 = rows[j + 1 < n ? j + 1 : j];
                    for (int64_t f = j + 2; f < j + 4 && f < n; f++) /* rows are scattered over pages */
                        for (int64_t c = 0; c < C; c++) __builtin_prefetch(rows[f] + 16 * c, 0, 3);
                    v16 a0[HB], a1[HB];
                    for (int h = 0; h < HB; h++) a0[h] = a1[h] = splat(0.f);
                    for (int64_t c = 0; c < C; c++) {
                        const v16 x0 = ld(r0 + 16 * c), x1 = ld(r1 + 16 * c);
                        for (int h = 0; h < HB; h++) {
                            const v16 qv = ld(qpad + (h0 + h) * D + 16 * c);
                            a0[h] += qv * x0;
                            a1[h] += qv * x1;
                        }
                    }
                    const v16 s0 = hsum8(a0) * scale, s1 = hsum8(a1) * scale;
                    st(s + j * HB, s0); /* lanes 8-15 spill into the next row, overwritten next */
                    mx = vmax(s0, mx);
                    if (j + 1 < n) {
                        st(s + (j + 1) * HB, s1);
                        mx = vmax(s1, mx);
                    }
                }
                for (int h = 0; h < HB; h++) mx[h + 8] = mx[h];
                for (int64_t k = n * HB; k < n2 * HB; k++) s[k] = -INFINITY; /* the odd row's partner */
                /* e^(s - max) in place, two rows per vector; per-head sums. */
                float m16[16], d16[16] = {0};
                st(m16, mx);
                for (int64_t j = 0; j < n2; j += 2) {
                    float* sp = s + j * HB;
#pragma omp simd
                    for (int i = 0; i < 16; i++) {
                        sp[i] = fexp(sp[i] - m16[i]);
                        d16[i] += sp[i];
                    }
                }
                const v16 den = ld(d16);
                float inv[HB];
                for (int h = 0; h < HB; h++)
                    inv[h] = h0 + h < H ? 1.0f / (den[h] + den[h + 8] + expf(sink[h0 + h] - mx[h])) : 0.f;
                /* o[h] = sum_j p[j, h] row_j, normalised at the end. */
                float* ot = out + t * H * D;
                const int64_t hb = H - h0 < HB ? H - h0 : HB;
                for (int64_t c = 0; c < C; c++) {
                    v16 o[HB];
                    for (int h = 0; h < HB; h++) o[h] = splat(0.f);
                    for (int64_t j = 0; j < n; j++) {
                        const v16 rv = ld(rows[j] + 16 * c);
                        const float* p = s + j * HB;
                        for (int h = 0; h < HB; h++) o[h] += p[h] * rv;
                    }
                    for (int64_t h = 0; h < hb; h++) st(ot + (h0 + h) * D + 16 * c, o[h] * inv[h]);
                }
            }
        }
        free(s);
        free(rows);
        free(qpad);
    }
    return bad;
}

/* ---------------------------------------------------------------------------------------------
 * mHC (spec §4). Streams h [T, n, D] with strides (st_t, st_n) in floats, D contiguous.
 */

static inline float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }

/* Tokens per block of hc_pre's mixing product: the fn rows loaded for one token serve the block
 * (fn, 24 rows of n*D, lives in L2: per-token re-reads made the product L2-bound). Four tokens x four
 * rows is 16 accumulators, which AVX-512's 32 registers hold; two elsewhere. */
#if defined(__AVX512F__)
#define HC_TB 4
#else
#define HC_TB 2
#endif

/* Sinkhorn-Knopp of hc_pre for training, forward and backward, in PyTorch's own arithmetic: the
 * same elementwise operations and sums in the same order as the autograd graph of the loop in
 * dsv4.kernels.mhc (comb / (comb.sum(dim) + eps), columns first, 2*iters-1 normalisations), so the
 * values and the gradients equal autograd's bit for bit (tests compare them with torch.equal). No
 * product may be fused into an add here: contraction is off for these two functions. The
 * inference hc_pre below runs the same normalisations. */
#if defined(__clang__)
#define DSV4_EXACT _Pragma("clang fp contract(off)")
#define DSV4_EXACT_FN
#else
#define DSV4_EXACT
#define DSV4_EXACT_FN __attribute__((optimize("fp-contract=off")))
#endif

/* One normalisation of an n x n matrix c (row-major, c[a*n+b]): dim 0 divides every column b by
 * (sum_a c[a][b]) + eps, dim 1 every row a by (sum_b c[a][b]) + eps; out may be c. */
static inline void sinkhorn_half(int64_t n, int dim, float eps, const float* c, float* out) {
    DSV4_EXACT
    float s[16];
    for (int64_t i = 0; i < n; i++) {
        float acc = 0.f;
        for (int64_t j = 0; j < n; j++) acc += dim == 0 ? c[j * n + i] : c[i * n + j];
        s[i] = acc + eps;
    }
    for (int64_t a = 0; a < n; a++)
        for (int64_t b = 0; b < n; b++) out[a * n + b] = c[a * n + b] / s[dim == 0 ? b : a];
}

/* hc_pre of one token from its mixing sums m [(2+n)n] (see dsv4_hc_pre). */
static void hc_pre_token(int64_t n, int64_t D, const float* ht, int64_t st_n, const float* m, const float* base,
                         const float* scale, float rms_eps, float hc_eps, int64_t iters, float* xt, float* post_t,
                         float* comb_t) {
    float ss = 0.f;
    for (int64_t j = 0; j < n; j++) {
        const float* hj = ht + j * st_n;
#pragma omp simd reduction(+ : ss)
        for (int64_t k = 0; k < D; k++) ss += hj[k] * hj[k];
    }
    const float r = 1.0f / sqrtf(ss / (float)(n * D) + rms_eps);
    float pre[16], c[16 * 16];
    for (int64_t j = 0; j < n; j++) {
        pre[j] = sigmoidf(m[j] * r * scale[0] + base[j]) + hc_eps;
        post_t[j] = 2.0f * sigmoidf(m[n + j] * r * scale[1] + base[n + j]);
    }
    for (int64_t a = 0; a < n; a++) {
        float* ca = c + a * n;
        float mx = -INFINITY, sum = 0.f;
        for (int64_t b = 0; b < n; b++) {
            ca[b] = m[2 * n + a * n + b] * r * scale[2] + base[2 * n + a * n + b];
            mx = ca[b] > mx ? ca[b] : mx;
        }
        for (int64_t b = 0; b < n; b++) sum += (ca[b] = expf(ca[b] - mx));
        for (int64_t b = 0; b < n; b++) ca[b] = ca[b] / sum + hc_eps;
    }
    for (int64_t k = 0; k < 2 * iters - 1; k++) sinkhorn_half(n, k % 2 ? 1 : 0, hc_eps, c, c); /* columns first */
    memcpy(comb_t, c, sizeof(float) * (size_t)(n * n));
    const float p0 = pre[0];
#pragma omp simd
    for (int64_t k = 0; k < D; k++) xt[k] = p0 * ht[k];
    for (int64_t j = 1; j < n; j++) {
        const float* hj = ht + j * st_n;
        const float pj = pre[j];
#pragma omp simd
        for (int64_t k = 0; k < D; k++) xt[k] += pj * hj[k];
    }
}

/* hc_pre: the mixing product mix_i = flatten(h_t) . fn_i (fn [(2+n)n, n*D]), its RMS scaling, then
 * the sublayer input x [T, D], post [T, n] and the Sinkhorn-normalised comb [T, n, n] (comb[a][b]:
 * row a, column b, as the PyTorch path's [T, n, n]). n <= 16; D a multiple of 16. Each (token, row)
 * sum has one accumulation order whatever the blocking: the result does not depend on T. */
void dsv4_hc_pre(int64_t T, int64_t n, int64_t D, const float* h, int64_t st_t, int64_t st_n, const float* fn,
                 const float* base, const float* scale, float rms_eps, float hc_eps, int64_t iters, float* x,
                 float* post, float* comb) {
    const int64_t R = (2 + n) * n, C = D / 16, blocks = (T + HC_TB - 1) / HC_TB;
    float* zero = (float*)calloc((size_t)(n * D), sizeof(float)); /* stands in for rows past R */
#pragma omp parallel for schedule(static)
    for (int64_t blk = 0; blk < blocks; blk++) {
        const float* ht[HC_TB];
        for (int b = 0; b < HC_TB; b++) { /* a short last block repeats its last token (not stored) */
            const int64_t t = blk * HC_TB + b < T ? blk * HC_TB + b : T - 1;
            ht[b] = h + t * st_t;
        }
        float m[HC_TB][16 * 18];
        for (int64_t r0 = 0; r0 < R; r0 += 4) { /* 4 mixing rows x HC_TB tokens, sums by hsum8 */
            const float* f[4];
            for (int i = 0; i < 4; i++) f[i] = r0 + i < R ? fn + (r0 + i) * n * D : zero;
            v16 acc[HC_TB * 4];
            for (int i = 0; i < HC_TB * 4; i++) acc[i] = splat(0.f);
            for (int64_t j = 0; j < n; j++)
                for (int64_t c = 0; c < C; c++) {
                    v16 fv[4];
                    for (int i = 0; i < 4; i++) fv[i] = ld(f[i] + j * D + 16 * c);
                    for (int b = 0; b < HC_TB; b++) {
                        const v16 hv = ld(ht[b] + j * st_n + 16 * c);
                        for (int i = 0; i < 4; i++) acc[4 * b + i] += fv[i] * hv;
                    }
                }
            for (int g = 0; g < HC_TB * 4; g += 8) {
                const v16 sums = hsum8(acc + g);
                for (int k = 0; k < 8; k++) {
                    const int b = (g + k) / 4, i = (g + k) % 4;
                    if (r0 + i < R) m[b][r0 + i] = sums[k];
                }
            }
        }
        for (int b = 0; b < HC_TB && blk * HC_TB + b < T; b++) {
            const int64_t t = blk * HC_TB + b;
            hc_pre_token(n, D, ht[b], st_n, m[b], base, scale, rms_eps, hc_eps, iters, x + t * D, post + t * n,
                         comb + t * n * n);
        }
    }
    free(zero);
}

/* comb [T, n, n] -> out [T, n, n] after 2*iters-1 normalisations; saved (or NULL: inference) gets
 * the input of every normalisation after the first ([2*iters-2, T, n, n]) for the backward. */
DSV4_EXACT_FN void dsv4_sinkhorn(int64_t T, int64_t n, int64_t iters, float eps, const float* comb, float* out,
                                 float* saved) {
    const int64_t steps = 2 * iters - 1, nn = n * n;
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < T; t++) {
        float a[256], b[256];
        const float* in = comb + t * nn;
        for (int64_t k = 0; k < steps; k++) {
            float* dst = k == steps - 1 ? out + t * nn : (k % 2 ? b : a);
            sinkhorn_half(n, k % 2 ? 1 : 0, eps, in, dst);
            if (saved && k < steps - 1) memcpy(saved + (k * T + t) * nn, dst, sizeof(float) * (size_t)nn);
            in = dst;
        }
    }
}

/* The gradient of dsv4_sinkhorn: grad_out [T, n, n] -> grad_in. For each normalisation y = x / s,
 * s = sum(x) + eps, from last to first, as autograd's DivBackward, SumBackward and the accumulation
 * of x's two uses compute it: g_x = g / s + sum(-g * ((x / s) / s)) (the sum over the normalised
 * dimension, broadcast back). */
DSV4_EXACT_FN void dsv4_sinkhorn_backward(int64_t T, int64_t n, int64_t iters, float eps, const float* comb,
                                          const float* saved, const float* grad_out, float* grad_in) {
    const int64_t steps = 2 * iters - 1, nn = n * n;
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < T; t++) {
        DSV4_EXACT
        float g[256], s[16], gs[16];
        memcpy(g, grad_out + t * nn, sizeof(float) * (size_t)nn);
        for (int64_t k = steps - 1; k >= 0; k--) {
            const float* x = k == 0 ? comb + t * nn : saved + ((k - 1) * T + t) * nn;
            const int dim = k % 2 ? 1 : 0;
            for (int64_t i = 0; i < n; i++) {
                float acc = 0.f;
                for (int64_t j = 0; j < n; j++) acc += dim == 0 ? x[j * n + i] : x[i * n + j];
                s[i] = acc + eps;
            }
            for (int64_t i = 0; i < n; i++) {
                float acc = 0.f;
                for (int64_t j = 0; j < n; j++) {
                    const int64_t e = dim == 0 ? j * n + i : i * n + j;
                    const float q = (x[e] / s[i]) / s[i];
                    const float p = -g[e] * q;
                    acc += p;
                }
                gs[i] = acc;
            }
            for (int64_t a = 0; a < n; a++)
                for (int64_t b = 0; b < n; b++) {
                    const int64_t i = dim == 0 ? b : a;
                    g[a * n + b] = g[a * n + b] / s[i] + gs[i];
                }
        }
        memcpy(grad_in + t * nn, g, sizeof(float) * (size_t)nn);
    }
}

/* New streams out[t, k] = post[t, k] f[t] + sum_j comb[t, j, k] h[t, j]; f [T, D] and out [T, n, D]
 * contiguous. */
void dsv4_hc_post(int64_t T, int64_t n, int64_t D, const float* f, const float* h, int64_t st_t, int64_t st_n,
                  const float* post, const float* comb, float* out) {
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < T; t++) {
        const float* ft = f + t * D;
        const float* ht = h + t * st_t;
        const float* ct = comb + t * n * n;
        for (int64_t k = 0; k < n; k++) {
            float* o = out + (t * n + k) * D;
            const float pk = post[t * n + k];
#pragma omp simd
            for (int64_t i = 0; i < D; i++) o[i] = pk * ft[i];
            for (int64_t j = 0; j < n; j++) {
                const float* hj = ht + j * st_n;
                const float w = ct[j * n + k];
#pragma omp simd
                for (int64_t i = 0; i < D; i++) o[i] += w * hj[i];
            }
        }
    }
}

/* ---------------------------------------------------------------------------------------------
 * RMSNorm: y[t] = w * x[t] / sqrt(mean(x[t]^2) + eps) for rows x [T, D] (row stride st, unit column
 * stride); w may be NULL (no weight). y [T, D] contiguous.
 */
void dsv4_rms_norm(int64_t T, int64_t D, const float* x, int64_t st, const float* w, float eps, float* y) {
#pragma omp parallel for schedule(static) if (T * D >= 32768)
    for (int64_t t = 0; t < T; t++) {
        const float* xt = x + t * st;
        float* yt = y + t * D;
        float ss = 0.f;
#pragma omp simd reduction(+ : ss)
        for (int64_t k = 0; k < D; k++) ss += xt[k] * xt[k];
        const float r = 1.0f / sqrtf(ss / (float)D + eps);
        if (w != NULL) {
#pragma omp simd
            for (int64_t k = 0; k < D; k++) yt[k] = w[k] * (xt[k] * r);
        } else {
#pragma omp simd
            for (int64_t k = 0; k < D; k++) yt[k] = xt[k] * r;
        }
    }
}

/* ---------------------------------------------------------------------------------------------
 * Routed experts of one MoE layer (spec §6) for decode-sized steps: every expert's rows in blocks
 * of up to 16, each block's two products and the clamped SwiGLU in one pass, summed into out.
 *
 * Weights are panel-packed by the caller: a [N, K] weight becomes [N/16, K, 16] (16 output columns
 * per panel, K contiguous rows of them), so a block's product is 16-row outer-product updates from
 * one contiguous stream. gate_up [E][2I/16][D][16] (gate = w1 then up = w3), down [E][D/16][I][16].
 */

/* C[M, 16] = A[M, K] (row stride lda) times one weight panel B [K, 16]; M <= 16 (a constant after
 * inlining). `next` (the following panel, or B) is prefetched line by line as B is read: more loads
 * in flight for weights that stream from memory (~18% faster routed experts of a decode step). */
static inline __attribute__((always_inline)) void panel_rows(const int M, const float* A, int64_t lda,
                                                              const float* B, const float* next, int64_t K,
                                                              float* C, int64_t ldc) {
    v16 acc[16];
    for (int m = 0; m < M; m++) acc[m] = splat(0.f);
    for (int64_t k = 0; k < K; k++) {
        __builtin_prefetch(next + k * 16, 0, 3);
        const v16 w = ld(B + k * 16);
        for (int m = 0; m < M; m++) acc[m] += A[m * lda + k] * w;
    }
    for (int m = 0; m < M; m++) st(C + m * ldc, acc[m]);
}

static void panel(int M, const float* A, int64_t lda, const float* B, const float* next, int64_t K, float* C,
                  int64_t ldc) {
    switch (M) {
#define CASE(m) \
    case m: panel_rows(m, A, lda, B, next, K, C, ldc); break;
        CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
        CASE(9) CASE(10) CASE(11) CASE(12) CASE(13) CASE(14) CASE(15) CASE(16)
#undef CASE
        default: break;
    }
}

/* C[M, N] = A[M, K] times the panel-packed B ([N/16, K, 16]), any M: panel by panel, every 16-row
 * block against the panel while it is in L1, so a weight streams from memory once. */
static void gemm(int64_t M, const float* A, int64_t lda, const float* B, int64_t K, int64_t N, float* C,
                 int64_t ldc) {
    const int64_t NP = N / 16;
    for (int64_t nt = 0; nt < NP; nt++) {
        const float* b = B + nt * K * 16;
        const float* next = nt + 1 < NP ? b + K * 16 : b;
        for (int64_t m0 = 0; m0 < M; m0 += 16)
            panel((int)(M - m0 < 16 ? M - m0 : 16), A + m0 * lda, lda, b, next, K, C + m0 * ldc + nt * 16, ldc);
    }
}

/* out[t] = sum_j weights[t, j] * expert_{idx[t, j]}(x[t]), the k experts of token t summed in j
 * order (so the result does not depend on how threads share the work). idx/weights [T, k], all ids
 * in [0, E). limit > 0 clamps the SwiGLU (gate <= limit, |up| <= limit). x, out [T, D] contiguous. */
int64_t dsv4_moe_experts(int64_t T, int64_t D, int64_t I, const float* x, int64_t E, const float* gate_up,
                         const float* down, const int64_t* idx, const float* weights, int64_t k, float limit,
                         float* out) {
    const int64_t A = T * k;
    for (int64_t a = 0; a < A; a++)
        if (idx[a] < 0 || idx[a] >= E) return 1; /* an expert id out of range: nothing computed */
    /* Counting sort of the assignments by expert (stable: token order within an expert). */
    int64_t* offsets = (int64_t*)calloc((size_t)(E + 1), sizeof(int64_t));
    int64_t* order = (int64_t*)malloc(sizeof(int64_t) * (size_t)(A + 1)); /* sorted position -> t*k+j */
    int64_t* inv = (int64_t*)malloc(sizeof(int64_t) * (size_t)(A + 1));   /* t*k+j -> sorted position */
    float* scratch = (float*)malloc(sizeof(float) * (size_t)(A * D + 1));
    for (int64_t a = 0; a < A; a++) offsets[idx[a] + 1]++;
    for (int64_t e = 0; e < E; e++) offsets[e + 1] += offsets[e];
    {
        int64_t* fill = (int64_t*)malloc(sizeof(int64_t) * (size_t)(E + 1));
        memcpy(fill, offsets, sizeof(int64_t) * (size_t)(E + 1));
        for (int64_t a = 0; a < A; a++) {
            const int64_t pos = fill[idx[a]]++;
            order[pos] = a;
            inv[a] = pos;
        }
        free(fill);
    }
    /* Work items: an expert's rows in chunks of up to BLOCK (its weights stream from memory once
     * per chunk), biggest first for the dynamic schedule. */
    enum { BLOCK = 64 };
    int64_t n_items = 0;
    for (int64_t e = 0; e < E; e++) n_items += (offsets[e + 1] - offsets[e] + BLOCK - 1) / BLOCK;
    int64_t* items = (int64_t*)malloc(sizeof(int64_t) * 3 * (size_t)(n_items + 1));
    int64_t n = 0;
    for (int64_t e = 0; e < E; e++) {
        const int64_t count = offsets[e + 1] - offsets[e], chunks = (count + BLOCK - 1) / BLOCK;
        for (int64_t c = 0; c < chunks; c++) { /* balanced chunk sizes */
            const int64_t lo = offsets[e] + count * c / chunks, hi = offsets[e] + count * (c + 1) / chunks;
            items[3 * n] = e;
            items[3 * n + 1] = lo;
            items[3 * n + 2] = hi - lo;
            n++;
        }
    }
    for (int64_t i = 1; i < n_items; i++) /* insertion sort by size, descending (n_items is small) */
        for (int64_t j = i; j > 0 && items[3 * j + 2] > items[3 * (j - 1) + 2]; j--)
            for (int f = 0; f < 3; f++) {
                const int64_t tmp = items[3 * j + f];
                items[3 * j + f] = items[3 * (j - 1) + f];
                items[3 * (j - 1) + f] = tmp;
            }
#pragma omp parallel
    {
        float* xb = (float*)malloc(sizeof(float) * (size_t)(BLOCK * D));
        float* h = (float*)malloc(sizeof(float) * (size_t)(BLOCK * 2 * I));
        float* act = (float*)malloc(sizeof(float) * (size_t)(BLOCK * I));
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < n_items; it++) {
            const int64_t e = items[3 * it], a0 = items[3 * it + 1], rows = items[3 * it + 2];
            for (int64_t m = 0; m < rows; m++)
                memcpy(xb + m * D, x + (order[a0 + m] / k) * D, sizeof(float) * (size_t)D);
            gemm(rows, xb, D, gate_up + e * 2 * I * D, D, 2 * I, h, 2 * I);
            for (int64_t m = 0; m < rows; m++) {
                const float* g = h + m * 2 * I;
                const float* u = g + I;
                const float w = weights[order[a0 + m]];
                float* o = act + m * I;
#pragma omp simd
                for (int64_t j = 0; j < I; j++) {
                    float gj = g[j], uj = u[j];
                    if (limit > 0.f) {
                        gj = gj < limit ? gj : limit;
                        uj = uj < -limit ? -limit : (uj > limit ? limit : uj);
                    }
                    o[j] = gj / (1.0f + fexp_any(-gj)) * uj * w; /* the routing weight, folded in */
                }
            }
            gemm(rows, act, I, down + e * D * I, I, D, scratch + a0 * D, D);
        }
        free(xb);
        free(h);
        free(act);
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) {
            float* o = out + t * D;
            memcpy(o, scratch + inv[t * k] * D, sizeof(float) * (size_t)D);
            for (int64_t j = 1; j < k; j++) {
                const float* yj = scratch + inv[t * k + j] * D;
#pragma omp simd
                for (int64_t i = 0; i < D; i++) o[i] += yj[i];
            }
        }
    }
    free(items);
    free(offsets);
    free(order);
    free(inv);
    free(scratch);
    return 0;
}

/* The MoE router (spec §6) for T tokens: logits = x W^T (W [E, D]); scores = softmax (func 0),
 * sigmoid (1) or sqrt(softplus) (2) of them; each token's k experts are idx_in's row where given
 * (hash layers, routing replay: rows whose first id is >= 0), else the top k of scores + bias (ties:
 * lower id first); weights are their scores, renormalised unless softmax, times scale. */
int64_t dsv4_moe_gate(int64_t T, int64_t D, int64_t E, const float* x, const float* W, const float* bias,
                      int32_t func, int64_t k, const int64_t* idx_in, float scale, int64_t* idx_out, float* w_out) {
    if (idx_in != NULL)
        for (int64_t t = 0; t < T; t++)
            if (idx_in[t * k] >= 0)
                for (int64_t j = 0; j < k; j++)
                    if (idx_in[t * k + j] < 0 || idx_in[t * k + j] >= E) return 1; /* imposed id out of range */
#pragma omp parallel for schedule(static) if (T * E * D >= 262144)
    for (int64_t t = 0; t < T; t++) {
        const float* xt = x + t * D;
        float* sc = (float*)malloc(sizeof(float) * (size_t)(2 * E));
        float* sel = sc + E;
        float mx = -INFINITY;
        for (int64_t e = 0; e < E; e++) {
            const float* we = W + e * D;
            float acc = 0.f;
#pragma omp simd reduction(+ : acc)
            for (int64_t i = 0; i < D; i++) acc += xt[i] * we[i];
            sc[e] = acc;
            mx = acc > mx ? acc : mx;
        }
        if (func == 0) {
            float sum = 0.f;
            for (int64_t e = 0; e < E; e++) sum += (sc[e] = expf(sc[e] - mx));
            for (int64_t e = 0; e < E; e++) sc[e] /= sum;
        } else if (func == 1) {
            for (int64_t e = 0; e < E; e++) sc[e] = 1.0f / (1.0f + expf(-sc[e]));
        } else {
            for (int64_t e = 0; e < E; e++) sc[e] = sqrtf(sc[e] > 20.f ? sc[e] : log1pf(expf(sc[e])));
        }
        int64_t* it = idx_out + t * k;
        if (idx_in != NULL && idx_in[t * k] >= 0) {
            for (int64_t j = 0; j < k; j++) it[j] = idx_in[t * k + j];
        } else {
            for (int64_t e = 0; e < E; e++) sel[e] = sc[e] + (bias != NULL ? bias[e] : 0.f);
            for (int64_t j = 0; j < k; j++) {
                int64_t best = -1;
                for (int64_t e = 0; e < E; e++)
                    if (best < 0 || sel[e] > sel[best]) best = e;
                it[j] = best;
                sel[best] = -INFINITY;
            }
        }
        float sum = 0.f;
        for (int64_t j = 0; j < k; j++) sum += (w_out[t * k + j] = sc[it[j]]);
        const float norm = func == 0 ? scale : scale / sum;
        for (int64_t j = 0; j < k; j++) w_out[t * k + j] *= norm;
        free(sc);
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * Interleaved partial RoPE (spec §2): out = x with the trailing rd channels of every row of
 * x [N, inner, d] (contiguous) rotated pairwise by cis [N, rd/2] (cos, sin pairs; the conjugate
 * when inverse). out [N, inner, d] contiguous, not aliasing x.
 */
void dsv4_rope(int64_t N, int64_t inner, int64_t d, int64_t rd, const float* x, const float* cis, int32_t inverse,
               float* out) {
    const float sgn = inverse ? -1.0f : 1.0f;
#pragma omp parallel for schedule(static) if (N * inner * d >= 65536)
    for (int64_t n = 0; n < N; n++) {
        const float* c = cis + n * rd;
        for (int64_t i = 0; i < inner; i++) {
            const float* xr = x + (n * inner + i) * d;
            float* o = out + (n * inner + i) * d;
            memcpy(o, xr, sizeof(float) * (size_t)(d - rd));
            const float* xp = xr + d - rd;
            float* op = o + d - rd;
#pragma omp simd
            for (int64_t j = 0; j < rd / 2; j++) {
                const float a = xp[2 * j], b = xp[2 * j + 1], cs = c[2 * j], sn = sgn * c[2 * j + 1];
                op[2 * j] = a * cs - b * sn;
                op[2 * j + 1] = a * sn + b * cs;
            }
        }
    }
}

/* ---------------------------------------------------------------------------------------------
 * Block compression (spec §5.1) of E closing blocks, reading the compressor rows in place.
 * rows [*, 2W] (W = coff*c: [K | Z] of a token), slots/valid [E, coff*m]: a block's slots (for
 * overlap: the previous block's m tokens, then its own m). ape [m, W]. Per channel, a softmax over
 * the valid slots of Z + ape weighs K; the entry is RMS-normed (weight norm_w) and its trailing rd
 * channels rotated by cis [E, rd/2] (cos, sin). out [E, c].
 */
int64_t dsv4_compress(int64_t E, int64_t m, int64_t c, int32_t overlap, const float* rows, int64_t n_rows,
                      const int64_t* slots, const uint8_t* valid, const float* ape, const float* norm_w, float eps,
                      const float* cis, int64_t rd, float* out) {
    const int64_t coff = overlap ? 2 : 1, W = coff * c, S = coff * m;
    for (int64_t i = 0; i < E * S; i++)
        if (valid[i] && (slots[i] < 0 || slots[i] >= n_rows)) return 1; /* a valid slot outside rows */
#pragma omp parallel for schedule(static) if (E >= 8)
    for (int64_t e = 0; e < E; e++) {
        float* o = out + e * c;
        float* mx = (float*)malloc(sizeof(float) * (size_t)(2 * c));
        float* den = mx + c;
        for (int64_t ch = 0; ch < c; ch++) {
            mx[ch] = -INFINITY;
            den[ch] = 0.f;
            o[ch] = 0.f;
        }
        for (int pass = 0; pass < 2; pass++)
            for (int64_t i = 0; i < S; i++) {
                if (!valid[e * S + i]) continue;
                const int64_t off = overlap && i >= m ? c : 0, a = i % m;
                const float* row = rows + slots[e * S + i] * 2 * W;
                const float* key = row + off;
                const float* z = row + W + off;
                const float* ap = ape + a * W + off;
                if (pass == 0) {
#pragma omp simd
                    for (int64_t ch = 0; ch < c; ch++) {
                        const float l = z[ch] + ap[ch];
                        mx[ch] = l > mx[ch] ? l : mx[ch];
                    }
                } else {
#pragma omp simd
                    for (int64_t ch = 0; ch < c; ch++) {
                        const float p = fexp(z[ch] + ap[ch] - mx[ch]);
                        den[ch] += p;
                        o[ch] += p * key[ch];
                    }
                }
            }
        float ss = 0.f;
        for (int64_t ch = 0; ch < c; ch++) {
            o[ch] = den[ch] > 0.f ? o[ch] / den[ch] : 0.f;
            ss += o[ch] * o[ch];
        }
        const float r = 1.0f / sqrtf(ss / (float)c + eps);
        for (int64_t ch = 0; ch < c; ch++) o[ch] = norm_w[ch] * (o[ch] * r);
        const float* cs = cis + e * rd;
        float* op = o + c - rd;
        for (int64_t j = 0; j < rd / 2; j++) {
            const float x0 = op[2 * j], x1 = op[2 * j + 1];
            op[2 * j] = x0 * cs[2 * j] - x1 * cs[2 * j + 1];
            op[2 * j + 1] = x0 * cs[2 * j + 1] + x1 * cs[2 * j];
        }
        free(mx);
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * Lightning-indexer top-k (spec §5.2), streamed: each token's scores are computed a few keys at a
 * time and folded into a running top-k, so no [tokens x keys] score matrix is ever held.
 *
 * score(t, s) = scale * sum_h w[t, h] * relu(q[t, h] . key_s) over the token's visible entries
 * s < limit[t] (<= N), key_s = store[slots_t[s]] read in place, slots_t = slots + t * slot_stride
 * (slot_stride 0: every token reads the same keys, as the queries of one request's prefill chunk do,
 * and tokens are then scored in pairs against each key). Picks are ranked by score, ties by the
 * lower entry index: a total order, so the top k do not depend on how the work is split (see
 * dsv4.attention.ops.select_topk, which ranks the same way). idx/score [T, k] get the k best in rank
 * order; a token with fewer than k visible entries gets its own, then the lowest invisible entries
 * (limit[t], limit[t] + 1, ...) with score -inf.
 *
 * The arithmetic of one (token, key) pair does not depend on the batch, the pairing or the split:
 * vectors run over 16 heads (padded with zero heads), the dot product over channels is a chain in
 * channel order, head groups add in order and hsum8 sums the 16 lanes by one fixed tree. A token
 * scored by a prefill chunk and by a decode step gets the same bits, hence the same picks.
 */

/* A pick's rank as one integer (greater: better): the score's bits made order-preserving in the high
 * 32 bits (-0.0 ranks as 0.0), 2^32 - 1 - its entry index in the low 32 (dsv4.attention.ops.rank_keys). */
static inline int64_t rank_key(float s, int64_t id) {
    const float z = s + 0.0f; /* -0.0 becomes 0.0 */
    int32_t b;
    memcpy(&b, &z, sizeof b);
    const int64_t ordered = b >= 0 ? b : b ^ 0x7FFFFFFF;
    return (int64_t)((uint64_t)ordered << 32) | (0xFFFFFFFFLL - id);
}

static inline float key_score(int64_t key) {
    const int32_t ordered = (int32_t)(key >> 32), b = ordered >= 0 ? ordered : ordered ^ 0x7FFFFFFF;
    float s;
    memcpy(&s, &b, sizeof s);
    return s;
}

/* A min-heap of at most k rank keys: the lowest-ranked pick at the root. */
static inline void heap_down(int64_t* h, int64_t n, int64_t i) {
    const int64_t x = h[i];
    for (;;) {
        const int64_t l = 2 * i + 1, r = l + 1;
        if (l >= n) break;
        const int64_t m = r < n && h[r] < h[l] ? r : l;
        if (h[m] >= x) break;
        h[i] = h[m];
        i = m;
    }
    h[i] = x;
}

static inline void heap_offer(int64_t* h, int64_t* n, int64_t k, int64_t key) {
    if (*n < k) { /* not full: sift the new pick up */
        int64_t i = (*n)++;
        while (i > 0 && h[(i - 1) / 2] > key) {
            h[i] = h[(i - 1) / 2];
            i = (i - 1) / 2;
        }
        h[i] = key;
    } else if (key > h[0]) { /* it beats the lowest-ranked pick: replace it */
        h[0] = key;
        heap_down(h, k, 0);
    }
}

/* The lowest score a pick must reach to enter a heap of n of at most k picks. */
static inline float heap_floor(const int64_t* h, int64_t n, int64_t k) { return n < k ? -INFINITY : key_score(h[0]); }

/* q [nh, c] as qT [G][c][16] (head groups of 16 lanes, zero heads past nh), w [nh] as wv [G][16]. */
static void pack_heads(int64_t nh, int64_t c, const float* q, const float* w, float* qT, float* wv) {
    const int64_t G = (nh + 15) / 16;
    memset(qT, 0, sizeof(float) * (size_t)(G * c * 16));
    memset(wv, 0, sizeof(float) * (size_t)(G * 16));
    for (int64_t h = 0; h < nh; h++) {
        float* dst = qT + (h / 16) * c * 16 + h % 16;
        for (int64_t ch = 0; ch < c; ch++) dst[ch * 16] = q[h * c + ch];
        wv[h] = w[h];
    }
}

/* Scores of TB tokens (packed by pack_heads) against KB keys (KB a multiple of 8): out[b][j]. The
 * TB x KB accumulators (16 at most) stay in registers through the channel loop. */
static inline __attribute__((always_inline)) void index_tile(const int TB, const int KB, int64_t G, int64_t c,
                                                              const float* const* qT, const float* const* wv,
                                                              const float* const* keys, float scale,
                                                              float out[][16]) {
    v16 part[2][16]; /* sum over head groups of w * relu(q . key), lane by lane */
    for (int b = 0; b < TB; b++)
        for (int j = 0; j < KB; j++) part[b][j] = splat(0.f);
    for (int64_t g = 0; g < G; g++) {
        v16 acc[2][16];
        for (int b = 0; b < TB; b++)
            for (int j = 0; j < KB; j++) acc[b][j] = splat(0.f);
        for (int64_t ch = 0; ch < c; ch++) {
            v16 qv[2];
            for (int b = 0; b < TB; b++) qv[b] = ld(qT[b] + (g * c + ch) * 16);
            for (int j = 0; j < KB; j++) {
                const v16 kv = splat(keys[j][ch]);
                for (int b = 0; b < TB; b++) acc[b][j] += qv[b] * kv;
            }
        }
        for (int b = 0; b < TB; b++) {
            const v16 wg = ld(wv[b] + g * 16);
            for (int j = 0; j < KB; j++) part[b][j] += vmax(acc[b][j], splat(0.f)) * wg;
        }
    }
    for (int b = 0; b < TB; b++)
        for (int j = 0; j < KB; j += 8) {
            const v16 sums = hsum8(part[b] + j) * scale;
            for (int i = 0; i < 8; i++) out[b][j + i] = sums[i];
        }
}

/* Rank order out of a heap of n picks (the lowest-ranked popped into the last place first), then the fill. */
static void heap_emit(int64_t* h, int64_t n, int64_t k, int64_t limit, int64_t* idx, float* score) {
    for (int64_t m = n - 1; m >= 0; m--) {
        const int64_t key = h[0];
        score[m] = key_score(key), idx[m] = 0xFFFFFFFFLL - (key & 0xFFFFFFFFLL);
        h[0] = h[m];
        heap_down(h, m, 0);
    }
    for (int64_t j = n; j < k; j++) score[j] = -INFINITY, idx[j] = limit + (j - n);
}

/* Work items: tiles of tokens (one token, or up to 32 sharing their keys, their packed queries within
 * 256 KB so they stay in L2 while the keys stream past) times splits of their keys, enough items for
 * 2 per thread where a step has few tokens (a decode step), each split at least 1024 keys. */
int64_t dsv4_indexer_topk(int64_t T, int64_t nh, int64_t c, const float* q, const float* w, const float* store,
                          int64_t n_rows, const int64_t* slots, int64_t N, int64_t slot_stride,
                          const int64_t* limit, int64_t k, int64_t threads, float scale, int64_t* idx,
                          float* score) {
    const int64_t G = (nh + 15) / 16, shared = slot_stride == 0;
    int64_t checked = 0; /* shared keys: the slots below this one were checked */
    for (int64_t t = 0; t < T; t++) {
        if (limit[t] < 0 || limit[t] > N) return 1; /* more entries visible than there are */
        const int64_t* row = slots + t * slot_stride;
        for (int64_t s = shared ? checked : 0; s < limit[t]; s++)
            if (row[s] < 0 || row[s] >= n_rows) return 1; /* a visible slot outside the store */
        if (shared && limit[t] > checked) checked = limit[t];
    }
    const int64_t fit = 65536 / (G * c * 16), span = shared ? (fit > 32 ? 32 : fit < 2 ? 2 : fit) : 1;
    const int64_t tiles = (T + span - 1) / span;
    int64_t splits = 1;
    if (tiles < 2 * threads) {
        splits = (2 * threads + tiles - 1) / tiles;
        if (splits > N / 1024) splits = N / 1024 > 1 ? N / 1024 : 1;
    }
    const int64_t items = tiles * splits;
    /* Each work item's heaps (one per token of its tile and split): [T][splits][k]. */
    int64_t* heaps = (int64_t*)malloc(sizeof(int64_t) * (size_t)(T * splits * k + 1));
    int64_t* pn = (int64_t*)calloc((size_t)(T * splits + 1), sizeof(int64_t));
    float* zero = (float*)calloc((size_t)c, sizeof(float)); /* stands in for keys past the visible ones */
#pragma omp parallel
    {
        float* qT = (float*)malloc(sizeof(float) * (size_t)(span * G * c * 16));
        float* wv = (float*)malloc(sizeof(float) * (size_t)(span * G * 16));
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < items; it++) {
            const int64_t t0 = (it / splits) * span, t1 = t0 + span < T ? t0 + span : T, sp = it % splits;
            int64_t most = 0;
            for (int64_t t = t0; t < t1; t++) {
                pack_heads(nh, c, q + t * nh * c, w + t * nh, qT + (t - t0) * G * c * 16, wv + (t - t0) * G * 16);
                most = limit[t] > most ? limit[t] : most;
            }
            const int64_t lo = most * sp / splits, hi = most * (sp + 1) / splits;
            if (shared) {
                for (int64_t s0 = lo; s0 < hi; s0 += 8) {
                    const float* keys[8];
                    for (int j = 0; j < 8; j++) keys[j] = s0 + j < hi ? store + slots[s0 + j] * c : zero;
                    for (int64_t t = t0; t < t1; t += 2) { /* an odd last token is paired with itself */
                        const int64_t u = t + 1 < t1 ? t + 1 : t;
                        const float* qp[2] = {qT + (t - t0) * G * c * 16, qT + (u - t0) * G * c * 16};
                        const float* wp[2] = {wv + (t - t0) * G * 16, wv + (u - t0) * G * 16};
                        float sc[2][16];
                        index_tile(2, 8, G, c, qp, wp, keys, scale, sc);
                        for (int b = 0; b < (u > t ? 2 : 1); b++) {
                            const int64_t tb = t + b, at = tb * splits + sp, end = limit[tb] < hi ? limit[tb] : hi;
                            int64_t* h = heaps + at * k;
                            const float floor = heap_floor(h, pn[at], k);
                            for (int j = 0; j < 8 && s0 + j < end; j++)
                                if (sc[b][j] >= floor) heap_offer(h, pn + at, k, rank_key(sc[b][j], s0 + j));
                        }
                    }
                }
            } else {
                const int64_t* row = slots + t0 * slot_stride;
                const int64_t end = limit[t0] < hi ? limit[t0] : hi, at = t0 * splits + sp;
                for (int64_t s0 = lo; s0 < end; s0 += 16) {
                    const float* keys[16];
                    for (int j = 0; j < 16; j++) keys[j] = s0 + j < end ? store + row[s0 + j] * c : zero;
                    /* A decode step reads its keys from memory, page by page: fetch two blocks ahead. */
                    for (int64_t j = s0 + 32; j < s0 + 48 && j < end; j++)
                        for (int64_t ch = 0; ch < c; ch += 16) __builtin_prefetch(store + row[j] * c + ch, 0, 3);
                    const float* qp[1] = {qT};
                    const float* wp[1] = {wv};
                    float sc[1][16];
                    index_tile(1, 16, G, c, qp, wp, keys, scale, sc);
                    int64_t* h = heaps + at * k;
                    const float floor = heap_floor(h, pn[at], k);
                    for (int j = 0; j < 16 && s0 + j < end; j++)
                        if (sc[0][j] >= floor) heap_offer(h, pn + at, k, rank_key(sc[0][j], s0 + j));
                }
            }
        }
        free(qT);
        free(wv);
        /* Merge each token's split heaps into its first, then emit in rank order. */
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) {
            int64_t* h = heaps + t * splits * k;
            int64_t* n = pn + t * splits;
            for (int64_t sp = 1; sp < splits; sp++)
                for (int64_t j = 0; j < n[sp]; j++) heap_offer(h, n, k, h[sp * k + j]);
            heap_emit(h, n[0], k, limit[t], idx + t * k, score + t * k);
        }
    }
    free(heaps);
    free(pn);
    free(zero);
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * Paged-pool slot lookup: out[i] = page * P + logical % P for the request row rows[req[i / J]] of
 * the page table pt [height, width]; page 0 (the null page) for a request without a row (-1), a
 * negative position, a page past the table, or an index out of range (never read out of bounds).
 * req has n / J entries (one per J positions), rows n_rows.
 */
void dsv4_slots(int64_t n, int64_t J, const int64_t* req, const int64_t* logical, const int64_t* rows, int64_t n_rows,
                const int64_t* pt, int64_t height, int64_t width, int64_t P, int64_t* out) {
    for (int64_t i = 0; i < n; i++) {
        const int64_t q = req[i / J], l = logical[i];
        const int64_t r = q >= 0 && q < n_rows ? rows[q] : -1;
        const int64_t pg = l >= 0 ? l / P : width;
        const int64_t page = r >= 0 && r < height && pg < width ? pt[r * width + pg] : 0;
        out[i] = page * P + (l >= 0 ? l % P : 0);
    }
}
