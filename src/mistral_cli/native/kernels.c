/* Matrix-vector products for one decode step on x86 CPUs with AVX2 and FMA: y = W x for a bf16, int8 or int4
 * weight W (N rows of K) and one activation row x. Built at first use by kernels.py with -march=native and
 * loaded with ctypes; torch's own kernels stay in use wherever this library is not available.
 *
 * A decode step reads every weight once, so these products are bound by memory bandwidth. torch's bf16 GEMV
 * reaches about 60% of it on AVX2; here each thread streams four rows at once with two accumulators per row, and
 * the quantized products multiply integers (x quantized to int8 in blocks of 32 to 256, as llama.cpp does), so their
 * arithmetic keeps up with the smaller weights.
 *
 * Threads: OpenMP, from the libgomp that torch has already loaded (the same soname), so torch and these kernels
 * share one thread team instead of two pools competing for the cores. Each thread takes one equal, contiguous share
 * of the rows (a static schedule): rows claimed in chunks from a shared counter (dynamic) were measured 12-22%
 * slower on an idle Zen 4 and no faster beside a busy program (BENCHMARKS.md); sharing the CPU is handled by the
 * thread count and sleeping threads instead (hardware.py).
 *
 * Layouts (bf16 and int8 row-major, each row contiguous):
 *   bf16  w[n, k]
 *   int8  q[n, k] in -127..127 and scale[n] (float32): W[n, k] = q[n, k] * scale[n]
 *   int4  rows in blocks of four, codes 0..15 in groups of 64 columns with a scale and a low each, the scales as
 *         integer multiples of one float per superblock of S columns (the int4 section below)
 * x and y are float32 (dtype 0) or bf16 (dtype 1). K is a multiple of 32 (bf16, int8) or S (int4).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

int mc_version(void) { return 1; }

/* Which instructions past AVX2 this build uses (one library is built per CPU with -march=native, so the compiler's
   target is the dispatch): 1 = AVX512-BF16 dot products for bf16 weights, bf16 prompt rows and the attention. A
   build with MISTRAL_KERNELS=avx2 is made without them, for comparison. VNNI (vpdpbusd) for the int8 decode product
   was measured and left out: it gives the same integer sums as the AVX2 maddubs/madd pair, and no speed on the 7B
   shapes, which are bound by memory (BENCHMARKS.md, "AVX-512 kernels"); int8 prompts, bound by arithmetic, use it. */
#if defined(__AVX512BF16__) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define MC_BF16_DP 1
#else
#define MC_BF16_DP 0
#endif
/* 2 = AVX512-VNNI for int4 weights and int8 prompts: vpdpbusd multiplies the codes by x and sums them in one
   instruction, two rows per 512-bit register; the int4 product is bound by that arithmetic on AVX2, not by memory */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define MC_INT4_VNNI 2
#else
#define MC_INT4_VNNI 0
#endif
int mc_features(void) { return MC_BF16_DP | MC_INT4_VNNI; }

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch converts */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* eight floats rounded to bf16 (nearest even, as torch converts) and stored; finite values only */
static inline __m256i round_bf16_bits(__m256 v) {
    __m256i u = _mm256_castps_si256(v);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    return _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
}

static inline void store_bf16x8(uint16_t *p, __m256 v) {
    __m256i r = round_bf16_bits(v);
    _mm_storeu_si128((__m128i *)p, _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* software prefetch of four row streams at offset o, for the quantized products: the rows a thread takes next
   (4 rows on) at the same column. Their arithmetic per byte is long enough that the hardware prefetchers fall
   behind (measured on the 7B shapes: int4 1.4x, int8 1.15x); the bf16 product gains nothing from it. */
#define PREFETCH4(o)                                                                                                   \
    do {                                                                                                               \
        _mm_prefetch((const char *)(r0 + (o)), _MM_HINT_T0);                                                         \
        _mm_prefetch((const char *)(r1 + (o)), _MM_HINT_T0);                                                         \
        _mm_prefetch((const char *)(r2 + (o)), _MM_HINT_T0);                                                         \
        _mm_prefetch((const char *)(r3 + (o)), _MM_HINT_T0);                                                         \
    } while (0)

static inline __m256 load_bf16x8(const uint16_t *p) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* x as float32 in a fresh buffer (the caller frees it) */
static float *x_as_f32(const void *x, int dtype, int64_t K) {
    float *xf = (float *)malloc((size_t)K * sizeof(float));
    if (!xf) return NULL;
    if (dtype == 1) {
        const uint16_t *xb = (const uint16_t *)x;
        for (int64_t k = 0; k < K; k++) xf[k] = bf16_to_f32(xb[k]);
    } else {
        memcpy(xf, x, (size_t)K * sizeof(float));
    }
    return xf;
}

static inline void store(void *y, int dtype, int64_t n, float v) {
    if (dtype == 1)
        ((uint16_t *)y)[n] = f32_to_bf16(v);
    else
        ((float *)y)[n] = v;
}

/* x quantized to int8 in blocks of B (32 or 64): xq = round(x * (127 / max|x|)) to nearest even, and per block
   the step d = max|x| / 127 and the sum of x itself */
static void quantize_x(const float *x, int64_t K, int64_t B, int8_t *xq, float *d, float *bsum) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t b = 0; b < K / B; b++) {
        const float *xb = x + B * b;
        __m256 amax = _mm256_setzero_ps(), sum = amax;
        for (int64_t i = 0; i < B; i += 8) {
            __m256 v = _mm256_loadu_ps(xb + i);
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v));
            sum = _mm256_add_ps(sum, v);
        }
        __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        m = _mm_max_ss(m, _mm_movehdup_ps(m));
        const float a = _mm_cvtss_f32(m);
        d[b] = a / 127.0f;
        bsum[b] = hsum(sum);
        const __m256 inv = _mm256_set1_ps(a > 0 ? 127.0f / a : 0.0f);
        for (int64_t i = 0; i < B; i += 32) {
            __m256i q0 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + i), inv));
            __m256i q1 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + i + 8), inv));
            __m256i q2 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + i + 16), inv));
            __m256i q3 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + i + 24), inv));
            __m256i q = _mm256_packs_epi16(_mm256_packs_epi32(q0, q1), _mm256_packs_epi32(q2, q3));
            _mm256_storeu_si256((__m256i *)(xq + B * b + i), _mm256_permutevar8x32_epi32(q, order));
        }
    }
}

/* ------------------------------------------------------------------------------------------------------- bf16 */

/* Rows shorter than this are taken one at a time, so that each thread reads one sequential stream: four streams of
   1-2 KB each are too short for the hardware prefetchers (measured: about 1.2x on 1024-column matrices, and worse
   on 3584-4096-column ones, where four rows at a time share the loads of x) */
#define ROWS4_MIN_K 2048
/* bytes a row-at-a-time product prefetches ahead in its stream (the rows after this one): the hardware prefetchers
   alone leave a 32000 x 1024 bf16 output head at about 23 GB/s, this at 28-29 */
#define ROW_AHEAD 8192

static inline float dot_bf16_1(const uint16_t *w, const float *x, int64_t K) {
    __m256 a = _mm256_setzero_ps(), b = a;
    for (int64_t k = 0; k < K; k += 16) {
        if (k % 32 == 0) _mm_prefetch((const char *)(w + k) + ROW_AHEAD, _MM_HINT_T0);
        a = _mm256_fmadd_ps(load_bf16x8(w + k), _mm256_loadu_ps(x + k), a);
        b = _mm256_fmadd_ps(load_bf16x8(w + k + 8), _mm256_loadu_ps(x + k + 8), b);
    }
    return hsum(_mm256_add_ps(a, b));
}

#if MC_BF16_DP
/* With AVX512-BF16, a bf16 activation row multiplies the bf16 weights as they are: vdpbf16ps takes 32 of each and
   adds the products in pairs into 16 float32 sums, where AVX2 widens every weight to float32 first (the widening,
   not memory, bounds the AVX2 product on the CPUs that have these instructions). The products are exact in float32;
   the sums are float32, as on AVX2, in another order. */
#ifndef BF16X_AHEAD
#define BF16X_AHEAD 1024
#endif
/* Elements ahead that the weight rows are prefetched in software, or 0 for none. 2 KB ahead gained up to 24% per
   product on an Intel Xeon; on AMD Zen 4 the hardware prefetchers alone were 1.1-1.3x faster than with it
   (BENCHMARKS.md, "bf16 products and software prefetch"), so AMD CPUs go without. */
static int64_t bf16x_ahead = BF16X_AHEAD;
__attribute__((constructor)) static void choose_bf16x_ahead(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_is("amd")) bf16x_ahead = 0;
}
static inline __m512 dp32(__m512 acc, const uint16_t *w, __m512i x) {
    return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512((const void *)w), (__m512bh)x);
}

static inline float dot_bf16x_1(const uint16_t *w, const uint16_t *x, int64_t K) {
    __m512 a = _mm512_setzero_ps(), b = a;
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
        _mm_prefetch((const char *)(w + k) + ROW_AHEAD, _MM_HINT_T0);
        a = dp32(a, w + k, _mm512_loadu_si512((const void *)(x + k)));
        b = dp32(b, w + k + 32, _mm512_loadu_si512((const void *)(x + k + 32)));
    }
    if (k < K) a = dp32(a, w + k, _mm512_loadu_si512((const void *)(x + k)));
    return _mm512_reduce_add_ps(_mm512_add_ps(a, b));
}

static void gemv_bf16x(const uint16_t *w, const uint16_t *x, void *y, int ytype, int64_t N, int64_t K, int threads) {
    int64_t blocks = K >= ROWS4_MIN_K ? N / 4 : 0;
    const int64_t ahead = bf16x_ahead;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t blk = 0; blk < blocks; blk++) {
        int64_t n = 4 * blk;
        const uint16_t *r0 = w + n * K, *r1 = r0 + K, *r2 = r1 + K, *r3 = r2 + K;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t k = 0; k < K; k += 32) {
            __m512i xv = _mm512_loadu_si512((const void *)(x + k));
            if (ahead) PREFETCH4(k + ahead);
            a0 = dp32(a0, r0 + k, xv);
            a1 = dp32(a1, r1 + k, xv);
            a2 = dp32(a2, r2 + k, xv);
            a3 = dp32(a3, r3 + k, xv);
        }
        store(y, ytype, n, _mm512_reduce_add_ps(a0));
        store(y, ytype, n + 1, _mm512_reduce_add_ps(a1));
        store(y, ytype, n + 2, _mm512_reduce_add_ps(a2));
        store(y, ytype, n + 3, _mm512_reduce_add_ps(a3));
    }
#pragma omp parallel for schedule(static) num_threads(threads) if (N - 4 * blocks > 64)
    for (int64_t n = 4 * blocks; n < N; n++) store(y, ytype, n, dot_bf16x_1(w + n * K, x, K));
}

/* gemv_bf16x for T activation rows at once (a short prompt): each block of four weight rows is loaded once per step
   of 32 columns and multiplied with T rows in registers, so the weights stream from memory once for the whole
   prompt instead of once per row. Every sum is the one gemv_bf16x builds for that row, in the same order, so each
   output equals the decode product of its row bit for bit. */
static inline __attribute__((always_inline)) void bf16x_rows4_t(const uint16_t *r0, const uint16_t *x, int64_t K,
                                                                const int T, int64_t ahead, float out[4][4]) {
    const uint16_t *r1 = r0 + K, *r2 = r1 + K, *r3 = r2 + K;
    __m512 a[4][4];
    for (int t = 0; t < T; t++) a[0][t] = a[1][t] = a[2][t] = a[3][t] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
        if (ahead) PREFETCH4(k + ahead);
        __m512i w0 = _mm512_loadu_si512((const void *)(r0 + k)), w1 = _mm512_loadu_si512((const void *)(r1 + k));
        __m512i w2 = _mm512_loadu_si512((const void *)(r2 + k)), w3 = _mm512_loadu_si512((const void *)(r3 + k));
        for (int t = 0; t < T; t++) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512((const void *)(x + t * K + k));
            a[0][t] = _mm512_dpbf16_ps(a[0][t], (__m512bh)w0, xv);
            a[1][t] = _mm512_dpbf16_ps(a[1][t], (__m512bh)w1, xv);
            a[2][t] = _mm512_dpbf16_ps(a[2][t], (__m512bh)w2, xv);
            a[3][t] = _mm512_dpbf16_ps(a[3][t], (__m512bh)w3, xv);
        }
    }
    for (int t = 0; t < T; t++)
        for (int j = 0; j < 4; j++) out[j][t] = _mm512_reduce_add_ps(a[j][t]);
}

static void gemm_bf16x(const uint16_t *w, const uint16_t *x, void *y, int ytype, int64_t M, int64_t N, int64_t K,
                       int threads) {
    int64_t blocks = K >= ROWS4_MIN_K ? N / 4 : 0;
    const int64_t ahead = bf16x_ahead;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t blk = 0; blk < blocks; blk++) {
        int64_t n = 4 * blk;
        float out[4][4];
        for (int64_t m = 0; m < M; m += 4) {
            const uint16_t *xm = x + m * K;
            int T = M - m < 4 ? (int)(M - m) : 4;
            if (T == 4) bf16x_rows4_t(w + n * K, xm, K, 4, ahead, out);
            else if (T == 3) bf16x_rows4_t(w + n * K, xm, K, 3, ahead, out);
            else if (T == 2) bf16x_rows4_t(w + n * K, xm, K, 2, ahead, out);
            else bf16x_rows4_t(w + n * K, xm, K, 1, ahead, out);
            for (int t = 0; t < T; t++)
                for (int j = 0; j < 4; j++) store(y, ytype, (m + t) * N + n + j, out[j][t]);
        }
    }
#pragma omp parallel for schedule(static) num_threads(threads) if ((N - 4 * blocks) * M > 64)
    for (int64_t n = 4 * blocks; n < N; n++)
        for (int64_t m = 0; m < M; m++) store(y, ytype, m * N + n, dot_bf16x_1(w + n * K, x + m * K, K));
}
#endif

#if !MC_BF16_DP
/* The AVX2 decode product (mc_gemv_bf16 below) for T activation rows at once, in float32: one weight row at a time,
   each 16 of its columns widened to float32 once for all T rows, so a short prompt reads and widens its weights
   once instead of once per row. Each sum is the decode product's for that row (two accumulators over alternate 8
   columns, added and reduced at the end), in the same order, so each output equals it bit for bit. */
static inline __attribute__((always_inline)) void bf16_row_t(const uint16_t *w, const float *x, int64_t K, const int T,
                                                             float out[4]) {
    __m256 a[4], b[4];
    for (int t = 0; t < T; t++) a[t] = b[t] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
        if (k % 32 == 0) _mm_prefetch((const char *)(w + k) + ROW_AHEAD, _MM_HINT_T0);
        __m256 w0 = load_bf16x8(w + k), w1 = load_bf16x8(w + k + 8);
        for (int t = 0; t < T; t++) {
            a[t] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + t * K + k), a[t]);
            b[t] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + t * K + k + 8), b[t]);
        }
    }
    for (int t = 0; t < T; t++) out[t] = hsum(_mm256_add_ps(a[t], b[t]));
}

static void gemm_bf16_avx2(const uint16_t *w, const float *xf, uint16_t *y, int64_t M, int64_t N, int64_t K,
                           int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        float out[4];
        for (int64_t m = 0; m < M; m += 4) {
            const float *xm = xf + m * K;
            int T = M - m < 4 ? (int)(M - m) : 4;
            if (T == 4) bf16_row_t(w + n * K, xm, K, 4, out);
            else if (T == 3) bf16_row_t(w + n * K, xm, K, 3, out);
            else if (T == 2) bf16_row_t(w + n * K, xm, K, 2, out);
            else bf16_row_t(w + n * K, xm, K, 1, out);
            for (int t = 0; t < T; t++) store(y, 1, (m + t) * N + n, out[t]);
        }
    }
}
#endif

/* M bf16 rows times bf16 weights, each row's result equal to mc_gemv_bf16 of that row: with AVX512-BF16 on the rows
   as they are, else widened to float32 (exactly) for the AVX2 product */
int mc_gemm_bf16(const uint16_t *w, const uint16_t *x, uint16_t *y, int64_t M, int64_t N, int64_t K, int threads) {
#if MC_BF16_DP
    gemm_bf16x(w, x, y, 1, M, N, K, threads);
    return 0;
#else
    float *xf = (float *)malloc((size_t)(M * K) * sizeof(float));
    if (!xf) return -1;
    for (int64_t i = 0; i < M * K; i++) xf[i] = bf16_to_f32(x[i]);
    gemm_bf16_avx2(w, xf, y, M, N, K, threads);
    free(xf);
    return 0;
#endif
}

int mc_gemv_bf16(const uint16_t *w, const void *x, int xtype, void *y, int ytype, int64_t N, int64_t K, int threads) {
#if MC_BF16_DP
    if (xtype == 1) { /* a float32 row keeps the widening path: rounding it to bf16 would lose precision */
        gemv_bf16x(w, (const uint16_t *)x, y, ytype, N, K, threads);
        return 0;
    }
#endif
    float *xf = x_as_f32(x, xtype, K);
    if (!xf) return -1;
    int64_t blocks = K >= ROWS4_MIN_K ? N / 4 : 0;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t blk = 0; blk < blocks; blk++) {
        int64_t n = 4 * blk;
        const uint16_t *r0 = w + n * K, *r1 = r0 + K, *r2 = r1 + K, *r3 = r2 + K;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
        for (int64_t k = 0; k < K; k += 16) {
            __m256 x0 = _mm256_loadu_ps(xf + k), x1 = _mm256_loadu_ps(xf + k + 8);
            a0 = _mm256_fmadd_ps(load_bf16x8(r0 + k), x0, a0);
            b0 = _mm256_fmadd_ps(load_bf16x8(r0 + k + 8), x1, b0);
            a1 = _mm256_fmadd_ps(load_bf16x8(r1 + k), x0, a1);
            b1 = _mm256_fmadd_ps(load_bf16x8(r1 + k + 8), x1, b1);
            a2 = _mm256_fmadd_ps(load_bf16x8(r2 + k), x0, a2);
            b2 = _mm256_fmadd_ps(load_bf16x8(r2 + k + 8), x1, b2);
            a3 = _mm256_fmadd_ps(load_bf16x8(r3 + k), x0, a3);
            b3 = _mm256_fmadd_ps(load_bf16x8(r3 + k + 8), x1, b3);
        }
        store(y, ytype, n, hsum(_mm256_add_ps(a0, b0)));
        store(y, ytype, n + 1, hsum(_mm256_add_ps(a1, b1)));
        store(y, ytype, n + 2, hsum(_mm256_add_ps(a2, b2)));
        store(y, ytype, n + 3, hsum(_mm256_add_ps(a3, b3)));
    }
#pragma omp parallel for schedule(static) num_threads(threads) if (N - 4 * blocks > 64)
    for (int64_t n = 4 * blocks; n < N; n++) store(y, ytype, n, dot_bf16_1(w + n * K, xf, K));
    free(xf);
    return 0;
}

/* ------------------------------------------------------------------------------------------------------- int8 */

/* the signed products q * xq of 32 bytes, summed in eight int32 lanes: maddubs wants an unsigned operand, so it
   gets |q| and xq carries q's sign (|q|, |xq| <= 127, so pair sums stay within int16) */
static inline __m256 dot_i8x32(__m256i q, __m256i xq, __m256i ones) {
    __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(xq, q));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones));
}

static inline float dot_int8_1(const int8_t *w, const int8_t *xq, const float *d, int64_t K) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 a = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
        _mm_prefetch((const char *)(w + k) + ROW_AHEAD, _MM_HINT_T0);
        __m256 s = dot_i8x32(_mm256_loadu_si256((const __m256i *)(w + k)), _mm256_loadu_si256((const __m256i *)(xq + k)), ones);
        a = _mm256_fmadd_ps(s, _mm256_set1_ps(d[k / 32]), a);
    }
    return hsum(a);
}

int mc_gemv_int8(const int8_t *w, const float *scale, const void *x, int xtype, void *y, int ytype, int64_t N,
                 int64_t K, int threads) {
    float *xf = x_as_f32(x, xtype, K);
    int8_t *xq = (int8_t *)malloc((size_t)K);
    float *d = (float *)malloc((size_t)(K / 32) * 2 * sizeof(float));
    if (!xf || !xq || !d) {
        free(xf), free(xq), free(d);
        return -1;
    }
    quantize_x(xf, K, 32, xq, d, d + K / 32);
    int64_t blocks = K >= ROWS4_MIN_K ? N / 4 : 0;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t blk = 0; blk < blocks; blk++) {
        int64_t n = 4 * blk;
        const __m256i ones = _mm256_set1_epi16(1);
        const int8_t *r0 = w + n * K, *r1 = r0 + K, *r2 = r1 + K, *r3 = r2 + K;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t k = 0; k < K; k += 32) {
            __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + k));
            __m256 dv = _mm256_set1_ps(d[k / 32]);
            PREFETCH4(k + 4 * K);
            a0 = _mm256_fmadd_ps(dot_i8x32(_mm256_loadu_si256((const __m256i *)(r0 + k)), xv, ones), dv, a0);
            a1 = _mm256_fmadd_ps(dot_i8x32(_mm256_loadu_si256((const __m256i *)(r1 + k)), xv, ones), dv, a1);
            a2 = _mm256_fmadd_ps(dot_i8x32(_mm256_loadu_si256((const __m256i *)(r2 + k)), xv, ones), dv, a2);
            a3 = _mm256_fmadd_ps(dot_i8x32(_mm256_loadu_si256((const __m256i *)(r3 + k)), xv, ones), dv, a3);
        }
        store(y, ytype, n, scale[n] * hsum(a0));
        store(y, ytype, n + 1, scale[n + 1] * hsum(a1));
        store(y, ytype, n + 2, scale[n + 2] * hsum(a2));
        store(y, ytype, n + 3, scale[n + 3] * hsum(a3));
    }
#pragma omp parallel for schedule(static) num_threads(threads) if (N - 4 * blocks > 64)
    for (int64_t n = 4 * blocks; n < N; n++) store(y, ytype, n, scale[n] * dot_int8_1(w + n * K, xq, d, K));
    free(xf), free(xq), free(d);
    return 0;
}

/* ------------------------------------------------------------------------------------------------------- int4 */

/* Our int4 layout (the header's): rows in blocks of four, groups of 64 columns, superblocks of S = 64 J columns
   (J = 4, 2 or 1 groups). Per block of four rows:
     codes    K/64 records of 128 bytes: for group g, the four rows' 32 bytes in turn; a row's byte i holds the code of
              column 64g+i in its low nibble and of column 64g+32+i in its high nibble;
     scales   K/S records of 16 + 16 J bytes: the four rows' float32 multipliers f[r], then for each group j of the
              superblock the four rows' int16 subscales q[j][r] (0..16383), then for each group the four rows' bf16
              lows l[j][r].
   W[4b+r, k] = code * f[r] * q[j][r] + l[j][r].
   The decode product multiplies integers for a whole superblock before it touches a float: x is quantized in blocks
   of S, so sum(code * xq) over a group times q[j][r] adds up, exactly, in int32, and each superblock costs one
   conversion and one multiply-add per row. An int16 lane holds at most 2 * 2 * 15 * 127 = 7620 (two code pairs),
   an int32 lane of one group 2 * 7620 * INT4_SUB_MAX < 2^28, so J = 4 groups stay below 2^31. Each thread
   streams the codes of its blocks of rows in one sequence. */

#define INT4_SUB_MAX 16383
#define INT4_AHEAD 16384 /* bytes of codes prefetched ahead of the read: the hardware prefetchers alone trail */

static inline int16_t load_i16(const uint8_t *p) {
    int16_t v;
    memcpy(&v, p, 2);
    return v;
}

/* sum over one 64-column group of code * xq, times the subscale q, in eight int32 lanes: maddubs takes the codes
   (0..15) as its unsigned operand, and the two halves' int16 pair sums are added before madd widens them */
static inline __m256i dot_u4x64(const uint8_t *p, __m256i x0, __m256i x1, int16_t q) {
    const __m256i m = _mm256_set1_epi8(15);
    __m256i v = _mm256_loadu_si256((const __m256i *)p);
    __m256i lo = _mm256_and_si256(v, m), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m);
    __m256i s = _mm256_add_epi16(_mm256_maddubs_epi16(lo, x0), _mm256_maddubs_epi16(hi, x1));
    return _mm256_madd_epi16(s, _mm256_set1_epi16(q));
}

/* one block of four rows: out[r] = row r . x, from xq and its steps d (per superblock) and gsum4 (x's own sums per
   group, each four times: the lows' term takes two groups of four rows a vector). J is a constant where this is
   inlined, so the group loop unrolls. */
static inline __attribute__((always_inline)) void int4_rows4(const uint8_t *w, const uint8_t *sc, const int8_t *xq,
                                                             const float *d, const float *gsum4, int64_t K, int J,
                                                             float *out) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, lows = a0;
    __m128 lows1 = _mm_setzero_ps();
    for (int64_t b = 0; b < K / (64 * J); b++, sc += 16 + 16 * J) {
        __m256i i0 = _mm256_setzero_si256(), i1 = i0, i2 = i0, i3 = i0;
        for (int j = 0; j < J; j++) {
            const int64_t g = b * J + j, k = 64 * g;
            const uint8_t *p = w + 128 * g, *qj = sc + 16 + 8 * j;
            _mm_prefetch((const char *)(p + INT4_AHEAD), _MM_HINT_T0);
            _mm_prefetch((const char *)(p + INT4_AHEAD + 64), _MM_HINT_T0);
            __m256i x0 = _mm256_loadu_si256((const __m256i *)(xq + k)), x1 = _mm256_loadu_si256((const __m256i *)(xq + k + 32));
            i0 = _mm256_add_epi32(i0, dot_u4x64(p, x0, x1, load_i16(qj)));
            i1 = _mm256_add_epi32(i1, dot_u4x64(p + 32, x0, x1, load_i16(qj + 2)));
            i2 = _mm256_add_epi32(i2, dot_u4x64(p + 64, x0, x1, load_i16(qj + 4)));
            i3 = _mm256_add_epi32(i3, dot_u4x64(p + 96, x0, x1, load_i16(qj + 6)));
        }
        const uint8_t *l = sc + 16 + 8 * J; /* lows: lanes (group, row) */
        const float *gs = gsum4 + 4 * J * b;
        if (J == 1) { /* four lows: a 64-bit load, which stays inside the record */
            __m128i h = _mm_cvtepu16_epi32(_mm_loadl_epi64((const __m128i *)l));
            lows1 = _mm_fmadd_ps(_mm_castsi128_ps(_mm_slli_epi32(h, 16)), _mm_loadu_ps(gs), lows1);
        }
        for (int j = 0; j + 1 < J; j += 2)
            lows = _mm256_fmadd_ps(load_bf16x8((const uint16_t *)(l + 8 * j)), _mm256_loadu_ps(gs + 4 * j), lows);
        const __m128 f = _mm_mul_ps(_mm_loadu_ps((const float *)sc), _mm_set1_ps(d[b]));
        a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i0), _mm256_broadcastss_ps(f), a0);
        a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i1), _mm256_broadcastss_ps(_mm_shuffle_ps(f, f, 0x55)), a1);
        a2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i2), _mm256_broadcastss_ps(_mm_shuffle_ps(f, f, 0xaa)), a2);
        a3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i3), _mm256_broadcastss_ps(_mm_shuffle_ps(f, f, 0xff)), a3);
    }
    float l[4];
    _mm_storeu_ps(l, _mm_add_ps(lows1, _mm_add_ps(_mm256_castps256_ps128(lows), _mm256_extractf128_ps(lows, 1))));
    out[0] = hsum(a0) + l[0], out[1] = hsum(a1) + l[1], out[2] = hsum(a2) + l[2], out[3] = hsum(a3) + l[3];
}

#if MC_INT4_VNNI
/* int4_rows4 with AVX512-VNNI, two rows per register (row 2i in the low 256 bits, 2i+1 in the high), the same
   integers in the same lanes and then the same float operations, so its results equal int4_rows4's bit for bit.
   vpdpbusd sums four code * xq products into an int32 lane; two of them (low and high nibbles) stay within
   2 * 4 * 15 * 127 = 15240, so the lane read as an int16 pair is (sum, its sign) and vpdpwssd with the pair
   (subscale, 0) adds sum * subscale exactly, where AVX2 needs maddubs, add, madd and add. */
static inline __m512i dot_u4x64x2(const uint8_t *p, __m512i x0, __m512i x1, __m512i q, __m512i acc) {
    const __m512i m = _mm512_set1_epi8(15);
    __m512i v = _mm512_loadu_si512((const void *)p);
    __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(v, m), x0);
    s = _mm512_dpbusd_epi32(s, _mm512_and_si512(_mm512_srli_epi16(v, 4), m), x1);
    return _mm512_dpwssd_epi32(acc, s, q);
}

static inline __attribute__((always_inline)) void int4_rows4_vnni(const uint8_t *w, const uint8_t *sc,
                                                                  const int8_t *xq, const float *d,
                                                                  const float *gsum4, int64_t K, int J, float *out) {
    /* int16 lanes picking subscale 0 | 1 (and 2 | 3) into the low | high half, the odd lanes zeroed by the mask */
    const __m512i pick01 = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(1), 1);
    const __m512i pick23 = _mm512_add_epi16(pick01, _mm512_set1_epi16(2));
    const __m512i half = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi32(1), 1);
    __m512 a01 = _mm512_setzero_ps(), a23 = a01;
    __m256 lows = _mm256_setzero_ps();
    __m128 lows1 = _mm_setzero_ps();
    for (int64_t b = 0; b < K / (64 * J); b++, sc += 16 + 16 * J) {
        __m512i i01 = _mm512_setzero_si512(), i23 = i01;
        for (int j = 0; j < J; j++) {
            const int64_t g = b * J + j, k = 64 * g;
            const uint8_t *p = w + 128 * g;
            _mm_prefetch((const char *)(p + INT4_AHEAD), _MM_HINT_T0);
            _mm_prefetch((const char *)(p + INT4_AHEAD + 64), _MM_HINT_T0);
            __m512i x0 = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(xq + k)));
            __m512i x1 = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(xq + k + 32)));
            __m512i q = _mm512_castsi128_si512(_mm_loadl_epi64((const __m128i *)(sc + 16 + 8 * j)));
            i01 = dot_u4x64x2(p, x0, x1, _mm512_maskz_permutexvar_epi16(0x55555555, pick01, q), i01);
            i23 = dot_u4x64x2(p + 64, x0, x1, _mm512_maskz_permutexvar_epi16(0x55555555, pick23, q), i23);
        }
        const uint8_t *l = sc + 16 + 8 * J;
        const float *gs = gsum4 + 4 * J * b;
        if (J == 1) {
            __m128i h = _mm_cvtepu16_epi32(_mm_loadl_epi64((const __m128i *)l));
            lows1 = _mm_fmadd_ps(_mm_castsi128_ps(_mm_slli_epi32(h, 16)), _mm_loadu_ps(gs), lows1);
        }
        for (int j = 0; j + 1 < J; j += 2)
            lows = _mm256_fmadd_ps(load_bf16x8((const uint16_t *)(l + 8 * j)), _mm256_loadu_ps(gs + 4 * j), lows);
        const __m512 f = _mm512_castps128_ps512(_mm_mul_ps(_mm_loadu_ps((const float *)sc), _mm_set1_ps(d[b])));
        a01 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i01), _mm512_permutexvar_ps(half, f), a01);
        a23 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i23), _mm512_permutexvar_ps(_mm512_add_epi32(half, _mm512_set1_epi32(2)), f), a23);
    }
    float l[4];
    _mm_storeu_ps(l, _mm_add_ps(lows1, _mm_add_ps(_mm256_castps256_ps128(lows), _mm256_extractf128_ps(lows, 1))));
    out[0] = hsum(_mm512_castps512_ps256(a01)) + l[0], out[1] = hsum(_mm512_extractf32x8_ps(a01, 1)) + l[1];
    out[2] = hsum(_mm512_castps512_ps256(a23)) + l[2], out[3] = hsum(_mm512_extractf32x8_ps(a23, 1)) + l[3];
}
#define INT4_ROWS4 int4_rows4_vnni

/* ------------------------------------------------------------------------------- int4 prompts with AVX512-VNNI */

/* int4_rows4_vnni for T activation rows at once: a block of four weight rows is loaded and unpacked once per group
   and multiplied with each row's codes, so a prompt reads its weights once per block of rows instead of once per
   token, and multiplies integers without dequantizing. Each row's integers and float operations are those of
   int4_rows4_vnni, in the same order, so each output equals the decode product of that row bit for bit. xq, d and
   gsum4 hold T rows of K, K/S and K/16 values. */
static inline __attribute__((always_inline)) void int4_rows4_vnni_t(const uint8_t *w, const uint8_t *sc,
                                                                    const int8_t *xq, const float *d,
                                                                    const float *gsum4, int64_t K, int J, int T,
                                                                    float *out) {
    const __m512i pick01 = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(1), 1);
    const __m512i pick23 = _mm512_add_epi16(pick01, _mm512_set1_epi16(2));
    const __m512i half = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi32(1), 1);
    const __m512i m15 = _mm512_set1_epi8(15);
    const int64_t nb = K / (64 * J);
    __m512 a01[4], a23[4];
    __m256 lows[4];
    __m128 lows1[4];
    for (int t = 0; t < T; t++) a01[t] = a23[t] = _mm512_setzero_ps(), lows[t] = _mm256_setzero_ps(), lows1[t] = _mm_setzero_ps();
    for (int64_t b = 0; b < nb; b++, sc += 16 + 16 * J) {
        __m512i i01[4], i23[4];
        for (int t = 0; t < T; t++) i01[t] = i23[t] = _mm512_setzero_si512();
        for (int j = 0; j < J; j++) {
            const int64_t g = b * J + j, k = 64 * g;
            const uint8_t *p = w + 128 * g;
            const __m512i v0 = _mm512_loadu_si512((const void *)p), v1 = _mm512_loadu_si512((const void *)(p + 64));
            const __m512i lo0 = _mm512_and_si512(v0, m15), hi0 = _mm512_and_si512(_mm512_srli_epi16(v0, 4), m15);
            const __m512i lo1 = _mm512_and_si512(v1, m15), hi1 = _mm512_and_si512(_mm512_srli_epi16(v1, 4), m15);
            const __m512i q = _mm512_castsi128_si512(_mm_loadl_epi64((const __m128i *)(sc + 16 + 8 * j)));
            const __m512i q01 = _mm512_maskz_permutexvar_epi16(0x55555555, pick01, q);
            const __m512i q23 = _mm512_maskz_permutexvar_epi16(0x55555555, pick23, q);
            for (int t = 0; t < T; t++) {
                const int8_t *xt = xq + t * K + k;
                const __m512i x0 = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)xt));
                const __m512i x1 = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(xt + 32)));
                __m512i s = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo0, x0), hi0, x1);
                i01[t] = _mm512_dpwssd_epi32(i01[t], s, q01);
                s = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo1, x0), hi1, x1);
                i23[t] = _mm512_dpwssd_epi32(i23[t], s, q23);
            }
        }
        const uint8_t *l = sc + 16 + 8 * J;
        const __m128 f4 = _mm_loadu_ps((const float *)sc);
        for (int t = 0; t < T; t++) {
            const float *gs = gsum4 + t * (K / 16) + 4 * J * b;
            if (J == 1) {
                __m128i h = _mm_cvtepu16_epi32(_mm_loadl_epi64((const __m128i *)l));
                lows1[t] = _mm_fmadd_ps(_mm_castsi128_ps(_mm_slli_epi32(h, 16)), _mm_loadu_ps(gs), lows1[t]);
            }
            for (int j = 0; j + 1 < J; j += 2)
                lows[t] = _mm256_fmadd_ps(load_bf16x8((const uint16_t *)(l + 8 * j)), _mm256_loadu_ps(gs + 4 * j), lows[t]);
            const __m512 f = _mm512_castps128_ps512(_mm_mul_ps(f4, _mm_set1_ps(d[t * nb + b])));
            a01[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i01[t]), _mm512_permutexvar_ps(half, f), a01[t]);
            a23[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i23[t]), _mm512_permutexvar_ps(_mm512_add_epi32(half, _mm512_set1_epi32(2)), f), a23[t]);
        }
    }
    for (int t = 0; t < T; t++) {
        float l[4];
        _mm_storeu_ps(l, _mm_add_ps(lows1[t], _mm_add_ps(_mm256_castps256_ps128(lows[t]), _mm256_extractf128_ps(lows[t], 1))));
        float *o = out + 4 * t;
        o[0] = hsum(_mm512_castps512_ps256(a01[t])) + l[0], o[1] = hsum(_mm512_extractf32x8_ps(a01[t], 1)) + l[1];
        o[2] = hsum(_mm512_castps512_ps256(a23[t])) + l[2], o[3] = hsum(_mm512_extractf32x8_ps(a23[t], 1)) + l[3];
    }
}

/* row m of x (rows of K, float32 or bf16) as float32 in f */
static void row_as_f32(const void *x, int xtype, int64_t m, int64_t K, float *f) {
    if (xtype == 1) {
        const uint16_t *src = (const uint16_t *)x + m * K;
        for (int64_t k = 0; k < K; k++) f[k] = bf16_to_f32(src[k]);
    } else {
        memcpy(f, (const float *)x + m * K, (size_t)K * sizeof(float));
    }
}

#define GEMM_T 4       /* activation rows per pass over a block of weight rows: what the registers hold */
#define GEMM_ROWS 128  /* activation rows per sweep over the weights: their int8 codes stay in the L2 cache */

/* one block of four weight rows against T activation rows, with J a constant so the loops unroll */
static void int4_block_t(const uint8_t *wb, const uint8_t *sb, const int8_t *xq, const float *d, const float *gsum4,
                         int64_t K, int J, int T, float *out) {
#define CASE(JJ, TT) if (J == JJ && T == TT) { int4_rows4_vnni_t(wb, sb, xq, d, gsum4, K, JJ, TT, out); return; }
    CASE(4, 4) CASE(4, 3) CASE(4, 2) CASE(4, 1) CASE(2, 4) CASE(2, 3) CASE(2, 2) CASE(2, 1)
    CASE(1, 4) CASE(1, 3) CASE(1, 2) CASE(1, 1)
#undef CASE
}

/* Y = X W^T for M activation rows x (M x K, float32 or bf16) and W in our int4 layout, y M x N; row m of y equals
   mc_gemv_int4 of row m of x, bit for bit */
int mc_gemm_int4(const uint8_t *w, const uint8_t *scales, const void *x, int xtype, void *y, int ytype, int64_t M,
                 int64_t N, int64_t K, int64_t S, int threads) {
    const int J = (int)(S / 64);
    if (N % 4 || S % 64 || J < 1 || J > 4 || J == 3 || K % S || M < 1) return -2;
    const int64_t nb = K / S, rows = M < GEMM_ROWS ? M : GEMM_ROWS;
    int8_t *xq = (int8_t *)malloc((size_t)(rows * K));
    float *d = (float *)malloc((size_t)(rows * (2 * nb + K / 16)) * sizeof(float));
    float *xf = (float *)malloc((size_t)(rows * K) * sizeof(float));
    if (!xq || !d || !xf) {
        free(xq), free(d), free(xf);
        return -1;
    }
    float *bsum = d + rows * nb, *gsum4 = bsum + rows * nb;
    const int64_t rec = 16 + 16 * J;
    for (int64_t m0 = 0; m0 < M; m0 += rows) {
        const int64_t R = M - m0 < rows ? M - m0 : rows;
        /* each row as mc_gemv_int4 prepares it: quantized in blocks of S, and the sums of x per group of 64 */
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t r = 0; r < R; r++) {
            float *f = xf + r * K;
            row_as_f32(x, xtype, m0 + r, K, f);
            quantize_x(f, K, S, xq + r * K, d + r * nb, bsum + r * nb);
            for (int64_t g = 0; g < K / 64; g++) {
                __m256 s = _mm256_setzero_ps();
                for (int64_t i = 0; i < 64; i += 8) s = _mm256_add_ps(s, _mm256_loadu_ps(f + 64 * g + i));
                _mm_storeu_ps(gsum4 + r * (K / 16) + 4 * g, _mm_set1_ps(hsum(s)));
            }
        }
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t blk = 0; blk < N / 4; blk++) {
            const uint8_t *wb = w + blk * 2 * K, *sb = scales + blk * nb * rec;
            float out[4 * GEMM_T];
            for (int64_t t0 = 0; t0 < R; t0 += GEMM_T) {
                const int T = (int)(R - t0 < GEMM_T ? R - t0 : GEMM_T);
                int4_block_t(wb, sb, xq + t0 * K, d + t0 * nb, gsum4 + t0 * (K / 16), K, J, T, out);
                for (int t = 0; t < T; t++)
                    for (int r = 0; r < 4; r++) store(y, ytype, (m0 + t0 + t) * N + 4 * blk + r, out[4 * t + r]);
            }
        }
    }
    free(xq), free(d), free(xf);
    return 0;
}

/* -------------------------------------------------------------------------------- int8 prompts with AVX512-VNNI */

/* Four int8 weight rows (two per register: row r in the low 256 bits, r + 1 in the high) against T activation rows,
   32 columns at a time. Each int32 lane sums the same four products as dot_i8x32 (the AVX2 maddubs/madd pair), and
   the float operations are mc_gemv_int8's in the same order, so each row's output equals the decode product bit for
   bit. vpdpbusd wants its first factor unsigned: it multiplies xu = xq + 128, starting from -128 times the sum of
   the weights' four bytes, computed once per block of weights for all T rows (exact integers: no saturation). */
static inline __attribute__((always_inline)) void int8_rows4_vnni_t(const int8_t *r0, int64_t K, const uint8_t *xu,
                                                                    const float *d, int T, float *out) {
    const int8_t *r1 = r0 + K, *r2 = r1 + K, *r3 = r2 + K;
    const __m512i ones = _mm512_set1_epi8(1), zero = _mm512_setzero_si512();
    __m512 a01[4], a23[4];
    for (int t = 0; t < T; t++) a01[t] = a23[t] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
        PREFETCH4(k + 4 * K);
        const __m512i w01 = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(r0 + k))),
                                               _mm256_loadu_si256((const __m256i *)(r1 + k)), 1);
        const __m512i w23 = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(r2 + k))),
                                               _mm256_loadu_si256((const __m256i *)(r3 + k)), 1);
        const __m512i b01 = _mm512_sub_epi32(zero, _mm512_slli_epi32(_mm512_dpbusd_epi32(zero, ones, w01), 7));
        const __m512i b23 = _mm512_sub_epi32(zero, _mm512_slli_epi32(_mm512_dpbusd_epi32(zero, ones, w23), 7));
        for (int t = 0; t < T; t++) {
            const __m512i x = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(xu + t * K + k)));
            const __m512 dv = _mm512_set1_ps(d[t * (K / 32) + k / 32]);
            a01[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(b01, x, w01)), dv, a01[t]);
            a23[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(b23, x, w23)), dv, a23[t]);
        }
    }
    for (int t = 0; t < T; t++) {
        float *o = out + 4 * t;
        o[0] = hsum(_mm512_castps512_ps256(a01[t])), o[1] = hsum(_mm512_extractf32x8_ps(a01[t], 1));
        o[2] = hsum(_mm512_castps512_ps256(a23[t])), o[3] = hsum(_mm512_extractf32x8_ps(a23[t], 1));
    }
}

static void int8_block_t(const int8_t *r0, int64_t K, const uint8_t *xu, const float *d, int T, float *out) {
    switch (T) { /* T a constant in each: the accumulators stay in registers */
    case 4: int8_rows4_vnni_t(r0, K, xu, d, 4, out); break;
    case 3: int8_rows4_vnni_t(r0, K, xu, d, 3, out); break;
    case 2: int8_rows4_vnni_t(r0, K, xu, d, 2, out); break;
    default: int8_rows4_vnni_t(r0, K, xu, d, 1, out); break;
    }
}

/* Y = X W^T for M activation rows x (M x K, float32 or bf16) and int8 W with a scale per row; row m of y equals
   mc_gemv_int8 of row m of x, bit for bit. The weights are read once per GEMM_ROWS rows, four weight rows against
   four activation rows at a time. */
int mc_gemm_int8(const int8_t *w, const float *scale, const void *x, int xtype, void *y, int ytype, int64_t M,
                 int64_t N, int64_t K, int threads) {
    if (K % 32 || M < 1) return -2;
    const int64_t nb = K / 32, rows = M < GEMM_ROWS ? M : GEMM_ROWS;
    int8_t *xq = (int8_t *)malloc((size_t)(rows * K));
    uint8_t *xu = (uint8_t *)malloc((size_t)(rows * K));
    float *d = (float *)malloc((size_t)(rows * 2 * nb) * sizeof(float));
    float *xf = (float *)malloc((size_t)(rows * K) * sizeof(float));
    if (!xq || !xu || !d || !xf) {
        free(xq), free(xu), free(d), free(xf);
        return -1;
    }
    for (int64_t m0 = 0; m0 < M; m0 += rows) {
        const int64_t R = M - m0 < rows ? M - m0 : rows;
        /* each row as mc_gemv_int8 prepares it: quantized in blocks of 32 */
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t r = 0; r < R; r++) {
            float *f = xf + r * K;
            row_as_f32(x, xtype, m0 + r, K, f);
            float *bsum = d + rows * nb + r * nb; /* not needed here: quantize_x writes it */
            quantize_x(f, K, 32, xq + r * K, d + r * nb, bsum);
            for (int64_t k = 0; k < K; k++) xu[r * K + k] = (uint8_t)(xq[r * K + k] ^ 0x80);
        }
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t blk = 0; blk < N / 4; blk++) {
            float out[4 * GEMM_T];
            for (int64_t t0 = 0; t0 < R; t0 += GEMM_T) {
                const int T = (int)(R - t0 < GEMM_T ? R - t0 : GEMM_T);
                int8_block_t(w + 4 * blk * K, K, xu + t0 * K, d + t0 * nb, T, out);
                for (int t = 0; t < T; t++)
                    for (int r = 0; r < 4; r++)
                        store(y, ytype, (m0 + t0 + t) * N + 4 * blk + r, scale[4 * blk + r] * out[4 * t + r]);
            }
        }
        for (int64_t n = N / 4 * 4; n < N; n++) /* the last rows, fewer than four: decode's one-row dot */
            for (int64_t r = 0; r < R; r++)
                store(y, ytype, (m0 + r) * N + n, scale[n] * dot_int8_1(w + n * K, xq + r * K, d + r * nb, K));
    }
    free(xq), free(xu), free(d), free(xf);
    return 0;
}
#else
int mc_gemm_int4(const uint8_t *w, const uint8_t *scales, const void *x, int xtype, void *y, int ytype, int64_t M,
                 int64_t N, int64_t K, int64_t S, int threads) {
    (void)w, (void)scales, (void)x, (void)xtype, (void)y, (void)ytype, (void)M, (void)N, (void)K, (void)S, (void)threads;
    return -3; /* not in this build: prompts dequantize into a GEMM instead */
}
int mc_gemm_int8(const int8_t *w, const float *scale, const void *x, int xtype, void *y, int ytype, int64_t M,
                 int64_t N, int64_t K, int threads) {
    (void)w, (void)scale, (void)x, (void)xtype, (void)y, (void)ytype, (void)M, (void)N, (void)K, (void)threads;
    return -3; /* not in this build */
}
#endif
#if !MC_INT4_VNNI
#define INT4_ROWS4 int4_rows4
#endif

/* y = W x for W in our int4 layout with superblocks of S columns (N a multiple of 4, K of S, S 64, 128 or 256) */
int mc_gemv_int4(const uint8_t *w, const uint8_t *scales, const void *x, int xtype, void *y, int ytype, int64_t N,
                 int64_t K, int64_t S, int threads) {
    const int J = (int)(S / 64);
    if (N % 4 || S % 64 || J < 1 || J > 4 || J == 3 || K % S) return -2;
    float *xf = x_as_f32(x, xtype, K);
    int8_t *xq = (int8_t *)malloc((size_t)K);
    float *d = (float *)malloc((size_t)(2 * (K / S) + K / 16) * sizeof(float));
    if (!xf || !xq || !d) {
        free(xf), free(xq), free(d);
        return -1;
    }
    float *gsum4 = d + 2 * (K / S);
    quantize_x(xf, K, S, xq, d, d + K / S);
    for (int64_t g = 0; g < K / 64; g++) { /* sums of x itself (not of xq): the low term stays exact */
        __m256 s = _mm256_setzero_ps();
        for (int64_t i = 0; i < 64; i += 8) s = _mm256_add_ps(s, _mm256_loadu_ps(xf + 64 * g + i));
        _mm_storeu_ps(gsum4 + 4 * g, _mm_set1_ps(hsum(s)));
    }
    const int64_t rec = 16 + 16 * J; /* bytes of scales per block of rows and superblock */
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t blk = 0; blk < N / 4; blk++) {
        const uint8_t *wb = w + blk * 2 * K, *sb = scales + blk * (K / S) * rec;
        float out[4];
        if (J == 4)
            INT4_ROWS4(wb, sb, xq, d, gsum4, K, 4, out);
        else if (J == 2)
            INT4_ROWS4(wb, sb, xq, d, gsum4, K, 2, out);
        else
            INT4_ROWS4(wb, sb, xq, d, gsum4, K, 1, out);
        for (int r = 0; r < 4; r++) store(y, ytype, 4 * blk + r, out[r]);
    }
    free(xf), free(xq), free(d);
    return 0;
}

/* rows [n0, n1) of an int4 weight as float32 (otype 0) or bf16 (otype 1, each value rounded from the float32 one as
   torch converts), out holding (n1 - n0) * K: a prompt's product dequantizes a block of rows at a time and multiplies
   it with one GEMM in the model's dtype */
static inline void put8(void *out, int otype, int64_t i, __m256 v) {
    if (otype)
        store_bf16x8((uint16_t *)out + i, v);
    else
        _mm256_storeu_ps((float *)out + i, v);
}

int mc_dequant_int4(const uint8_t *w, const uint8_t *scales, void *out, int otype, int64_t n0, int64_t n1, int64_t K,
                    int64_t S, int threads) {
    const int64_t J = S / 64, rec = 16 + 16 * J;
    if (S % 64 || J < 1 || K % S) return -2;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = n0; n < n1; n++) {
        const int64_t blk = n / 4, r = n % 4;
        const int64_t o = (n - n0) * K;
        const __m128i m = _mm_set1_epi8(15);
        for (int64_t g = 0; g < K / 64; g++) {
            const uint8_t *sc = scales + (blk * (K / S) + g / J) * rec;
            float f;
            memcpy(&f, sc + 4 * r, 4);
            const __m256 s = _mm256_set1_ps(f * (float)load_i16(sc + 16 + 8 * (g % J) + 2 * r));
            const __m256 l = _mm256_set1_ps(bf16_to_f32((uint16_t)load_i16(sc + 16 + 8 * J + 8 * (g % J) + 2 * r)));
            const uint8_t *row = w + blk * 2 * K + 128 * g + 32 * r;
            for (int half = 0; half < 2; half++) {
                __m128i v = _mm_loadu_si128((const __m128i *)(row + 16 * half));
                __m128i lo = _mm_and_si128(v, m), hi = _mm_and_si128(_mm_srli_epi16(v, 4), m);
                const int64_t o_lo = o + 64 * g + 16 * half, o_hi = o_lo + 32;
                put8(out, otype, o_lo, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), s, l));
                put8(out, otype, o_lo + 8, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), s, l));
                put8(out, otype, o_hi, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), s, l));
                put8(out, otype, o_hi + 8, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), s, l));
            }
        }
    }
    return 0;
}

/* -------------------------------------------------------------------------------------------------- attention */

/* e^x for x <= 0 (softmax arguments), 8 lanes: 2^n * p(r) with x = n ln2 + r, |r| <= ln2/2, p a degree-6
   polynomial; relative error below 2e-7. Arguments below -87 give 0. */
static inline __m256 exp_neg(__m256 x) {
    const __m256 log2e = _mm256_set1_ps(1.44269504f), ln2_hi = _mm256_set1_ps(0.693359375f),
                 ln2_lo = _mm256_set1_ps(-2.12194440e-4f);
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, ln2_hi, x);
    r = _mm256_fnmadd_ps(n, ln2_lo, r);
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

#define ATT_BLOCK 128 /* keys/values per block: a block of V stays in L1/L2 while its columns are summed */
/* bytes ahead that the key and value streams are prefetched: 1.1-1.2x at 2K-4K keys from memory */
#define ATT_AHEAD 2048

/* the cache lines of `rows` rows of D bf16 values, ATT_AHEAD bytes ahead */
static inline void prefetch_rows(const uint16_t *row, int rows, int64_t D) {
    for (int64_t i = 0; i < rows * D; i += 32) _mm_prefetch((const char *)(row + i) + ATT_AHEAD, _MM_HINT_T0);
}

/* 16 bf16 values as two float vectors, with one load and two unpacks: the first holds elements 0-3 and 8-11, the
   second 4-7 and 12-15 (the unpacks work within 128-bit lanes). Dot products read q in that order too (qf below),
   and sums of rows come out in it, to be put back in order at the end (unshuffle16). */
static inline void load_bf16x16(const uint16_t *p, __m256 *lo, __m256 *hi) {
    __m256i v = _mm256_loadu_si256((const __m256i *)p), zero = _mm256_setzero_si256();
    *lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, v));
    *hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, v));
}

/* where element i of a block of 16 goes in load_bf16x16's order, and back: quarters 1 and 2 trade places */
static inline int64_t unshuffle16(int64_t i) {
    const int64_t quarter = (i >> 2) & 3;
    return quarter == 1 ? i + 4 : quarter == 2 ? i - 4 : i;
}

/* the horizontal sums of eight vectors, as one vector in their order */
static inline __m256 hsum8(const __m256 *s) {
    __m256 ab = _mm256_hadd_ps(_mm256_hadd_ps(s[0], s[1]), _mm256_hadd_ps(s[2], s[3]));
    __m256 cd = _mm256_hadd_ps(_mm256_hadd_ps(s[4], s[5]), _mm256_hadd_ps(s[6], s[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(ab, cd, 0x20), _mm256_permute2f128_ps(ab, cd, 0x31));
}

/* the attention of the G query heads that share key/value head c (G a constant after inlining, so the per-head
   accumulators live in registers) */
static inline __attribute__((always_inline)) void attention_group(
    const int G, const uint16_t *q, const uint16_t *kc, const uint16_t *vc, int64_t start, int64_t n, int64_t D,
    float scale, uint16_t *out, float *qf, float *acc, float *p) {
    for (int g = 0; g < G; g++)
        for (int64_t d = 0; d < D; d++)
            qf[g * D + d / 16 * 16 + unshuffle16(d % 16)] = bf16_to_f32(q[g * D + d]) * scale;
    /* scores: every query head of the group against each key, read once; B keys at a time, so that the B * G <= 8
       dot products are summed across their lanes together */
    const int B = G >= 8 ? 1 : 8 / G;
    int64_t j = 0;
    for (; j + B <= n; j += B) {
        __m256 s[8];
        for (int i = 0; i < 8; i++) s[i] = _mm256_setzero_ps();
        prefetch_rows(kc + (start + j) * D, B, D);
        for (int64_t d = 0; d < D; d += 16) {
            for (int b = 0; b < B; b++) {
                __m256 lo, hi;
                load_bf16x16(kc + (start + j + b) * D + d, &lo, &hi);
                for (int g = 0; g < G; g++) {
                    s[b * G + g] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(qf + g * D + d), s[b * G + g]);
                    s[b * G + g] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(qf + g * D + d + 8), s[b * G + g]);
                }
            }
        }
        float t[8];
        _mm256_storeu_ps(t, hsum8(s));
        for (int b = 0; b < B; b++)
            for (int g = 0; g < G; g++) p[g * n + j + b] = t[b * G + g];
    }
    for (; j < n; j++) { /* the last keys, fewer than B */
        __m256 s[8];
        for (int g = 0; g < G; g++) s[g] = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 16) {
            __m256 lo, hi;
            load_bf16x16(kc + (start + j) * D + d, &lo, &hi);
            for (int g = 0; g < G; g++) {
                s[g] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(qf + g * D + d), s[g]);
                s[g] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(qf + g * D + d + 8), s[g]);
            }
        }
        for (int g = 0; g < G; g++) p[g * n + j] = hsum(s[g]);
    }
    /* softmax weights, unnormalized: e^(s - max); the sum divides at the end */
    float total[8];
    for (int g = 0; g < G; g++) {
        float *pg = p + g * n, m = -INFINITY;
        int64_t j = 0;
        if (n >= 8) {
            __m256 mv = _mm256_loadu_ps(pg);
            for (j = 8; j + 8 <= n; j += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(pg + j));
            float t[8];
            _mm256_storeu_ps(t, mv);
            for (int i = 0; i < 8; i++) m = t[i] > m ? t[i] : m;
        }
        for (; j < n; j++) m = pg[j] > m ? pg[j] : m;
        __m256 mv = _mm256_set1_ps(m), sum = _mm256_setzero_ps();
        for (j = 0; j + 8 <= n; j += 8) {
            __m256 e = exp_neg(_mm256_sub_ps(_mm256_loadu_ps(pg + j), mv));
            _mm256_storeu_ps(pg + j, e);
            sum = _mm256_add_ps(sum, e);
        }
        float t = hsum(sum);
        for (; j < n; j++) {
            pg[j] = expf(pg[j] - m);
            t += pg[j];
        }
        total[g] = t;
    }
    /* weighted sum of the values, a block of keys at a time, 16 columns at a time (in load_bf16x16's order) */
    for (int64_t i = 0; i < G * D; i++) acc[i] = 0.0f;
    for (int64_t j0 = 0; j0 < n; j0 += ATT_BLOCK) {
        const int64_t j1 = j0 + ATT_BLOCK < n ? j0 + ATT_BLOCK : n;
        for (int64_t d = 0; d < D; d += 16) {
            __m256 a0[8], a1[8];
            for (int g = 0; g < G; g++) {
                a0[g] = _mm256_loadu_ps(acc + g * D + d);
                a1[g] = _mm256_loadu_ps(acc + g * D + d + 8);
            }
            for (int64_t j = j0; j < j1; j++) {
                if (d == 0) prefetch_rows(vc + (start + j) * D, 1, D); /* the first pass over a block's rows */
                __m256 v0, v1;
                load_bf16x16(vc + (start + j) * D + d, &v0, &v1);
                for (int g = 0; g < G; g++) {
                    __m256 w = _mm256_broadcast_ss(p + g * n + j);
                    a0[g] = _mm256_fmadd_ps(w, v0, a0[g]);
                    a1[g] = _mm256_fmadd_ps(w, v1, a1[g]);
                }
            }
            for (int g = 0; g < G; g++) {
                _mm256_storeu_ps(acc + g * D + d, a0[g]);
                _mm256_storeu_ps(acc + g * D + d + 8, a1[g]);
            }
        }
    }
    for (int g = 0; g < G; g++)
        for (int64_t d = 0; d < D; d++)
            out[g * D + d] = f32_to_bf16(acc[g * D + d / 16 * 16 + unshuffle16(d % 16)] / total[g]);
}

#if MC_BF16_DP
/* attention_group with AVX512-BF16: vdpbf16ps multiplies the bf16 keys and values as they are stored, where the AVX2
   path widens each to float32 first (the widening bounds it once the keys come from a fast memory).
   Scores: q . k_j with q as given (bf16, so the products are exact in float32), float32 sums, times the scale.
   Values: the softmax weights are rounded to bf16 and two keys' values are multiplied by their two weights in one
   pair of each 32-bit lane (v_j and v_j+1 interleaved); the sum that divides is the sum of the rounded weights, so
   the output is an exact average of the values under weights within 2^-8 of the float32 ones (as if the scores
   moved by under 0.004, a tenth of what rounding q and k to bf16 moves them). Columns are taken 32 at a time, the
   last 16 with a mask when D is an odd multiple of 16; the interleaving permutes the columns within 128-bit lanes,
   undone at the end. */
static inline __m512i load_bf16x32(const uint16_t *p, __mmask32 m) { return _mm512_maskz_loadu_epi16(m, p); }

static inline __attribute__((always_inline)) void attention_group_x(
    const int G, const uint16_t *q, const uint16_t *kc, const uint16_t *vc, int64_t start, int64_t n, int64_t D,
    float scale, uint16_t *out, float *acc, float *p, uint16_t *pb) {
    const int64_t chunks = (D + 31) / 32, np = n + (n & 1); /* pb rows hold an even count: a zero pairs the last */
    const __mmask32 tail = D % 32 ? (__mmask32)0xFFFF : (__mmask32)0xFFFFFFFF;
    const int B = G >= 8 ? 1 : 8 / G;
    int64_t j = 0;
    for (; j + B <= n; j += B) {
        __m512 s[8];
        for (int i = 0; i < 8; i++) s[i] = _mm512_setzero_ps();
        prefetch_rows(kc + (start + j) * D, B, D);
        for (int64_t c = 0; c < chunks; c++) {
            const __mmask32 m = c + 1 < chunks ? (__mmask32)0xFFFFFFFF : tail;
            for (int b = 0; b < B; b++) {
                const __m512i k = load_bf16x32(kc + (start + j + b) * D + 32 * c, m);
                for (int g = 0; g < G; g++)
                    s[b * G + g] = _mm512_dpbf16_ps(s[b * G + g], (__m512bh)k, (__m512bh)load_bf16x32(q + g * D + 32 * c, m));
            }
        }
        __m256 h[8];
        for (int i = 0; i < 8; i++)
            h[i] = _mm256_add_ps(_mm512_castps512_ps256(s[i]), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s[i]), 1)));
        float t[8];
        _mm256_storeu_ps(t, _mm256_mul_ps(hsum8(h), _mm256_set1_ps(scale)));
        for (int b = 0; b < B; b++)
            for (int g = 0; g < G; g++) p[g * n + j + b] = t[b * G + g];
    }
    for (; j < n; j++) { /* the last keys, fewer than B */
        __m512 s[8];
        for (int g = 0; g < G; g++) s[g] = _mm512_setzero_ps();
        for (int64_t c = 0; c < chunks; c++) {
            const __mmask32 m = c + 1 < chunks ? (__mmask32)0xFFFFFFFF : tail;
            const __m512i k = load_bf16x32(kc + (start + j) * D + 32 * c, m);
            for (int g = 0; g < G; g++)
                s[g] = _mm512_dpbf16_ps(s[g], (__m512bh)k, (__m512bh)load_bf16x32(q + g * D + 32 * c, m));
        }
        for (int g = 0; g < G; g++) p[g * n + j] = _mm512_reduce_add_ps(s[g]) * scale;
    }
    /* softmax weights e^(s - max), rounded to bf16; the sum of the rounded weights divides at the end */
    float total[8];
    for (int g = 0; g < G; g++) {
        float *pg = p + g * n;
        __m512 mx = _mm512_set1_ps(-INFINITY);
        for (int64_t i = 0; i < n; i += 16) {
            const __mmask16 k = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
            mx = _mm512_mask_max_ps(mx, k, mx, _mm512_maskz_loadu_ps(k, pg + i));
        }
        const __m256 mv = _mm256_set1_ps(_mm512_reduce_max_ps(mx));
        __m512 sum = _mm512_setzero_ps();
        uint16_t *bg = pb + g * np;
        for (int64_t i = 0; i < n; i += 16) {
            const __mmask16 k = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
            __m512 x = _mm512_maskz_loadu_ps(k, pg + i);
            const __m256 x1 = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1));
            const __m256 e0 = exp_neg(_mm256_sub_ps(_mm512_castps512_ps256(x), mv)), e1 = exp_neg(_mm256_sub_ps(x1, mv));
            __m512 e = _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(e0)), _mm256_castps_pd(e1), 1));
            e = _mm512_maskz_mov_ps(k, e);
            const __m256bh r = _mm512_cvtneps_pbh(e);
            _mm256_mask_storeu_epi16(bg + i, k, (__m256i)r);
            sum = _mm512_add_ps(sum, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)r), 16)));
        }
        if (n & 1) bg[n] = 0;
        total[g] = _mm512_reduce_add_ps(sum);
    }
    /* weighted sum of the values: a block of keys at a time, CW chunks of 32 columns per pass over the block (so that
       4 * G accumulators stay in registers), two keys per instruction */
    const int CW = G <= 4 ? 2 : 1;
    const int64_t cp = (chunks + CW - 1) / CW * CW; /* chunks held in acc, a multiple of CW */
    for (int64_t i = 0; i < G * cp * 32; i++) acc[i] = 0.0f;
    for (int64_t j0 = 0; j0 < n; j0 += ATT_BLOCK) { /* ATT_BLOCK is even: pairs never straddle blocks */
        const int64_t j1 = j0 + ATT_BLOCK < n ? j0 + ATT_BLOCK : n;
        for (int64_t c = 0; c < chunks; c += CW) {
            __mmask32 m[2]; /* a chunk past the last reads nothing */
            for (int cc = 0; cc < CW; cc++)
                m[cc] = c + cc + 1 < chunks ? (__mmask32)0xFFFFFFFF : c + cc + 1 == chunks ? tail : (__mmask32)0;
            __m512 a[16]; /* a[(g * CW + cc) * 2 + half] */
            for (int g = 0; g < G; g++)
                for (int cc = 0; cc < CW; cc++) {
                    a[(g * CW + cc) * 2] = _mm512_loadu_ps(acc + (g * cp + c + cc) * 32);
                    a[(g * CW + cc) * 2 + 1] = _mm512_loadu_ps(acc + (g * cp + c + cc) * 32 + 16);
                }
            for (int64_t j = j0; j < j1; j += 2) {
                if (c == 0) prefetch_rows(vc + (start + j) * D, 2, D);
                __m512i lo[2], hi[2];
                for (int cc = 0; cc < CW; cc++) {
                    const __m512i v0 = load_bf16x32(vc + (start + j) * D + 32 * (c + cc), m[cc]);
                    const __m512i v1 = j + 1 < n ? load_bf16x32(vc + (start + j + 1) * D + 32 * (c + cc), m[cc])
                                                 : _mm512_setzero_si512();
                    lo[cc] = _mm512_unpacklo_epi16(v0, v1), hi[cc] = _mm512_unpackhi_epi16(v0, v1);
                }
                for (int g = 0; g < G; g++) {
                    uint32_t pair;
                    memcpy(&pair, pb + g * np + j, 4);
                    const __m512bh w = (__m512bh)_mm512_set1_epi32((int)pair);
                    for (int cc = 0; cc < CW; cc++) {
                        a[(g * CW + cc) * 2] = _mm512_dpbf16_ps(a[(g * CW + cc) * 2], (__m512bh)lo[cc], w);
                        a[(g * CW + cc) * 2 + 1] = _mm512_dpbf16_ps(a[(g * CW + cc) * 2 + 1], (__m512bh)hi[cc], w);
                    }
                }
            }
            for (int g = 0; g < G; g++)
                for (int cc = 0; cc < CW; cc++) {
                    _mm512_storeu_ps(acc + (g * cp + c + cc) * 32, a[(g * CW + cc) * 2]);
                    _mm512_storeu_ps(acc + (g * cp + c + cc) * 32 + 16, a[(g * CW + cc) * 2 + 1]);
                }
        }
    }
    /* column d of a chunk is in 128-bit lane (d % 32) / 8; its first four columns in a0, the next four in a1 */
    for (int g = 0; g < G; g++)
        for (int64_t d = 0; d < D; d++) {
            const int64_t r = d % 32, lane = r / 8, w = r % 8;
            const int64_t at = (g * cp + d / 32) * 32 + (w < 4 ? lane * 4 + w : 16 + lane * 4 + w - 4);
            out[g * D + d] = f32_to_bf16(acc[at] / total[g]);
        }
}
#endif

/* One decode step's attention, all bf16: for each query head h (of H, reading key/value head h / (H / KV)),
   softmax(q_h . k_j * scale) over keys j in [start, L), times v_j. Key j of head c is at k + c * head_stride +
   j * D (the cache's layout); q and out are (H, D). D a multiple of 16, H / KV at most 8. Threads split the
   key/value heads, each of which is read once for all of its query heads. */
int mc_attention_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, int64_t head_stride, int64_t start,
                      int64_t L, int64_t H, int64_t KV, int64_t D, float scale, uint16_t *out, int threads) {
    const int64_t G = H / KV, n = L - start;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        /* the AVX2 path keeps q as float32 (qf), the AVX512-BF16 one the weights as bf16 (pb) */
        float *qf = MC_BF16_DP ? NULL : (float *)malloc((size_t)(G * D) * sizeof(float));
        uint16_t *pb = MC_BF16_DP ? (uint16_t *)malloc((size_t)(G * (n + 2)) * sizeof(uint16_t)) : NULL;
        float *acc = (float *)malloc((size_t)(G * ((D + 63) / 64 * 2) * 32) * sizeof(float));
        float *p = (float *)malloc((size_t)(G * n + 8) * sizeof(float));
        const int ready = acc && p && (MC_BF16_DP ? pb != NULL : qf != NULL);
        if (!ready) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t c = 0; c < KV; c++) {
            if (!ready) continue;
            const uint16_t *qc = q + c * G * D, *kc = k + c * head_stride, *vc = v + c * head_stride;
            uint16_t *oc = out + c * G * D;
#if MC_BF16_DP
            switch (G) {
            case 1: attention_group_x(1, qc, kc, vc, start, n, D, scale, oc, acc, p, pb); break;
            case 2: attention_group_x(2, qc, kc, vc, start, n, D, scale, oc, acc, p, pb); break;
            case 4: attention_group_x(4, qc, kc, vc, start, n, D, scale, oc, acc, p, pb); break;
            default: attention_group_x((int)G, qc, kc, vc, start, n, D, scale, oc, acc, p, pb); break;
            }
#else
            switch (G) { /* Mistral 7B: 4 */
            case 1: attention_group(1, qc, kc, vc, start, n, D, scale, oc, qf, acc, p); break;
            case 2: attention_group(2, qc, kc, vc, start, n, D, scale, oc, qf, acc, p); break;
            case 4: attention_group(4, qc, kc, vc, start, n, D, scale, oc, qf, acc, p); break;
            default: attention_group((int)G, qc, kc, vc, start, n, D, scale, oc, qf, acc, p); break;
            }
#endif
        }
        free(qf), free(acc), free(p), free(pb);
    }
    return failed ? -1 : 0;
}

/* ------------------------------------------------------------------------------------------ a whole decode step */

/* v rounded to bf16 and back: the value a bf16 tensor would hold */
static inline __m256 as_bf16(__m256 v) { return _mm256_castsi256_ps(_mm256_slli_epi32(round_bf16_bits(v), 16)); }

static inline __m256 square_bf16x8(const uint16_t *p) {
    __m256 v = load_bf16x8(p);
    return _mm256_mul_ps(v, v);
}

/* the sum of x^2 (n a multiple of 16) in float32, added in the order of torch's CPU sum (SumKernel.cpp's cascade
   over torch's vectors of 8 floats, or 16 where it runs AVX-512 code: `halves` 1 or 2; the vectors in 4
   interleaved rows, partial sums carried up 4 levels every 2^p vectors), so that the RMSNorm below rounds exactly
   as the model's F.rms_norm does */
static float sum_squares_as_torch(const uint16_t *x, int64_t n, int halves) {
    const int64_t V = n / (8 * halves), size = V / 4;
    int64_t p = size <= 2 ? 1 : 64 - __builtin_clzll((unsigned long long)(size - 1)); /* ceil(log2(size)) */
    p = p / 4 > 4 ? p / 4 : 4;
    const int64_t step = (int64_t)1 << p;
    __m256 acc[4][4][2];
    for (int j = 0; j < 4; j++)
        for (int k = 0; k < 4; k++) acc[j][k][0] = acc[j][k][1] = _mm256_setzero_ps();
#define ADD_VECTOR(a, v)                                                                                             \
    for (int h = 0; h < halves; h++) (a)[h] = _mm256_add_ps((a)[h], square_bf16x8(x + 8 * (halves * (v) + h)))
#define ADD_ACC(a, b)                                                                                                \
    for (int h = 0; h < halves; h++) (a)[h] = _mm256_add_ps((a)[h], (b)[h])
    int64_t i = 0;
    while (i + step <= size) {
        for (int64_t j = 0; j < step; j++, i++)
            for (int k = 0; k < 4; k++) ADD_VECTOR(acc[0][k], 4 * i + k);
        for (int j = 1; j < 4; j++) {
            for (int k = 0; k < 4; k++) {
                ADD_ACC(acc[j][k], acc[j - 1][k]);
                acc[j - 1][k][0] = acc[j - 1][k][1] = _mm256_setzero_ps();
            }
            if (i & ((step - 1) << (j * p))) break;
        }
    }
    for (; i < size; i++)
        for (int k = 0; k < 4; k++) ADD_VECTOR(acc[0][k], 4 * i + k);
    for (int j = 1; j < 4; j++)
        for (int k = 0; k < 4; k++) ADD_ACC(acc[0][k], acc[j][k]);
    for (int64_t v = 4 * size; v < V; v++) ADD_VECTOR(acc[0][0], v);
    for (int k = 1; k < 4; k++) ADD_ACC(acc[0][0], acc[0][k]);
#undef ADD_VECTOR
#undef ADD_ACC
    float lanes[16], total = 0.0f;
    _mm256_storeu_ps(lanes, acc[0][0][0]);
    _mm256_storeu_ps(lanes + 8, acc[0][0][1]);
    for (int k = 0; k < 8 * halves; k++) total += lanes[k];
    return total;
}

/* out = bf16(bf16(x * rsqrt(mean(x^2) + eps)) * w): the model's RMSNorm, its float32 result rounded to the
   activations' dtype before the weight multiplies it */
static void rms_norm(const uint16_t *x, const uint16_t *w, int64_t n, float eps, int halves, uint16_t *out) {
    const __m256 r = _mm256_set1_ps(1.0f / sqrtf(sum_squares_as_torch(x, n, halves) / (float)n + eps));
    for (int64_t i = 0; i < n; i += 8)
        store_bf16x8(out + i, _mm256_mul_ps(as_bf16(_mm256_mul_ps(load_bf16x8(x + i), r)), load_bf16x8(w + i)));
}

/* x = bf16(x + y), the residual connection */
static void add_bf16(uint16_t *x, const uint16_t *y, int64_t n) {
    for (int64_t i = 0; i < n; i += 8) store_bf16x8(x + i, _mm256_add_ps(load_bf16x8(x + i), load_bf16x8(y + i)));
}

/* RoPE on `heads` heads of D in place, rotating halves: (a, b) -> (a cos - b sin, b cos + a sin), each product
   and the sum rounded to bf16 as three bf16 tensor ops would; cos/sin are the position's (D) bf16 tables */
static void rope_bf16(uint16_t *x, int64_t heads, int64_t D, const uint16_t *cos, const uint16_t *sin) {
    const int64_t half = D / 2;
    for (int64_t h = 0; h < heads; h++) {
        uint16_t *a = x + h * D, *b = a + half;
        for (int64_t j = 0; j < half; j += 8) {
            __m256 va = load_bf16x8(a + j), vb = load_bf16x8(b + j);
            __m256 ca = load_bf16x8(cos + j), sa = load_bf16x8(sin + j);
            __m256 cb = load_bf16x8(cos + half + j), sb = load_bf16x8(sin + half + j);
            __m256 ra = _mm256_sub_ps(as_bf16(_mm256_mul_ps(va, ca)), as_bf16(_mm256_mul_ps(vb, sa)));
            __m256 rb = _mm256_add_ps(as_bf16(_mm256_mul_ps(vb, cb)), as_bf16(_mm256_mul_ps(va, sb)));
            store_bf16x8(a + j, ra);
            store_bf16x8(b + j, rb);
        }
    }
}

/* out = bf16(bf16(silu(gate)) * up) for gu = [gate (n), up (n)]: silu(g) = g / (1 + e^-g), from e^-|g| so that
   the exponential never overflows */
static void silu_mul_bf16(const uint16_t *gu, int64_t n, uint16_t *out) {
    const __m256 sign = _mm256_set1_ps(-0.0f), one = _mm256_set1_ps(1.0f);
    for (int64_t i = 0; i < n; i += 8) {
        __m256 g = load_bf16x8(gu + i);
        __m256 e = exp_neg(_mm256_or_ps(g, sign)); /* e^-|g| */
        __m256 num = _mm256_blendv_ps(one, e, g);  /* g < 0: sigmoid(g) = e^g / (1 + e^g) */
        __m256 silu = _mm256_mul_ps(g, _mm256_div_ps(num, _mm256_add_ps(one, e)));
        store_bf16x8(out + i, _mm256_mul_ps(as_bf16(silu), load_bf16x8(gu + n + i)));
    }
}

/* a linear layer as kernels.py describes it: kind 0 bf16 w, 1 int8 w with float32 scales s, 2 int4 w with its
   scales s in superblocks of S columns */
typedef struct {
    int64_t kind, N, K, S;
    const void *w, *s;
} mc_linear;

typedef struct {
    const uint16_t *attention_norm, *ffn_norm;
    mc_linear wqkv, wo, w13, w2;
} mc_layer;

/* a model as mc_decode_token reads it: its embedding table (rows of dim), its blocks, the final norm and the
   output head */
typedef struct {
    const uint16_t *embedding;
    const mc_layer *layers;
    int64_t n_layers, dim, H, KV, D, hidden;
    float eps, scale;
    const uint16_t *norm;
    mc_linear head;
} mc_model;

static int linear(const mc_linear *l, const uint16_t *x, uint16_t *y, int threads) {
    switch (l->kind) {
    case 0: return mc_gemv_bf16((const uint16_t *)l->w, x, 1, y, 1, l->N, l->K, threads);
    case 1: return mc_gemv_int8((const int8_t *)l->w, (const float *)l->s, x, 1, y, 1, l->N, l->K, threads);
    case 2: return mc_gemv_int4((const uint8_t *)l->w, (const uint8_t *)l->s, x, 1, y, 1, l->N, l->K, l->S, threads);
    default: return -2;
    }
}

/* The scratch rows of one token's step: the running activation x, then what each block computes from it. */
typedef struct {
    uint16_t *x, *h, *qkv, *att, *y, *gu, *mid, *out;
} mc_rows;

static uint16_t *rows_alloc(const mc_model *m, int64_t n, mc_rows *r) {
    const int64_t dim = m->dim, hidden = m->hidden, nqkv = (m->H + 2 * m->KV) * m->D;
    const int64_t one = 2 * dim + nqkv + m->H * m->D + 3 * hidden + m->head.N; /* all but x */
    uint16_t *all = (uint16_t *)malloc((size_t)(n * dim + one) * sizeof(uint16_t));
    if (!all) return NULL;
    r->x = all;
    r->h = all + n * dim;
    r->qkv = r->h + dim;
    r->att = r->qkv + nqkv;
    r->y = r->att + m->H * m->D;
    r->gu = r->y + dim;
    r->mid = r->gu + 2 * hidden;
    r->out = r->mid + hidden;
    return all;
}

/* Block l of the model for one token at `pos` whose activation is x (dim, updated in place): its keys and values go
   to kc[l]/vc[l] at `pos`, and attention reads positions [start, pos] of them. */
static int block(const mc_model *m, int64_t l, uint16_t *x, const mc_rows *r, uint16_t *const *kc,
                 uint16_t *const *vc, int64_t head_stride, const uint16_t *cos, const uint16_t *sin, int64_t pos,
                 int64_t start, int sum_halves, int threads) {
    const int64_t dim = m->dim, H = m->H, KV = m->KV, D = m->D, hidden = m->hidden;
    const mc_layer *L = m->layers + l;
    int rc = 0;
    rms_norm(x, L->attention_norm, dim, m->eps, sum_halves, r->h);
    rc |= linear(&L->wqkv, r->h, r->qkv, threads);
    rope_bf16(r->qkv, H + KV, D, cos, sin); /* queries and keys */
    for (int64_t c = 0; c < KV; c++) {
        memcpy(kc[l] + c * head_stride + pos * D, r->qkv + (H + c) * D, (size_t)D * sizeof(uint16_t));
        memcpy(vc[l] + c * head_stride + pos * D, r->qkv + (H + KV + c) * D, (size_t)D * sizeof(uint16_t));
    }
    rc |= mc_attention_bf16(r->qkv, kc[l], vc[l], head_stride, start, pos + 1, H, KV, D, m->scale, r->att, threads);
    rc |= linear(&L->wo, r->att, r->y, threads);
    add_bf16(x, r->y, dim);
    rms_norm(x, L->ffn_norm, dim, m->eps, sum_halves, r->h);
    rc |= linear(&L->w13, r->h, r->gu, threads);
    silu_mul_bf16(r->gu, hidden, r->mid);
    rc |= linear(&L->w2, r->mid, r->y, threads);
    add_bf16(x, r->y, dim);
    return rc;
}

/* The final norm and the head for activation x into logits (head.N floats, each rounded to bf16 first, as torch's
   bf16 product and .float() give). */
static int head(const mc_model *m, const uint16_t *x, const mc_rows *r, int sum_halves, float *logits, int threads) {
    rms_norm(x, m->norm, m->dim, m->eps, sum_halves, r->h);
    int rc = linear(&m->head, r->h, r->out, threads);
    for (int64_t n = 0; n < m->head.N && rc == 0; n++) logits[n] = bf16_to_f32(r->out[n]);
    return rc;
}

/* One decode step of token `token` at position `pos`, all bf16, the math of model.py's Transformer for one token:
   its embedding row, every block (layer l's keys/values go to kc[l]/vc[l], KV heads of head_stride, the cache's
   layout, at `pos`; attention reads positions [start, pos]), then the final norm and the head into logits (head.N
   floats). cos/sin: the position's RoPE tables (D). dim, D and hidden are multiples of 16; sum_halves: torch's float
   vectors, 1 for 8 lanes, 2 for 16 (AVX-512). Returns 0, -1 when out of memory. */
int mc_decode_token(const mc_model *m, int64_t token, uint16_t *const *kc, uint16_t *const *vc, int64_t head_stride,
                    const uint16_t *cos, const uint16_t *sin, int64_t pos, int64_t start, int sum_halves,
                    float *logits, int threads) {
    mc_rows r;
    uint16_t *all = rows_alloc(m, 1, &r);
    if (!all) return -1;
    memcpy(r.x, m->embedding + token * m->dim, (size_t)m->dim * sizeof(uint16_t));
    int rc = 0;
    for (int64_t l = 0; l < m->n_layers && rc == 0; l++)
        rc |= block(m, l, r.x, &r, kc, vc, head_stride, cos, sin, pos, start, sum_halves, threads);
    if (rc == 0) rc = head(m, r.x, &r, sum_halves, logits, threads);
    free(all);
    return rc;
}

/* The n tokens of a prompt at positions pos0, pos0 + 1, ... taken block by block: block l for every token, then
   block l + 1. Each token's arithmetic is mc_decode_token's, in the same order (token j's attention at block l reads
   the keys and values tokens before it have written there), so the cache and the last token's logits are bit for bit
   what n calls of mc_decode_token give; only the last token goes through the head. Each block's weights are read
   once for the whole prompt while they are still being read from disk. cos/sin: the RoPE tables from position 0
   (D per position); window: the sliding window, 0 for none. */
int mc_decode_tokens(const mc_model *m, const int64_t *tokens, int64_t n, uint16_t *const *kc, uint16_t *const *vc,
                     int64_t head_stride, const uint16_t *cos, const uint16_t *sin, int64_t pos0, int64_t window,
                     int sum_halves, float *logits, int threads) {
    const int64_t dim = m->dim, D = m->D;
    if (n < 1) return -2;
    mc_rows r;
    uint16_t *all = rows_alloc(m, n, &r);
    if (!all) return -1;
    for (int64_t j = 0; j < n; j++)
        memcpy(r.x + j * dim, m->embedding + tokens[j] * dim, (size_t)dim * sizeof(uint16_t));
    int rc = 0;
    for (int64_t l = 0; l < m->n_layers && rc == 0; l++)
        for (int64_t j = 0; j < n && rc == 0; j++) {
            const int64_t pos = pos0 + j, start = window && pos + 1 > window ? pos + 1 - window : 0;
            rc |= block(m, l, r.x + j * dim, &r, kc, vc, head_stride, cos + pos * D, sin + pos * D, pos, start,
                        sum_halves, threads);
        }
    if (rc == 0) rc = head(m, r.x + (n - 1) * dim, &r, sum_halves, logits, threads);
    free(all);
    return rc;
}

#else /* no AVX2 + FMA: the library builds, reports version 0, and torch's kernels are used */

int mc_version(void) { return 0; }
int mc_features(void) { return 0; }

#endif

/* ---------------------------------------------------------------------------------------------------- sampling */

/* The sampler of engine/sampling.py, in float64: `logits` (V floats) with the repetition penalty applied to the
   distinct ids in `recent` (a positive score divided by it, a negative one multiplied), then greedy (temperature 0:
   the first highest score) or: divided by the temperature; top-k (scores below the k-th highest dropped); softmax;
   top-p (in order of probability, highest first and ties by id, a token is dropped once those before it reach
   top_p); min-p (dropped below min_p times the highest probability); and the token where the running sum of the
   kept probabilities, in id order, first passes u (0 <= u < 1) times their total. `masked`: the scores may hold
   -inf (a grammar's mask), never drawn. Returns the token id, -1 out of memory, -2 a score NaN or infinite. */

static void swap_d(double *a, double *b) {
    double t = *a;
    *a = *b;
    *b = t;
}

/* the k-th highest of v[0..n) (k from 1), reordering v: Hoare's selection, expected linear time */
static double kth_highest(double *v, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n - 1, want = k - 1;
    while (lo < hi) {
        swap_d(v + lo + (hi - lo) / 2, v + hi);
        double pivot = v[hi];
        int64_t store = lo;
        for (int64_t i = lo; i < hi; i++)
            if (v[i] > pivot) swap_d(v + i, v + store++);
        swap_d(v + store, v + hi);
        if (store == want) return v[store];
        if (store < want) lo = store + 1;
        else hi = store - 1;
    }
    return v[lo];
}

typedef struct {
    double p;
    int64_t id;
} mc_ranked;

static int higher_first(const void *a, const void *b) {
    const mc_ranked *x = (const mc_ranked *)a, *y = (const mc_ranked *)b;
    if (x->p != y->p) return x->p > y->p ? -1 : 1;
    return x->id < y->id ? -1 : (x->id > y->id);
}

int64_t mc_sample(const float *logits, int64_t V, const int64_t *recent, int64_t n_recent, double penalty,
                  double temperature, int64_t top_k, double top_p, double min_p, double u, int masked) {
    for (int64_t i = 0; i < V; i++)
        if (isnan(logits[i]) || (isinf(logits[i]) && (!masked || logits[i] > 0))) return -2;
    double *p = (double *)malloc((size_t)V * 2 * sizeof(double));
    if (!p) return -1;
    double *scratch = p + V;
    for (int64_t i = 0; i < V; i++) p[i] = logits[i];
    if (penalty != 1.0)
        for (int64_t r = 0; r < n_recent; r++) {
            int64_t id = recent[r];
            if (id >= 0 && id < V) p[id] = p[id] > 0 ? p[id] / penalty : p[id] * penalty;
        }
    int64_t best = 0;
    for (int64_t i = 1; i < V; i++)
        if (p[i] > p[best]) best = i;
    if (temperature == 0 || p[best] == -INFINITY) { /* greedy, or nothing allowed (the caller's to refuse) */
        free(p);
        return best;
    }
    double top = p[best] / temperature, floor = -INFINITY;
    for (int64_t i = 0; i < V; i++) p[i] /= temperature;
    if (top_k > 0 && top_k < V) {
        memcpy(scratch, p, (size_t)V * sizeof(double));
        floor = kth_highest(scratch, V, top_k);
    }
    double sum = 0;
    for (int64_t i = 0; i < V; i++) {
        p[i] = p[i] < floor || p[i] == -INFINITY ? 0.0 : exp(p[i] - top);
        sum += p[i];
    }
    for (int64_t i = 0; i < V; i++) p[i] /= sum;
    if (top_p < 1.0) {
        mc_ranked *order = (mc_ranked *)malloc((size_t)V * sizeof(mc_ranked));
        if (!order) {
            free(p);
            return -1;
        }
        int64_t n = 0;
        for (int64_t i = 0; i < V; i++)
            if (p[i] > 0) order[n++] = (mc_ranked){p[i], i};
        qsort(order, (size_t)n, sizeof(mc_ranked), higher_first);
        double before = 0;
        for (int64_t r = 0; r < n; r++) {
            if (before >= top_p) p[order[r].id] = 0.0;
            before += order[r].p;
        }
        free(order);
    }
    if (min_p > 0) {
        double most = 0;
        for (int64_t i = 0; i < V; i++) most = p[i] > most ? p[i] : most;
        for (int64_t i = 0; i < V; i++)
            if (p[i] < min_p * most) p[i] = 0.0;
    }
    double total = 0;
    for (int64_t i = 0; i < V; i++) total += p[i];
    double target = u * total, run = 0;
    int64_t token = best;
    for (int64_t i = 0; i < V; i++)
        if (p[i] > 0) {
            token = i;
            run += p[i];
            if (run > target) break;
        }
    free(p);
    return token;
}
