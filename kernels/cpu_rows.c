/* The soft cross-entropy on a CPU, fp32 (dino_fast/cross_entropy.py: the eager path's sweep,
 * whose notation this follows): per sample, the teacher probabilities of its G teacher crops and
 * each crop group's combined Q are built in a per-thread workspace ((G + 1) * K floats and the
 * block maxima of two rows), then each
 * of its student rows takes two sweeps: an online softmax a block at a time (the block's max
 * from memory, then, from L1, its exp, sum and dot with Q against the running max), and the
 * gradient, from the L2 cache. S and T are read once from memory and the gradient written once
 * (its final values with streaming stores); nothing (rows, K) is allocated. The teacher's column
 * sum (for a center update) is added up in the same read of T.
 *
 * Per student row (crop v of sample b, in group g), y = S / tau_s, m = max y:
 *     CE      = Qsum lse - <Q, y>  = Qsum log sum_k exp(y_k - m) - <Q, y - m>
 *     dCE/dS  = (Qsum softmax(y) - Q) / tau_s
 * ce[v * B + b] receives w_b CE and the gradient row f w_b (Qsum p - Q) (f: the caller's scale
 * / tau_s * grad_output). A NaN or +inf in a student row, or an inf or NaN in a teacher row,
 * gives NaN; a -inf student logit has probability 0 (CE +inf where Q > 0), as on the ops path.
 *
 * Built at first use by dino_fast.cpu_kernels with the system C compiler (-O3, -fopenmp where
 * it links, else -fopenmp-simd: the SIMD pragmas only). With OpenMP, dino_fast_soft_ce_f32_batch
 * runs a range of samples on each thread of the process's OpenMP runtime: in a PyTorch process
 * that is PyTorch's own (libgomp.so.1 is loaded once), whose threads, still spinning after the
 * last PyTorch op, take the work instead of competing with other threads for the cores. Without
 * it the caller's threads each take a range (dino_fast_soft_ce_f32). Plain C99 (x86 intrinsics
 * for the streaming stores where the compiler targets them), no other dependency.
 */
#include <math.h>
#if defined(__SSE__) || defined(__SSE2__)
#include <xmmintrin.h>
#endif
#include <stdint.h>
#include <string.h>

/* Non-temporal stores for the gradient's final values: it is not read again here, so it goes
 * to memory without staying in the cache the next rows need (the call runs about 1.5x faster
 * into mapped memory than with plain stores on a 2-core AMD EPYC VM, 1 MB L2 per core).
 * W floats per store; elsewhere plain stores. */
#if defined(__AVX512F__)
#include <immintrin.h>
#define STREAM_W 16
typedef __m512 vfloat;
#define VLOAD _mm512_loadu_ps
#define VSET1 _mm512_set1_ps
#define VMUL _mm512_mul_ps
#define VSUB _mm512_sub_ps
#define VSTREAM _mm512_stream_ps
#define STREAM_FENCE() _mm_sfence()
#elif defined(__AVX__)
#include <immintrin.h>
#define STREAM_W 8
typedef __m256 vfloat;
#define VLOAD _mm256_loadu_ps
#define VSET1 _mm256_set1_ps
#define VMUL _mm256_mul_ps
#define VSUB _mm256_sub_ps
#define VSTREAM _mm256_stream_ps
#define STREAM_FENCE() _mm_sfence()
#elif defined(__SSE2__)
#include <emmintrin.h>
#define STREAM_W 4
typedef __m128 vfloat;
#define VLOAD _mm_loadu_ps
#define VSET1 _mm_set1_ps
#define VMUL _mm_mul_ps
#define VSUB _mm_sub_ps
#define VSTREAM _mm_stream_ps
#define STREAM_FENCE() _mm_sfence()
#else
#define STREAM_W 0
#define STREAM_FENCE() ((void)0)
#endif

#define BLOCK 512 /* float partial sums over BLOCK elements, then double */

/* x[0 .. n) = x * a - b * q in place, streamed (from where x is aligned to the stores) */
static inline void scale_sub_stream(float *x, const float *q, float a, float b, int64_t n) {
    int64_t i = 0;
#if STREAM_W
    while (i < n && ((uintptr_t)(x + i) & (STREAM_W * sizeof(float) - 1)) != 0) {
        x[i] = x[i] * a - b * q[i];
        ++i;
    }
    const vfloat va = VSET1(a), vb = VSET1(b);
    for (; i + STREAM_W <= n; i += STREAM_W)
        VSTREAM(x + i, VSUB(VMUL(VLOAD(x + i), va), VMUL(vb, VLOAD(q + i))));
#endif
    for (; i < n; ++i) x[i] = x[i] * a - b * q[i];
}

/* a * b + c, fused where the target has FMA instructions: for the exponential's polynomial
 * only (the build's -ffp-contract=off keeps every other product unfused, see
 * dino_fast/cpu_kernels.py) */
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
#define MADD(a, b, c) fmaf((a), (b), (c))
#else
#define MADD(a, b, c) ((a) * (b) + (c))
#endif

/* e^x for x <= 0 (x = y - max y): Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2, a degree-7
 * polynomial for e^r and 2^n from the exponent bits; about 1.4 ulp. Below -87.3 (e^x < 1.2e-38,
 * nothing next to a sum >= 1) it returns 0; NaN stays NaN (with no float-to-integer conversion
 * of it). */
static inline float exp_nonpositive(float x) {
    const float xc = x < -87.3f ? -87.3f : x;
    /* n = round(x log2 e) from the low bits of x log2 e + 1.5 * 2^23; reading them as an
     * unsigned integer is defined for any input (a NaN gives some bits, and p is NaN anyway) */
    const float big = MADD(xc, 1.44269504088896341f, 12582912.0f);
    uint32_t ub;
    memcpy(&ub, &big, sizeof ub);
    const float n = big - 12582912.0f;
    float r = MADD(n, -0.693359375f, xc);
    r = MADD(n, 2.12194440e-4f, r);
    float p = 1.9875691500e-4f;
    p = MADD(p, r, 1.3981999507e-3f);
    p = MADD(p, r, 8.3334519073e-3f);
    p = MADD(p, r, 4.1665795894e-2f);
    p = MADD(p, r, 1.6666665459e-1f);
    p = MADD(p, r, 5.0000001201e-1f);
    p = MADD(p * r, r, r) + 1.0f;
    const uint32_t bits = (ub - 0x4B400000u + 127u) << 23; /* 2^n: n + 127 in the exponent */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return x < -87.3f ? 0.0f : p * scale;
}

/* A student row whose gradient is still to be written (sweep 2 below): out holds exp(y - m_j)
 * of each block j, blk_max the m_j / tau_s, ym the row's final max / tau_s. */
typedef struct {
    float *out;
    const float *q;
    const float *blk_max;
    float pa, qa, ym;
} pending_grad;

/* sweep 2 of a pending row, block j (entries k0 .. k0 + n - 1): exp(y - m_j) (fw Qsum / sum)
 * e^(m_j - m) - fw Q, streamed to out; where p is one-hot on Q's support (K = 1, say) the two
 * products are the same float and cancel exactly */
static inline void grad_block(const pending_grad *g, int64_t j, int64_t k0, int64_t n) {
    const float pj = g->blk_max[j] == g->ym ? g->pa
        : g->pa * (float)exp((double)g->blk_max[j] - (double)g->ym); /* -inf: 0, e is 0 too */
    scale_sub_stream(g->out + k0, g->q + k0, pj, g->qa, n);
}

/* The whole sweep 2 of a pending row, and *g cleared */
static void flush_grad(pending_grad *g, int64_t K) {
    if (!g->out) return;
    int64_t j = 0;
    for (int64_t k0 = 0; k0 < K; k0 += BLOCK, ++j)
        grad_block(g, j, k0, k0 + BLOCK < K ? BLOCK : K - k0);
    g->out = 0;
}

/* Sweep 1 of one student row s against Q = qscale * q (Qsum its sum): returns CE. When out is
 * not NULL the row's gradient fw (Qsum p - Q) is left pending in *next (its sweep 2 done later,
 * interleaved with the next row's sweep 1), with blk_max (ceil(K / BLOCK) floats of work) for
 * its block maxima; the pending row *prev (when prev->out is set) gets its sweep 2 here, block
 * by block, so that the stores to memory of one row overlap the exponentials of the next.
 *
 * Sweep 1, a block of BLOCK entries at a time, each first read from memory for its max (and
 * NaNs) and then, from L1, for exp(y - m) and <q, y - m>, m the running max of y: an online
 * softmax, whose sum and dot are brought to each new max as it rises; exp(y - m) of each block
 * is kept in the gradient row (in the cache: the row is written back only once, by sweep 2) and
 * the block's m in blk_max. A -inf entry is exp = 0 (and makes CE +inf where Q > 0, as the ops
 * do), a +inf or a NaN makes the row NaN. */
static double student_row(const float *s, const float *q, float qscale, double qsum, float *out,
                          int64_t K, float inv_s, float fw, float *blk_max, pending_grad *prev,
                          pending_grad *next) {
    float m = -INFINITY, nans = 0.0f;
    float ym = 0.0f; /* m / tau_s; 0 while m is -inf (then every exp so far is 0) */
    double sum = 0.0, d = 0.0, qacc = 0.0; /* qacc: sum of q over the blocks done */
    int64_t j = 0;
    for (int64_t k0 = 0; k0 < K; k0 += BLOCK, ++j) {
        const int64_t k1 = k0 + BLOCK < K ? k0 + BLOCK : K;
        float bmax = -INFINITY;
#pragma omp simd reduction(max : bmax) reduction(+ : nans)
        for (int64_t k = k0; k < k1; ++k) {
            bmax = s[k] > bmax ? s[k] : bmax;
            nans += s[k] != s[k] ? 1.0f : 0.0f;
        }
        if (bmax > m) {
            const float ym_new = bmax * inv_s;
            if (m != -INFINITY) { /* the blocks before: relative to the new max (both <= 0) */
                sum *= exp((double)ym - (double)ym_new);
                d += ((double)ym - (double)ym_new) * qacc;
            }
            m = bmax;
            ym = ym_new;
        }
        float bs = 0.0f, bd = 0.0f, bq = 0.0f;
        if (out) {
            blk_max[j] = m == -INFINITY ? -INFINITY : ym;
#pragma omp simd reduction(+ : bs, bd, bq)
            for (int64_t k = k0; k < k1; ++k) {
                const float t = s[k] * inv_s - ym;
                const float e = exp_nonpositive(t);
                out[k] = e;
                bs += e;
                bd += q[k] * t;
                bq += q[k];
            }
        } else {
#pragma omp simd reduction(+ : bs, bd, bq)
            for (int64_t k = k0; k < k1; ++k) {
                const float t = s[k] * inv_s - ym;
                bs += exp_nonpositive(t);
                bd += q[k] * t;
                bq += q[k];
            }
        }
        sum += bs;
        d += bd;
        qacc += bq;
        if (prev->out) grad_block(prev, j, k0, k1 - k0);
    }
    prev->out = 0;
    if (nans != 0.0f || m == INFINITY || m == -INFINITY) {
        if (out)
            for (int64_t k = 0; k < K; ++k) out[k] = NAN;
        return NAN;
    }
    if (out) {
        next->out = out;
        next->q = q;
        next->blk_max = blk_max;
        next->pa = fw * (float)(qsum / sum);
        next->qa = fw * qscale;
        next->ym = ym;
    }
    return qsum * log(sum) - qscale * d;
}

/* v[k] = exp(v[k] - m) in place (v <= m); returns their sum (float partial sums per BLOCK, then
 * double) */
static double exp_shifted_sum(float *v, float m, int64_t K) {
    double sum = 0.0;
    for (int64_t k0 = 0; k0 < K; k0 += BLOCK) {
        const int64_t k1 = k0 + BLOCK < K ? k0 + BLOCK : K;
        float bs = 0.0f;
#pragma omp simd reduction(+ : bs)
        for (int64_t k = k0; k < k1; ++k) {
            v[k] = exp_nonpositive(v[k] - m);
            bs += v[k];
        }
        sum += bs;
    }
    return sum;
}

/* sum[k] += x with Kahan's compensation comp[k] (the sum is sum - comp): the column sum of many
 * rows as exact as one rounding. An inf stays inf (its compensation would be NaN: set to 0). */
static inline void kahan_add(float *sum, float *comp, float x) {
    const float y = x - *comp, t = *sum + y, c = (t - *sum) - y;
    *comp = c == c ? c : 0.0f;
    *sum = t;
}

/* exp((t - center) * inv_t - max) of one teacher row into q: the softmax times the returned
 * sum (NaN for a row with an inf or a NaN). colsum, when not NULL (2 K floats: sums, then
 * their compensations), gets t added (the teacher's column sum for a center update, in the same
 * read of t). */
static double teacher_row(const float *t, const float *center, float inv_t, float *q, int64_t K,
                          float *colsum) {
    float m = -INFINITY;
    if (colsum) {
#pragma omp simd reduction(max : m)
        for (int64_t k = 0; k < K; ++k) {
            q[k] = (t[k] - (center ? center[k] : 0.0f)) * inv_t;
            kahan_add(colsum + k, colsum + K + k, t[k]);
            m = q[k] > m ? q[k] : m;
        }
    } else if (center) {
#pragma omp simd reduction(max : m)
        for (int64_t k = 0; k < K; ++k) {
            q[k] = (t[k] - center[k]) * inv_t;
            m = q[k] > m ? q[k] : m;
        }
    } else {
#pragma omp simd reduction(max : m)
        for (int64_t k = 0; k < K; ++k) {
            q[k] = t[k] * inv_t;
            m = q[k] > m ? q[k] : m;
        }
    }
    const double sum = exp_shifted_sum(q, m, K);
    return (m == m && m != INFINITY) ? sum : NAN;
}

/* Samples b0 .. b1 - 1 of the soft cross-entropy (see the top of the file).
 * S: (V * B, K) student logits; T: (NT * B, K) teacher logits (probs_given == 0: softmax((T -
 * center) * inv_t)) or probabilities used as given; center: K floats or NULL; G: (V * B, K)
 * gradient or NULL. Crop groups: student
 * crops group_v0[g] .. group_v0[g + 1] - 1 share the teacher weights group_w[g * NT ..]; row_w:
 * B sample weights or NULL; work: dino_fast_soft_ce_work(NT, K) floats of this thread; ce:
 * V * B doubles;
 * colsum: 2 K floats of this thread or NULL: set to the sum of the teacher rows of its samples
 * (K sums, then K compensations: the sum is sums - compensations).
 * Denormal results are flushed to zero for the call (restored at its end): a teacher's
 * probabilities below 1e-38 times a scale would otherwise make every sweep pay for them. So a
 * -inf student logit against a combined Q entry that flushes to 0 gives CE NaN, not +inf. */
void dino_fast_soft_ce_f32(const float *S, const float *T, const float *center, float *G,
                           int64_t V, int64_t NT, int64_t B, int64_t K, float inv_s, float inv_t,
                           int64_t probs_given, int64_t n_groups, const int64_t *group_v0, const float *group_w,
                           const float *row_w, double f, int64_t b0, int64_t b1, float *work,
                           double *ce, float *colsum) {
    (void)V;
#if defined(__SSE__) || defined(__SSE2__)
    const unsigned int csr = _mm_getcsr();
    _mm_setcsr(csr | 0x8000u); /* flush-to-zero: no denormal result */
#endif
    const float *qrow[64];
    float qscale[64]; /* teacher crop i's probabilities are qscale[i] * qrow[i] */
    double qsum[64];  /* and sum to qsum[i] */
    float *Qbuf = work + NT * K, *blk_max = work + (NT + 1) * K;
    const int64_t nblk = (K + BLOCK - 1) / BLOCK;
    pending_grad pend[2] = {{0}, {0}};
    int cur = 0;
    if (colsum) memset(colsum, 0, 2 * (size_t)K * sizeof(float));
    for (int64_t b = b0; b < b1; ++b) {
        for (int64_t i = 0; i < NT; ++i) {
            const float *t = T + (i * B + b) * K;
            if (!probs_given) {
                const double esum = teacher_row(t, center, inv_t, work + i * K, K, colsum);
                qscale[i] = (float)(1.0 / esum);
                qsum[i] = esum * qscale[i];
                qrow[i] = work + i * K;
            } else {
                double total = 0.0;
                for (int64_t k0 = 0; k0 < K; k0 += BLOCK) {
                    const int64_t k1 = k0 + BLOCK < K ? k0 + BLOCK : K;
                    float bs = 0.0f;
                    if (colsum) {
#pragma omp simd reduction(+ : bs)
                        for (int64_t k = k0; k < k1; ++k) {
                            bs += t[k];
                            kahan_add(colsum + k, colsum + K + k, t[k]);
                        }
                    } else {
#pragma omp simd reduction(+ : bs)
                        for (int64_t k = k0; k < k1; ++k) bs += t[k];
                    }
                    total += bs;
                }
                qsum[i] = total;
                qscale[i] = 1.0f;
                qrow[i] = t;
            }
        }
        const double w = row_w ? row_w[b] : 1.0;
        for (int64_t g = 0; g < n_groups; ++g) {
            const float *wg = group_w + g * NT;
            int64_t active = 0, last = 0;
            for (int64_t i = 0; i < NT; ++i)
                if (wg[i] != 0.0f) ++active, last = i;
            const float *Q = Qbuf;
            float Qscale = 1.0f;
            double Qsum = 0.0;
            if (active == 1 && wg[last] == 1.0f) {
                Q = qrow[last];
                Qscale = qscale[last];
                Qsum = qsum[last];
            } else if (active > 0) {
                if (pend[cur].q == Qbuf) flush_grad(&pend[cur], K); /* Qbuf is rebuilt */
                int first = 1;
                for (int64_t i = 0; i < NT; ++i) {
                    if (wg[i] == 0.0f) continue;
                    const float wi = wg[i] * qscale[i], *qi = qrow[i];
                    if (first) {
#pragma omp simd
                        for (int64_t k = 0; k < K; ++k) Qbuf[k] = wi * qi[k];
                    } else {
#pragma omp simd
                        for (int64_t k = 0; k < K; ++k) Qbuf[k] += wi * qi[k];
                    }
                    first = 0;
                    Qsum += wg[i] * qsum[i];
                }
            }
            for (int64_t v = group_v0[g]; v < group_v0[g + 1]; ++v) {
                float *out = G ? G + (v * B + b) * K : 0;
                if (active == 0) { /* crops paired with no teacher crop: no loss, zero gradient */
                    if (out) memset(out, 0, (size_t)K * sizeof(float));
                    ce[v * B + b] = 0.0;
                    continue;
                }
                /* the pending row's sweep 2 runs in this row's sweep 1; blk_max alternates
                 * between the two halves of its work */
                pending_grad *prev = &pend[cur], *next = &pend[cur ^ 1];
                ce[v * B + b] = w * student_row(S + (v * B + b) * K, Q, Qscale, Qsum, out, K,
                                                inv_s, (float)(f * w), blk_max + cur * nblk,
                                                prev, next);
                cur ^= 1;
            }
        }
        flush_grad(&pend[cur], K); /* before the next sample's teacher rows take the work */
    }
    STREAM_FENCE(); /* the streamed stores are visible before the caller's thread hands over */
#if defined(__SSE__) || defined(__SSE2__)
    _mm_setcsr(csr);
#endif
}

/* BODY for each i < n_threads, on the threads of the OpenMP runtime (one after the other in a
 * build without OpenMP); no parallel region for one thread. The pragma names the caller's
 * variable n_threads (a _Pragma string takes no macro argument). */
#ifdef _OPENMP
#define FOR_EACH_THREAD(n_threads, BODY)                                                      \
    do {                                                                                      \
        if ((n_threads) == 1) {                                                               \
            const int64_t i = 0;                                                              \
            BODY;                                                                             \
        } else {                                                                              \
            _Pragma("omp parallel for num_threads(n_threads) schedule(static, 1)")            \
            for (int64_t i = 0; i < (n_threads); ++i) BODY;                                   \
        }                                                                                     \
    } while (0)
#else
#define FOR_EACH_THREAD(n_threads, BODY)                                                      \
    do {                                                                                      \
        for (int64_t i = 0; i < (n_threads); ++i) BODY;                                       \
    } while (0)
#endif

/* The floats of work dino_fast_soft_ce_f32 takes per thread: the teacher rows and Q, and two
 * rows' block maxima */
int64_t dino_fast_soft_ce_work(int64_t NT, int64_t K) {
    return (NT + 1) * K + 2 * ((K + BLOCK - 1) / BLOCK);
}

/* colsum (K floats) = the sum over i < n of the column sums at partial + i * stride (2 K floats
 * each: sums, then their compensations, see kahan_add), added in double */
void dino_fast_colsum_f32(const float *partial, int64_t n, int64_t stride, int64_t K,
                          float *colsum) {
    for (int64_t k = 0; k < K; ++k) {
        double total = 0.0;
        for (int64_t i = 0; i < n; ++i)
            total += (double)partial[i * stride + k] - (double)partial[i * stride + K + k];
        colsum[k] = (float)total;
    }
}

/* 1 when built with OpenMP (dino_fast_soft_ce_f32_batch runs threads), else 0 */
int64_t dino_fast_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* All B samples of dino_fast_soft_ce_f32 on n_threads threads (OpenMP; one after the other
 * without it), thread i taking samples B i / n .. B (i + 1) / n - 1 with work + i * work_stride
 * and, when colsum is not NULL, 2 K floats at partial + i * work_stride for its teacher column
 * sum; colsum then gets the sum of the partial sums, added in double. */
void dino_fast_soft_ce_f32_batch(const float *S, const float *T, const float *center, float *G,
                                 int64_t V, int64_t NT, int64_t B, int64_t K, float inv_s,
                                 float inv_t, int64_t probs_given, int64_t n_groups,
                                 const int64_t *group_v0, const float *group_w,
                                 const float *row_w, double f, int64_t n_threads, float *work,
                                 int64_t work_stride, double *ce, float *partial,
                                 float *colsum) {
    FOR_EACH_THREAD(n_threads,
                    dino_fast_soft_ce_f32(S, T, center, G, V, NT, B, K, inv_s, inv_t, probs_given,
                                          n_groups, group_v0, group_w, row_w, f,
                                          B * i / n_threads, B * (i + 1) / n_threads,
                                          work + i * work_stride, ce,
                                          colsum ? partial + i * work_stride : 0));
    if (colsum) dino_fast_colsum_f32(partial, n_threads, work_stride, K, colsum);
}

/* ----------------------------------------------------------------------------------------------
 * The photometric pass of the batched augmentation (dino_fast/batch_augmentation.py, whose
 * formulas this follows operation by operation, in fp32 with no fused multiply-adds): colour
 * jitter in each image's own order, grayscale, Gaussian blur, solarization and normalisation, on
 * (n, 3, H, W) float images in [0, 1], in place. One image at a time stays in the L1/L2 cache
 * through every operation, where the ops path makes a pass over the whole batch per elementary
 * operation (about a hundred at CIFAR size).
 *
 * ops: n * 4 operation codes, position by position (0 brightness, 1 contrast, 2 saturation,
 * 3 hue, -1 none); factors: n * 4 floats (brightness, contrast, saturation, hue factor);
 * gray, solarize: n flags; blur: n indices into blur_k (., 2 * reach + 1), the box kernels of
 * the blur's passes, or -1; mean, std: 3 floats each, or NULL for no
 * normalisation; work: max(H, H_in) * W floats of this thread. Images b0 .. b1 - 1. */

static inline float clamp01(float v) { return v < 0.0f ? 0.0f : (v > 1.0f ? 1.0f : v); }

static inline float luma(float r, float g, float b) {
    return 0.2989f * r + 0.587f * g + 0.114f * b; /* torchvision's rgb_to_grayscale weights */
}

/* f * x + (1 - f) * other, clamped to [0, 1]: brightness (other 0), contrast (other the mean
 * grey level), saturation (other the pixel's grey level) */
static void blend(float *r, float *g, float *b, int64_t hw, int op, float f) {
    const float keep = 1.0f - f;
    if (op == 0) {
        const float zero = keep * 0.0f;
#pragma omp simd
        for (int64_t i = 0; i < hw; ++i) {
            r[i] = clamp01(f * r[i] + zero);
            g[i] = clamp01(f * g[i] + zero);
            b[i] = clamp01(f * b[i] + zero);
        }
    } else if (op == 1) {
        double total = 0.0;
        for (int64_t i0 = 0; i0 < hw; i0 += BLOCK) {
            const int64_t i1 = i0 + BLOCK < hw ? i0 + BLOCK : hw;
            float bs = 0.0f;
#pragma omp simd reduction(+ : bs)
            for (int64_t i = i0; i < i1; ++i) bs += luma(r[i], g[i], b[i]);
            total += bs;
        }
        const float m = keep * (float)(total / (double)hw);
#pragma omp simd
        for (int64_t i = 0; i < hw; ++i) {
            r[i] = clamp01(f * r[i] + m);
            g[i] = clamp01(f * g[i] + m);
            b[i] = clamp01(f * b[i] + m);
        }
    } else {
#pragma omp simd
        for (int64_t i = 0; i < hw; ++i) {
            const float m = keep * luma(r[i], g[i], b[i]);
            r[i] = clamp01(f * r[i] + m);
            g[i] = clamp01(f * g[i] + m);
            b[i] = clamp01(f * b[i] + m);
        }
    }
}

/* The hue rotation by `turns` through HSV (batch_augmentation.adjust_hue's formulas). Every
 * candidate value is computed, then selected: branch-free, so the loop vectorizes. */
static void hue(float *r, float *g, float *b, int64_t hw, float turns) {
#pragma omp simd
    for (int64_t i = 0; i < hw; ++i) {
        const float R = r[i], G = g[i], B = b[i];
        const float rg_hi = R > G ? R : G, rg_lo = R < G ? R : G;
        const float hi = rg_hi > B ? rg_hi : B, lo = rg_lo < B ? rg_lo : B;
        const float cr = hi - lo, div = cr == 0.0f ? 1.0f : cr;
        /* the maximum's channel, r before g before b: (g - b) / cr, 2 + (b - r) / cr, 4 + ... */
        const float from_r = G - B, from_g = B - R, from_b = R - G;
        float num = from_b, add = 4.0f;
        num = hi == G ? from_g : num;
        add = hi == G ? 2.0f : add;
        num = hi == R ? from_r : num;
        add = hi == R ? 0.0f : add;
        float h = num / div + add;
        h = h / 6.0f + 1.0f;
        const float h_less = h - 1.0f;
        h = h >= 1.0f ? h_less : h;
        /* torch.remainder(h + turns, 1) for h + turns in [-0.5, 1.5) (h in [0, 1), turns in
         * [-0.5, 0.5]): fmod's exact result, + 1 where it is negative */
        const float t0 = h + turns, up = t0 + 1.0f, down = t0 - 1.0f;
        const float t = (t0 < 0.0f ? up : (t0 >= 1.0f ? down : t0)) * 6.0f;
        r[i] = clamp01(fabsf(t - 3.0f) * 1.0f + -1.0f) * cr + lo;
        g[i] = clamp01(fabsf(t - 2.0f) * -1.0f + 2.0f) * cr + lo;
        b[i] = clamp01(fabsf(t - 4.0f) * -1.0f + 2.0f) * cr + lo;
    }
}

/* PIL's Gaussian blur of a plane (H, W): BLUR_PASSES passes of the box kernel k (2 * reach + 1
 * taps) down the columns, then as many along the rows, edge pixels replicated (what the ops
 * path's matrices down and across hold). work: H * W floats. */
#define BLUR_PASSES 3
static void blur_plane(float *plane, int64_t H, int64_t W, const float *k, int64_t reach,
                       float *work) {
    for (int pass = 0; pass < BLUR_PASSES; ++pass) { /* down the columns, a row at a time */
        for (int64_t i = 0; i < H; ++i) {
            float *out = work + i * W;
            memset(out, 0, (size_t)W * sizeof(float));
            for (int64_t j = -reach; j <= reach; ++j) {
                const float kj = k[j + reach];
                const int64_t src = i + j < 0 ? 0 : (i + j >= H ? H - 1 : i + j);
                const float *row = plane + src * W;
#pragma omp simd
                for (int64_t c = 0; c < W; ++c) out[c] += kj * row[c];
            }
        }
        memcpy(plane, work, (size_t)(H * W) * sizeof(float));
    }
    for (int64_t i = 0; i < H; ++i) { /* along the rows */
        float *row = plane + i * W, *tmp = work;
        for (int pass = 0; pass < BLUR_PASSES; ++pass) {
            for (int64_t c = 0; c < W; ++c) {
                float acc = 0.0f;
                for (int64_t j = -reach; j <= reach; ++j) {
                    const int64_t src = c + j < 0 ? 0 : (c + j >= W ? W - 1 : c + j);
                    acc += k[j + reach] * row[src];
                }
                tmp[c] = acc;
            }
            memcpy(row, tmp, (size_t)W * sizeof(float));
        }
    }
}

/* x (3, S, S) <- clamp(wy @ image_c @ wx_t, 0, 1) per channel: PIL's resize of a crop as two
 * products (resized_crops' weights, wx transposed to (W, S)); rows and columns whose weights
 * are all zero (outside the crop and its filter's support) are skipped. work: H * S floats. */
static void resize_crop(const float *image, int64_t H, int64_t W, const float *wy,
                        const float *wx_t, int64_t S, float *x, float *work) {
    int64_t w0 = W, w1 = 0, h0 = H, h1 = 0;
    for (int64_t w = 0; w < W; ++w)
        for (int64_t t = 0; t < S; ++t)
            if (wx_t[w * S + t] != 0.0f) {
                w0 = w < w0 ? w : w0;
                w1 = w + 1;
                break;
            }
    for (int64_t s = 0; s < S; ++s)
        for (int64_t h = 0; h < H; ++h)
            if (wy[s * H + h] != 0.0f) {
                h0 = h < h0 ? h : h0;
                h1 = h + 1 > h1 ? h + 1 : h1;
            }
    for (int c = 0; c < 3; ++c) {
        const float *plane = image + c * H * W;
        float *out = x + c * S * S;
        for (int64_t h = h0; h < h1; ++h) { /* work[h] = image_c[h] @ wx_t */
            float *row = work + h * S;
            memset(row, 0, (size_t)S * sizeof(float));
            for (int64_t w = w0; w < w1; ++w) {
                const float v = plane[h * W + w], *wt = wx_t + w * S;
#pragma omp simd
                for (int64_t t = 0; t < S; ++t) row[t] += v * wt[t];
            }
        }
        for (int64_t s = 0; s < S; ++s) {
            float *row = out + s * S;
            memset(row, 0, (size_t)S * sizeof(float));
            for (int64_t h = h0; h < h1; ++h) {
                const float a = wy[s * H + h], *src = work + h * S;
                if (a == 0.0f) continue;
#pragma omp simd
                for (int64_t t = 0; t < S; ++t) row[t] += a * src[t];
            }
#pragma omp simd
            for (int64_t t = 0; t < S; ++t) row[t] = clamp01(row[t]);
        }
    }
}

/* images == NULL: x holds the crops already. Otherwise crop n is first made from image n % B of
 * images (B, 3, H_in, W_in) with the weights wy (n, H, H_in) and wx_t (n, W_in, W) (H == W). */
void dino_fast_photometric_f32(float *x, int64_t H, int64_t W, const float *images, int64_t B,
                               int64_t H_in, int64_t W_in, const float *wy, const float *wx_t,
                               const int64_t *ops,
                               const float *factors, const uint8_t *gray, const int64_t *blur,
                               const float *blur_k, int64_t reach,
                               const uint8_t *solarize, float threshold, const float *mean,
                               const float *std, float *work, int64_t b0, int64_t b1) {
    const int64_t hw = H * W;
    for (int64_t n = b0; n < b1; ++n) {
        float *r = x + n * 3 * hw, *g = r + hw, *b = g + hw;
        if (images)
            resize_crop(images + (n % B) * 3 * H_in * W_in, H_in, W_in, wy + n * H * H_in,
                        wx_t + n * W_in * W, W, r, work);
        for (int p = 0; p < 4; ++p) {
            const int64_t op = ops[n * 4 + p];
            if (op >= 0 && op <= 2)
                blend(r, g, b, hw, (int)op, factors[n * 4 + op]);
            else if (op == 3)
                hue(r, g, b, hw, factors[n * 4 + 3]);
        }
        if (gray[n]) {
#pragma omp simd
            for (int64_t i = 0; i < hw; ++i) r[i] = g[i] = b[i] = luma(r[i], g[i], b[i]);
        }
        if (blur[n] >= 0)
            for (int c = 0; c < 3; ++c)
                blur_plane(r + c * hw, H, W, blur_k + blur[n] * (2 * reach + 1), reach, work);
        if (solarize[n]) {
#pragma omp simd
            for (int64_t i = 0; i < 3 * hw; ++i) {
                const float v = r[i], flipped = 1.0f - v;
                r[i] = v >= threshold ? flipped : v;
            }
        }
        if (mean)
            for (int c = 0; c < 3; ++c) {
                float *plane = r + c * hw;
                const float m = mean[c], s = std[c];
#pragma omp simd
                for (int64_t i = 0; i < hw; ++i) plane[i] = (plane[i] - m) / s;
            }
    }
}

/* Images 0 .. n - 1 of dino_fast_photometric_f32 on n_threads threads (OpenMP, as
 * dino_fast_soft_ce_f32_batch; one after the other without it), thread i taking images
 * n i / n_threads .. n (i + 1) / n_threads - 1 with work + i * work_stride. */
void dino_fast_photometric_f32_batch(float *x, int64_t H, int64_t W, const float *images,
                                     int64_t B, int64_t H_in, int64_t W_in, const float *wy,
                                     const float *wx_t, const int64_t *ops, const float *factors,
                                     const uint8_t *gray, const int64_t *blur,
                                     const float *blur_k, int64_t reach, const uint8_t *solarize,
                                     float threshold, const float *mean, const float *std,
                                     int64_t n, int64_t n_threads, float *work,
                                     int64_t work_stride) {
    FOR_EACH_THREAD(n_threads,
                    dino_fast_photometric_f32(x, H, W, images, B, H_in, W_in, wy, wx_t, ops,
                                              factors, gray, blur, blur_k, reach, solarize,
                                              threshold, mean, std, work + i * work_stride,
                                              n * i / n_threads, n * (i + 1) / n_threads));
}

/* ----------------------------------------------------------------------------------------------
 * The Sinkhorn-Knopp steps of dino_fast/sinkhorn.py (its _EagerSteps, whose formulas these
 * follow) on a = X / tau, fp32, read in place (row stride ld, K columns): each step one read of
 * the rows, one exponential per entry (none for the column max), K floats of partial result per
 * thread; nothing (rows, K) but the probabilities of SK_PROBS.
 *   SK_COL_MAX   result_k = max_b a_bk (a NaN in a column makes it NaN)
 *   SK_COL_SUM   result_k = sum_b exp(a_bk - vec_k)                     (vec: the column max)
 *   SK_COL_STEP  result_k = sum_b P_bk, P = softmax_rows(a + vec)        (vec: log u)
 *   SK_PROBS     out rows = softmax_rows(a + vec)
 * Denormal results are flushed to zero for the call, as in the loss. */
enum { SK_COL_MAX = 0, SK_COL_SUM = 1, SK_COL_STEP = 2, SK_PROBS = 3 };

static inline float max_nan(float a, float b) { return (b > a || b != b) ? b : a; }

/* rows r0 .. r1 - 1 of one step: partial (K floats, set here) and row (K floats of work) */
static void sk_rows(int64_t op, const float *X, int64_t ld, int64_t K, float inv_t,
                    const float *vec, float *partial, float *row, float *out, int64_t out_ld,
                    int64_t r0, int64_t r1) {
#if defined(__SSE__) || defined(__SSE2__)
    const unsigned int csr = _mm_getcsr();
    _mm_setcsr(csr | 0x8000u);
#endif
    if (op != SK_PROBS)
        for (int64_t k = 0; k < K; ++k) partial[k] = op == SK_COL_MAX ? -INFINITY : 0.0f;
    for (int64_t r = r0; r < r1; ++r) {
        const float *x = X + r * ld;
        if (op == SK_COL_MAX) {
#pragma omp simd
            for (int64_t k = 0; k < K; ++k) partial[k] = max_nan(partial[k], x[k] * inv_t);
        } else if (op == SK_COL_SUM) {
#pragma omp simd
            for (int64_t k = 0; k < K; ++k) partial[k] += exp_nonpositive(x[k] * inv_t - vec[k]);
        } else {
            float m = -INFINITY;
#pragma omp simd reduction(max : m)
            for (int64_t k = 0; k < K; ++k) {
                row[k] = x[k] * inv_t + vec[k];
                m = m > row[k] ? m : row[k];
            }
            /* a NaN entry (wherever m ends) makes its exp, the row sum and so the row NaN */
            const float inv = (float)(1.0 / exp_shifted_sum(row, m, K));
            if (op == SK_COL_STEP) {
#pragma omp simd
                for (int64_t k = 0; k < K; ++k) partial[k] += row[k] * inv;
            } else {
                float *o = out + r * out_ld;
#pragma omp simd
                for (int64_t k = 0; k < K; ++k) o[k] = row[k] * inv;
            }
        }
    }
#if defined(__SSE__) || defined(__SSE2__)
    _mm_setcsr(csr);
#endif
}

/* One step over rows 0 .. n - 1 on n_threads threads (OpenMP; one after the other without it),
 * thread i taking rows n i / n_threads .. n (i + 1) / n_threads - 1 with 2 K floats of work at
 * work + i * work_stride (its partial result, then its row); result (K floats) gets the
 * partials combined (max, or the sum in double); SK_PROBS writes out instead. */
void dino_fast_sk_f32_batch(int64_t op, const float *X, int64_t ld, int64_t n, int64_t K,
                            float inv_t, const float *vec, int64_t n_threads, float *work,
                            int64_t work_stride, float *out, int64_t out_ld, float *result) {
    FOR_EACH_THREAD(n_threads,
                    sk_rows(op, X, ld, K, inv_t, vec, work + i * work_stride,
                            work + i * work_stride + K, out, out_ld, n * i / n_threads,
                            n * (i + 1) / n_threads));
    if (op == SK_PROBS) return;
    for (int64_t k = 0; k < K; ++k) {
        if (op == SK_COL_MAX) {
            float m = -INFINITY;
            for (int64_t i = 0; i < n_threads; ++i) m = max_nan(m, work[i * work_stride + k]);
            result[k] = m;
        } else {
            double total = 0.0;
            for (int64_t i = 0; i < n_threads; ++i) total += work[i * work_stride + k];
            result[k] = (float)total;
        }
    }
}
