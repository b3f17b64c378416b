"""Linear layers over int8 weights: ``y = (x @ qweight.T) * scale + bias`` for the decode loop.

Why: a decode step multiplies a few rows (batch 1 with guidance: 2; batch jobs: up to 64) by every weight of
the LM once, so it is bound by the bytes of weight it reads; int8 weights read a quarter of fp32's.

Quantisation (``quantize_weight``): symmetric, one scale per output channel, ``scale[n] = max_k |w[n, k]| / 127``,
``qweight = round(w / scale)`` in [-127, 127]; the round trip ``qweight * scale`` is within ``scale / 2`` of the
(fp32-rounded) weight. Zero rows get the smallest normal fp32 scale (no division by zero; their codes are 0).

Shapes. ``x`` ``[..., K]``, ``qweight`` ``[N, K]`` int8, ``scale`` ``[N]`` float (applied in fp32; stored fp32 by
``quantize_weight``), ``bias`` ``[N]`` float or None. Output ``[..., N]`` in x's dtype.

Two modes (``MODES``), the same on CUDA, different on CPU: ``"int8"`` is weight-only (the result is that of the
dequantised weight, to fp32 accuracy); ``"int8-dynamic"`` also rounds each row of activations to int8 on the fly
on CPU, so that the products run on the CPU's int8 dot-product instructions (faster there at 16 rows and more,
less accurate).

- Triton (CUDA, or CPU through ``TRITON_INTERPRET=1``), both modes: program ``(n block, m block, split)`` walks
  its chunk of K in ``TRITON_BLOCK_K`` steps, loads a ``[TRITON_BLOCK_N, TRITON_BLOCK_K]`` tile of int8 codes,
  converts it to floats in registers and multiplies: up to ``TRITON_MAX_FMA_ROWS`` rows multiply and reduce in
  fp32 on the FMA units (a GEMV: one or two rows would fill 1/16 of a tensor-core tile, and the op is memory
  bound); more rows go through ``backend.dot`` in tiles of 16 to ``TRITON_MAX_BLOCK_M`` rows (the codes are
  converted to x's dtype, which holds every int8 value exactly; 3xTF32 for fp32 x), fp32 accumulation. K is
  split so that about ``TRITON_TARGET_PROGRAMS`` programs run (a GEMV at batch 1 still fills the GPU); with one
  split the program scales (and adds the bias) and writes the output, with several it writes fp32 partials
  ``[splits, M, N]`` that a second kernel sums, scales and writes. fp32, bf16 or fp16 x. (On sm90 the 64-row
  tiles feed wgmma, which reads its operand from shared memory: the converted tile passes through it, on chip.)
- PyTorch, ``"int8"`` on CPU, up to ``CPU_GEMV_MAX_ROWS`` rows (batch 1 or 2, with or without guidance), eagerly
  or inside ``torch.compile``: the C loop of ``int8_gemv_cpu`` (four fp32 accumulators per row over the codes
  converted to fp32, AVX-512 or AVX2, built at first use; one library op, kept whole in a compiled graph). The
  products of one MusicGen-small step at 2 rows, 2 threads (``bench/int8_step_products.py``, AMD EPYC Zen 5):
  10.1 ms (10.9 in one compiled graph) against 13.3 ms for inductor's loops and 13.5 ms for fbgemm; with AVX2
  code (``ATEN_CPU_CAPABILITY=avx2``) 12.2 ms against 153 ms for inductor's loops, which it leaves scalar there.
  Where it cannot run (``int8_gemv_cpu.unavailable_reason()``: no C compiler, no AVX2, not x86) the paths below
  serve.
- PyTorch, ``"int8"`` on CPU: an int8 x int8 matrix product (``torch._int_mm``, oneDNN) over activations
  written exactly enough in int8: each row of x is ``step * (x1 + x2 / 254 + x3 / 254^2)`` with
  ``step = row_max / 127`` and ``WEIGHT_ONLY_LEVELS = 3`` int8 levels ``x1, x2, x3`` (each level quantises the
  rounding residual of the levels before it), within ``row_max / 254^3 = 6.1e-8 * row_max`` of x, about the
  rounding error of an fp32 product. The ``3 M`` level rows go through one product (exact in int32), the
  levels are summed in fp32 and scaled. Why: of the library products the fastest weight-only path measured on
  CPU for 1 to 32 rows (``bench/int8_linear.py``): converting the codes to floats, by blocks so that the weight
  never exists in full or through ``torch.compile``, costs more, and ``torch.ops.aten._weight_int8pack_mm`` and
  torchao's int8 weight-only layers are slower still. K up to ``TORCH_MAX_K`` (the int32 accumulator).
- PyTorch, ``"int8"`` on CPU inside ``torch.compile`` without the C loop, up to ``TRACED_GEMV_MAX_ROWS`` rows:
  each row times the codes converted to fp32, summed over K, scaled, written as tensor ops that inductor turns
  into one vectorised C++ loop over the codes (the rows' sums share it, so the codes are read once), fused with
  its neighbours: no library call. x is stored first (``backend.stored``) so that its producer is not
  recomputed per output channel. The products of one MusicGen-small step, 2 rows, 2 threads, AVX-512 code:
  11.2 ms against 13.4-13.6 ms for fbgemm's dynamic int8 (less accurate) and 18.8-19.0 ms for ``torch._int_mm``
  (each layer on its own input; chained as in the decoder, 13.3 ms against fbgemm's 13.5). Each row's sum
  is one chain of dependent vector adds (about half the speed of memory), so with more rows the loop does not
  speed up per row: at 4 rows the same products took 16.3 ms against fbgemm's 11.3 ms, at 16 rows 75 ms against
  17.3 ms; more rows take the path above.
- PyTorch, ``"int8-dynamic"`` on CPU: each row of x rounded to int8 units of its own step (``step = max |x_row|
  / 127``, ties to even, so each activation is within ``step / 2`` of its value), the units times the codes summed
  exactly in int32, then ``* step * scale + bias``. A row's result does not depend on the other rows. Through the
  C loop of ``int8_gemv_cpu`` (``mmdgen::int8_gemv_dynamic``: AVX-512 VNNI, 64 int8 products an instruction, or
  AVX2) for any number of rows, eager or compiled, K up to ``int8_gemv_cpu.DYNAMIC_MAX_K``; elsewhere through
  ``torch._int_mm`` (``DYNAMIC_LEVELS = 1`` level of the path above), with the same results. Why not fbgemm's
  dynamic linear (what ``torch.ao``'s dynamic quantisation runs, and this mode's first version): it rounds the
  whole tensor to 7 bits (a step twice as coarse at best, and one row's outlier coarsens every other row), keeps
  a packed copy of the codes, and was slower (``bench/int8_step_products.py``).
- PyTorch, float64 x (a reference) or tensors off the CPU (a fallback: ``torch._int_mm`` on CUDA needs more
  than 16 rows, and Triton is the CUDA path), both modes: a float product with the dequantised weight, which
  materialises that weight in x's dtype.

Memory: reads the codes once per M block (Triton) or once (PyTorch; the C loop reads them again from L1 for each
pair of rows), ``N * K`` bytes, plus x and the output;
no dequantised weight is ever stored (except by the float64 and off-CPU fallback). Extra memory: Triton, the
partials ``splits * M * N`` fp32 when K is split; PyTorch ``"int8"``, the ``3 M K`` int8 levels and a
``3 M N`` int32 product; ``"int8-dynamic"``, the rows' units (``M K`` bytes, int16 on AVX2). No gradient
(inference only): int8 weights are not trained.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmdgen.kernels import int8_gemv_cpu
from mmdgen.kernels.backend import TRITON_IMPORT_ERROR, dot_precision, resolve_backend, stored, traced_on_cpu

MODES = ("int8", "int8-dynamic")
WEIGHT_ONLY_LEVELS = 3  # int8 levels per activation row of the weight-only CPU path
DYNAMIC_LEVELS = 1  # the dynamic mode: one int8 level per row (the C loop's own rounding)
TORCH_MAX_K = (2**31 - 1) // (127 * 127)  # products summed in int32 without overflow
CPU_GEMV_MAX_ROWS = 4  # rows of the weight-only CPU path that take the C loop (int8_gemv_cpu), eager or compiled
TRACED_GEMV_MAX_ROWS = 2  # rows of the compiled weight-only CPU path without the C loop (4: slower than fbgemm)
TRITON_BLOCK_N = 64  # output channels per program
TRITON_BLOCK_K = 64  # input features per step of the K loop
TRITON_MAX_FMA_ROWS = 2  # rows multiplied on FMA units; more go through tensor-core tiles
TRITON_MAX_BLOCK_M = 64  # rows per tensor-core tile (more rows: several M blocks)
TRITON_TARGET_PROGRAMS = 512  # programs to aim for when splitting K: a few waves over 108-132 SMs
TRITON_COMBINE_BLOCK = 1024  # outputs per program of the split-sum kernel
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------
# Quantisation
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` ``[N, K]`` float -> (``qweight`` ``[N, K]`` int8, ``scale`` ``[N]`` fp32), symmetric per output
    channel: ``qweight * scale[:, None]`` is within ``scale / 2`` of ``weight`` rounded to fp32."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"quantize_weight: weight must be a float tensor [N, K], got {_describe(weight)}")
    weight = weight.float()
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"quantize_weight: weight {tuple(weight.shape)} holds NaN or infinite values; expected "
                         "finite weights")
    # zero (or denormal) rows get the smallest normal scale: no division by zero, and their codes stay 0
    scale = (weight.abs().amax(dim=1) / 127.0).clamp_min(torch.finfo(torch.float32).tiny)
    qweight = torch.round(weight / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return qweight, scale


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} {tuple(t.shape)}"
    return type(t).__name__


def _is_channel_vector(t, out_features: int) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.shape == (out_features,)


def _check(x, qweight, scale, bias, mode) -> None:
    if mode not in MODES:
        raise ValueError(f"int8_linear: unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    if not isinstance(qweight, torch.Tensor) or qweight.dtype != torch.int8 or qweight.dim() != 2:
        raise ValueError(f"int8_linear: qweight must be an int8 tensor [N, K], got {_describe(qweight)}")
    out_features, in_features = qweight.shape
    if in_features == 0:
        raise ValueError(f"int8_linear: qweight {tuple(qweight.shape)} has no input features; expected K >= 1")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise ValueError(f"int8_linear: x must be a float tensor [..., K], got {_describe(x)}")
    if x.shape[-1] != in_features:
        raise ValueError(f"int8_linear: x {tuple(x.shape)} does not fit qweight {tuple(qweight.shape)}: expected "
                         f"x [..., {in_features}]")
    for name, t in (("scale", scale), ("bias", bias)):
        if (name == "scale" or t is not None) and not _is_channel_vector(t, out_features):
            raise ValueError(f"int8_linear: {name} must be a float tensor [N] = [{out_features}], got {_describe(t)}")
    for name, t in (("qweight", qweight), ("scale", scale), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"int8_linear: {name} is on {t.device} but x on {x.device}")


# ----------------------------------------------------------------------------------------------
# PyTorch path
# ----------------------------------------------------------------------------------------------


def _split_rows(x: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] fp32 -> (int8 levels [levels * M, K], row step [M, 1]) with
    x ~ step * (x1 + x2 / 254 + x3 / 254^2 + ...), within row_max / 254^levels."""
    # a zero row keeps a finite step (its levels are 0); NaN or inf in a row make its step, and so its output, so
    row_max = torch.linalg.vector_norm(x, float("inf"), dim=1, keepdim=True).clamp_min_(torch.finfo(torch.float32).tiny)
    step = row_max / 127.0
    units = x / step  # in [-127, 127]
    parts = []
    for level in range(levels):
        part = units.round()
        parts.append(part)
        if level + 1 < levels:
            units = (units - part).mul_(254.0)  # the residual, in [-0.5, 0.5], stretched to [-127, 127]
    return torch.cat(parts).to(torch.int8), step


def _torch_int8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, levels: int) -> torch.Tensor:
    """Weight-only on CPU: [M, K] float -> [M, N] fp32, without the bias."""
    if x.shape[1] > TORCH_MAX_K:
        raise ValueError(f"int8_linear: K={x.shape[1]} input features overflow the int32 accumulator of the "
                         f"PyTorch path; expected K <= {TORCH_MAX_K}")
    rows = x.shape[0]
    parts, step = _split_rows(x.float(), levels)
    # torch 2.14's CPU _int_mm returns wrong sums when K = 1 (any M, N > 1): an int32 product serves there
    products = torch._int_mm(parts, qweight.T) if x.shape[1] > 1 else parts.int() @ qweight.int().T
    products = products.view(levels, rows, qweight.shape[0]).float()
    total = products[0]
    for level in range(1, levels):
        total = total.add_(products[level], alpha=254.0 ** -level)
    return total * step * scale.float()


def _dequantised_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float64 reference and the off-CPU fallback: [M, K] -> [M, N] (fp64 for fp64 x, else fp32)."""
    out_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return F.linear(x, qweight.to(x.dtype)).to(out_dtype) * scale.to(out_dtype)


def _traced_gemv(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Weight-only inside a ``torch.compile`` graph, for up to ``TRACED_GEMV_MAX_ROWS`` rows: [M, K] -> [M, N]
    fp32. One reduction over K per row, each row times the codes converted to fp32; inductor fuses the rows'
    reductions into one vectorised pass over the codes, so they are read once. Each row's sum is one chain of
    dependent vector adds, which bounds the loop (about half the copy bandwidth on a Zen 5 core pair)."""
    x, codes = stored(x.float()), qweight.float()
    return torch.stack([(row * codes).sum(-1) for row in x.unbind(0)]) * scale.float()


def _c_loop(x: torch.Tensor, mode: str):
    """The C loop of ``int8_gemv_cpu`` that serves ``x`` [M, K] (CPU, float) in ``mode``, or None: weight-only for
    1 to ``CPU_GEMV_MAX_ROWS`` rows, dynamic for any rows up to its K."""
    if not int8_gemv_cpu.kernel_ready():
        return None
    if mode == "int8":
        return int8_gemv_cpu.int8_gemv if 0 < x.shape[0] <= CPU_GEMV_MAX_ROWS else None
    return int8_gemv_cpu.int8_gemv_dynamic if x.shape[1] <= int8_gemv_cpu.DYNAMIC_MAX_K else None


def _torch_path(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                mode: str) -> torch.Tensor:
    if x.dtype == torch.float64 or x.device.type != "cpu":
        out = _dequantised_linear(x, qweight, scale)
    elif (loop := _c_loop(x, mode)) is not None:
        float_bias = None if bias is None else bias.float()
        return loop(x.float(), qweight, scale.float(), float_bias).to(x.dtype)
    elif mode == "int8" and 0 < x.shape[0] <= TRACED_GEMV_MAX_ROWS and traced_on_cpu(x):
        out = _traced_gemv(x, qweight, scale)
    else:
        out = _torch_int8_linear(x, qweight, scale, WEIGHT_ONLY_LEVELS if mode == "int8" else DYNAMIC_LEVELS)
    if bias is not None:
        out = out + bias
    return out.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Triton path
# ----------------------------------------------------------------------------------------------


def split_plan(in_features: int, tiles: int) -> tuple[int, int]:
    """(chunk, splits): K cut into ``splits`` chunks of ``chunk`` features (a multiple of ``TRITON_BLOCK_K``) so
    that ``tiles * splits`` reaches about ``TRITON_TARGET_PROGRAMS``."""
    k_blocks = -(-in_features // TRITON_BLOCK_K)
    wanted = min(k_blocks, max(1, -(-TRITON_TARGET_PROGRAMS // max(tiles, 1))))
    chunk = -(-k_blocks // wanted) * TRITON_BLOCK_K
    return chunk, -(-in_features // chunk)


if TRITON_IMPORT_ERROR is None:
    import triton
    import triton.language as tl

    from mmdgen.kernels.backend import dot

    @triton.jit
    def _scaled(acc, scale_ptr, bias_ptr, cols, col_ok, HAS_BIAS: tl.constexpr):
        """acc [.., BLOCK_N] fp32 times the channels' scales, plus their bias."""
        out = acc * tl.load(scale_ptr + cols, mask=col_ok, other=0.0)
        if HAS_BIAS:
            out = out + tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        return out

    @triton.jit
    def _codes_for_dot(codes, x, PRECISION: tl.constexpr):
        """The int8 codes in x's dtype (exact for fp32, bf16 and fp16). Under the interpreter's "upcast" dot the
        operands go to fp32 anyway, and its int8 -> bf16 conversion gives NaN (triton 3.8): convert to fp32."""
        if PRECISION == "upcast":
            return codes.to(tl.float32)
        return codes.to(x.dtype)

    @triton.jit
    def _int8_matmul_kernel(x_ptr, q_ptr, scale_ptr, bias_ptr, out_ptr, rows_total, out_features, in_features,
                            chunk, stride_xm, stride_xk, stride_qn, stride_qk, HAS_BIAS: tl.constexpr,
                            PARTIAL: tl.constexpr, USE_DOT: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
        """One [BLOCK_M, BLOCK_N] output tile over one chunk of K: with PARTIAL the fp32 sum goes to the split's
        slice of the partials [splits, M, N], else it is scaled (plus the bias) and written in out's dtype."""
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        split = tl.program_id(2)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < rows_total
        col_ok = cols < out_features
        start = split * chunk
        end = tl.minimum(start + chunk, in_features)
        x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
        q_rows = q_ptr + cols.to(tl.int64)[:, None] * stride_qn
        if USE_DOT:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        else:  # products summed over K per lane, reduced across lanes once at the end
            acc_k = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(start, end, BLOCK_K):
            feats = k0 + tl.arange(0, BLOCK_K)
            k_ok = feats < end
            x = tl.load(x_rows + feats[None, :] * stride_xk, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            codes = tl.load(q_rows + feats[None, :] * stride_qk, mask=col_ok[:, None] & k_ok[None, :], other=0)
            if USE_DOT:
                acc = dot(x, tl.trans(_codes_for_dot(codes, x, PRECISION)), acc, PRECISION)
            else:
                acc_k += x.to(tl.float32)[:, None, :] * codes.to(tl.float32)[None, :, :]
        if not USE_DOT:
            acc = tl.sum(acc_k, axis=2)
        ok = row_ok[:, None] & col_ok[None, :]
        offsets = rows.to(tl.int64)[:, None] * out_features + cols[None, :]
        if PARTIAL:
            tl.store(out_ptr + split.to(tl.int64) * rows_total * out_features + offsets, acc, mask=ok)
        else:
            out = _scaled(acc, scale_ptr, bias_ptr, cols[None, :], col_ok[None, :], HAS_BIAS)
            tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _int8_combine_kernel(partial_ptr, scale_ptr, bias_ptr, out_ptr, outputs, out_features, splits,
                             HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
        """out = (sum of the splits' partials) * scale + bias over BLOCK outputs of the [M, N] result."""
        index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = index < outputs
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for split in range(0, splits):
            acc += tl.load(partial_ptr + split * outputs + index, mask=ok, other=0.0)
        out = _scaled(acc, scale_ptr, bias_ptr, index % out_features, ok, HAS_BIAS)
        tl.store(out_ptr + index, out.to(out_ptr.dtype.element_ty), mask=ok)


def _triton_int8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                        bias: torch.Tensor | None) -> torch.Tensor:
    if x.dtype not in _TRITON_DTYPES:
        raise ValueError(f"int8_linear: the triton kernel takes x in float32, bfloat16 or float16, got {x.dtype}")
    rows, in_features = x.shape
    out_features = qweight.shape[0]
    out = torch.empty(rows, out_features, dtype=x.dtype, device=x.device)
    if rows == 0:
        return out
    use_dot = rows > TRITON_MAX_FMA_ROWS
    block_m = min(max(16, triton.next_power_of_2(rows)), TRITON_MAX_BLOCK_M) if use_dot else \
        triton.next_power_of_2(rows)
    m_blocks, n_blocks = -(-rows // block_m), -(-out_features // TRITON_BLOCK_N)
    chunk, splits = split_plan(in_features, m_blocks * n_blocks)
    scale = scale.float()
    target = out if splits == 1 else torch.empty(splits, rows, out_features, dtype=torch.float32, device=x.device)
    _int8_matmul_kernel[(n_blocks, m_blocks, splits)](
        x, qweight, scale, bias, target, rows, out_features, in_features, chunk, *x.stride(), *qweight.stride(),
        HAS_BIAS=bias is not None, PARTIAL=splits > 1, USE_DOT=use_dot, BLOCK_M=block_m, BLOCK_N=TRITON_BLOCK_N,
        BLOCK_K=TRITON_BLOCK_K, PRECISION=dot_precision(x.dtype))
    if splits > 1:
        outputs = rows * out_features
        _int8_combine_kernel[(triton.cdiv(outputs, TRITON_COMBINE_BLOCK),)](
            target, scale, bias, out, outputs, out_features, splits, HAS_BIAS=bias is not None,
            BLOCK=TRITON_COMBINE_BLOCK)
    return out


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                backend: str = "auto", *, mode: str = "int8") -> torch.Tensor:
    """``(x @ qweight.T) * scale + bias`` for ``x`` ``[..., K]``, ``qweight`` ``[N, K]`` int8, ``scale`` ``[N]``,
    ``bias`` ``[N]`` or None; returns ``[..., N]`` in x's dtype. Inference only: no gradient.

    ``mode``: ``"int8"`` (weight-only: the result of the dequantised weight, to fp32 accuracy) or
    ``"int8-dynamic"`` (on CPU each row of x is rounded to int8 as well, to its own step ``max |x_row| / 127``:
    faster at many rows, less accurate; the Triton path is the same in both modes). ``backend``: ``"auto"`` (Triton
    on CUDA, PyTorch otherwise; env ``MMDGEN_BACKEND``; float64 x goes to PyTorch), ``"triton"``, ``"torch"``.
    """
    _check(x, qweight, scale, bias, mode)
    chosen = resolve_backend(backend, x.device)
    if chosen == "triton" and x.dtype == torch.float64 and backend == "auto":
        chosen = "torch"
    flat = x.reshape(-1, x.shape[-1])
    if chosen == "triton":
        out = _triton_int8_linear(flat, qweight, scale, bias)
    else:
        out = _torch_path(flat, qweight, scale, bias, mode)
    return out.view(*x.shape[:-1], qweight.shape[0])
