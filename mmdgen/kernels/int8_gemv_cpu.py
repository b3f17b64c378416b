"""The int8 products of the decode step's rows on x86 CPUs: two C loops, built at first use.

Weight-only (``int8_gemv``, a few rows): ``y[m, n] = scale[n] * sum_k x[m, k] * qweight[n, k] + bias[n]``.
Shapes: ``x`` ``[M, K]`` fp32, ``qweight`` ``[N, K]`` int8, ``scale`` ``[N]`` fp32, ``bias`` ``[N]`` fp32 or None;
output ``[M, N]`` fp32 (to fp32 accuracy: the codes are converted to fp32 exactly and multiplied by x in fp32
fused multiply-adds).

Why: a decode step at batch 1 (2 rows with guidance) reads every int8 weight once, so it is bound by memory, and
its hundreds of products are small enough that a library call's fixed cost shows. Inside ``torch.compile``
the products written as tensor ops become inductor loops with one vector accumulator per row: a chain of
dependent adds that streams the codes at about half the copy bandwidth (``int8_linear``'s docstring). Here each
row sums into four AVX-512 (or AVX2) accumulators, 64 (32) codes an iteration, so the loop runs at about the
speed of memory; the rows go in pairs over each row of codes (read once from memory, again from L1 for a third
row); OpenMP splits the output channels over the threads (torch's own OpenMP runtime: ``torch.set_num_threads``
applies). K needs no alignment: 16 (8) codes at a time, then one at a time, finish a row. The codes are
prefetched 8 KB ahead: without it the loop streamed them 30% slower than a plain read of the same bytes
(MusicGen-small's 196 layers at 2 rows, 2 threads, AMD EPYC Zen 5, interleaved runs: read 7.3 ms, the loop 8.1
ms, 10.2 ms without the prefetch). One thread alone is bound by the arithmetic (about twice a read's time).

Memory bound: ``N K`` bytes of codes, ``4 M K`` of x, ``4 M N`` written; nothing else is allocated.

Dynamic (``int8_gemv_dynamic``, any number of rows; same shapes): each row of x is first rounded to int8 units
of its own step, ``step[m] = max_k |x[m, k]| / 127`` (at least ``FLT_MIN / 127``), ``u = round(x / step)``
(ties to even, as ``torch.round``), then ``y[m, n] = (sum_k u[m, k] * qweight[n, k]) * step[m] * scale[n] +
bias[n]``, the sum exact in int32 (K up to ``DYNAMIC_MAX_K``): bit for bit what ``int8_linear``'s ``torch._int_mm``
path computes with one level. A row holding NaN or inf gives NaN outputs. Why: at batch 8 with guidance (16 rows)
the weight-only loop is bound by its fp32 multiply-adds, not by memory; int8 dot-product instructions do 4 (AVX2:
2) times the work per instruction. With AVX-512 VNNI (``vpdpbusd``: 64 unsigned-by-signed byte products summed
into 16 int32 lanes) the codes are the unsigned side, flipped to ``c + 128``, and ``128 * sum_k u[m, k]`` is taken
off each sum. A tile multiplies one row of codes (up to 4 rows of x: memory bound) or four (more rows: each
codes vector feeds 16 products) by 4 rows of units, 64 codes a step, the last step masked; each row of codes is
prefetched 8 KB ahead (without it the loop ran 2-3 times slower), and read again from L1 for the next 4 rows.
Without VNNI (torch's capability AVX2, or an AVX-512 CPU without it): the codes widened to int16 times int16
units (``vpmaddwd``, pairs of products into int32), one or two rows of codes by 4 rows of units (16 registers).
OpenMP splits the rows of codes over the threads after each thread has rounded its share of the rows of x.
MusicGen-small's 196 products at 16 rows, chained as in a step, 2 threads, AMD EPYC Zen 5
(``bench/int8_step_products.py --rows 16``): 17.3 ms against fbgemm's 19.1 (a floor of 14.2 ms at this core's
3.2 G ``vpdpbusd`` a second); at 2 rows 11.0 against 14.6; with AVX2 code 40.2 against fbgemm's 29.2 at 16 rows
(its 7-bit unsigned activations let it use ``vpmaddubsw``, 32 products an instruction) and 12.9 against 12.6 at 2.
Memory: reads the codes once, the units (``M K`` bytes, int16 on AVX2: allocated per call) again per tile.

Build: the C source below, compiled with the system's C compiler (``$CC``, else ``cc``; ``-O3 -fopenmp``)
into ``$MMDGEN_KERNEL_CACHE`` (default ``~/.cache/mmdgen/kernels``) under a name that hashes the source, the
compiler's version and the flags; written to a temporary file and renamed, so a concurrent or interrupted build
never leaves half a library. Loaded with ctypes and registered as the library ops ``mmdgen::int8_gemv`` and
``mmdgen::int8_gemv_dynamic`` (with fake kernels: ``torch.compile`` keeps each in its graph as one call). The
variant follows torch's CPU capability (``torch.backends.cpu.get_cpu_capability()``, which
``ATEN_CPU_CAPABILITY`` lowers): AVX-512 (the dynamic loop with VNNI where the CPU has it) or AVX2; anything
else (``DEFAULT``, non-x86 machines), no compiler or a failed build leaves ``kernel_variant()`` None and
``unavailable_reason()`` saying why, and ``int8_linear`` takes its other paths.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = r"""
#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define AVX512 __attribute__((target("avx512f,avx512bw")))
#define AVX2 __attribute__((target("avx2,fma")))
/* codes requested this far ahead of the loop (it runs on into the next rows of codes; a prefetch past the end of
   the array is harmless): the hardware prefetcher alone left a core's stream of codes 30% slower than a plain read */
#define PREFETCH_BYTES 8192

/* Two rows' dot products with one row of codes: x0 . codes and x1 . codes (x1 may be x0). */
typedef void (*pair_fn)(const float *x0, const float *x1, const int8_t *codes, int64_t K, float *sums);

AVX512 static inline __m512 codes16(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}

AVX2 static inline __m256 codes8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

AVX2 static inline float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* One body for both widths: V is the vector type, L its lanes, and ZERO, LOAD, FMA, ADD, CODES (L codes as
   floats) and SUM (across the lanes) its operations. */
#define DEFINE_PAIR(NAME, TARGET, V, L, ZERO, LOAD, FMA, ADD, CODES, SUM)                                        \
TARGET static void NAME(const float *x0, const float *x1, const int8_t *codes, int64_t K, float *sums) {         \
    V a0 = ZERO(), a1 = ZERO(), a2 = ZERO(), a3 = ZERO(), b0 = ZERO(), b1 = ZERO(), b2 = ZERO(), b3 = ZERO();    \
    int64_t k = 0;                                                                                               \
    for (; k + 4 * L <= K; k += 4 * L) { /* four independent accumulators per row: no chain of dependent adds */ \
        _mm_prefetch((const char *)(codes + k + PREFETCH_BYTES), _MM_HINT_T0);                                   \
        const V w0 = CODES(codes + k), w1 = CODES(codes + k + L);                                                \
        const V w2 = CODES(codes + k + 2 * L), w3 = CODES(codes + k + 3 * L);                                    \
        a0 = FMA(LOAD(x0 + k), w0, a0);                                                                          \
        a1 = FMA(LOAD(x0 + k + L), w1, a1);                                                                      \
        a2 = FMA(LOAD(x0 + k + 2 * L), w2, a2);                                                                  \
        a3 = FMA(LOAD(x0 + k + 3 * L), w3, a3);                                                                  \
        b0 = FMA(LOAD(x1 + k), w0, b0);                                                                          \
        b1 = FMA(LOAD(x1 + k + L), w1, b1);                                                                      \
        b2 = FMA(LOAD(x1 + k + 2 * L), w2, b2);                                                                  \
        b3 = FMA(LOAD(x1 + k + 3 * L), w3, b3);                                                                  \
    }                                                                                                            \
    for (; k + L <= K; k += L) {                                                                                 \
        const V w = CODES(codes + k);                                                                            \
        a0 = FMA(LOAD(x0 + k), w, a0);                                                                           \
        b0 = FMA(LOAD(x1 + k), w, b0);                                                                           \
    }                                                                                                            \
    float s0 = SUM(ADD(ADD(a0, a1), ADD(a2, a3))), s1 = SUM(ADD(ADD(b0, b1), ADD(b2, b3)));                      \
    for (; k < K; ++k) {                                                                                         \
        s0 += x0[k] * (float)codes[k];                                                                           \
        s1 += x1[k] * (float)codes[k];                                                                           \
    }                                                                                                            \
    sums[0] = s0;                                                                                                \
    sums[1] = s1;                                                                                                \
}

DEFINE_PAIR(pair_avx512, AVX512, __m512, 16, _mm512_setzero_ps, _mm512_loadu_ps, _mm512_fmadd_ps, _mm512_add_ps,
            codes16, _mm512_reduce_add_ps)
DEFINE_PAIR(pair_avx2, AVX2, __m256, 8, _mm256_setzero_ps, _mm256_loadu_ps, _mm256_fmadd_ps, _mm256_add_ps,
            codes8, sum8)

/* y [M, N] = x [M, K] . codes [N, K]^T * scale [N] + bias [N] (bias may be NULL); all contiguous. */
static void gemv(pair_fn pair, const float *x, int64_t M, int64_t K, const int8_t *codes, int64_t N,
                 const float *scale, const float *bias, float *y) {
    /* a small product is done before a thread team could start */
    #pragma omp parallel for schedule(static) if (M * N * K >= (1 << 16))
    for (int64_t n = 0; n < N; ++n) {
        const int8_t *row = codes + n * K;
        const float b = bias ? bias[n] : 0.0f;
        for (int64_t m = 0; m < M; m += 2) {
            const int64_t m1 = m + 1 < M ? m + 1 : m;  /* an odd last row pairs with itself */
            float sums[2];
            pair(x + m * K, x + m1 * K, row, K, sums);
            y[m * N + n] = sums[0] * scale[n] + b;
            y[m1 * N + n] = sums[1] * scale[n] + b;
        }
    }
}

void mmdgen_int8_gemv_avx512(const float *x, int64_t M, int64_t K, const int8_t *codes, int64_t N,
                             const float *scale, const float *bias, float *y) {
    gemv(pair_avx512, x, M, K, codes, N, scale, bias, y);
}

void mmdgen_int8_gemv_avx2(const float *x, int64_t M, int64_t K, const int8_t *codes, int64_t N,
                           const float *scale, const float *bias, float *y) {
    gemv(pair_avx2, x, M, K, codes, N, scale, bias, y);
}

/* ---- The dynamic product: each row of x rounded to int8 units of its own step, int32 dot products ---- */

#define VNNI __attribute__((target("avx512f,avx512bw,avx512vnni")))
#define ROWS_PER_TILE 4    /* rows of x a tile multiplies by the same codes */
#define FEW_ROWS 4         /* up to this many rows a tile takes one row of codes (memory bound); more take several */

int mmdgen_cpu_has_avx512_vnni(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vnni");
}

/* max |x| / 127 over a row (at least FLT_MIN / 127, as int8_linear's _split_rows); NaN when the row holds NaN or
   inf, so that its outputs are NaN */
AVX2 static float row_step(const float *x, int64_t K) {
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 largest = _mm256_setzero_ps(), poison = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        const __m256 v = _mm256_loadu_ps(x + k);
        largest = _mm256_max_ps(largest, _mm256_and_ps(v, magnitude));
        poison = _mm256_add_ps(poison, _mm256_mul_ps(v, _mm256_setzero_ps()));  /* NaN for NaN or inf */
    }
    float lanes[8], bad[8], top = 0.0f, nan_sum = 0.0f;
    _mm256_storeu_ps(lanes, largest);
    _mm256_storeu_ps(bad, poison);
    for (int i = 0; i < 8; ++i) { top = lanes[i] > top ? lanes[i] : top; nan_sum += bad[i]; }
    for (; k < K; ++k) { const float a = fabsf(x[k]); top = a > top ? a : top; nan_sum += x[k] * 0.0f; }
    if (nan_sum != nan_sum) return NAN;
    return (top > FLT_MIN ? top : FLT_MIN) / 127.0f;
}

/* x / step rounded to the nearest integer, ties to even (the default rounding mode, as torch.round) */
AVX2 static inline __m256i units8(const float *x, __m256 step) {
    return _mm256_cvtps_epi32(_mm256_div_ps(_mm256_loadu_ps(x), step));
}

/* One row as units of its step, int8 (vpdpbusd) or, with unit_bytes 2, int16 (vpmaddwd), zero from K up to
   padded; returns the sum of the units. */
AVX2 static int32_t quantize_row(const float *x, int64_t K, int64_t padded, int64_t unit_bytes, void *out,
                                 float *step_out) {
    int8_t *bytes = out;
    int16_t *words = out;
    const float step = row_step(x, K);
    *step_out = step;
    memset(out, 0, padded * unit_bytes);
    if (step != step) return 0;
    const __m256 steps = _mm256_set1_ps(step);
    __m256i total = _mm256_setzero_si256();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {  /* 16 units: two vectors of int32 packed to int16 (then to int8) */
        const __m256i a = units8(x + k, steps), b = units8(x + k + 8, steps);
        total = _mm256_add_epi32(total, _mm256_add_epi32(a, b));
        const __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8);
        if (unit_bytes == 2)
            _mm256_storeu_si256((__m256i *)(words + k), packed);
        else
            _mm_storeu_si128((__m128i *)(bytes + k),
                             _mm_packs_epi16(_mm256_castsi256_si128(packed), _mm256_extracti128_si256(packed, 1)));
    }
    int32_t lanes[8], sum = 0;
    _mm256_storeu_si256((__m256i *)lanes, total);
    for (int i = 0; i < 8; ++i) sum += lanes[i];
    for (; k < K; ++k) {
        const int32_t unit = (int32_t)nearbyintf(x[k] / step);
        if (unit_bytes == 2)
            words[k] = (int16_t)unit;
        else
            bytes[k] = (int8_t)unit;
        sum += unit;
    }
    return sum;
}

/* A tile: sums[j * ROWS_PER_TILE + i] = codes row j . units row i, for j < its rows of codes, i < ROWS_PER_TILE. */
typedef void (*tile_fn)(const int8_t *const *codes, const void *const *units, int64_t K, int32_t *sums);

/* AVX-512 VNNI: vpdpbusd multiplies unsigned by signed bytes and sums each four products into an int32 lane.
   The codes are the unsigned side, flipped to c + 128 (XOR 0x80); the row's sum of units, times 128, is taken
   off afterwards (PLAN_VNNI's offset). 64 codes a step; the last step masked (the units are zero past K). */
#define VNNI_TILE_BEGIN                                                                                          \
    const __m512i flip = _mm512_set1_epi8((char)0x80);                                                         \
    const int8_t *x0 = units[0], *x1 = units[1], *x2 = units[2], *x3 = units[3];                               \
    for (int64_t k = 0; k < K; k += 64) {                                                                      \
        const __mmask64 m = K - k >= 64 ? ~0ULL : (1ULL << (K - k)) - 1;                                       \
        const __m512i v0 = _mm512_loadu_si512(x0 + k), v1 = _mm512_loadu_si512(x1 + k);                      \
        const __m512i v2 = _mm512_loadu_si512(x2 + k), v3 = _mm512_loadu_si512(x3 + k);
#define VNNI_CODES_ROW(j)                                                                                      \
        {                                                                                                      \
            _mm_prefetch((const char *)(w##j + k + PREFETCH_BYTES), _MM_HINT_T0);                              \
            const __m512i c = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, w##j + k), flip);                   \
            a##j##0 = _mm512_dpbusd_epi32(a##j##0, c, v0);                                                     \
            a##j##1 = _mm512_dpbusd_epi32(a##j##1, c, v1);                                                     \
            a##j##2 = _mm512_dpbusd_epi32(a##j##2, c, v2);                                                     \
            a##j##3 = _mm512_dpbusd_epi32(a##j##3, c, v3);                                                     \
        }
/* a tile's row j of codes, its four accumulators (vector type V, zeroed by ZERO), and their sums (REDUCE) */
#define ACCUMULATORS(j, V, ZERO)                                                                               \
    const int8_t *w##j = codes[j];                                                                             \
    V a##j##0 = ZERO(), a##j##1 = a##j##0, a##j##2 = a##j##0, a##j##3 = a##j##0;
#define SUMS(j, REDUCE)                                                                                        \
    sums[4 * j] = REDUCE(a##j##0);                                                                             \
    sums[4 * j + 1] = REDUCE(a##j##1);                                                                         \
    sums[4 * j + 2] = REDUCE(a##j##2);                                                                         \
    sums[4 * j + 3] = REDUCE(a##j##3);
#define VNNI_ACCUMULATORS(j) ACCUMULATORS(j, __m512i, _mm512_setzero_si512)
#define VNNI_SUMS(j) SUMS(j, _mm512_reduce_add_epi32)

VNNI static void tile1_vnni(const int8_t *const *codes, const void *const *units, int64_t K, int32_t *sums) {
    VNNI_ACCUMULATORS(0)
    VNNI_TILE_BEGIN
        VNNI_CODES_ROW(0)
    }
    VNNI_SUMS(0)
}

VNNI static void tile4_vnni(const int8_t *const *codes, const void *const *units, int64_t K, int32_t *sums) {
    VNNI_ACCUMULATORS(0) VNNI_ACCUMULATORS(1) VNNI_ACCUMULATORS(2) VNNI_ACCUMULATORS(3)
    VNNI_TILE_BEGIN
        VNNI_CODES_ROW(0) VNNI_CODES_ROW(1) VNNI_CODES_ROW(2) VNNI_CODES_ROW(3)
    }
    VNNI_SUMS(0) VNNI_SUMS(1) VNNI_SUMS(2) VNNI_SUMS(3)
}

/* AVX2: 16 codes widened to int16, vpmaddwd with 16 int16 units (pairs of products summed into int32 lanes),
   added up in int32; 16 registers hold at most two rows of codes by four rows of units (three spill). A prefetch
   every step: with one per 64 codes GCC interleaved four steps and spilled their sums to the stack (16 rows, 2
   threads: 54 ms a MusicGen-small step's products against 39). The last step reads the codes through a
   zero-padded copy. */
#define AVX2_STEP(j, from)                                                                                     \
    {                                                                                                          \
        const __m256i c = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(from)));                     \
        a##j##0 = _mm256_add_epi32(a##j##0, _mm256_madd_epi16(c, _mm256_loadu_si256((const __m256i *)(x0 + k)))); \
        a##j##1 = _mm256_add_epi32(a##j##1, _mm256_madd_epi16(c, _mm256_loadu_si256((const __m256i *)(x1 + k)))); \
        a##j##2 = _mm256_add_epi32(a##j##2, _mm256_madd_epi16(c, _mm256_loadu_si256((const __m256i *)(x2 + k)))); \
        a##j##3 = _mm256_add_epi32(a##j##3, _mm256_madd_epi16(c, _mm256_loadu_si256((const __m256i *)(x3 + k)))); \
    }
#define AVX2_ACCUMULATORS(j) ACCUMULATORS(j, __m256i, _mm256_setzero_si256)
#define AVX2_SUMS(j) SUMS(j, sum8i)
#define AVX2_TILE(NAME, ROWS, EACH_ROW)                                                                        \
AVX2 static void NAME(const int8_t *const *codes, const void *const *units, int64_t K, int32_t *sums) {       \
    const int16_t *x0 = units[0], *x1 = units[1], *x2 = units[2], *x3 = units[3];                              \
    EACH_ROW(AVX2_ACCUMULATORS)                                                                                \
    int64_t k = 0;                                                                                             \
    for (; k + 16 <= K; k += 16) { EACH_ROW(AVX2_PREFETCH) EACH_ROW(AVX2_FROM_CODES) }                         \
    if (k < K) {                                                                                               \
        int8_t tail[ROWS][16] = {{0}};                                                                         \
        EACH_ROW(AVX2_COPY_TAIL)                                                                               \
        EACH_ROW(AVX2_FROM_TAIL)                                                                               \
    }                                                                                                          \
    EACH_ROW(AVX2_SUMS)                                                                                        \
}
#define AVX2_PREFETCH(j) _mm_prefetch((const char *)(w##j + k + PREFETCH_BYTES), _MM_HINT_T0);
#define AVX2_FROM_CODES(j) AVX2_STEP(j, w##j + k)
#define AVX2_COPY_TAIL(j) memcpy(tail[j], w##j + k, K - k);
#define AVX2_FROM_TAIL(j) AVX2_STEP(j, tail[j])
#define ONE_ROW(DO) DO(0)
#define TWO_ROWS(DO) DO(0) DO(1)

AVX2 static inline int32_t sum8i(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}

AVX2_TILE(tile1_avx2, 1, ONE_ROW)
AVX2_TILE(tile2_avx2, 2, TWO_ROWS)

/* How a variant quantises the rows and which tiles it runs. */
struct plan {
    int64_t unit_bytes, pad;  /* bytes per unit; the units' rows padded to a multiple of pad */
    tile_fn few, many;        /* the tiles for up to FEW_ROWS rows and for more */
    int64_t few_codes, many_codes;  /* their rows of codes */
    int32_t offset;           /* subtracted from a sum per unit of the row's sum of units */
};

static const struct plan PLAN_VNNI = {1, 64, tile1_vnni, tile4_vnni, 1, 4, 128};
static const struct plan PLAN_AVX2 = {2, 16, tile1_avx2, tile2_avx2, 1, 2, 0};

/* y [M, N] = (units [M, K] . codes [N, K]^T, exact in int32) * step [M] * scale [N] + bias [N] (bias may be
   NULL); x, codes, scale, bias, y contiguous. Returns 0, or -1 when the units' memory cannot be allocated. */
static int dynamic(const struct plan *p, const float *x, int64_t M, int64_t K, const int8_t *codes, int64_t N,
                   const float *scale, const float *bias, float *y) {
    const int64_t padded = (K + p->pad - 1) / p->pad * p->pad, row_bytes = padded * p->unit_bytes;
    /* a multiple of 64 bytes, and at least 64 (K = 0: aligned_alloc of 0 bytes may return NULL) */
    char *units = aligned_alloc(64, M * row_bytes > 0 ? (M * row_bytes + 63) / 64 * 64 : 64);
    float *steps = malloc(M * sizeof(float));
    int32_t *unit_sums = malloc(M * sizeof(int32_t));
    if (!units || !steps || !unit_sums) {
        free(units); free(steps); free(unit_sums);
        return -1;
    }
    const tile_fn tile = M <= FEW_ROWS ? p->few : p->many;
    const int64_t tile_codes = M <= FEW_ROWS ? p->few_codes : p->many_codes;
    #pragma omp parallel if (M * N * K >= (1 << 16))
    {
        #pragma omp for schedule(static)
        for (int64_t m = 0; m < M; ++m)
            unit_sums[m] = quantize_row(x + m * K, K, padded, p->unit_bytes, units + m * row_bytes, steps + m);
        #pragma omp for schedule(static)
        for (int64_t n0 = 0; n0 < N; n0 += tile_codes) {
            const int8_t *rows_of_codes[4];
            int64_t ns[4];
            for (int64_t j = 0; j < tile_codes; ++j) {  /* past N: the last row again (its sums written twice) */
                ns[j] = n0 + j < N ? n0 + j : N - 1;
                rows_of_codes[j] = codes + ns[j] * K;
            }
            for (int64_t m0 = 0; m0 < M; m0 += ROWS_PER_TILE) {
                const void *rows_of_units[ROWS_PER_TILE];
                int64_t ms[ROWS_PER_TILE];
                for (int i = 0; i < ROWS_PER_TILE; ++i) {  /* past M: likewise */
                    ms[i] = m0 + i < M ? m0 + i : M - 1;
                    rows_of_units[i] = units + ms[i] * row_bytes;
                }
                int32_t sums[4 * ROWS_PER_TILE];
                tile(rows_of_codes, rows_of_units, K, sums);
                for (int64_t j = 0; j < tile_codes; ++j)
                    for (int i = 0; i < ROWS_PER_TILE; ++i) {
                        const int64_t m = ms[i], n = ns[j];
                        const float v = (float)(sums[j * ROWS_PER_TILE + i] - p->offset * unit_sums[m]) * steps[m]
                                        * scale[n];
                        y[m * N + n] = bias ? v + bias[n] : v;
                    }
            }
        }
    }
    free(units); free(steps); free(unit_sums);
    return 0;
}

int mmdgen_int8_dynamic_vnni(const float *x, int64_t M, int64_t K, const int8_t *codes, int64_t N,
                             const float *scale, const float *bias, float *y) {
    return dynamic(&PLAN_VNNI, x, M, K, codes, N, scale, bias, y);
}

int mmdgen_int8_dynamic_avx2(const float *x, int64_t M, int64_t K, const int8_t *codes, int64_t N,
                             const float *scale, const float *bias, float *y) {
    return dynamic(&PLAN_AVX2, x, M, K, codes, N, scale, bias, y);
}
"""

FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC")
CACHE_ENV = "MMDGEN_KERNEL_CACHE"
VARIANTS = {"AVX512": "avx512", "AVX2": "avx2"}  # torch's CPU capability -> the C function's suffix
DYNAMIC_VARIANTS = ("vnni", "avx2")  # the dynamic product's loops: AVX-512 VNNI, AVX2
DYNAMIC_MAX_K = (2**31 - 1) // (255 * 127)  # the VNNI sums of flipped codes (c + 128) times units stay in int32


def _cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/mmdgen/kernels").expanduser()


def _compiler_identity(compiler: str) -> str:
    """The compiler's first line of ``--version`` (part of the library's name: a new compiler builds anew)."""
    done = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60)
    lines = (done.stdout or done.stderr).splitlines()
    return lines[0] if lines else compiler


def _build(compiler: str, again: bool = False) -> Path:
    """The library, compiled now unless the cache holds it (``again``: compiled anyway, replacing it). Raises
    RuntimeError naming the compiler and its first error line when compiling fails, OSError when the cache cannot
    be written."""
    identity = "\n".join((SOURCE, _compiler_identity(compiler), " ".join(FLAGS)))
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    cache = _cache_dir()
    for folder in (cache, *cache.parents):  # the first that exists must be a folder
        if folder.exists():
            if not folder.is_dir():
                raise RuntimeError(f"the kernel cache {cache} ({CACHE_ENV}): {folder} is a file; expected a folder")
            break
    library = cache / f"int8_gemv-{digest}.so"
    if library.is_file() and not again:
        return library
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as work:
        source = Path(work) / "int8_gemv.c"
        source.write_text(SOURCE)
        built = Path(work) / library.name
        done = subprocess.run([compiler, *FLAGS, str(source), "-o", str(built)], capture_output=True, text=True,
                              timeout=300)
        if done.returncode != 0:
            errors = [line for line in done.stderr.splitlines() if "error" in line] or done.stderr.splitlines()
            raise RuntimeError(f"{compiler} could not compile the int8 CPU loop (exit {done.returncode}): "
                               f"{errors[0] if errors else 'no message'}")
        os.replace(built, library)  # atomic: a concurrent build's library is the same bytes
    return library


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str | None]:
    """(the loaded library, None) or (None, why it cannot be built or loaded). Once per process."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None, f"the C loop is written for x86 CPUs, this is {platform.machine()}"
    chosen = os.environ.get("CC") or "cc"
    compiler = shutil.which(chosen)
    if compiler is None:
        reason = f"no C compiler found ({chosen}; set CC)"
        if os.environ.get("CC"):  # a compiler asked for by name and not there is worth saying
            warnings.warn(f"CC={chosen!r} is not a program on PATH; int8 products take the slower paths", stacklevel=4)
        return None, reason
    try:
        try:
            return ctypes.CDLL(str(_build(compiler))), None
        except OSError:  # a damaged library in the cache (copied, cut short) is built again, once
            return ctypes.CDLL(str(_build(compiler, again=True))), None
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        reason = f"building the int8 CPU loop failed: {error}"
        warnings.warn(f"{reason}; int8 products take the slower paths (mmdgen.kernels.int8_linear)", stacklevel=4)
        return None, reason


def variant_function(library: ctypes.CDLL, variant: str, product: str = "gemv"):
    """The C function of ``product`` (``"gemv"``, weight-only, variants ``VARIANTS``; ``"dynamic"``, variants
    ``DYNAMIC_VARIANTS``) in ``variant``, with its argument types. The dynamic one returns 0, or -1 when its
    scratch memory cannot be allocated."""
    function = getattr(library, f"mmdgen_int8_{product}_{variant}")
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    function.argtypes = [pointer, size, size, pointer, size, pointer, pointer, pointer]
    function.restype = ctypes.c_int if product == "dynamic" else None
    return function


@functools.cache
def _load() -> tuple[dict | None, dict | None, str | None]:
    """({product: C function}, {product: variant}, None) or (None, None, why not), for torch's CPU capability:
    AVX-512 runs the dynamic product with VNNI where the CPU has it, else its AVX2 loop."""
    capability = torch.backends.cpu.get_cpu_capability()
    variant = VARIANTS.get(capability)
    if variant is None:
        return None, None, f"torch's CPU capability is {capability}; the C loop needs AVX2 or AVX-512"
    library, reason = _library()
    if library is None:
        return None, None, reason
    dynamic = "vnni" if variant == "avx512" and library.mmdgen_cpu_has_avx512_vnni() else "avx2"
    variants = {"gemv": variant, "dynamic": dynamic}
    return {product: variant_function(library, name, product) for product, name in variants.items()}, variants, None


def kernel_variant(product: str = "gemv") -> str | None:
    """The loop of ``product`` this process runs (built now if needed): ``"avx512"`` or ``"avx2"`` (weight-only),
    ``"vnni"`` or ``"avx2"`` (dynamic); None when it cannot."""
    if product not in OPS:
        raise ValueError(f"kernel_variant: unknown product {product!r}; expected one of {', '.join(OPS)}")
    variants = _load()[1]
    return None if variants is None else variants[product]


def unavailable_reason() -> str | None:
    """Why the C loops cannot run here, or None when they can."""
    return _load()[2]


@torch.compiler.assume_constant_result
def kernel_ready() -> bool:
    """Whether ``int8_gemv`` and ``int8_gemv_dynamic`` run here. Under ``torch.compile`` the answer is found (and
    the library built) while the graph is traced, and kept as a constant of the graph."""
    return _load()[0] is not None


# Plain library definitions, not ``torch.library.custom_op``: its Python wrapper costs a few microseconds a
# call, and a decode step makes ~200 of these
_LIBRARY = torch.library.Library("mmdgen", "FRAGMENT")
_LIBRARY.define("int8_gemv(Tensor x, Tensor qweight, Tensor scale, Tensor? bias) -> Tensor")
_LIBRARY.define("int8_gemv_dynamic(Tensor x, Tensor qweight, Tensor scale, Tensor? bias) -> Tensor")


def _run(product: str, x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
         bias: torch.Tensor | None) -> torch.Tensor:
    functions = _load()[0]
    if functions is None:
        raise RuntimeError(f"mmdgen::{OPS[product]} cannot run: {unavailable_reason()}")
    # the C loop reads raw memory: a tensor of another dtype or size would be read past its end
    out_features = qweight.shape[0] if qweight.dim() == 2 else -1
    if not (x.dtype == scale.dtype == torch.float32 and qweight.dtype == torch.int8 and x.dim() == 2
            and out_features >= 0 and x.shape[1] == qweight.shape[1] and scale.shape == (out_features,)
            and (bias is None or (bias.dtype == torch.float32 and bias.shape == (out_features,)))):
        raise ValueError(f"mmdgen::{OPS[product]}: expected x [M, K] float32, qweight [N, K] int8, scale and bias "
                         f"[N] float32; got x {x.dtype} {tuple(x.shape)}, qweight {qweight.dtype} "
                         f"{tuple(qweight.shape)}, scale {scale.dtype} {tuple(scale.shape)}, bias "
                         f"{'None' if bias is None else f'{bias.dtype} {tuple(bias.shape)}'}")
    if product == "dynamic" and x.shape[1] > DYNAMIC_MAX_K:
        raise ValueError(f"mmdgen::{OPS[product]}: K={x.shape[1]} input features overflow its int32 sums; "
                         f"expected K <= {DYNAMIC_MAX_K}")
    x, qweight, scale = x.contiguous(), qweight.contiguous(), scale.contiguous()
    bias = None if bias is None else bias.contiguous()
    rows, in_features = x.shape
    out = x.new_empty(rows, qweight.shape[0])
    if rows and functions[product](x.data_ptr(), rows, in_features, qweight.data_ptr(), qweight.shape[0],
                                   scale.data_ptr(), None if bias is None else bias.data_ptr(), out.data_ptr()):
        raise MemoryError(f"mmdgen::{OPS[product]}: no memory for the int8 units of x {tuple(x.shape)}")
    return out


OPS = {"gemv": "int8_gemv", "dynamic": "int8_gemv_dynamic"}
for _product, _op in OPS.items():
    _LIBRARY.impl(_op, functools.partial(_run, _product), "CPU")
    torch.library.register_fake(f"mmdgen::{_op}", lib=_LIBRARY)(
        lambda x, qweight, scale, bias: x.new_empty(x.shape[0], qweight.shape[0]))


def int8_gemv(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` ``[M, K]`` fp32 times the int8 codes ``[N, K]`` scaled by ``scale`` ``[N]`` fp32, plus ``bias``
    ``[N]`` fp32: ``[M, N]`` fp32, on CPU where ``kernel_ready()``. Other dtypes or sizes: ValueError."""
    return torch.ops.mmdgen.int8_gemv(x, qweight, scale, bias)


def int8_gemv_dynamic(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """As ``int8_gemv``, with each row of ``x`` first rounded to int8 units of its own step (``max |x| / 127``)
    and the products summed exactly in int32: ``(units @ qweight.T) * step * scale + bias``. K up to
    ``DYNAMIC_MAX_K``; a row holding NaN or inf gives NaN outputs."""
    return torch.ops.mmdgen.int8_gemv_dynamic(x, qweight, scale, bias)
