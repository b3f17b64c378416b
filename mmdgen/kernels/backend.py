"""Which implementation a fused op runs: the Triton kernels or the PyTorch path.

``backend="auto"`` picks Triton for CUDA tensors when triton imports, the PyTorch path otherwise.
The environment variable ``MMDGEN_BACKEND=triton|torch`` overrides ``"auto"``; an explicit
``backend=`` argument overrides both. Every public op chooses through ``choose_backend``, which also sends
what a kernel does not take (a dtype outside ``TRITON_DTYPES``, a size limit) to the PyTorch path under
"auto". Triton also runs on CPU tensors through its interpreter when
``TRITON_INTERPRET=1`` was set before triton was imported (that is how the tests exercise it).
"""

from __future__ import annotations

import os
from typing import get_args

import torch

from mmdgen.choices import Backend

BACKENDS = get_args(Backend)
ENV_VAR = "MMDGEN_BACKEND"
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what every Triton kernel here takes

try:
    import triton
    from triton import knobs as _triton_knobs

    TRITON_IMPORT_ERROR: str | None = None
    TRITON_INTERPRETED = bool(_triton_knobs.runtime.interpret)
except Exception as error:  # triton is absent on macOS/Windows/ARM wheels, or broken
    TRITON_IMPORT_ERROR = f"{type(error).__name__}: {error}"
    TRITON_INTERPRETED = False


def triton_unusable_reason(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on ``device``, or None when they can."""
    if TRITON_IMPORT_ERROR is not None:
        return f"triton does not import ({TRITON_IMPORT_ERROR})"
    if device.type == "cuda" and not TRITON_INTERPRETED:
        return None
    if device.type == "cpu" and TRITON_INTERPRETED:
        return None
    if TRITON_INTERPRETED:
        return f"the triton interpreter (TRITON_INTERPRET=1) runs on CPU tensors only, got a {device.type} tensor"
    return (
        f"the triton kernels need CUDA tensors, got a {device.type} tensor "
        "(set TRITON_INTERPRET=1 before importing mmdgen to run them on CPU through the interpreter)"
    )


def resolve_backend(backend: str, device: torch.device) -> str:
    """Return ``"triton"`` or ``"torch"`` for a tensor on ``device``; ValueError when impossible."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        forced = os.environ.get(ENV_VAR, "").strip().lower()
        if forced not in ("", "auto", "triton", "torch"):
            raise ValueError(f"{ENV_VAR}={forced!r} is not a backend; expected triton, torch or auto")
        backend = forced if forced in ("triton", "torch") else "auto"
    if backend == "torch":
        return "torch"
    reason = triton_unusable_reason(device)
    if backend == "triton":
        if reason is not None:
            raise ValueError(f"backend 'triton' was requested but cannot run: {reason}")
        return "triton"
    return "triton" if reason is None and device.type == "cuda" else "torch"


def choose_backend(backend: str, device: torch.device, dtype: torch.dtype, kernel: str, operand: str = "",
                   refusal: str | None = None) -> str:
    """The path a public op runs: ``resolve_backend``, then the PyTorch path for what its kernel does not take.

    ``kernel`` and ``operand`` name the op's kernel and the tensor whose dtype counts in messages ("the triton
    <kernel> takes float32, bfloat16 or float16 <operand>, got ..."). ``refusal``: why the kernel cannot take
    this input for another reason (a size limit), or None. Under "auto" (or the environment) a dtype outside
    ``TRITON_DTYPES`` or a refusal quietly takes the PyTorch path (fp64 gradchecks and references stay exact);
    an explicit ``backend="triton"`` raises ValueError instead.
    """
    chosen = resolve_backend(backend, device)
    if chosen != "triton":
        return chosen
    reason = refusal
    if dtype not in TRITON_DTYPES:
        what = f" {operand}" if operand else ""
        reason = f"the triton {kernel} takes float32, bfloat16 or float16{what}, got {dtype}"
    if reason is None:
        return "triton"
    if backend == "triton":
        raise ValueError(reason)
    return "torch"


def traced_on_cpu(t: torch.Tensor) -> bool:
    """True while ``torch.compile`` traces an op on a CPU tensor. The PyTorch paths of the decode step's small
    ops (one-query attention; int8 matrix-vector products where mmdgen's C loop cannot run) are then written as
    elementwise products and sums, which inductor turns into a few fused C++ loops, instead of one library call
    per op: at batch 1 a decode step's hundreds of library calls cost more in fixed overhead than their
    arithmetic."""
    return t.device.type == "cpu" and torch.compiler.is_compiling()


def stored(x: torch.Tensor) -> torch.Tensor:
    """``x`` written to memory inside a ``torch.compile`` graph (inductor's stride prim; no copy). Inductor
    otherwise inlines an elementwise producer (a layer norm, a GELU, a softmax) into a consumer that reads each
    element many times (a matrix-vector product reads its vector once per output channel) and recomputes it at
    every read."""
    from torch._inductor.inductor_prims import force_stride_order  # imported by torch.compile already

    return force_stride_order(x, x.stride())


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the PyTorch paths compute in: fp64 for fp64 inputs (exact references, gradcheck), fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def describe_shape(value) -> str:
    """For error messages: a tensor's shape as a tuple, the type name of anything else."""
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


def dot_precision(dtype: torch.dtype) -> str:
    """The ``PRECISION`` constexpr the kernels pass to ``dot``: 3xTF32 keeps fp32 inputs fp32-accurate;
    "upcast" works around the interpreter, whose bf16/fp16 ``tl.dot`` is wrong in triton 3.8."""
    if TRITON_INTERPRETED:
        return "upcast"
    return "tf32x3" if dtype == torch.float32 else "tf32"


if TRITON_IMPORT_ERROR is None:
    import triton.language as tl

    @triton.jit
    def dot(a, b, acc, PRECISION: tl.constexpr):
        """acc + a @ b with fp32 accumulation. Under "upcast" the operands go to fp32 first: bf16 and fp16
        products are exact in fp32, so the result is the one the compiled kernel computes."""
        if PRECISION == "upcast":
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        return tl.dot(a, b, acc, input_precision=PRECISION)
