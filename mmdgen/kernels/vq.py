"""Nearest-codeword search for vector quantisation, without the N x Q distance matrix.

For rows ``x`` ``[N, D]`` and a codebook ``[Q, D]``: the index of the closest codeword,
``argmin_q |x - c_q|^2``, and that squared distance. Since ``|x|^2`` is the same for every codeword,
the search ranks ``|c_q|^2 - 2 x . c_q``, computed tile by tile from dot products; each row keeps its
running best across codebook tiles. Ties go to the lowest index, as ``torch.argmin`` resolves them.

- Triton (CUDA, or CPU through ``TRITON_INTERPRET=1``): one program per block of rows, looping over
  codebook tiles and feature chunks; fp32, bf16 or fp16 inputs, fp32 accumulation (3xTF32 for fp32).
- PyTorch: the same over fixed ``[TORCH_ROWS, TORCH_CODES]`` tiles with in-place ``addmm``.

Memory: O(N + Q) beyond the inputs (plus one tile of scores on the PyTorch path); never O(N Q).
No gradient: the quantizer applies its straight-through estimator around the codes this returns.
"""

from __future__ import annotations

import torch

from mmdgen.kernels.backend import TRITON_IMPORT_ERROR, accumulation_dtype, choose_backend, dot_precision

TORCH_ROWS = 1024
TORCH_CODES = 1024
TRITON_BLOCK_N = 64
TRITON_BLOCK_Q = 64
TRITON_BLOCK_D = 64


def _check(x: torch.Tensor, codebook: torch.Tensor) -> None:
    for name, t in (("x", x), ("codebook", codebook)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 2-D tensor, got {shape}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {t.dtype}")
    if x.shape[1] != codebook.shape[1]:
        raise ValueError(f"x has {x.shape[1]} features but codewords have {codebook.shape[1]}")
    if codebook.shape[0] < 1:
        raise ValueError("the codebook is empty")
    if x.dtype != codebook.dtype or x.device != codebook.device:
        raise ValueError(f"x and codebook must share dtype and device, got {x.dtype}/{x.device} and "
                         f"{codebook.dtype}/{codebook.device}")


def _torch_search(x: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = accumulation_dtype(x.dtype)
    x, codebook = x.to(dtype), codebook.to(dtype)
    n, q = x.shape[0], codebook.shape[0]
    code_norms = codebook.square().sum(dim=1)
    best_score = torch.full((n,), float("inf"), dtype=dtype, device=x.device)
    best_index = torch.zeros(n, dtype=torch.int64, device=x.device)
    distance = torch.empty(n, dtype=dtype, device=x.device)
    scratch = torch.empty(min(n, TORCH_ROWS) * min(q, TORCH_CODES), dtype=dtype, device=x.device)
    for r0 in range(0, n, TORCH_ROWS):
        r1 = min(r0 + TORCH_ROWS, n)
        for c0 in range(0, q, TORCH_CODES):
            c1 = min(c0 + TORCH_CODES, q)
            scores = scratch[: (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)
            torch.addmm(code_norms[None, c0:c1], x[r0:r1], codebook[c0:c1].T, alpha=-2.0, out=scores)
            tile_score, tile_index = scores.min(dim=1)
            better = tile_score < best_score[r0:r1]  # strict: an earlier tile keeps ties
            best_score[r0:r1] = torch.where(better, tile_score, best_score[r0:r1])
            best_index[r0:r1] = torch.where(better, tile_index + c0, best_index[r0:r1])
        distance[r0:r1] = (best_score[r0:r1] + x[r0:r1].square().sum(dim=1)).clamp_(min=0.0)
    return best_index, distance.float()


if TRITON_IMPORT_ERROR is None:
    import triton
    import triton.language as tl

    from mmdgen.kernels.backend import dot

    @triton.jit
    def _nearest_codeword_kernel(x_ptr, code_ptr, code_norm_ptr, index_ptr, score_ptr, n, q, dim, stride_x,
                                 stride_c, BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
                                 PRECISION: tl.constexpr):
        """index[i] = argmin_q (|c_q|^2 - 2 x_i . c_q), score[i] = that minimum, for one block of rows."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        best_score = tl.full((BLOCK_N,), float("inf"), dtype=tl.float32)
        best_index = tl.zeros((BLOCK_N,), dtype=tl.int32)
        for code_start in range(0, q, BLOCK_Q):
            codes = code_start + tl.arange(0, BLOCK_Q)
            dots = tl.zeros((BLOCK_N, BLOCK_Q), dtype=tl.float32)
            for d_start in range(0, dim, BLOCK_D):
                feats = d_start + tl.arange(0, BLOCK_D)
                x = tl.load(x_ptr + rows[:, None] * stride_x + feats[None, :],
                            mask=(rows[:, None] < n) & (feats[None, :] < dim), other=0.0)
                c = tl.load(code_ptr + codes[:, None] * stride_c + feats[None, :],
                            mask=(codes[:, None] < q) & (feats[None, :] < dim), other=0.0)
                dots = dot(x, tl.trans(c), dots, PRECISION)
            norms = tl.load(code_norm_ptr + codes, mask=codes < q, other=float("inf"))
            scores = norms[None, :] - 2.0 * dots
            tile_score = tl.min(scores, axis=1)
            tile_index = tl.argmin(scores, axis=1, tie_break_left=True) + code_start
            better = tile_score < best_score
            best_score = tl.where(better, tile_score, best_score)
            best_index = tl.where(better, tile_index, best_index)
        tl.store(index_ptr + rows, best_index, mask=rows < n)
        tl.store(score_ptr + rows, best_score, mask=rows < n)


def _triton_search(x: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x, codebook = x.contiguous(), codebook.contiguous()
    n, dim = x.shape
    q = codebook.shape[0]
    code_norms = codebook.float().square().sum(dim=1)
    index = torch.empty(n, dtype=torch.int32, device=x.device)
    score = torch.empty(n, dtype=torch.float32, device=x.device)
    precision = dot_precision(x.dtype)
    if n:
        _nearest_codeword_kernel[(triton.cdiv(n, TRITON_BLOCK_N),)](
            x, codebook, code_norms, index, score, n, q, dim, x.stride(0), codebook.stride(0),
            BLOCK_N=TRITON_BLOCK_N, BLOCK_Q=TRITON_BLOCK_Q, BLOCK_D=TRITON_BLOCK_D, PRECISION=precision)
    distance = (score + x.float().square().sum(dim=1)).clamp_(min=0.0)
    return index.long(), distance


@torch.no_grad()
def nearest_codeword(x: torch.Tensor, codebook: torch.Tensor, backend: str = "auto"
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices [N] int64, squared distances [N] fp32) of the closest codeword to each row of ``x``.

    ``x``: ``[N, D]``; ``codebook``: ``[Q, D]``, same dtype and device. Ties go to the lowest index.
    ``backend``: ``"auto"`` (Triton on CUDA, PyTorch otherwise; env ``MMDGEN_BACKEND``), ``"triton"``,
    ``"torch"``.
    """
    _check(x, codebook)
    chosen = choose_backend(backend, x.device, x.dtype, "VQ kernel")
    return (_triton_search if chosen == "triton" else _torch_search)(x, codebook)
