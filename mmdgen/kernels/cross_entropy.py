"""The LM's K output heads fused with their cross-entropy: no ``[N, K, V]`` logits, no second pass.

MusicGen ends in K linear heads without bias, ``weight`` ``[K, V, C]`` (V = codebook size, plus the
special token when there is one), applied to hidden states ``hidden`` ``[N, C]`` (N = batch * steps).
The loss is audiocraft's: the cross-entropy of each codebook averaged over that codebook's own valid
positions (``targets != ignore_index``), then averaged over the K codebooks::

    loss = (1/K) sum_k  (1/n_k) sum_{n valid for k}  [logsumexp_v(h_n . w_kv) - h_n . w_k,t(n,k)]

A codebook with no valid position (n_k = 0, a 0/0 in audiocraft) contributes 0 to the sum and to the
gradient; the sum is still divided by K.

What is fused. Rows are processed in chunks. For each chunk and each codebook: the chunk's logits
``[rows, V]`` are computed in fp32 (one matmul), then per row the max, logsumexp and loss, and the
logits buffer is overwritten *in place* with the logits' gradient ``softmax - onehot`` (0 on ignored
rows); then at once ``grad_hidden[chunk] += s_k * dlogits @ W_k`` and
``grad_weight[k] += s_k * dlogits^T @ hidden[chunk]`` with ``s_k = 1 / (K n_k)``. The factor ``s_k``
is applied after the matmuls (as their alpha), not in the buffer: folded into half-precision matmul
operands it would underflow fp16 for large n_k. Backward only multiplies the saved ``[N, C]`` and
``[K, V, C]`` gradients by the incoming scalar. When no input needs a gradient (or grad mode is off)
only the loss is computed.

- Triton (CUDA, or CPU through ``TRITON_INTERPRET=1``): the per-row part is one kernel, one program per
  row: pass 1 reads the row's fp32 logits in ``BLOCK_V`` blocks keeping an online max and sum of
  exponentials (and picks the target's logit), pass 2 writes ``softmax - onehot`` over the same
  blocks. The matmuls stay in torch (cuBLAS). fp32 inputs: fp32 matmuls. bf16/fp16 inputs: the
  matmuls take the half operands and write fp32 (``torch.mm(..., out_dtype=torch.float32)``: half
  products, fp32 accumulation and output); the gradient of the logits is rounded to the input dtype
  to be a matmul operand (relative error 2^-9 bf16, 2^-12 fp16, before the fp32 accumulation). On CPU
  (the interpreter) the half operands are upcast to fp32 first, which gives the same products.
- PyTorch: the same chunking with in-place torch ops (``amax``, ``exp_``, ``scatter_add_``, ``addmm_``).
  It computes in fp32 from upcast operands (the hidden chunk and one head ``W_k`` at a time), or fp64
  for fp64 inputs (gradcheck). Exponent arguments are floored at -80 (fp32; -700 fp64) because CPU
  ``exp`` is 25-60x slower on underflowing arguments; a probability below e^-80 = 1.8e-35 counts as
  that floor, which moves the loss by at most V * 1.8e-35.

Dtypes: ``hidden`` and ``weight`` fp32, bf16 or fp16 (fp64 on the PyTorch path), the same for both;
``targets`` integer (int64 or int32). Returns ``(loss, per_codebook)``: the loss a differentiable fp32
scalar (fp64 for fp64 inputs), ``per_codebook`` ``[K]`` the detached per-codebook means. Gradients
accumulate in fp32 and are stored and returned in the input dtype.

Memory: the inputs, the two gradients (``[N, C]`` and ``[K, V, C]``, fp32 while accumulating) and
O(chunk_rows * V + V * C) scratch: one chunk of logits, one upcast head or half-precision copy of the
logits gradient, the matmul outputs. Never O(N K V): for N = 32k, K = 4, V = 2048 the naive fp32
logits alone are 1 GiB (and their gradient as much again); the default chunk here is 32 MiB.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from mmdgen.kernels.backend import TRITON_IMPORT_ERROR, accumulation_dtype, choose_backend, describe_shape

# Default rows per chunk: CHUNK_ELEMENTS // V (4096 rows of V = 2048, a 32 MiB fp32 logits buffer).
CHUNK_ELEMENTS = 1 << 23
TRITON_BLOCK_V = 2048
_HALF_DTYPES = (torch.bfloat16, torch.float16)
# CPU exp is slow on underflowing arguments: the PyTorch path floors them (see the module docstring).
_EXP_FLOOR = {torch.float32: -80.0, torch.float64: -700.0}


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def _check(hidden, weight, targets, ignore_index, chunk_rows) -> None:
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
        raise ValueError(f"hidden must have shape [N, C], got {describe_shape(hidden)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 3:
        raise ValueError(f"weight must have shape [K, V, C], got {describe_shape(weight)}")
    if not isinstance(targets, torch.Tensor) or targets.dim() != 2:
        raise ValueError(f"targets must have shape [N, K], got {describe_shape(targets)}")
    n, c = hidden.shape
    k, v, wc = weight.shape
    if not hidden.is_floating_point():
        raise ValueError(f"hidden must be floating point, got {hidden.dtype}")
    if hidden.dtype != weight.dtype or hidden.device != weight.device:
        raise ValueError(f"hidden and weight must share dtype and device, got {hidden.dtype}/{hidden.device} "
                         f"and {weight.dtype}/{weight.device}")
    if wc != c:
        raise ValueError(f"hidden has C={c} features but weight [K, V, C] has C={wc}")
    if k < 1 or v < 1 or c < 1:
        raise ValueError(f"weight must have K >= 1 heads, V >= 1 classes and C >= 1 features, "
                         f"got {tuple(weight.shape)}")
    if tuple(targets.shape) != (n, k):
        raise ValueError(f"targets must have shape [N, K] = {(n, k)} for hidden {tuple(hidden.shape)} and "
                         f"weight {tuple(weight.shape)}, got {tuple(targets.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be int64 (or int32) class indices, got {targets.dtype}")
    if targets.device != hidden.device:
        raise ValueError(f"targets must be on hidden's device {hidden.device}, got {targets.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be a positive int or None, got {chunk_rows!r}")


def _check_range(targets: torch.Tensor, valid: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """ValueError naming the first target outside [0, V) that is not ignore_index (one host sync)."""
    bad = valid & ((targets < 0) | (targets >= num_classes))
    if bool(bad.any()):
        row, codebook = (int(i) for i in bad.nonzero()[0])
        value = int(targets[row, codebook])
        raise ValueError(f"target {value} at position {row} of codebook {codebook} is out of range: expected "
                         f"0 <= target < V={num_classes} or ignore_index={ignore_index}")


# ----------------------------------------------------------------------------------------------
# Per-row cross-entropy on a chunk of logits: PyTorch
# ----------------------------------------------------------------------------------------------


def _torch_rows(logits: torch.Tensor, target: torch.Tensor, ignore_index: int, with_grad: bool) -> torch.Tensor:
    """Per-row loss of ``logits`` ``[rows, V]`` (0 on ignored rows); with ``with_grad`` the buffer is
    overwritten with ``softmax - onehot`` (0 on ignored rows). In place: O(rows) extra memory."""
    valid = target != ignore_index
    safe = torch.where(valid, target, 0).long()[:, None]
    picked = logits.gather(1, safe).squeeze(1)
    row_max = logits.amax(dim=1, keepdim=True)
    logits.sub_(row_max).clamp_(min=_EXP_FLOOR[logits.dtype]).exp_()
    total = logits.sum(dim=1, keepdim=True)
    loss = torch.where(valid, (row_max + total.log()).squeeze(1) - picked, 0.0)
    if with_grad:
        mask = valid.to(logits.dtype)[:, None]
        logits.mul_(mask / total)
        logits.scatter_add_(1, safe, -mask)
    return loss


# ----------------------------------------------------------------------------------------------
# Per-row cross-entropy on a chunk of logits: Triton
# ----------------------------------------------------------------------------------------------

if TRITON_IMPORT_ERROR is None:
    import triton
    import triton.language as tl

    @triton.jit
    def _cross_entropy_rows_kernel(logits_ptr, target_ptr, loss_ptr, num_classes, stride_row, stride_target,
                                   ignore_index, WITH_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
        """One row of fp32 logits: loss[row] = logsumexp - logit[target] (0 when ignored); WITH_GRAD
        overwrites the row with softmax - onehot (0 when ignored)."""
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * stride_row
        target = tl.load(target_ptr + row * stride_target).to(tl.int64)
        valid = target != ignore_index
        safe_target = tl.where(valid, target, 0)
        picked = tl.load(row_ptr + safe_target)
        # pass 1: running max m and sum of exp(x - m) over the V blocks
        m = float("-inf")
        total = 0.0
        for start in range(0, num_classes, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            x = tl.load(row_ptr + cols, mask=cols < num_classes, other=float("-inf"))
            m_new = tl.maximum(m, tl.max(x, axis=0))
            total = total * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        lse = m + tl.log(total)
        tl.store(loss_ptr + row, tl.where(valid, lse - picked, 0.0))
        if WITH_GRAD:
            # pass 2: the gradient of the logits, written over them
            for start in range(0, num_classes, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                in_row = cols < num_classes
                x = tl.load(row_ptr + cols, mask=in_row, other=0.0)
                grad = tl.exp(x - lse) - tl.where(cols == safe_target, 1.0, 0.0)
                tl.store(row_ptr + cols, tl.where(valid, grad, 0.0), mask=in_row)


def _triton_rows(logits: torch.Tensor, target: torch.Tensor, ignore_index: int, with_grad: bool) -> torch.Tensor:
    """``_torch_rows`` on the Triton kernel; ``logits`` fp32, row-major with unit column stride."""
    rows, num_classes = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        block = min(TRITON_BLOCK_V, triton.next_power_of_2(num_classes))
        _cross_entropy_rows_kernel[(rows,)](logits, target, loss, num_classes, logits.stride(0), target.stride(0),
                                            ignore_index, WITH_GRAD=with_grad, BLOCK_V=block,
                                            num_warps=8 if block >= 2048 else 4)
    return loss


# ----------------------------------------------------------------------------------------------
# The chunked pass shared by both paths
# ----------------------------------------------------------------------------------------------


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b of half-precision operands with an fp32 result (fp32 accumulation). CUDA: cuBLAS writes
    fp32 directly; CPU (the interpreter's tests): the operands are upcast, exactly, and multiplied in fp32."""
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def _fused_pass(hidden, weight, targets, ignore_index, chunk_rows, backend, need_hidden, need_weight):
    """(per-codebook loss sums [K] fp64, valid counts [K], grad hidden, grad weight); the gradients are
    fp32 (fp64 for fp64 inputs) and None where not needed."""
    n, c = hidden.shape
    heads, num_classes, _ = weight.shape
    valid = targets != ignore_index
    _check_range(targets, valid, num_classes, ignore_index)
    counts = valid.sum(dim=0).tolist()
    scales = [1.0 / (heads * count) if count else 0.0 for count in counts]
    with_grad = need_hidden or need_weight
    dtype = accumulation_dtype(hidden.dtype)
    # Triton with half inputs: half matmul operands, fp32 outputs; otherwise every operand in `dtype`.
    mixed = backend == "triton" and hidden.dtype in _HALF_DTYPES
    rows_fn = _triton_rows if backend == "triton" else _torch_rows
    device = hidden.device
    chunk = max(1, min(n, chunk_rows or CHUNK_ELEMENTS // num_classes))
    grad_hidden = torch.zeros(n, c, dtype=dtype, device=device) if need_hidden else None
    grad_weight = torch.zeros(heads, num_classes, c, dtype=dtype, device=device) if need_weight else None
    sums = torch.zeros(heads, dtype=torch.float64, device=device)
    buffer = None if mixed else torch.empty(chunk * num_classes, dtype=dtype, device=device)
    for r0 in range(0, n, chunk):
        r1 = min(r0 + chunk, n)
        rows = r1 - r0
        h = hidden[r0:r1] if mixed else hidden[r0:r1].to(dtype)
        for k in range(heads):
            if counts[k] == 0:
                continue  # contributes 0 to the loss and to both gradients
            w = weight[k] if mixed else weight[k].to(dtype)
            if mixed:
                logits = _mm_fp32(h, w.T)
            else:
                logits = torch.mm(h, w.T, out=buffer[: rows * num_classes].view(rows, num_classes))
            target = targets[r0:r1, k]
            sums[k] += rows_fn(logits, target, ignore_index, with_grad).sum(dtype=torch.float64)
            if not with_grad:
                continue
            if mixed:
                grad_logits = logits.to(hidden.dtype)
                if need_hidden:
                    grad_hidden[r0:r1].add_(_mm_fp32(grad_logits, w), alpha=scales[k])
                if need_weight:
                    grad_weight[k].add_(_mm_fp32(grad_logits.T, h), alpha=scales[k])
            else:
                if need_hidden:
                    grad_hidden[r0:r1].addmm_(logits, w, alpha=scales[k])
                if need_weight:
                    grad_weight[k].addmm_(logits.T, h, alpha=scales[k])
    return sums, counts, grad_hidden, grad_weight


# ----------------------------------------------------------------------------------------------
# Autograd and the public function
# ----------------------------------------------------------------------------------------------


class _LinearCrossEntropyFunction(torch.autograd.Function):
    """Loss and per-codebook means; the forward also produces the gradients, backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, chunk_rows, backend, need_hidden, need_weight):
        sums, counts, grad_hidden, grad_weight = _fused_pass(hidden, weight, targets, ignore_index, chunk_rows,
                                                             backend, need_hidden, need_weight)
        heads = weight.shape[0]
        denominators = torch.tensor([max(count, 1) for count in counts], dtype=torch.float64, device=sums.device)
        per_codebook = sums / denominators  # 0 for a codebook without valid targets
        out_dtype = accumulation_dtype(hidden.dtype)
        loss = (per_codebook.sum() / heads).to(out_dtype)
        ctx.save_for_backward(None if grad_hidden is None else grad_hidden.to(hidden.dtype),
                              None if grad_weight is None else grad_weight.to(weight.dtype))
        per_codebook = per_codebook.to(out_dtype)
        ctx.mark_non_differentiable(per_codebook)
        return loss, per_codebook

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, grad_per_codebook):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_h = grad_hidden * grad_loss if ctx.needs_input_grad[0] and grad_hidden is not None else None
        grad_w = grad_weight * grad_loss if ctx.needs_input_grad[1] and grad_weight is not None else None
        return grad_h, grad_w, None, None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                         backend: str = "auto", chunk_rows: int | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of K bias-free linear heads over hidden states, without materialising the logits.

    ``hidden``: ``[N, C]``; ``weight``: ``[K, V, C]`` (head k's logits are ``hidden @ weight[k].T``), same
    dtype (fp32, bf16, fp16; fp64 on the PyTorch path) and device; ``targets``: ``[N, K]`` int64 class
    indices, ``ignore_index`` where a position does not count. Every other target must lie in
    ``[0, V)`` (ValueError otherwise, before any kernel runs).

    Returns ``(loss, per_codebook)``: ``per_codebook[k]`` is the mean cross-entropy of codebook k over
    its valid positions (0 if it has none), ``loss = per_codebook.sum() / K`` (audiocraft's definition),
    an fp32 scalar (fp64 for fp64 inputs) differentiable in ``hidden`` and ``weight``; ``per_codebook``
    is detached. The gradients are computed during the forward pass, chunk by chunk.

    ``chunk_rows``: rows per chunk (default ``CHUNK_ELEMENTS // V``); scratch memory is
    O(chunk_rows * V + V * C). ``backend``: ``"auto"`` (Triton on CUDA, PyTorch otherwise; env
    ``MMDGEN_BACKEND``), ``"triton"``, ``"torch"``.
    """
    _check(hidden, weight, targets, ignore_index, chunk_rows)
    chosen = choose_backend(backend, hidden.device, hidden.dtype, "cross-entropy")
    grad_on = torch.is_grad_enabled()
    need_hidden = grad_on and hidden.requires_grad
    need_weight = grad_on and weight.requires_grad
    return _LinearCrossEntropyFunction.apply(hidden, weight, targets, ignore_index, chunk_rows, chosen, need_hidden,
                                             need_weight)
