/* The soft cross-entropy on a CPU, fp32 (dino_fast/cross_entropy.py: the eager path's sweep,
 * whose notation this follows): per sample, the teacher probabilities of its G teacher crops and
 * each crop group's combined Q are built in a per-thread workspace ((G + 1) * K floats), then each
 * of its student rows takes three sweeps that stay in the core's L2 cache (max; sum of exp and
 * the dot with Q; the gradient). S and T are read once from memory and the gradient written
 * once (its final values with streaming stores); nothing (rows, K) is allocated.
 *
 * Per student row (crop v of sample b, in group g), y = S / tau_s, m = max y:
 *     CE      = Qsum lse - <Q, y>  = Qsum log sum_k exp(y_k - m) - <Q, y - m>
 *     dCE/dS  = (Qsum softmax(y) - Q) / tau_s
 * ce[v * B + b] receives w_b CE and the gradient row f w_b (Qsum p - Q) (f: the caller's scale
 * / tau_s * grad_output). A NaN or +inf in a student row, or an inf or NaN in a teacher row,
 * gives NaN; a -inf student logit has probability 0 (CE +inf where Q > 0), as on the ops path.
 *
 * Built at first use by dino_fast.cpu_kernels with the system C compiler (-O3, -fopenmp-simd:
 * the SIMD pragmas only, no OpenMP runtime); the caller's threads each take a range of samples.
 * Plain C99 (x86 intrinsics for the streaming stores where the compiler targets them), no
 * dependency.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* Non-temporal stores for the gradient's final values: it is not read again here, so it goes
 * to memory without staying in the cache the next rows need (the call runs about 1.5x faster
 * into mapped memory than with plain stores on a 2-core AMD EPYC VM, 1 MB L2 per core).
 * W floats per store; elsewhere plain stores. */
#if defined(__AVX512F__)
#include <immintrin.h>
#define STREAM_W 16
#define STREAM_STORE(p, v) _mm512_stream_ps((p), _mm512_loadu_ps(v))
#define STREAM_FENCE() _mm_sfence()
#elif defined(__AVX__)
#include <immintrin.h>
#define STREAM_W 8
#define STREAM_STORE(p, v) _mm256_stream_ps((p), _mm256_loadu_ps(v))
#define STREAM_FENCE() _mm_sfence()
#elif defined(__SSE2__)
#include <emmintrin.h>
#define STREAM_W 4
#define STREAM_STORE(p, v) _mm_stream_ps((p), _mm_loadu_ps(v))
#define STREAM_FENCE() _mm_sfence()
#else
#define STREAM_W 0
#define STREAM_FENCE() ((void)0)
#endif

#define BLOCK 512 /* float partial sums over BLOCK elements, then double */

/* dst[0 .. n) = src[0 .. n) with streaming stores where dst is aligned to them */
static inline void stream_copy(float *dst, const float *src, int64_t n) {
    int64_t i = 0;
#if STREAM_W
    while (i < n && ((uintptr_t)(dst + i) & (STREAM_W * sizeof(float) - 1)) != 0) {
        dst[i] = src[i];
        ++i;
    }
    for (; i + STREAM_W <= n; i += STREAM_W) STREAM_STORE(dst + i, src + i);
#endif
    for (; i < n; ++i) dst[i] = src[i];
}

/* e^x for x <= 0 (x = y - max y): Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2, a degree-7
 * polynomial for e^r and 2^n from the exponent bits; about 1.4 ulp. Below -87.3 (e^x < 1.2e-38,
 * nothing next to a sum >= 1) it returns 0, so no denormal reaches the gradient; NaN stays NaN
 * (with no float-to-integer conversion of it). */
static inline float exp_nonpositive(float x) {
    const float xc = x < -87.3f ? -87.3f : x;
    const float t = xc * 1.44269504088896341f;
    /* n = round(t) from the low bits of t + 1.5 * 2^23; reading them as an unsigned integer is
     * defined for any input (a NaN gives some bits, and p is NaN anyway) */
    const float big = t + 12582912.0f;
    uint32_t ub;
    memcpy(&ub, &big, sizeof ub);
    const float n = big - 12582912.0f;
    float r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const uint32_t bits = (ub - 0x4B400000u + 127u) << 23; /* 2^n: n + 127 in the exponent */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return x < -87.3f ? 0.0f : p * scale;
}

/* The three sweeps of one student row s against Q = qscale * q (Qsum its sum): returns CE and
 * stores the gradient fw (Qsum p - Q) in out when out is not NULL. */
static double student_row(const float *s, const float *q, float qscale, double qsum, float *out,
                          int64_t K, float inv_s, float fw) {
    /* sweep 1: the row's max (from memory; the row then sits in L2) and its NaNs; a -inf entry
     * is exp = 0 (and makes CE +inf where Q > 0, as the ops do), a +inf or a NaN makes the row
     * NaN */
    float m = -INFINITY, nans = 0.0f;
#pragma omp simd reduction(max : m) reduction(+ : nans)
    for (int64_t k = 0; k < K; ++k) {
        m = s[k] > m ? s[k] : m;
        nans += s[k] != s[k] ? 1.0f : 0.0f;
    }
    if (nans != 0.0f || m == INFINITY || m == -INFINITY) {
        if (out)
            for (int64_t k = 0; k < K; ++k) out[k] = NAN;
        return NAN;
    }
    const float ym = m * inv_s;

    /* sweep 2: sum of exp(y - m) and <Q, y - m>; exp(y - m) kept in the gradient row (in
     * the cache: the row is written back only once, by sweep 3) */
    double sum = 0.0, d = 0.0;
    for (int64_t k0 = 0; k0 < K; k0 += BLOCK) {
        const int64_t k1 = k0 + BLOCK < K ? k0 + BLOCK : K;
        float bs = 0.0f, bd = 0.0f;
        if (out) {
#pragma omp simd reduction(+ : bs, bd)
            for (int64_t k = k0; k < k1; ++k) {
                const float t = s[k] * inv_s - ym;
                const float e = exp_nonpositive(t);
                out[k] = e;
                bs += e;
                bd += q[k] * t;
            }
        } else {
#pragma omp simd reduction(+ : bs, bd)
            for (int64_t k = k0; k < k1; ++k) {
                const float t = s[k] * inv_s - ym;
                bs += exp_nonpositive(t);
                bd += q[k] * t;
            }
        }
        sum += bs;
        d += bd;
    }

    /* sweep 3: the gradient, exp(y - m) (fw Qsum / sum) - fw Q, a block at a time into an L1
     * buffer that is streamed to out; where p is one-hot on Q's support (K = 1, say) the two
     * products are the same float and cancel exactly */
    if (out) {
        const float pa = fw * (float)(qsum / sum), qa = fw * qscale;
        float buf[BLOCK] __attribute__((aligned(64)));
        for (int64_t k0 = 0; k0 < K; k0 += BLOCK) {
            const int64_t n = k0 + BLOCK < K ? BLOCK : K - k0;
            const float *eb = out + k0, *qb = q + k0;
#pragma omp simd
            for (int64_t k = 0; k < n; ++k) buf[k] = eb[k] * pa - qa * qb[k];
            stream_copy(out + k0, buf, n);
        }
    }
    return qsum * log(sum) - qscale * d;
}

/* exp((t - center) * inv_t - max) of one teacher row into q: the softmax times the returned
 * sum (NaN for a row with an inf or a NaN). */
static double teacher_row(const float *t, const float *center, float inv_t, float *q, int64_t K) {
    float m = -INFINITY;
    if (center) {
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
    double sum = 0.0;
    for (int64_t k0 = 0; k0 < K; k0 += BLOCK) {
        const int64_t k1 = k0 + BLOCK < K ? k0 + BLOCK : K;
        float bs = 0.0f;
#pragma omp simd reduction(+ : bs)
        for (int64_t k = k0; k < k1; ++k) {
            q[k] = exp_nonpositive(q[k] - m);
            bs += q[k];
        }
        sum += bs;
    }
    return (m == m && m != INFINITY) ? sum : NAN;
}

/* Samples b0 .. b1 - 1 of the soft cross-entropy (see the top of the file).
 * S: (V * B, K) student logits; T: (NT * B, K) teacher logits (probs_given == 0: softmax((T -
 * center) * inv_t)) or probabilities used as given; center: K floats or NULL; G: (V * B, K)
 * gradient or NULL. Crop groups: student
 * crops group_v0[g] .. group_v0[g + 1] - 1 share the teacher weights group_w[g * NT ..]; row_w:
 * B sample weights or NULL; work: (NT + 1) * K floats of this thread; ce: V * B doubles. */
void dino_fast_soft_ce_f32(const float *S, const float *T, const float *center, float *G,
                           int64_t V, int64_t NT, int64_t B, int64_t K, float inv_s, float inv_t,
                           int64_t probs_given, int64_t n_groups, const int64_t *group_v0, const float *group_w,
                           const float *row_w, double f, int64_t b0, int64_t b1, float *work,
                           double *ce) {
    (void)V;
    const float *qrow[64];
    float qscale[64]; /* teacher crop i's probabilities are qscale[i] * qrow[i] */
    double qsum[64];  /* and sum to qsum[i] */
    float *Qbuf = work + NT * K;
    for (int64_t b = b0; b < b1; ++b) {
        for (int64_t i = 0; i < NT; ++i) {
            const float *t = T + (i * B + b) * K;
            if (!probs_given) {
                const double esum = teacher_row(t, center, inv_t, work + i * K, K);
                qscale[i] = (float)(1.0 / esum);
                qsum[i] = esum * qscale[i];
                qrow[i] = work + i * K;
            } else {
                double total = 0.0;
                for (int64_t k0 = 0; k0 < K; k0 += BLOCK) {
                    const int64_t k1 = k0 + BLOCK < K ? k0 + BLOCK : K;
                    float bs = 0.0f;
#pragma omp simd reduction(+ : bs)
                    for (int64_t k = k0; k < k1; ++k) bs += t[k];
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
                ce[v * B + b] = w * student_row(S + (v * B + b) * K, Q, Qscale, Qsum, out, K,
                                                inv_s, (float)(f * w));
            }
        }
    }
    STREAM_FENCE(); /* the streamed stores are visible before the caller's thread hands over */
}
