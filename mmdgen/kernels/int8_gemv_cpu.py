"""The weight-only int8 product of a few rows on x86 CPUs: a C loop with four accumulators per row, built at first use.

``y[m, n] = scale[n] * sum_k x[m, k] * qweight[n, k] + bias[n]``. Shapes: ``x`` ``[M, K]`` fp32, ``qweight``
``[N, K]`` int8, ``scale`` ``[N]`` fp32, ``bias`` ``[N]`` fp32 or None; output ``[M, N]`` fp32 (to fp32
accuracy: the codes are converted to fp32 exactly and multiplied by x in fp32 fused multiply-adds).

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

Build: the C source below, compiled with the system's C compiler (``$CC``, else ``cc``; ``-O3 -fopenmp``)
into ``$MMDGEN_KERNEL_CACHE`` (default ``~/.cache/mmdgen/kernels``) under a name that hashes the source, the
compiler's version and the flags; written to a temporary file and renamed, so a concurrent or interrupted build
never leaves half a library. Loaded with ctypes and registered as the library op ``mmdgen::int8_gemv`` (with a
fake kernel: ``torch.compile`` keeps it in its graph as one call). The variant follows torch's CPU capability
(``torch.backends.cpu.get_cpu_capability()``, which ``ATEN_CPU_CAPABILITY`` lowers): AVX-512 or AVX2; anything
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
#include <immintrin.h>
#include <stdint.h>

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
"""

FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC")
CACHE_ENV = "MMDGEN_KERNEL_CACHE"
VARIANTS = {"AVX512": "avx512", "AVX2": "avx2"}  # torch's CPU capability -> the C function's suffix


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


def variant_function(library: ctypes.CDLL, variant: str):
    """The C function of ``variant`` (a value of ``VARIANTS``) with its argument types."""
    function = getattr(library, f"mmdgen_int8_gemv_{variant}")
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    function.argtypes = [pointer, size, size, pointer, size, pointer, pointer, pointer]
    function.restype = None
    return function


@functools.cache
def _load() -> tuple[object | None, str | None, str | None]:
    """(the C function, its variant, None) or (None, None, why not), for torch's CPU capability."""
    capability = torch.backends.cpu.get_cpu_capability()
    variant = VARIANTS.get(capability)
    if variant is None:
        return None, None, f"torch's CPU capability is {capability}; the C loop needs AVX2 or AVX-512"
    library, reason = _library()
    if library is None:
        return None, None, reason
    return variant_function(library, variant), variant, None


def kernel_variant() -> str | None:
    """``"avx512"`` or ``"avx2"``: the loop this process runs (built now if needed), or None when it cannot."""
    return _load()[1]


def unavailable_reason() -> str | None:
    """Why the C loop cannot run here, or None when it can."""
    return _load()[2]


@torch.compiler.assume_constant_result
def kernel_ready() -> bool:
    """Whether ``int8_gemv`` runs here. Under ``torch.compile`` the answer is found (and the library built) while
    the graph is traced, and kept as a constant of the graph."""
    return _load()[0] is not None


# A plain library definition, not ``torch.library.custom_op``: its Python wrapper costs a few microseconds a
# call, and a decode step makes ~200 of these (see int8_linear's ``mmdgen::int8_dynamic_linear``)
_LIBRARY = torch.library.Library("mmdgen", "FRAGMENT")
_LIBRARY.define("int8_gemv(Tensor x, Tensor qweight, Tensor scale, Tensor? bias) -> Tensor")


def _int8_gemv_cpu(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    function = _load()[0]
    if function is None:
        raise RuntimeError(f"mmdgen::int8_gemv cannot run: {unavailable_reason()}")
    # the C loop reads raw memory: a tensor of another dtype or size would be read past its end
    out_features = qweight.shape[0] if qweight.dim() == 2 else -1
    if not (x.dtype == scale.dtype == torch.float32 and qweight.dtype == torch.int8 and x.dim() == 2
            and out_features >= 0 and x.shape[1] == qweight.shape[1] and scale.shape == (out_features,)
            and (bias is None or (bias.dtype == torch.float32 and bias.shape == (out_features,)))):
        raise ValueError(f"mmdgen::int8_gemv: expected x [M, K] float32, qweight [N, K] int8, scale and bias [N] "
                         f"float32; got x {x.dtype} {tuple(x.shape)}, qweight {qweight.dtype} "
                         f"{tuple(qweight.shape)}, scale {scale.dtype} {tuple(scale.shape)}, bias "
                         f"{'None' if bias is None else f'{bias.dtype} {tuple(bias.shape)}'}")
    x, qweight, scale = x.contiguous(), qweight.contiguous(), scale.contiguous()
    bias = None if bias is None else bias.contiguous()
    rows, in_features = x.shape
    out = x.new_empty(rows, qweight.shape[0])
    if rows:
        function(x.data_ptr(), rows, in_features, qweight.data_ptr(), qweight.shape[0], scale.data_ptr(),
                 None if bias is None else bias.data_ptr(), out.data_ptr())
    return out


_LIBRARY.impl("int8_gemv", _int8_gemv_cpu, "CPU")


@torch.library.register_fake("mmdgen::int8_gemv", lib=_LIBRARY)
def _(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(x.shape[0], qweight.shape[0])


def int8_gemv(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` ``[M, K]`` fp32 times the int8 codes ``[N, K]`` scaled by ``scale`` ``[N]`` fp32, plus ``bias``
    ``[N]`` fp32: ``[M, N]`` fp32, on CPU where ``kernel_ready()``. Other dtypes or sizes: ValueError."""
    return torch.ops.mmdgen.int8_gemv(x, qweight, scale, bias)
