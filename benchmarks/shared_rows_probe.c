/* Probe for issue 24's 2:4 target (not used by semisparse): a batch-1 1x1-conv product where each block of 4
 * output channels keeps the same input channels (a row-block-shared 2:4 mask, still 2:4 in every row), so one
 * loaded input vector feeds 4 FMAs, as in a dense GEMM microkernel, instead of 1 (per-row masks).
 *   Y[4b + i, p] = sum_j W[b, j, i] * X[off[b, j] + p], 24 positions (3 vectors) x 4 rows per register tile.
 * Built and timed by shared_rows_probe.py (AVX2/FMA). */
#include <immintrin.h>
#include <stdint.h>

static inline void tile24(const float *X, const float *W, const int32_t *off, int64_t k, float *Y, int64_t ldy,
                          int64_t p0) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, b0 = a0, b1 = a0, b2 = a0;
    __m256 c0 = a0, c1 = a0, c2 = a0, d0 = a0, d1 = a0, d2 = a0;
    for (int64_t j = 0; j < k; ++j) {
        const float *s = X + off[j] + p0, *w = W + 4 * j;
        const __m256 x0 = _mm256_loadu_ps(s), x1 = _mm256_loadu_ps(s + 8), x2 = _mm256_loadu_ps(s + 16);
        __m256 v = _mm256_broadcast_ss(w);
        a0 = _mm256_fmadd_ps(v, x0, a0), a1 = _mm256_fmadd_ps(v, x1, a1), a2 = _mm256_fmadd_ps(v, x2, a2);
        v = _mm256_broadcast_ss(w + 1);
        b0 = _mm256_fmadd_ps(v, x0, b0), b1 = _mm256_fmadd_ps(v, x1, b1), b2 = _mm256_fmadd_ps(v, x2, b2);
        v = _mm256_broadcast_ss(w + 2);
        c0 = _mm256_fmadd_ps(v, x0, c0), c1 = _mm256_fmadd_ps(v, x1, c1), c2 = _mm256_fmadd_ps(v, x2, c2);
        v = _mm256_broadcast_ss(w + 3);
        d0 = _mm256_fmadd_ps(v, x0, d0), d1 = _mm256_fmadd_ps(v, x1, d1), d2 = _mm256_fmadd_ps(v, x2, d2);
    }
    float *y = Y + p0;
    _mm256_storeu_ps(y, a0), _mm256_storeu_ps(y + 8, a1), _mm256_storeu_ps(y + 16, a2), y += ldy;
    _mm256_storeu_ps(y, b0), _mm256_storeu_ps(y + 8, b1), _mm256_storeu_ps(y + 16, b2), y += ldy;
    _mm256_storeu_ps(y, c0), _mm256_storeu_ps(y + 8, c1), _mm256_storeu_ps(y + 16, c2), y += ldy;
    _mm256_storeu_ps(y, d0), _mm256_storeu_ps(y + 8, d1), _mm256_storeu_ps(y + 16, d2);
}

/* X (C, ldx), W (nb, k, 4), off (nb, k) = kept channel * ldx, Y (4 nb, ldx); ldx a multiple of 24. */
void shared_rows4(const float *X, const float *W, const int32_t *off, float *Y, int64_t nb, int64_t k, int64_t ldx,
                  int threads) {
    const int64_t nt = ldx / 24;
#pragma omp parallel for schedule(static) num_threads(threads) collapse(2)
    for (int64_t t = 0; t < nt; ++t) /* positions outer: a 24-column slice of X (C x 96 bytes) stays in L2 */
        for (int64_t b = 0; b < nb; ++b) tile24(X, W + b * k * 4, off + b * k, k, Y + b * 4 * ldx, ldx, t * 24);
}
