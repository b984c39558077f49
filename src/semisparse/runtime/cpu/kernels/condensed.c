/* Condensed (constant fan-in) sparse kernels for semisparse, fp32, compiled on first use.
 *
 * Storage of one layer: `rows` kept output neurons, each with `k` kept weights w[r*k + j] and the view
 * column idx[r*k + j] (uint16, or int32 where the view is wider than 65,535) of each weight.
 * A small table `coff[K]` turns a view column into an element offset into the activation buffer X and
 * `base[r]` adds a per-row offset (the group of a grouped conv), so one kernel serves Linear and Conv:
 *
 *   Y[orow[r]*ldy + p] = bias[r] + sum_j w[r,j] * X[(p / PB) * panel + base[r] + coff[idx[r,j]] + p % PB]
 *
 * (the caller resolves base[r] + coff[idx[r,j]] once per input geometry into an int32 offset table).
 *
 * Linear: X is x^T cut into panels (K, PB) (panel = K*PB, coff[i] = i*PB).  Conv: X is the zero-padded,
 * stride-phase-split input, laid out (C, phases, N, H', W') so that every kernel tap is a constant shift
 * of the flattened plane (panel = PB, coff = channel/phase/tap offset): positions p are vectorised,
 * weights are broadcast, no gathers and no im2col.
 *
 * Entry points: ss_spmm / ss_spmm_pairs (one or two rows per pass), ss_spmm_rows4 (blocks of 4 rows that
 * share their inputs), ss_spmm_tiled (each row's weights cut into input-channel tiles that stay in L1), ss_conv2d_run (a whole batch-1 2-D convolution: pad,
 * product, crop, ablated channels in one parallel region), ss_gemv_* / ss_gemv_run (the batch-1 Linear:
 * y[orow[r]] = bias[r] + sum_j w[r,j] * x[idx[r,j]], packed scalar loads or AVX2 gathers), and the glue
 * ss_pack_panels / ss_transpose (8x8 register transposes) / ss_fill_rows, and ss_maxpool2d (torch's CPU max
 * pooling is slow at batch 1; deployed models use this one where the planner measures it faster).
 * Threads: OpenMP, resolved at load time to the libgomp that torch itself loaded, so torch's intra-op
 * pool and these kernels share one pool and never oversubscribe the cores; each region runs the thread
 * count Python set for the calling thread (ss_sync_threads: no more than the CPUs the process may use now).
 * The product bodies use orphaned worksharing so that ss_conv2d_run can run them inside its own parallel
 * region. Every entry point trusts its arguments: the Python wrappers check them first.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SS_AVX2 1
#endif
/* The AVX-512 build (Python compiles one library per instruction set and loads the one the CPU runs, see
 * kernels/__init__.py) swaps in 16-wide versions of the two hottest loops: the 64-position SpMM row and the
 * batch-1 gather. Everything else runs its AVX2 code (AVX-512 processors run it at full speed). Each 16-wide
 * routine reads exactly the elements its 8-wide twin reads, so the Python bounds checks hold for both. */
#if defined(SS_AVX2) && defined(__AVX512F__) && defined(__AVX512DQ__) && defined(__AVX512VL__) && \
    defined(__AVX512BW__)
#define SS_AVX512 1
#elif defined(SS_AVX2) && defined(SS_EMULATE_AVX512)
/* For tests on CPUs without AVX-512: the same 16-wide code, its intrinsics emulated by SIMDe (header-only)
 * with AVX2, so that it runs, and is checked against the reference, on any AVX2 machine. */
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#define SS_AVX512 1
#endif

#ifndef SS_PF
#define SS_PF 8 /* prefetch distance in kept weights: the next inputs come from L2 */
#endif
#define SS_BLOCK 64 /* positions per register block: 8 x 8 floats */
#define SS_INLINE static inline __attribute__((always_inline))
/* Software prefetch of the NB bytes a kept weight SS_PF steps ahead will read: each weight reads a
 * different input row, so the hardware prefetcher cannot guess it. */
#define SS_PREFETCH(J, END, NB)                                                                         \
    do {                                                                                                \
        if ((J) + SS_PF < (END)) {                                                                      \
            const char *q_ = (const char *)(xb + off[(J) + SS_PF]);                                     \
            for (int b_ = 0; b_ < (NB); b_ += 64) _mm_prefetch(q_ + b_, _MM_HINT_T0);                   \
            _mm_prefetch(q_ + (NB) - 4, _MM_HINT_T0);                                                   \
        }                                                                                               \
    } while (0)

int ss_abi_version(void) { return 27; }

int ss_simd(void) {
#if defined(SS_AVX512)
    return 512;
#elif defined(SS_AVX2)
    return 256;
#else
    return 0;
#endif
}

/* The number of threads this calling thread's parallel regions use (set by Python from the CPUs the process
 * may use now, never more than torch's pool). Each region names it in num_threads(): OpenMP's own per-thread
 * setting, which torch reads as its intra-op thread count, is left alone. */
static __thread int tl_threads = 0;
#ifdef _OPENMP
#define SS_THREADS (tl_threads > 0 ? tl_threads : omp_get_max_threads())
#else
#define SS_THREADS 1
#endif

void ss_sync_threads(int n) { tl_threads = n > 0 ? n : 0; }

int ss_max_threads(void) { return SS_THREADS; }

/* One row over up to 64 consecutive positions of one block: xb points at the block, yb at the output.
 * Accumulators are named registers (an array indexed in a loop is spilled to the stack by GCC: 8 stores
 * per 8 FMAs), one pass over the row's k weights per 64, 32 or 8 positions. */
#define SS_STORE(A, OFF)                                                                                \
    do {                                                                                                \
        if (ldp == 1 && n >= (OFF) + 8) {                                                               \
            _mm256_storeu_ps(yb + (OFF), A);                                                            \
        } else if (n > (OFF)) {                                                                         \
            float t_[8];                                                                                \
            _mm256_storeu_ps(t_, A);                                                                    \
            const int c_ = n - (OFF) < 8 ? n - (OFF) : 8;                                               \
            for (int i_ = 0; i_ < c_; ++i_) yb[((OFF) + i_) * ldp] = t_[i_];                           \
        }                                                                                               \
    } while (0)

#ifdef SS_AVX2
#define SS_FMA8(V, A) A = _mm256_fmadd_ps(wv, _mm256_loadu_ps(s + 8 * (V)), A)
#ifdef SS_AVX512
/* 64 positions as four 16-wide vectors; even and odd weights in separate accumulators (8 FMA chains). */
static void row64(const float *xb, const float *w, const int32_t *off, int64_t k, float b, float *yb,
                  int64_t ldp, int n) {
    __m512 a0 = _mm512_set1_ps(b), a1 = a0, a2 = a0, a3 = a0;
    __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
    int64_t j = 0;
    for (; j + 2 <= k; j += 2) {
        SS_PREFETCH(j, k, 256);
        SS_PREFETCH(j + 1, k, 256);
        const float *s = xb + off[j], *t = xb + off[j + 1];
        const __m512 wv = _mm512_set1_ps(w[j]), wu = _mm512_set1_ps(w[j + 1]);
        a0 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(s), a0);
        a1 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(s + 16), a1);
        a2 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(s + 32), a2);
        a3 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(s + 48), a3);
        c0 = _mm512_fmadd_ps(wu, _mm512_loadu_ps(t), c0);
        c1 = _mm512_fmadd_ps(wu, _mm512_loadu_ps(t + 16), c1);
        c2 = _mm512_fmadd_ps(wu, _mm512_loadu_ps(t + 32), c2);
        c3 = _mm512_fmadd_ps(wu, _mm512_loadu_ps(t + 48), c3);
    }
    if (j < k) {
        const float *s = xb + off[j];
        const __m512 wv = _mm512_set1_ps(w[j]);
        a0 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(s), a0);
        a1 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(s + 16), a1);
        a2 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(s + 32), a2);
        a3 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(s + 48), a3);
    }
    a0 = _mm512_add_ps(a0, c0);
    a1 = _mm512_add_ps(a1, c1);
    a2 = _mm512_add_ps(a2, c2);
    a3 = _mm512_add_ps(a3, c3);
    if (ldp == 1 && n == 64) {
        _mm512_storeu_ps(yb, a0);
        _mm512_storeu_ps(yb + 16, a1);
        _mm512_storeu_ps(yb + 32, a2);
        _mm512_storeu_ps(yb + 48, a3);
    } else { /* a short block or a strided output: the first n positions, one by one */
        float t_[64];
        _mm512_storeu_ps(t_, a0);
        _mm512_storeu_ps(t_ + 16, a1);
        _mm512_storeu_ps(t_ + 32, a2);
        _mm512_storeu_ps(t_ + 48, a3);
        for (int i = 0; i < n; ++i) yb[i * ldp] = t_[i];
    }
}
#else
static void row64(const float *xb, const float *w, const int32_t *off, int64_t k, float b, float *yb,
                  int64_t ldp, int n) {
    __m256 a0 = _mm256_set1_ps(b), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    for (int64_t j = 0; j < k; ++j) {
        const float *s = xb + off[j];
        SS_PREFETCH(j, k, 256);
        const __m256 wv = _mm256_broadcast_ss(w + j);
        SS_FMA8(0, a0); SS_FMA8(1, a1); SS_FMA8(2, a2); SS_FMA8(3, a3);
        SS_FMA8(4, a4); SS_FMA8(5, a5); SS_FMA8(6, a6); SS_FMA8(7, a7);
    }
    SS_STORE(a0, 0); SS_STORE(a1, 8); SS_STORE(a2, 16); SS_STORE(a3, 24);
    SS_STORE(a4, 32); SS_STORE(a5, 40); SS_STORE(a6, 48); SS_STORE(a7, 56);
}
#endif
/* 40, 48 or 56 positions (NV vectors): a short block, such as a 7x7 plane's 49 positions, does not pay for 64
 * (measured 1.1x on ResNet-50's 7x7 1x1 convs). Reads and sums exactly what row64 does for those lanes. */
SS_INLINE void row_nv(const float *xb, const float *w, const int32_t *off, int64_t k, float b, float *yb,
                      int64_t ldp, int n, const int NV) {
    __m256 a0 = _mm256_set1_ps(b), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0;
    for (int64_t j = 0; j < k; ++j) {
        const float *s = xb + off[j];
        SS_PREFETCH(j, k, NV * 32);
        const __m256 wv = _mm256_broadcast_ss(w + j);
        SS_FMA8(0, a0); SS_FMA8(1, a1); SS_FMA8(2, a2); SS_FMA8(3, a3); SS_FMA8(4, a4);
        if (NV > 5) SS_FMA8(5, a5);
        if (NV > 6) SS_FMA8(6, a6);
    }
    SS_STORE(a0, 0); SS_STORE(a1, 8); SS_STORE(a2, 16); SS_STORE(a3, 24); SS_STORE(a4, 32);
    if (NV > 5) SS_STORE(a5, 40);
    if (NV > 6) SS_STORE(a6, 48);
}
#ifndef SS_AVX512
static void row56(const float *xb, const float *w, const int32_t *off, int64_t k, float b, float *yb,
                  int64_t ldp, int n) { row_nv(xb, w, off, k, b, yb, ldp, n, 7); }
static void row48(const float *xb, const float *w, const int32_t *off, int64_t k, float b, float *yb,
                  int64_t ldp, int n) { row_nv(xb, w, off, k, b, yb, ldp, n, 6); }
static void row40(const float *xb, const float *w, const int32_t *off, int64_t k, float b, float *yb,
                  int64_t ldp, int n) { row_nv(xb, w, off, k, b, yb, ldp, n, 5); }
#endif
static void row32(const float *xb, const float *w, const int32_t *off, int64_t k, float b, float *yb,
                  int64_t ldp, int n) {
    __m256 a0 = _mm256_set1_ps(b), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t j = 0; j < k; ++j) {
        SS_PREFETCH(j, k, 128);
        const float *s = xb + off[j];
        const __m256 wv = _mm256_broadcast_ss(w + j);
        SS_FMA8(0, a0); SS_FMA8(1, a1); SS_FMA8(2, a2); SS_FMA8(3, a3);
    }
    SS_STORE(a0, 0); SS_STORE(a1, 8); SS_STORE(a2, 16); SS_STORE(a3, 24);
}
static void row16(const float *xb, const float *w, const int32_t *off, int64_t k, float b, float *yb,
                  int64_t ldp, int n) {
    __m256 a0 = _mm256_set1_ps(b), a1 = a0, c0 = _mm256_setzero_ps(), c1 = c0;
    int64_t j = 0;
    for (; j + 2 <= k; j += 2) {
        const float *s = xb + off[j], *t = xb + off[j + 1];
        const __m256 wv = _mm256_broadcast_ss(w + j), wu = _mm256_broadcast_ss(w + j + 1);
        a0 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(s), a0);
        a1 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(s + 8), a1);
        c0 = _mm256_fmadd_ps(wu, _mm256_loadu_ps(t), c0);
        c1 = _mm256_fmadd_ps(wu, _mm256_loadu_ps(t + 8), c1);
    }
    if (j < k) {
        const float *s = xb + off[j];
        const __m256 wv = _mm256_broadcast_ss(w + j);
        a0 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(s), a0);
        a1 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(s + 8), a1);
    }
    a0 = _mm256_add_ps(a0, c0);
    a1 = _mm256_add_ps(a1, c1);
    SS_STORE(a0, 0); SS_STORE(a1, 8);
}
static void row8(const float *xb, const float *w, const int32_t *off, int64_t k, float b, float *yb,
                 int64_t ldp, int n) {
    __m256 a0 = _mm256_set1_ps(b), a1 = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 2 <= k; j += 2) {
        a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(w + j), _mm256_loadu_ps(xb + off[j]), a0);
        a1 = _mm256_fmadd_ps(_mm256_broadcast_ss(w + j + 1), _mm256_loadu_ps(xb + off[j + 1]), a1);
    }
    if (j < k) a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(w + j), _mm256_loadu_ps(xb + off[j]), a0);
    a0 = _mm256_add_ps(a0, a1);
    SS_STORE(a0, 0);
}
static inline void row_block(const float *xb, const float *w, const int32_t *off, int64_t k, float b,
                             float *yb, int64_t ldp, int n) {
#ifndef SS_AVX512 /* 16-wide row64 already covers 48 positions in three vectors */
    if (n > 32 && n <= 56) {
        if (n > 48) row56(xb, w, off, k, b, yb, ldp, n);
        else if (n > 40) row48(xb, w, off, k, b, yb, ldp, n);
        else row40(xb, w, off, k, b, yb, ldp, n);
        return;
    }
#endif
    if (n > 32) { row64(xb, w, off, k, b, yb, ldp, n); return; }
    if (n > 16) { row32(xb, w, off, k, b, yb, ldp, n); return; }
    if (n > 8) { row16(xb, w, off, k, b, yb, ldp, n); return; }
    for (int o = 0; o < n; o += 8) row8(xb + o, w, off, k, b, yb + o * ldp, ldp, n - o < 8 ? n - o : 8);
}
#else
static inline void row_block(const float *xb, const float *w, const int32_t *off, int64_t k, float b,
                             float *yb, int64_t ldp, int n) {
    float a[SS_BLOCK];
    for (int v = 0; v < SS_BLOCK; ++v) a[v] = b;
    for (int64_t j = 0; j < k; ++j) {
        const float *s = xb + off[j];
        const float wj = w[j];
        for (int v = 0; v < SS_BLOCK; ++v) a[v] += wj * s[v];
    }
    for (int i = 0; i < n; ++i) yb[i * ldp] = a[i];
}
#endif

/* Y = condensed(W) @ X over positions [0, P); off[r*k + j] = base[r] + coff[idx[r, j]] (int32, built per
 * input geometry by the caller: one load per kept weight instead of two dependent ones). PB is a multiple
 * of 8, at most 64. Parallel over position blocks when there are enough, else over rows. */
static void spmm_body(const float *X, const float *W, const int32_t *off, const float *bias, const int64_t *orow,
                      float *Y, int64_t rows, int64_t k, int64_t P, int64_t ldy, int64_t ldp, int64_t PB,
                      int64_t panel, int64_t by_blocks) {
    const int64_t nb = (P + PB - 1) / PB;
    if (by_blocks) {
#pragma omp for schedule(static)
        for (int64_t bl = 0; bl < nb; ++bl) {
            const int64_t p0 = bl * PB;
            const int n = (int)((P - p0) < PB ? (P - p0) : PB);
            for (int64_t r = 0; r < rows; ++r)
                row_block(X + bl * panel, W + r * k, off + r * k, k, bias ? bias[r] : 0.f,
                          Y + orow[r] * ldy + p0 * ldp, ldp, n);
        }
    } else {
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; ++r) {
            for (int64_t bl = 0; bl < nb; ++bl) {
                const int64_t p0 = bl * PB;
                const int n = (int)((P - p0) < PB ? (P - p0) : PB);
                row_block(X + bl * panel, W + r * k, off + r * k, k, bias ? bias[r] : 0.f,
                          Y + orow[r] * ldy + p0 * ldp, ldp, n);
            }
        }
    }
}

/* Bodies (spmm_body, pairs_body, tiled_body) use orphaned worksharing: they run inside a parallel region,
 * either their own wrapper's or ss_conv2d_run's (one region for padding, product and cropping). */
void ss_spmm(const float *X, const float *W, const int32_t *off, const float *bias, const int64_t *orow,
             float *Y, int64_t rows, int64_t k, int64_t P, int64_t ldy, int64_t ldp, int64_t PB, int64_t panel,
             int64_t by_blocks) {
#pragma omp parallel num_threads(SS_THREADS)
    spmm_body(X, W, off, bias, orow, Y, rows, k, P, ldy, ldp, PB, panel, by_blocks);
}

/* Two rows at a time over blocks of 32 positions: twice the independent loads in flight (the kernel is
 * bound by L2-served loads, so memory-level parallelism is what it lacks); the planner times it. */
#ifdef SS_AVX2
static void pair32(const float *xb, const float *w, const int32_t *off, const float *w2, const int32_t *off2,
                   int64_t k, float b, float b2, float *yb, float *yb2, int64_t ldp, int n) {
    __m256 a0 = _mm256_set1_ps(b), a1 = a0, a2 = a0, a3 = a0;
    __m256 c0 = _mm256_set1_ps(b2), c1 = c0, c2 = c0, c3 = c0;
    for (int64_t j = 0; j < k; ++j) {
        SS_PREFETCH(j, k, 128);
        if (j + SS_PF < k) _mm_prefetch((const char *)(xb + off2[j + SS_PF]), _MM_HINT_T0),
            _mm_prefetch((const char *)(xb + off2[j + SS_PF]) + 64, _MM_HINT_T0),
            _mm_prefetch((const char *)(xb + off2[j + SS_PF]) + 124, _MM_HINT_T0);
        const float *s = xb + off[j], *t = xb + off2[j];
        const __m256 wv = _mm256_broadcast_ss(w + j), wu = _mm256_broadcast_ss(w2 + j);
        a0 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(s), a0);
        c0 = _mm256_fmadd_ps(wu, _mm256_loadu_ps(t), c0);
        a1 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(s + 8), a1);
        c1 = _mm256_fmadd_ps(wu, _mm256_loadu_ps(t + 8), c1);
        a2 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(s + 16), a2);
        c2 = _mm256_fmadd_ps(wu, _mm256_loadu_ps(t + 16), c2);
        a3 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(s + 24), a3);
        c3 = _mm256_fmadd_ps(wu, _mm256_loadu_ps(t + 24), c3);
    }
    SS_STORE(a0, 0); SS_STORE(a1, 8); SS_STORE(a2, 16); SS_STORE(a3, 24);
    yb = yb2;
    SS_STORE(c0, 0); SS_STORE(c1, 8); SS_STORE(c2, 16); SS_STORE(c3, 24);
}
#endif

/* ss_spmm with PB = 32 and rows taken in pairs (falls back to ss_spmm without AVX2). */
static void pairs_body(const float *X, const float *W, const int32_t *off, const float *bias, const int64_t *orow,
                   float *Y, int64_t rows, int64_t k, int64_t P, int64_t ldy, int64_t ldp, int64_t panel,
                   int64_t by_blocks) {
#ifdef SS_AVX2
    const int64_t PB = 32, nb = (P + PB - 1) / PB, npairs = rows / 2;
    if (by_blocks) {
#pragma omp for schedule(static)
        for (int64_t bl = 0; bl < nb; ++bl) {
            const int64_t p0 = bl * PB;
            const int n = (int)((P - p0) < PB ? (P - p0) : PB);
            for (int64_t q = 0; q < npairs; ++q) {
                const int64_t r = 2 * q;
                pair32(X + bl * panel, W + r * k, off + r * k, W + (r + 1) * k, off + (r + 1) * k, k,
                       bias ? bias[r] : 0.f, bias ? bias[r + 1] : 0.f, Y + orow[r] * ldy + p0 * ldp,
                       Y + orow[r + 1] * ldy + p0 * ldp, ldp, n);
            }
            if (rows & 1)
                row_block(X + bl * panel, W + (rows - 1) * k, off + (rows - 1) * k, k,
                          bias ? bias[rows - 1] : 0.f, Y + orow[rows - 1] * ldy + p0 * ldp, ldp, n);
        }
    } else {
#pragma omp for schedule(static)
        for (int64_t q = 0; q < npairs + (rows & 1); ++q) {
            const int64_t r = 2 * q;
            for (int64_t bl = 0; bl < nb; ++bl) {
                const int64_t p0 = bl * PB;
                const int n = (int)((P - p0) < PB ? (P - p0) : PB);
                if (r + 1 < rows)
                    pair32(X + bl * panel, W + r * k, off + r * k, W + (r + 1) * k, off + (r + 1) * k, k,
                           bias ? bias[r] : 0.f, bias ? bias[r + 1] : 0.f, Y + orow[r] * ldy + p0 * ldp,
                           Y + orow[r + 1] * ldy + p0 * ldp, ldp, n);
                else
                    row_block(X + bl * panel, W + r * k, off + r * k, k, bias ? bias[r] : 0.f,
                              Y + orow[r] * ldy + p0 * ldp, ldp, n);
            }
        }
    }
#else
    spmm_body(X, W, off, bias, orow, Y, rows, k, P, ldy, ldp, 32, panel, by_blocks);
#endif
}

void ss_spmm_pairs(const float *X, const float *W, const int32_t *off, const float *bias, const int64_t *orow,
                   float *Y, int64_t rows, int64_t k, int64_t P, int64_t ldy, int64_t ldp, int64_t panel,
                   int64_t by_blocks) {
#pragma omp parallel num_threads(SS_THREADS)
    pairs_body(X, W, off, bias, orow, Y, rows, k, P, ldy, ldp, panel, by_blocks);
}

/* Channel-tiled SpMM: the same product as ss_spmm, with each row's kept weights sorted by input offset and
 * cut into `nt` tiles of input channels (seg[r*(nt+1) + t] = first weight of row r in tile t). A block of
 * positions is swept tile by tile over all rows, so the input a tile reads (a few channels x the block's
 * span) stays in L1 while every row reuses it; without tiling the rows of a layer with hundreds of input
 * channels stream the block's input from L2, which halves the FMA rate. Partial sums of the tiles before
 * the last go to a per-thread scratch row (L1/L2), the last tile writes Y. The last (partial) block reads
 * through masked loads, so X needs no slack past position P. Returns 0, or -1 when scratch allocation fails. */
/* A thread's work buffer, grown on demand and kept for the thread's life (NULL when allocation fails). */
static float *grow(float **buf, size_t *cap, size_t floats) {
    if (floats > *cap) {
        free(*buf);
        *cap = 0;
        *buf = aligned_alloc(64, ((floats * 4 + 63) / 64) * 64);
        if (*buf) *cap = floats;
    }
    return *buf;
}

static __thread float *tl_acc = NULL; /* partial sums of the tiled kernel (each OpenMP thread its own) */
static __thread size_t tl_cap = 0;

#ifdef SS_AVX2
static inline __m256i lane_mask(int n, int v) {
    const int left = n - 8 * v;
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(left < 0 ? 0 : left), lanes);
}
#define SS_LD_FULL(p, V) _mm256_loadu_ps((p) + 8 * (V))
#define SS_LD_TAIL(p, V) _mm256_maskload_ps((p) + 8 * (V), m##V)

/* 64 positions, 8 accumulators (two FMA chains per vector unit: enough to cover the FMA latency). */
#define SS_TILE64(NAME, LD)                                                                             \
SS_INLINE void NAME(const float *xb, const float *w, const int32_t *off, int64_t j0, int64_t j1, float *acc,  \
                 int first, int last, float b, float *yb, int64_t ldp, int n) {                        \
    const __m256i m0 = lane_mask(n, 0), m1 = lane_mask(n, 1), m2 = lane_mask(n, 2), m3 = lane_mask(n, 3); \
    const __m256i m4 = lane_mask(n, 4), m5 = lane_mask(n, 5), m6 = lane_mask(n, 6), m7 = lane_mask(n, 7); \
    (void)m0; (void)m1; (void)m2; (void)m3; (void)m4; (void)m5; (void)m6; (void)m7;                    \
    __m256 a0, a1, a2, a3, a4, a5, a6, a7;                                                              \
    if (first) {                                                                                        \
        a0 = _mm256_set1_ps(b); a1 = a0; a2 = a0; a3 = a0; a4 = a0; a5 = a0; a6 = a0; a7 = a0;          \
    } else {                                                                                            \
        a0 = _mm256_load_ps(acc); a1 = _mm256_load_ps(acc + 8); a2 = _mm256_load_ps(acc + 16);          \
        a3 = _mm256_load_ps(acc + 24); a4 = _mm256_load_ps(acc + 32); a5 = _mm256_load_ps(acc + 40);    \
        a6 = _mm256_load_ps(acc + 48); a7 = _mm256_load_ps(acc + 56);                                   \
    }                                                                                                   \
    for (int64_t j = j0; j < j1; ++j) { /* no software prefetch: the tile is in L1 (it cost 10-30%) */  \
        const float *s = xb + off[j];                                                                   \
        const __m256 wv = _mm256_broadcast_ss(w + j);                                                   \
        a0 = _mm256_fmadd_ps(wv, LD(s, 0), a0); a1 = _mm256_fmadd_ps(wv, LD(s, 1), a1);                 \
        a2 = _mm256_fmadd_ps(wv, LD(s, 2), a2); a3 = _mm256_fmadd_ps(wv, LD(s, 3), a3);                 \
        a4 = _mm256_fmadd_ps(wv, LD(s, 4), a4); a5 = _mm256_fmadd_ps(wv, LD(s, 5), a5);                 \
        a6 = _mm256_fmadd_ps(wv, LD(s, 6), a6); a7 = _mm256_fmadd_ps(wv, LD(s, 7), a7);                 \
    }                                                                                                   \
    if (last) {                                                                                         \
        SS_STORE(a0, 0); SS_STORE(a1, 8); SS_STORE(a2, 16); SS_STORE(a3, 24);                           \
        SS_STORE(a4, 32); SS_STORE(a5, 40); SS_STORE(a6, 48); SS_STORE(a7, 56);                         \
    } else {                                                                                            \
        _mm256_store_ps(acc, a0); _mm256_store_ps(acc + 8, a1); _mm256_store_ps(acc + 16, a2);          \
        _mm256_store_ps(acc + 24, a3); _mm256_store_ps(acc + 32, a4); _mm256_store_ps(acc + 40, a5);    \
        _mm256_store_ps(acc + 48, a6); _mm256_store_ps(acc + 56, a7);                                   \
    }                                                                                                   \
}
SS_TILE64(tile64_full, SS_LD_FULL)
SS_TILE64(tile64_tail, SS_LD_TAIL)

/* 32 positions: even and odd weights in separate accumulators (8 chains), summed at the end. */
#define SS_TILE32(NAME, LD)                                                                             \
SS_INLINE void NAME(const float *xb, const float *w, const int32_t *off, int64_t j0, int64_t j1, float *acc,  \
                 int first, int last, float b, float *yb, int64_t ldp, int n) {                        \
    const __m256i m0 = lane_mask(n, 0), m1 = lane_mask(n, 1), m2 = lane_mask(n, 2), m3 = lane_mask(n, 3); \
    (void)m0; (void)m1; (void)m2; (void)m3;                                                             \
    __m256 a0, a1, a2, a3, c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;                          \
    if (first) {                                                                                        \
        a0 = _mm256_set1_ps(b); a1 = a0; a2 = a0; a3 = a0;                                              \
    } else {                                                                                            \
        a0 = _mm256_load_ps(acc); a1 = _mm256_load_ps(acc + 8); a2 = _mm256_load_ps(acc + 16);          \
        a3 = _mm256_load_ps(acc + 24);                                                                  \
    }                                                                                                   \
    int64_t j = j0;                                                                                     \
    for (; j + 2 <= j1; j += 2) {                                                                       \
        const float *s = xb + off[j], *t = xb + off[j + 1];                                             \
        const __m256 wv = _mm256_broadcast_ss(w + j), wu = _mm256_broadcast_ss(w + j + 1);             \
        a0 = _mm256_fmadd_ps(wv, LD(s, 0), a0); a1 = _mm256_fmadd_ps(wv, LD(s, 1), a1);                 \
        a2 = _mm256_fmadd_ps(wv, LD(s, 2), a2); a3 = _mm256_fmadd_ps(wv, LD(s, 3), a3);                 \
        c0 = _mm256_fmadd_ps(wu, LD(t, 0), c0); c1 = _mm256_fmadd_ps(wu, LD(t, 1), c1);                 \
        c2 = _mm256_fmadd_ps(wu, LD(t, 2), c2); c3 = _mm256_fmadd_ps(wu, LD(t, 3), c3);                 \
    }                                                                                                   \
    if (j < j1) {                                                                                       \
        const float *s = xb + off[j];                                                                   \
        const __m256 wv = _mm256_broadcast_ss(w + j);                                                   \
        a0 = _mm256_fmadd_ps(wv, LD(s, 0), a0); a1 = _mm256_fmadd_ps(wv, LD(s, 1), a1);                 \
        a2 = _mm256_fmadd_ps(wv, LD(s, 2), a2); a3 = _mm256_fmadd_ps(wv, LD(s, 3), a3);                 \
    }                                                                                                   \
    a0 = _mm256_add_ps(a0, c0); a1 = _mm256_add_ps(a1, c1);                                             \
    a2 = _mm256_add_ps(a2, c2); a3 = _mm256_add_ps(a3, c3);                                             \
    if (last) {                                                                                         \
        SS_STORE(a0, 0); SS_STORE(a1, 8); SS_STORE(a2, 16); SS_STORE(a3, 24);                           \
    } else {                                                                                            \
        _mm256_store_ps(acc, a0); _mm256_store_ps(acc + 8, a1); _mm256_store_ps(acc + 16, a2);          \
        _mm256_store_ps(acc + 24, a3);                                                                  \
    }                                                                                                   \
}
SS_TILE32(tile32_full, SS_LD_FULL)
SS_TILE32(tile32_tail, SS_LD_TAIL)

/* Up to 16 positions (the short last block of a plane): one or two vectors, masked loads. */
SS_INLINE void tile16_tail(const float *xb, const float *w, const int32_t *off, int64_t j0, int64_t j1, float *acc,
                           int first, int last, float b, float *yb, int64_t ldp, int n) {
    const __m256i m0 = lane_mask(n, 0), m1 = lane_mask(n, 1);
    __m256 a0, a1, c0 = _mm256_setzero_ps(), c1 = c0;
    if (first) {
        a0 = _mm256_set1_ps(b); a1 = a0;
    } else {
        a0 = _mm256_load_ps(acc); a1 = _mm256_load_ps(acc + 8);
    }
    int64_t j = j0;
    for (; j + 2 <= j1; j += 2) {
        const float *s = xb + off[j], *t = xb + off[j + 1];
        const __m256 wv = _mm256_broadcast_ss(w + j), wu = _mm256_broadcast_ss(w + j + 1);
        a0 = _mm256_fmadd_ps(wv, _mm256_maskload_ps(s, m0), a0);
        a1 = _mm256_fmadd_ps(wv, _mm256_maskload_ps(s + 8, m1), a1);
        c0 = _mm256_fmadd_ps(wu, _mm256_maskload_ps(t, m0), c0);
        c1 = _mm256_fmadd_ps(wu, _mm256_maskload_ps(t + 8, m1), c1);
    }
    if (j < j1) {
        const float *s = xb + off[j];
        const __m256 wv = _mm256_broadcast_ss(w + j);
        a0 = _mm256_fmadd_ps(wv, _mm256_maskload_ps(s, m0), a0);
        a1 = _mm256_fmadd_ps(wv, _mm256_maskload_ps(s + 8, m1), a1);
    }
    a0 = _mm256_add_ps(a0, c0);
    a1 = _mm256_add_ps(a1, c1);
    if (last) {
        SS_STORE(a0, 0); SS_STORE(a1, 8);
    } else {
        _mm256_store_ps(acc, a0); _mm256_store_ps(acc + 8, a1);
    }
}

#else
/* Portable tile: reads only positions < n (no slack needed either). */
static void tile_any(const float *xb, const float *w, const int32_t *off, int64_t j0, int64_t j1, float *acc,
                     int first, int last, float b, float *yb, int64_t ldp, int n) {
    float a[SS_BLOCK];
    for (int v = 0; v < n; ++v) a[v] = first ? b : acc[v];
    for (int64_t j = j0; j < j1; ++j) {
        const float *s = xb + off[j];
        const float wj = w[j];
        for (int v = 0; v < n; ++v) a[v] += wj * s[v];
    }
    for (int v = 0; v < n; ++v) {
        if (last) yb[v * ldp] = a[v];
        else acc[v] = a[v];
    }
}
#endif

/* Each input tile is swept by every row before the next: the tile stays in L1 and the rows' partial sums
 * (rows x PB floats) stream through L2. One loop per tile routine, so the routine is inlined. */
#define SS_TILED_ROWS(FN)                                                                               \
    for (int64_t t = 0; t < nt; ++t) {                                                                  \
        const int first = t == 0, last = t == nt - 1;                                                   \
        for (int64_t r = r0; r < r1; ++r) {                                                             \
            const int32_t *sg = seg + r * (nt + 1);                                                     \
            const int64_t j0 = sg[t], j1 = sg[t + 1];                                                   \
            if (j0 == j1 && !first && !last) continue;                                                  \
            FN(xb, W + r * k, off + r * k, j0, j1, acc + (r - r0) * PB, first, last, bias ? bias[r] : 0.f, \
               Y + orow[r] * ldy + p0 * ldp, ldp, n);                                                   \
        }                                                                                               \
    }

static void tiled_block(const float *X, const float *W, const int32_t *off, const int32_t *seg, int64_t nt,
                        const float *bias, const int64_t *orow, float *Y, int64_t r0, int64_t r1, int64_t k,
                        int64_t P, int64_t ldy, int64_t ldp, int64_t PB, int64_t panel, int64_t bl, float *acc) {
    const int64_t p0 = bl * PB;
    const int n = (int)((P - p0) < PB ? (P - p0) : PB);
    const float *xb = X + bl * panel;
#ifdef SS_AVX2
    /* the narrowest routine that covers the block: a short last block does not pay for 64 positions */
    if (n == 64) { SS_TILED_ROWS(tile64_full) }
    else if (n > 32) { SS_TILED_ROWS(tile64_tail) }
    else if (n == 32) { SS_TILED_ROWS(tile32_full) }
    else if (n > 16) { SS_TILED_ROWS(tile32_tail) }
    else { SS_TILED_ROWS(tile16_tail) }
#else
    SS_TILED_ROWS(tile_any)
#endif
}

static void tiled_body(const float *X, const float *W, const int32_t *off, const int32_t *seg, int64_t nt,
                       const float *bias, const int64_t *orow, float *Y, int64_t rows, int64_t k, int64_t P,
                       int64_t ldy, int64_t ldp, int64_t PB, int64_t panel, int64_t by_blocks, int *failed) {
    const int64_t nb = (P + PB - 1) / PB;
    int64_t r0 = 0, r1 = rows;
#ifdef _OPENMP
    if (!by_blocks) {
        const int64_t nth = omp_get_num_threads(), me = omp_get_thread_num();
        r0 = rows * me / nth;
        r1 = rows * (me + 1) / nth;
    }
#endif
    float *acc = nt > 1 ? grow(&tl_acc, &tl_cap, (size_t)((r1 - r0) > 0 ? (r1 - r0) : 1) * PB) : tl_acc;
    if (nt > 1 && acc == NULL) {
#pragma omp atomic write
        *failed = 1;
    }
#pragma omp barrier
    int stop;
#pragma omp atomic read
    stop = *failed;
    if (stop) return; /* every thread read the same flag after the barrier: all or none go on */
    if (by_blocks) {
#pragma omp for schedule(static)
        for (int64_t bl = 0; bl < nb; ++bl)
            tiled_block(X, W, off, seg, nt, bias, orow, Y, 0, rows, k, P, ldy, ldp, PB, panel, bl, acc);
    } else {
        for (int64_t bl = 0; bl < nb; ++bl)
            tiled_block(X, W, off, seg, nt, bias, orow, Y, r0, r1, k, P, ldy, ldp, PB, panel, bl, acc);
#pragma omp barrier
    }
}

int ss_spmm_tiled(const float *X, const float *W, const int32_t *off, const int32_t *seg, int64_t nt,
                  const float *bias, const int64_t *orow, float *Y, int64_t rows, int64_t k, int64_t P, int64_t ldy,
                  int64_t ldp, int64_t PB, int64_t panel, int64_t by_blocks) {
    int failed = 0;
#pragma omp parallel num_threads(SS_THREADS)
    tiled_body(X, W, off, seg, nt, bias, orow, Y, rows, k, P, ldy, ldp, PB, panel, by_blocks, &failed);
    return failed ? -1 : 0;
}

/* Batch-1 Linear: y[orow[r]] = bias[r] + sum_j w[r,j] * x[idx[r,j]].
 * The eight x values of a step are loaded as scalars and packed (faster than vgatherdps on Zen 2/3 and
 * most Intel cores); the indices arrive two at a time in 32-bit loads. */
#ifdef SS_AVX2
static inline __m256 gather8_u16(const float *x, const uint16_t *id) {
    uint32_t p0, p1, p2, p3; /* index pairs: one mask and one shift per pair (5% faster than 64-bit loads) */
    memcpy(&p0, id, 4);
    memcpy(&p1, id + 2, 4);
    memcpy(&p2, id + 4, 4);
    memcpy(&p3, id + 6, 4);
    const __m128 lo = _mm_setr_ps(x[p0 & 0xFFFF], x[p0 >> 16], x[p1 & 0xFFFF], x[p1 >> 16]);
    const __m128 hi = _mm_setr_ps(x[p2 & 0xFFFF], x[p2 >> 16], x[p3 & 0xFFFF], x[p3 >> 16]);
    return _mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1);
}
static inline __m256 gather8_i32(const float *x, const int32_t *id) {
    return _mm256_setr_ps(x[id[0]], x[id[1]], x[id[2]], x[id[3]], x[id[4]], x[id[5]], x[id[6]], x[id[7]]);
}
static inline float hsum256(__m256 v) {
    float t[8];
    _mm256_storeu_ps(t, v);
    return ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
}
#ifdef SS_AVX512
static inline float hsum512(__m512 v) {
    return hsum256(_mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1)));
}
/* 16 inputs at a time: two 8-wide gathers joined (loads), or one 16-wide hardware gather. */
static inline __m512 gather16_u16(const float *x, const uint16_t *id) {
    return _mm512_insertf32x8(_mm512_castps256_ps512(gather8_u16(x, id)), gather8_u16(x, id + 8), 1);
}
static inline __m512 gather16_i32(const float *x, const int32_t *id) {
    return _mm512_insertf32x8(_mm512_castps256_ps512(gather8_i32(x, id)), gather8_i32(x, id + 8), 1);
}
static inline __m512 hwgather16_u16(const float *x, const uint16_t *id) {
    return _mm512_i32gather_ps(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)id)), x, 4);
}
static inline __m512 hwgather16_i32(const float *x, const int32_t *id) {
    return _mm512_i32gather_ps(_mm512_loadu_si512((const void *)id), x, 4);
}
/* The 32-at-a-time head of a row (two 16-wide accumulators); the 8-wide loop and the scalar tail follow. */
#define SS_GEMV_HEAD(GATHER16, LDW16)                                                                   \
        __m512 z0 = _mm512_setzero_ps(), z1 = _mm512_setzero_ps();                                      \
        for (; j + 32 <= k; j += 32) {                                                                  \
            z0 = _mm512_fmadd_ps(LDW16(w + j), GATHER16(x, id + j), z0);                                \
            z1 = _mm512_fmadd_ps(LDW16(w + j + 16), GATHER16(x, id + j + 16), z1);                      \
        }                                                                                               \
        const float head = hsum512(_mm512_add_ps(z0, z1));
#define SS_LDF16(p) _mm512_loadu_ps(p)
#define SS_LDB16(p) _mm512_castsi512_ps(_mm512_slli_epi32(                                              \
        _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p))), 16))
#else
#define SS_GEMV_HEAD(GATHER16, LDW16) const float head = 0.f;
#endif
/* Weights as fp32, or as bf16 (the upper half of an fp32: half the bytes, widened exactly on load). */
#define SS_LDF8(p) _mm256_loadu_ps(p)
#define SS_LDB8(p) _mm256_castsi256_ps(_mm256_slli_epi32(                                               \
        _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p))), 16))
SS_INLINE float ss_f32(float v) { return v; }
SS_INLINE float ss_bf16(uint16_t v) {
    const uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
#define SS_GEMV(NAME, W_T, IDX_T, GATHER, GATHER16, LDW8, LDW16, LDW1)                                 \
static void NAME(const float *x, const W_T *W, const IDX_T *idx, const float *bias, const int64_t *orow,  \
          float *y, int64_t rows, int64_t k) {                                                          \
    _Pragma("omp parallel for schedule(static) num_threads(SS_THREADS)")                                    \
    for (int64_t r = 0; r < rows; ++r) {                                                                \
        const W_T *w = W + r * k;                                                                       \
        const IDX_T *id = idx + r * k;                                                                  \
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();                                      \
        int64_t j = 0;                                                                                  \
        SS_GEMV_HEAD(GATHER16, LDW16)                                                                   \
        for (; j + 16 <= k; j += 16) {                                                                  \
            a0 = _mm256_fmadd_ps(LDW8(w + j), GATHER(x, id + j), a0);                                   \
            a1 = _mm256_fmadd_ps(LDW8(w + j + 8), GATHER(x, id + j + 8), a1);                           \
        }                                                                                               \
        for (; j + 8 <= k; j += 8) a0 = _mm256_fmadd_ps(LDW8(w + j), GATHER(x, id + j), a0);          \
        float s = hsum256(_mm256_add_ps(a0, a1)) + head;                                                \
        for (; j < k; ++j) s += LDW1(w[j]) * x[id[j]];                                                  \
        y[orow[r]] = s + (bias ? bias[r] : 0.f);                                                        \
    }                                                                                                   \
}
SS_GEMV(ss_gemv_i16, float, uint16_t, gather8_u16, gather16_u16, SS_LDF8, SS_LDF16, ss_f32)
SS_GEMV(ss_gemv_i32, float, int32_t, gather8_i32, gather16_i32, SS_LDF8, SS_LDF16, ss_f32)
SS_GEMV(ss_gemv_bf16_i16, uint16_t, uint16_t, gather8_u16, gather16_u16, SS_LDB8, SS_LDB16, ss_bf16)
SS_GEMV(ss_gemv_bf16_i32, uint16_t, int32_t, gather8_i32, gather16_i32, SS_LDB8, SS_LDB16, ss_bf16)

/* The same with hardware gathers (vgatherdps): faster on some cores, slower on others (and on Intel
 * parts with the GDS microcode mitigation); the planner times both. */
static inline __m256 hwgather8_u16(const float *x, const uint16_t *id) {
    return _mm256_i32gather_ps(x, _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)id)), 4);
}
static inline __m256 hwgather8_i32(const float *x, const int32_t *id) {
    return _mm256_i32gather_ps(x, _mm256_loadu_si256((const __m256i *)id), 4);
}
SS_GEMV(ss_gemv_gather_i16, float, uint16_t, hwgather8_u16, hwgather16_u16, SS_LDF8, SS_LDF16, ss_f32)
SS_GEMV(ss_gemv_gather_i32, float, int32_t, hwgather8_i32, hwgather16_i32, SS_LDF8, SS_LDF16, ss_f32)
SS_GEMV(ss_gemv_bf16_gather_i16, uint16_t, uint16_t, hwgather8_u16, hwgather16_u16, SS_LDB8, SS_LDB16, ss_bf16)
SS_GEMV(ss_gemv_bf16_gather_i32, uint16_t, int32_t, hwgather8_i32, hwgather16_i32, SS_LDB8, SS_LDB16, ss_bf16)
#else
SS_INLINE float ss_f32(float v) { return v; }
SS_INLINE float ss_bf16(uint16_t v) {
    const uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
#define SS_GEMV(NAME, W_T, IDX_T, LDW1)                                                                 \
static void NAME(const float *x, const W_T *W, const IDX_T *idx, const float *bias, const int64_t *orow,  \
          float *y, int64_t rows, int64_t k) {                                                          \
    _Pragma("omp parallel for schedule(static) num_threads(SS_THREADS)")                                    \
    for (int64_t r = 0; r < rows; ++r) {                                                                \
        const W_T *w = W + r * k;                                                                       \
        const IDX_T *id = idx + r * k;                                                                  \
        float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;                                                   \
        int64_t j = 0;                                                                                  \
        for (; j + 4 <= k; j += 4) {                                                                    \
            s0 += LDW1(w[j]) * x[id[j]]; s1 += LDW1(w[j + 1]) * x[id[j + 1]];                           \
            s2 += LDW1(w[j + 2]) * x[id[j + 2]]; s3 += LDW1(w[j + 3]) * x[id[j + 3]];                   \
        }                                                                                               \
        for (; j < k; ++j) s0 += LDW1(w[j]) * x[id[j]];                                                 \
        y[orow[r]] = (s0 + s1) + (s2 + s3) + (bias ? bias[r] : 0.f);                                    \
    }                                                                                                   \
}
SS_GEMV(ss_gemv_i16, float, uint16_t, ss_f32)
SS_GEMV(ss_gemv_i32, float, int32_t, ss_f32)
SS_GEMV(ss_gemv_gather_i16, float, uint16_t, ss_f32)
SS_GEMV(ss_gemv_gather_i32, float, int32_t, ss_f32)
SS_GEMV(ss_gemv_bf16_i16, uint16_t, uint16_t, ss_bf16)
SS_GEMV(ss_gemv_bf16_i32, uint16_t, int32_t, ss_bf16)
SS_GEMV(ss_gemv_bf16_gather_i16, uint16_t, uint16_t, ss_bf16)
SS_GEMV(ss_gemv_bf16_gather_i32, uint16_t, int32_t, ss_bf16)
#endif

/* The batch-1 call with everything but x and y bound once (ctypes converts 3 arguments instead of 8: at a
 * few tens of microseconds per layer call, argument conversion is a visible share). W holds fp32 values, or
 * bf16 ones (bf16 != 0): the batch-1 Linear reads half the bytes, and accumulates in fp32 all the same. */
typedef struct {
    const void *W;
    const void *idx;
    const float *bias;
    const int64_t *orow;
    int64_t rows, k;
    int32_t wide, hw, bf16, unused;
} ss_gemv_plan;

void ss_gemv_run(const ss_gemv_plan *p, const float *x, float *y) {
    const int64_t R = p->rows, K = p->k;
    const int32_t *i32 = (const int32_t *)p->idx;
    const uint16_t *i16 = (const uint16_t *)p->idx;
    if (p->bf16) {
        const uint16_t *W = (const uint16_t *)p->W;
        if (p->wide) {
            if (p->hw) ss_gemv_bf16_gather_i32(x, W, i32, p->bias, p->orow, y, R, K);
            else ss_gemv_bf16_i32(x, W, i32, p->bias, p->orow, y, R, K);
        } else {
            if (p->hw) ss_gemv_bf16_gather_i16(x, W, i16, p->bias, p->orow, y, R, K);
            else ss_gemv_bf16_i16(x, W, i16, p->bias, p->orow, y, R, K);
        }
        return;
    }
    const float *W = (const float *)p->W;
    if (p->wide) {
        if (p->hw) ss_gemv_gather_i32(x, W, i32, p->bias, p->orow, y, R, K);
        else ss_gemv_i32(x, W, i32, p->bias, p->orow, y, R, K);
    } else {
        if (p->hw) ss_gemv_gather_i16(x, W, i16, p->bias, p->orow, y, R, K);
        else ss_gemv_i16(x, W, i16, p->bias, p->orow, y, R, K);
    }
}

/* Rows that are not computed (ablated neurons): Y[rows[i]*ldy + p*ldp] = vals[i] for p < P. */
void ss_fill_rows(float *Y, const int64_t *rows, const float *vals, int64_t n, int64_t ldy, int64_t P,
                  int64_t ldp) {
    for (int64_t i = 0; i < n; ++i) {
        float *o = Y + rows[i] * ldy;
        for (int64_t p = 0; p < P; ++p) o[p * ldp] = vals[i];
    }
}

/* 2-D max pooling of `planes` contiguous (H, W) planes, torch's semantics (padding never wins, a NaN in a
 * window is the result, windows clipped to the input), dilation 1. Each output row is two passes: the max of
 * its kh input rows column by column (contiguous: vectorised), then of kw neighbours with stride sw. torch's
 * CPU kernel takes ~4 ms for ResNet's 64x112x112 stem output at batch 1 and 2 threads; this is ~20x less. */
SS_INLINE float nan_max(float m, float v) {
    const float r = v > m ? v : m; /* branch-free selects: both loops vectorise */
    return v != v ? v : r;
}

/* The max of col[w0, w1) clipped to [0, W): an output whose window overlaps the padding. */
SS_INLINE float window_max(const float *col, int64_t w0, int64_t w1, int64_t W) {
    if (w0 < 0) w0 = 0;
    if (w1 > W) w1 = W;
    float m = col[w0];
    for (int64_t w = w0 + 1; w < w1; ++w) m = nan_max(m, col[w]);
    return m;
}

static __thread float *tl_pool = NULL; /* one column-max row per thread */
static __thread size_t tl_pool_cap = 0;

int ss_maxpool2d(const float *x, float *y, int64_t planes, int64_t H, int64_t W, int64_t Ho, int64_t Wo,
                 int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw) {
    /* output columns [j0, j1) have their whole window inside the row; those before and after are clipped */
    int64_t j1 = W - kw + pw < 0 ? 0 : (W - kw + pw) / sw + 1, j0 = (pw + sw - 1) / sw;
    if (j1 > Wo) j1 = Wo;
    if (j0 > j1) j0 = j1;
    int failed = 0;
#pragma omp parallel num_threads(SS_THREADS)
    {
        float *col = grow(&tl_pool, &tl_pool_cap, (size_t)W);
        if (col == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for collapse(2) schedule(static)
        for (int64_t c = 0; c < planes; ++c)
            for (int64_t i = 0; i < Ho; ++i) {
                if (col == NULL) continue;
                const float *xp = x + c * H * W;
                float *yr = y + (c * Ho + i) * Wo;
                int64_t h0 = i * sh - ph, h1 = h0 + kh;
                if (h0 < 0) h0 = 0;
                if (h1 > H) h1 = H;
                memcpy(col, xp + h0 * W, sizeof(float) * (size_t)W);
                for (int64_t h = h0 + 1; h < h1; ++h) {
                    const float *r = xp + h * W;
                    for (int64_t w = 0; w < W; ++w) col[w] = nan_max(col[w], r[w]);
                }
                for (int64_t j = 0; j < j0; ++j) yr[j] = window_max(col, j * sw - pw, j * sw - pw + kw, W);
                if (kw == 3 && sw == 2) /* ResNet's stem pooling: a fixed window the compiler unrolls */
                    for (int64_t j = j0; j < j1; ++j) {
                        const float *c3 = col + j * 2 - pw;
                        yr[j] = nan_max(nan_max(c3[0], c3[1]), c3[2]);
                    }
                else
                    for (int64_t j = j0; j < j1; ++j) {
                        const float *cw = col + j * sw - pw;
                        float m = cw[0];
                        for (int64_t w = 1; w < kw; ++w) m = nan_max(m, cw[w]);
                        yr[j] = m;
                    }
                for (int64_t j = j1; j < Wo; ++j) yr[j] = window_max(col, j * sw - pw, j * sw - pw + kw, W);
            }
    }
    return failed ? -1 : 0;
}

/* A whole batch-1 2-D convolution with stride 1 after subsampling (1x1 convs of any stride, kxk convs of
 * stride 1) in one call and one parallel region: zero-padded copy of x into xbuf, the ablated rows' constant,
 * the condensed product into ybuf (or straight into out when nothing is cropped), the crop into out.
 * Python builds the plan once per input shape and kernel setting. Returns 0, or -1 (scratch allocation). */
/* Rows in blocks of 4 that keep the same inputs (a row-block-shared mask, e.g. 2:4 chosen per block of 4
 * output channels): each loaded input vector feeds 4 FMAs, one per row, as in a dense GEMM microkernel, where
 * per-row masks give 1. W4 holds block b's weights interleaved, W4[(b*k + j)*4 + i] = w[4b + i, j]; the
 * block's offsets are its first row's, off[4b*k + j]. Tiles of 24 positions (3 vectors x 4 rows = 12
 * accumulators), positions outer so that a 24-column slice of the input stays in L2 across all blocks. A
 * partial last tile reads up to 23 floats past P (inside the BLOCK of slack after the input) and writes
 * only its P - p0 positions. */
#define SS_ROWS4_PB 24
#ifdef SS_AVX2
/* One tile of NV vectors (NV = 3 full, 1-2 for a short last tile: less work on 7x7 and 14x14 planes); NV is a
 * constant at each call, so the unused accumulators and loads compile away. */
SS_INLINE void rows4_tile_nv(const float *xb, const float *w, const int32_t *off, int64_t k, const float *bias,
                             float *const *dst, int n, int64_t ldp, const int NV) {
    __m256 a0 = _mm256_set1_ps(bias[0]), a1 = a0, a2 = a0, b0 = _mm256_set1_ps(bias[1]), b1 = b0, b2 = b0;
    __m256 c0 = _mm256_set1_ps(bias[2]), c1 = c0, c2 = c0, d0 = _mm256_set1_ps(bias[3]), d1 = d0, d2 = d0;
    const __m256 z = _mm256_setzero_ps();
    for (int64_t j = 0; j < k; ++j) {
        if (j + SS_PF < k) { /* the first and last line of the tile's input SS_PF weights ahead */
            const char *q = (const char *)(xb + off[j + SS_PF]);
            _mm_prefetch(q, _MM_HINT_T0);
            if (NV > 1) _mm_prefetch(q + 32 * NV - 4, _MM_HINT_T0);
        }
        const float *s = xb + off[j], *wj = w + 4 * j;
        const __m256 x0 = _mm256_loadu_ps(s), x1 = NV > 1 ? _mm256_loadu_ps(s + 8) : z;
        const __m256 x2 = NV > 2 ? _mm256_loadu_ps(s + 16) : z;
#define SS_ROWS4_FMA(R, A0, A1, A2)                                                                     \
        do {                                                                                            \
            const __m256 v_ = _mm256_broadcast_ss(wj + (R));                                            \
            A0 = _mm256_fmadd_ps(v_, x0, A0);                                                           \
            if (NV > 1) A1 = _mm256_fmadd_ps(v_, x1, A1);                                               \
            if (NV > 2) A2 = _mm256_fmadd_ps(v_, x2, A2);                                               \
        } while (0)
        SS_ROWS4_FMA(0, a0, a1, a2);
        SS_ROWS4_FMA(1, b0, b1, b2);
        SS_ROWS4_FMA(2, c0, c1, c2);
        SS_ROWS4_FMA(3, d0, d1, d2);
#undef SS_ROWS4_FMA
    }
    if (ldp != 1) { /* (positions, rows) output, the block's 4 rows adjacent: 4x8 transposes, 16-byte stores */
        float *y = dst[0];
#define SS_ROWS4_T(V, A, B, C, D)                                                                       \
        do {                                                                                            \
            const __m256 t0_ = _mm256_unpacklo_ps(A, B), t1_ = _mm256_unpackhi_ps(A, B);                \
            const __m256 t2_ = _mm256_unpacklo_ps(C, D), t3_ = _mm256_unpackhi_ps(C, D);                \
            const __m256 u_[4] = {_mm256_shuffle_ps(t0_, t2_, 0x44), _mm256_shuffle_ps(t0_, t2_, 0xEE),   \
                                  _mm256_shuffle_ps(t1_, t3_, 0x44), _mm256_shuffle_ps(t1_, t3_, 0xEE)};  \
            for (int q_ = 0; q_ < 4; ++q_) { /* u_[q] holds positions 8V + q and 8V + q + 4 */          \
                if (8 * (V) + q_ < n) _mm_storeu_ps(y + (8 * (V) + q_) * ldp, _mm256_castps256_ps128(u_[q_])); \
                if (8 * (V) + q_ + 4 < n)                                                               \
                    _mm_storeu_ps(y + (8 * (V) + q_ + 4) * ldp, _mm256_extractf128_ps(u_[q_], 1));      \
            }                                                                                           \
        } while (0)
        SS_ROWS4_T(0, a0, b0, c0, d0);
        if (NV > 1) SS_ROWS4_T(1, a1, b1, c1, d1);
        if (NV > 2) SS_ROWS4_T(2, a2, b2, c2, d2);
#undef SS_ROWS4_T
        return;
    }
    float t[4][SS_ROWS4_PB];
    const int full = n == 8 * NV;
#define SS_ROWS4_OUT(R, A0, A1, A2)                                                                     \
    do {                                                                                                \
        float *o_ = full ? dst[R] : t[R];                                                               \
        _mm256_storeu_ps(o_, A0);                                                                       \
        if (NV > 1) _mm256_storeu_ps(o_ + 8, A1);                                                       \
        if (NV > 2) _mm256_storeu_ps(o_ + 16, A2);                                                      \
    } while (0)
    SS_ROWS4_OUT(0, a0, a1, a2);
    SS_ROWS4_OUT(1, b0, b1, b2);
    SS_ROWS4_OUT(2, c0, c1, c2);
    SS_ROWS4_OUT(3, d0, d1, d2);
#undef SS_ROWS4_OUT
    if (!full)
        for (int r = 0; r < 4; ++r) memcpy(dst[r], t[r], sizeof(float) * (size_t)n);
}
#endif

/* Row r's position i goes to dst[r][i * ldp] (ldp 1: (rows, positions) output; else dst[r] = dst[0] + r). */
static void rows4_tile(const float *xb, const float *w, const int32_t *off, int64_t k, const float *bias,
                       float *y0, float *y1, float *y2, float *y3, int n, int64_t ldp) {
    float *const dst[4] = {y0, y1, y2, y3};
#ifdef SS_AVX2
    if (n > 16)
        rows4_tile_nv(xb, w, off, k, bias, dst, n, ldp, 3);
    else if (n > 8)
        rows4_tile_nv(xb, w, off, k, bias, dst, n, ldp, 2);
    else
        rows4_tile_nv(xb, w, off, k, bias, dst, n, ldp, 1);
#else
    for (int r = 0; r < 4; ++r)
        for (int i = 0; i < n; ++i) {
            float a = bias[r];
            for (int64_t j = 0; j < k; ++j) a += w[4 * j + r] * xb[off[j] + i];
            dst[r][i * ldp] = a;
        }
#endif
}

/* Tile t of 24 positions reads X + t * xstep: a conv's plane (xstep 24) or a Linear's (K, 24) panels. Row r,
 * position p is written to Y[orow[r] * ldy + p * ldp]; ldp != 1 needs ldy 1 and orow[4b + i] = orow[4b] + i. */
static void rows4_body(const float *X, const float *W4, const int32_t *off, const float *bias, const int64_t *orow,
                       float *Y, int64_t rows, int64_t k, int64_t P, int64_t ldy, int64_t ldp, int64_t xstep) {
    const int64_t nblk = rows / 4, nt = (P + SS_ROWS4_PB - 1) / SS_ROWS4_PB;
#pragma omp for schedule(static) collapse(2)
    for (int64_t t = 0; t < nt; ++t)
        for (int64_t b = 0; b < nblk; ++b) {
            const int64_t p0 = t * SS_ROWS4_PB, r = 4 * b;
            const float zero[4] = {0.f, 0.f, 0.f, 0.f};
            rows4_tile(X + t * xstep, W4 + r * k, off + r * k, k, bias ? bias + r : zero,
                       Y + orow[r] * ldy + p0 * ldp, Y + orow[r + 1] * ldy + p0 * ldp, Y + orow[r + 2] * ldy + p0 * ldp,
                       Y + orow[r + 3] * ldy + p0 * ldp, (int)(P - p0 < SS_ROWS4_PB ? P - p0 : SS_ROWS4_PB), ldp);
        }
}

/* ss_spmm with rows in blocks of 4 sharing their offsets (W in rows4 order, PB 24): output rows contiguous
 * (ldp 1), or positions contiguous (ldy 1) with each block's 4 output rows adjacent. */
void ss_spmm_rows4(const float *X, const float *W4, const int32_t *off, const float *bias, const int64_t *orow,
                   float *Y, int64_t rows, int64_t k, int64_t P, int64_t ldy, int64_t ldp, int64_t panel) {
#pragma omp parallel num_threads(SS_THREADS)
    rows4_body(X, W4, off, bias, orow, Y, rows, k, P, ldy, ldp, panel);
}

typedef struct {
    int64_t C, H0, W0, sh, sw;       /* input channels, input size, subsampling steps (1x1 convs) */
    int64_t H, W, pt, pl, Hp, Wp, cs; /* subsampled size, top/left padding, padded size, channel stride */
    int64_t stH, stW, Hq, Wq;        /* stride (phases), phase plane size: padded[a::stH, b::stW] */
    const float *Wt;                 /* kept values (rows, k), in the order of off; kind 3: rows4 layout */
    const int32_t *off, *seg;        /* offsets (rows, k); tiles (rows, nt + 1) when kind == 2 */
    const float *bias;               /* per stored row, or NULL */
    const int64_t *orow, *abl;       /* output channel of each stored row; ablated output channels */
    const float *abl_vals;           /* the constant output of each ablated channel */
    int64_t rows, k, nt, P, PB, kind, by_blocks, Cout, Ho, Wo, nabl;
    int64_t alias;                   /* 1: x is the padded input as it is (no copy; Python checked every read) */
} ss_conv_plan;

static __thread float *tl_xbuf = NULL, *tl_ybuf = NULL; /* the calling thread's conv input / output */
static __thread size_t tl_xcap = 0, tl_ycap = 0;

int ss_conv2d_run(const ss_conv_plan *p, const float *x, float *out) {
    const int64_t plane = p->Hq * p->Wq, direct = p->Hq == p->Ho && p->Wq == p->Wo;
    /* the calling thread's work buffers, kept between calls: layers run one after another. An unpadded 1x1
     * conv of stride 1 whose channels are already cs apart reads x itself (alias): a copy of the whole input
     * cost 20% of a rows4 conv 256->64 at 56x56. */
    float *xbuf = p->alias ? NULL : grow(&tl_xbuf, &tl_xcap, (size_t)(p->C * p->cs + SS_BLOCK));
    float *ybuf = direct ? out : grow(&tl_ybuf, &tl_ycap, (size_t)(p->Cout * plane));
    if ((xbuf == NULL && !p->alias) || ybuf == NULL) return -1;
    const float *X = p->alias ? x : xbuf;
    float *Y = direct ? out : ybuf;
    const int64_t used = p->stH * p->stW * plane;
    int failed = 0;
    if (!p->alias) memset(xbuf + p->C * p->cs, 0, sizeof(float) * SS_BLOCK); /* slack read by spare lanes */
#pragma omp parallel num_threads(SS_THREADS)
    {
#pragma omp for schedule(static)
        for (int64_t c = 0; c < (p->alias ? 0 : p->C); ++c) {
            float *o = xbuf + c * p->cs;
            const float *src = x + c * p->H0 * p->W0;
            memset(o + used, 0, sizeof(float) * (size_t)(p->cs - used));
            if (p->stH == 1 && p->stW == 1 && p->sh == 1 && p->sw == 1 && p->pl == 0 && p->pt == 0 && p->W == p->Wq
                && p->H <= p->Hq) { /* unpadded 1x1 input: the plane is the channel */
                memcpy(o, src, sizeof(float) * (size_t)(p->H * p->W));
                memset(o + p->H * p->W, 0, sizeof(float) * (size_t)(plane - p->H * p->W));
                continue;
            }
            for (int64_t a = 0; a < p->stH; ++a)
                for (int64_t b = 0; b < p->stW; ++b) {
                    float *ph = o + (a * p->stW + b) * plane; /* phase (a, b): padded[a::stH, b::stW] */
                    for (int64_t i = 0; i < p->Hq; ++i) {
                        float *row = ph + i * p->Wq;
                        const int64_t r = a + p->stH * i - p->pt;
                        if (r < 0 || r >= p->H) {
                            memset(row, 0, sizeof(float) * (size_t)p->Wq);
                            continue;
                        }
                        const float *srow = src + r * p->sh * p->W0;
                        if (p->stW == 1 && p->sw == 1) {
                            memset(row, 0, sizeof(float) * (size_t)p->pl);
                            memcpy(row + p->pl, srow, sizeof(float) * (size_t)p->W);
                            memset(row + p->pl + p->W, 0, sizeof(float) * (size_t)(p->Wq - p->pl - p->W));
                        } else { /* columns j whose source b + stW*j - pl lies in [0, W): a strided copy */
                            const int64_t step = p->stW * p->sw, lo_num = p->pl - b, hi_num = p->W + p->pl - b;
                            int64_t jlo = lo_num > 0 ? (lo_num + p->stW - 1) / p->stW : 0;
                            int64_t jhi = hi_num > 0 ? (hi_num + p->stW - 1) / p->stW : 0;
                            if (jhi > p->Wq) jhi = p->Wq;
                            if (jlo > jhi) jlo = jhi;
                            const int64_t q0 = (b - p->pl) * p->sw; /* srow[q0 + j * step]: column j */
                            for (int64_t j = 0; j < jlo; ++j) row[j] = 0.f;
                            if (step == 2) /* stride-2 convs: a fixed step the compiler vectorises */
                                for (int64_t j = jlo; j < jhi; ++j) row[j] = srow[q0 + 2 * j];
                            else
                                for (int64_t j = jlo; j < jhi; ++j) row[j] = srow[q0 + j * step];
                            for (int64_t j = jhi; j < p->Wq; ++j) row[j] = 0.f;
                        }
                    }
                }
        }
#pragma omp for schedule(static)
        for (int64_t i = 0; i < p->nabl; ++i) {
            float *o = Y + p->abl[i] * plane;
            for (int64_t q = 0; q < plane; ++q) o[q] = p->abl_vals[i];
        }
        if (p->kind == 3)
            rows4_body(X, p->Wt, p->off, p->bias, p->orow, Y, p->rows, p->k, p->P, plane, 1, SS_ROWS4_PB);
        else if (p->kind == 2)
            tiled_body(X, p->Wt, p->off, p->seg, p->nt, p->bias, p->orow, Y, p->rows, p->k, p->P, plane, 1,
                       p->PB, p->PB, p->by_blocks, &failed);
        else if (p->kind == 1)
            pairs_body(X, p->Wt, p->off, p->bias, p->orow, Y, p->rows, p->k, p->P, plane, 1, 32, p->by_blocks);
        else
            spmm_body(X, p->Wt, p->off, p->bias, p->orow, Y, p->rows, p->k, p->P, plane, 1, p->PB, p->PB,
                      p->by_blocks);
        if (!direct && !failed) {
#pragma omp for schedule(static)
            for (int64_t r = 0; r < p->Cout; ++r)
                for (int64_t i = 0; i < p->Ho; ++i)
                    memcpy(out + (r * p->Ho + i) * p->Wo, Y + r * plane + i * p->Wq, sizeof(float) * (size_t)p->Wo);
        }
    }
    return failed ? -1 : 0;
}

/* dst[c*ldd + r] = src[r*lds + c] for r < R, c < C: 8x8 register transposes (AVX2), scalar edges. Strided
 * element-by-element copies run at ~1 GB/s here; blocks of 8x8 keep both sides' cache lines in use. */
static void transpose_rows(const float *src, float *dst, int64_t R, int64_t C, int64_t lds, int64_t ldd,
                           int64_t c0, int64_t c1) {
    int64_t r = 0;
#ifdef SS_AVX2
    for (; r + 8 <= R; r += 8) {
        int64_t c = c0;
        for (; c + 8 <= c1; c += 8) {
            const float *s = src + r * lds + c;
            __m256 t0 = _mm256_loadu_ps(s), t1 = _mm256_loadu_ps(s + lds), t2 = _mm256_loadu_ps(s + 2 * lds),
                   t3 = _mm256_loadu_ps(s + 3 * lds), t4 = _mm256_loadu_ps(s + 4 * lds),
                   t5 = _mm256_loadu_ps(s + 5 * lds), t6 = _mm256_loadu_ps(s + 6 * lds),
                   t7 = _mm256_loadu_ps(s + 7 * lds);
            __m256 u0 = _mm256_unpacklo_ps(t0, t1), u1 = _mm256_unpackhi_ps(t0, t1);
            __m256 u2 = _mm256_unpacklo_ps(t2, t3), u3 = _mm256_unpackhi_ps(t2, t3);
            __m256 u4 = _mm256_unpacklo_ps(t4, t5), u5 = _mm256_unpackhi_ps(t4, t5);
            __m256 u6 = _mm256_unpacklo_ps(t6, t7), u7 = _mm256_unpackhi_ps(t6, t7);
            __m256 v0 = _mm256_shuffle_ps(u0, u2, 0x44), v1 = _mm256_shuffle_ps(u0, u2, 0xEE);
            __m256 v2 = _mm256_shuffle_ps(u1, u3, 0x44), v3 = _mm256_shuffle_ps(u1, u3, 0xEE);
            __m256 v4 = _mm256_shuffle_ps(u4, u6, 0x44), v5 = _mm256_shuffle_ps(u4, u6, 0xEE);
            __m256 v6 = _mm256_shuffle_ps(u5, u7, 0x44), v7 = _mm256_shuffle_ps(u5, u7, 0xEE);
            float *d = dst + c * ldd + r;
            _mm256_storeu_ps(d, _mm256_permute2f128_ps(v0, v4, 0x20));
            _mm256_storeu_ps(d + ldd, _mm256_permute2f128_ps(v1, v5, 0x20));
            _mm256_storeu_ps(d + 2 * ldd, _mm256_permute2f128_ps(v2, v6, 0x20));
            _mm256_storeu_ps(d + 3 * ldd, _mm256_permute2f128_ps(v3, v7, 0x20));
            _mm256_storeu_ps(d + 4 * ldd, _mm256_permute2f128_ps(v0, v4, 0x31));
            _mm256_storeu_ps(d + 5 * ldd, _mm256_permute2f128_ps(v1, v5, 0x31));
            _mm256_storeu_ps(d + 6 * ldd, _mm256_permute2f128_ps(v2, v6, 0x31));
            _mm256_storeu_ps(d + 7 * ldd, _mm256_permute2f128_ps(v3, v7, 0x31));
        }
        for (; c < c1; ++c)
            for (int64_t i = 0; i < 8; ++i) dst[c * ldd + r + i] = src[(r + i) * lds + c];
    }
#endif
    for (; r < R; ++r)
        for (int64_t c = c0; c < c1; ++c) dst[c * ldd + r] = src[r * lds + c];
}

void ss_transpose(const float *src, float *dst, int64_t R, int64_t C, int64_t lds, int64_t ldd) {
    const int64_t nr = (R + 63) / 64, nc = (C + 63) / 64; /* 64 x 64 tiles: 16 KiB a side */
#pragma omp parallel for schedule(static) if (R * C > 16384) num_threads(SS_THREADS)
    for (int64_t t = 0; t < nr * nc; ++t) {
        const int64_t r0 = (t / nc) * 64, c0 = (t % nc) * 64, c1 = c0 + 64 < C ? c0 + 64 : C;
        transpose_rows(src + r0 * lds, dst + r0, R - r0 < 64 ? R - r0 : 64, C, lds, ldd, c0, c1);
    }
}

/* x (B, K) row-major -> panels (ceil(B/PB), K, PB): out[(b/PB)*K*PB + i*PB + b%PB] = x[b*K + i]; rows of
 * the last panel past B are zero. */
void ss_pack_panels(const float *x, float *out, int64_t B, int64_t K, int64_t PB) {
    const int64_t npan = (B + PB - 1) / PB, nk = (K + 63) / 64;
#pragma omp parallel for schedule(static) if (B * K > 16384) num_threads(SS_THREADS)
    for (int64_t t = 0; t < npan * nk; ++t) {
        const int64_t pan = t / nk, i0 = (t % nk) * 64, i1 = i0 + 64 < K ? i0 + 64 : K;
        const int64_t b0 = pan * PB, nb = B - b0 < PB ? B - b0 : PB;
        float *o = out + pan * K * PB;
        transpose_rows(x + b0 * K, o, nb, K, K, PB, i0, i1);
        if (nb < PB)
            for (int64_t i = i0; i < i1; ++i) memset(o + i * PB + nb, 0, sizeof(float) * (size_t)(PB - nb));
    }
}
