"""MMD^2 with a sum of Gaussian kernels, fused and memory-linear: the kernel of the independence loss
(``mmdgen.losses.independence`` builds the loss's samples and calls ``sharded_rbf_mmd``).

Maths. For joint samples ``x`` and product-of-marginals samples ``y``, both ``[N, F]``, and the kernel
``k(u, v) = sum_a exp(-|u - v|^2 / (2 a))`` over the bandwidths ``a`` (variances)::

    unbiased (U-statistic):  S'_xx / (N (N-1)) + S'_yy / (N (N-1)) - 2 S_xy / N^2
    biased   (V-statistic):  (S_xx + S_yy - 2 S_xy) / N^2

where ``S_ab = sum_ij k(a_i, b_j)`` and ``S'`` leaves out the diagonal ``i == j``. With
``W(u, v) = sum_a exp(-|u - v|^2 / (2 a)) / a`` the gradient of ``k(u, v)`` in ``u`` is
``W(u, v) (v - u)``, so::

    dL/dx_i = 2 c_s sum_j W(x_i, x_j) (x_j - x_i) - 2 c_xy sum_j W(x_i, y_j) (y_j - x_i)

and symmetrically for ``y``. Both are ``(W @ Z)_i - rowsum(W)_i x_i``: one extra tile matmul.

Implementation. Neither path ever holds an ``N x N`` matrix. Pairs are visited in tiles; squared
distances come from tile dot products and row norms; every bandwidth is evaluated per tile and the
three kernel sums are accumulated (fp32 within a tile, fp64 across tiles). When a gradient is needed
the forward pass also produces it (the exponentials are shared), so backward is a scale.

- Triton (CUDA, or CPU through ``TRITON_INTERPRET=1``): one program per row block; the forward-only
  kernel visits the upper triangle of the ``xx``/``yy`` pairs (symmetry), the value-and-gradient
  kernel visits every pair of its rows and accumulates ``W @ Z`` tile by tile.
  Inputs fp32, bf16 or fp16; dot products accumulate in fp32 (fp32 inputs use 3xTF32 for fp32
  accuracy); kernel values and sums in fp32.
- PyTorch: the same maths over fixed ``TORCH_TILE x TORCH_TILE`` tiles with preallocated buffers and
  in-place ops, the symmetric halves visited once. Computes in fp32 (fp64 for fp64 inputs). On CPU the
  fp32 tile products go through oneDNN's GEMM (``onednn_matmul_usable``: MKL's is several times slower
  on AMD), and a bandwidth whose gamma doubles the previous one's takes that kernel's square instead of
  an exponential (``exponential_plan``).

Memory: O(N F) for the inputs, norms and gradients, plus O(tile^2) scratch; never O(N^2).

Distributed: ``sharded_rbf_mmd`` visits one rank's share of the pair tiles (``Shard``) and all-reduces
the kernel sums; the caller gathers the samples and sums the ranks' partial gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from mmdgen.kernels.backend import TRITON_IMPORT_ERROR, accumulation_dtype, choose_backend, dot_precision

DEFAULT_BANDWIDTHS = (0.1, 1.0, 5.0, 10.0, 20.0, 50.0)
TORCH_TILE = 512
ONEDNN_MATMUL = hasattr(torch.ops.mkldnn, "_linear_pointwise")  # a private op: used only where present
TRITON_BLOCK = 64
TRITON_BLOCK_F = 64


@dataclass(frozen=True)
class Shard:
    """This rank's share of the pair tiles when the samples are spread over a process group."""

    rank: int
    world: int
    group: object = None


SINGLE_PROCESS = Shard(rank=0, world=1)


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def check_bandwidths(bandwidths: Sequence[float]) -> tuple[float, ...]:
    try:
        values = tuple(float(a) for a in bandwidths)
    except TypeError as error:
        raise ValueError(f"bandwidths must be a sequence of positive numbers, got {bandwidths!r}") from error
    if not values:
        raise ValueError("bandwidths is empty; expected at least one positive bandwidth")
    bad = [a for a in values if not (math.isfinite(a) and a > 0)]
    if bad:
        raise ValueError(f"bandwidths must be finite and positive, got {bad} in {values}")
    return values


def check_finite(name: str, tensor: torch.Tensor) -> None:
    if not bool(torch.isfinite(tensor).all()):
        count = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"{name} holds {count} non-finite values (NaN or inf); expected finite numbers")


def _check_samples(x: torch.Tensor, y: torch.Tensor) -> None:
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must have shape [N, F], got {tuple(t.shape)} ({t.dim()} dimensions)")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape [N, F], got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.dtype != y.dtype or x.device != y.device:
        raise ValueError(f"x and y must share dtype and device, got {x.dtype}/{x.device} and {y.dtype}/{y.device}")
    if x.shape[0] < 2:
        raise ValueError(f"the MMD needs at least 2 samples, got N={x.shape[0]}")
    if x.shape[1] < 1:
        raise ValueError(f"samples need at least one feature, got F={x.shape[1]}")
    check_finite("x", x)
    check_finite("y", y)


def _gammas(bandwidths: tuple[float, ...]) -> tuple[float, ...]:
    """exp(-d / (2a)) = exp(-gamma d) with gamma = 1 / (2a)."""
    return tuple(1.0 / (2.0 * a) for a in bandwidths)


# ----------------------------------------------------------------------------------------------
# PyTorch path
# ----------------------------------------------------------------------------------------------


def onednn_matmul_usable(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the tile products go through oneDNN's fp32 GEMM rather than ``addmm`` (MKL on x86).

    On AMD Zen 5, MKL's sgemm runs a 512 x 512 x 512 tile product at 97 GFLOP/s on one core against
    oneDNN's 241 (bench/results/mmd-cpu-profile-amd-epyc.txt), and those products are most of the time.
    oneDNN takes fp32 CPU tensors only; fp64 and CUDA stay on ``addmm``."""
    return (ONEDNN_MATMUL and device.type == "cpu" and dtype == torch.float32
            and torch.backends.mkldnn.is_available())


def _product_nt(a, b, bias, onednn):
    """``a @ b.T + bias`` (``bias``: one value per column, or None) as a new tensor; ``b`` may be a view."""
    if onednn:
        return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")
    return a @ b.T if bias is None else torch.addmm(bias[None, :], a, b.T)


def _add_product(out, a, b, alpha, onednn):
    """``out += alpha * a @ b`` (``b``: ``[K, cols]``, a view is fine)."""
    if onednn:
        out.add_(_product_nt(a, b.T, None, onednn), alpha=alpha)
    else:
        out.addmm_(a, b, alpha=alpha)


def _tile_minus_half_squared_distances(a, a_half_norm, c, c_half_norm, onednn):
    """-|a_i - c_j|^2 / 2 = a_i . c_j - |a_i|^2 / 2 - |c_j|^2 / 2: one product (minus the column
    half-norms as its bias) and one subtraction; the factor -1/2 is exact and goes into each gamma."""
    return _product_nt(a, c, -c_half_norm, onednn).sub_(a_half_norm[:, None])


# CPU exp takes a slow path (about 100x) for arguments that underflow, so arguments are clamped here:
# kernel values below e^-80 (fp32; e^-700 in fp64) count as that floor. Every sum moves by at most
# N^2 * len(bandwidths) * 1.8e-35, and the floored weights stay normal numbers (no denormal slow path).
_EXP_FLOOR = {torch.float32: -80.0, torch.float64: -700.0}
# A value squared in place of an exponential is first raised to the square root of that floor, so its
# square stays a normal number too (a multiply that yields a denormal is itself slow on Intel CPUs).
_SQUARE_FLOOR = {dtype: math.exp(floor / 2.0) for dtype, floor in _EXP_FLOOR.items()}


def exponential_plan(gammas: Sequence[float]) -> list[tuple[float, bool]]:
    """The gammas in ascending order, each paired with whether its kernel is the previous one's square.

    exp(-2 g d) = exp(-g d)^2: a multiply instead of an exponential, the costliest elementwise pass on
    CPU (the default bandwidths 20, 10, 5 are such a chain). The square's relative error is twice the
    previous value's plus one rounding, about what exp(-2 g d) has from rounding its argument; only exact
    doublings are squared, so no other power's error grows."""
    ordered = sorted(gammas)
    return [(g, k > 0 and g == 2.0 * ordered[k - 1]) for k, g in enumerate(ordered)]


def _tile_tasks(num_blocks: int) -> list[tuple[str, int, int]]:
    """Every tile of the three pair sets: the upper triangle of xx and yy, all of xy."""
    upper = [(i, j) for i in range(num_blocks) for j in range(i, num_blocks)]
    full = [(i, j) for i in range(num_blocks) for j in range(num_blocks)]
    return [("xx", i, j) for i, j in upper] + [("yy", i, j) for i, j in upper] + [("xy", i, j) for i, j in full]


def _torch_pass(x, y, gammas, coef_self, coef_cross, with_grad, shard):
    """Kernel sums (S'_xx, S'_yy, S_xy) as fp64 [3] and, if asked, dL/dx and dL/dy (fp32/fp64).

    ``coef_self`` / ``coef_cross`` are the factors of ``sum_j W_ij (z_j - a_i)`` in the gradient
    (``2 c_s`` and ``-2 c_xy``). Memory: O(N F) (the samples and gradients) plus three ``tile x tile``
    buffers.
    """
    tile = TORCH_TILE
    n = x.shape[0]
    dtype = accumulation_dtype(x.dtype)
    onednn = onednn_matmul_usable(dtype, x.device)
    values = {"x": x.to(dtype), "y": y.to(dtype)}
    half_norms = {name: v.square().sum(dim=1).mul_(0.5) for name, v in values.items()}
    blocks = [(start, min(start + tile, n)) for start in range(0, n, tile)]
    scratch = torch.empty(2, tile * tile, dtype=dtype, device=x.device)
    floor, square_floor = _EXP_FLOOR[dtype], _SQUARE_FLOOR[dtype]
    plan = exponential_plan(gammas)
    sums = {pair: torch.zeros((), dtype=torch.float64, device=x.device) for pair in ("xx", "yy", "xy")}
    grads = {name: torch.zeros_like(v) for name, v in values.items()} if with_grad else None
    row_weights = {name: v.new_zeros(n) for name, v in values.items()} if with_grad else None

    for index, (pair, i, j) in enumerate(_tile_tasks(len(blocks))):
        if index % shard.world != shard.rank:
            continue
        a, b = pair[0], pair[1]
        (r0, r1), (c0, c1) = blocks[i], blocks[j]
        rows, cols = r1 - r0, c1 - c0
        e, w = (buf[: rows * cols].view(rows, cols) for buf in scratch)
        minus_half_d2 = _tile_minus_half_squared_distances(values[a][r0:r1], half_norms[a][r0:r1],
                                                           values[b][c0:c1], half_norms[b][c0:c1], onednn)
        on_diagonal = a == b and i == j
        for k, (gamma, squares_previous) in enumerate(plan):
            if squares_previous:
                e.clamp_(min=square_floor).square_()
            else:
                torch.mul(minus_half_d2, 2.0 * gamma, out=e)
                e.clamp_(min=floor).exp_()
            if on_diagonal:
                e.diagonal().zero_()  # the U-statistic leaves out i == j
            sums[pair].add_(e.sum(), alpha=1.0 if (a != b or on_diagonal) else 2.0)
            if with_grad:
                if k == 0:
                    torch.mul(e, 2.0 * gamma, out=w)
                else:
                    w.add_(e, alpha=2.0 * gamma)
        if with_grad:
            coef = coef_self if a == b else coef_cross  # applied after the matmul: folded into w it is denormal
            _add_product(grads[a][r0:r1], w, values[b][c0:c1], coef, onednn)
            row_weights[a][r0:r1].add_(w.sum(dim=1), alpha=coef)
            if not on_diagonal:
                _add_product(grads[b][c0:c1], w.T, values[a][r0:r1], coef, onednn)
                row_weights[b][c0:c1].add_(w.sum(dim=0), alpha=coef)

    total = torch.stack([sums["xx"], sums["yy"], sums["xy"]])
    if not with_grad:
        return total, None, None
    gx = grads["x"].sub_(row_weights["x"][:, None] * values["x"])
    gy = grads["y"].sub_(row_weights["y"][:, None] * values["y"])
    return total, gx, gy


# ----------------------------------------------------------------------------------------------
# Triton path
# ----------------------------------------------------------------------------------------------

if TRITON_IMPORT_ERROR is None:
    import triton
    import triton.language as tl

    from mmdgen.kernels.backend import dot

    @triton.jit
    def _squared_distances(a_ptr, c_ptr, a_norm_ptr, c_norm_ptr, rows, cols, n, f_dim, stride_a, stride_c,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr,
                           PRECISION: tl.constexpr):
        """|a_i - c_j|^2 for a [BLOCK_M, BLOCK_N] tile from F-chunked dot products and row norms."""
        dots = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for f_start in range(0, f_dim, BLOCK_F):
            feats = f_start + tl.arange(0, BLOCK_F)
            a = tl.load(a_ptr + rows[:, None] * stride_a + feats[None, :],
                        mask=(rows[:, None] < n) & (feats[None, :] < f_dim), other=0.0)
            c = tl.load(c_ptr + cols[:, None] * stride_c + feats[None, :],
                        mask=(cols[:, None] < n) & (feats[None, :] < f_dim), other=0.0)
            dots = dot(a, tl.trans(c), dots, PRECISION)
        a_norm = tl.load(a_norm_ptr + rows, mask=rows < n, other=0.0)
        c_norm = tl.load(c_norm_ptr + cols, mask=cols < n, other=0.0)
        return tl.maximum(a_norm[:, None] + c_norm[None, :] - 2.0 * dots, 0.0)

    @triton.jit
    def _kernel_and_weight(d2, gamma_ptr, NUM_BW: tl.constexpr):
        """k = sum_a exp(-gamma_a d2) and W = sum_a 2 gamma_a exp(-gamma_a d2).

        ``gamma_ptr`` holds gamma_a * log2(e) (for exp2) then 2 gamma_a.
        """
        k = tl.zeros_like(d2)
        w = tl.zeros_like(d2)
        for i in tl.static_range(NUM_BW):
            e = tl.exp2(-tl.load(gamma_ptr + i) * d2)
            k += e
            w += tl.load(gamma_ptr + NUM_BW + i) * e
        return k, w

    @triton.jit
    def _row_block_kernel_sum(a_ptr, c_ptr, a_norm_ptr, c_norm_ptr, gamma_ptr, rows, row_block, n, f_dim,
                              stride_a, stride_c, SYMMETRIC: tl.constexpr, NUM_BW: tl.constexpr,
                              BLOCK: tl.constexpr, BLOCK_F: tl.constexpr, PRECISION: tl.constexpr):
        """Per-row kernel sums of one row block; SYMMETRIC visits the upper triangle and doubles it."""
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        col_begin = row_block * BLOCK if SYMMETRIC else 0
        for col_start in range(col_begin, n, BLOCK):
            cols = col_start + tl.arange(0, BLOCK)
            d2 = _squared_distances(a_ptr, c_ptr, a_norm_ptr, c_norm_ptr, rows, cols, n, f_dim, stride_a,
                                    stride_c, BLOCK, BLOCK, BLOCK_F, PRECISION)
            k, _ = _kernel_and_weight(d2, gamma_ptr, NUM_BW)
            valid = (rows[:, None] < n) & (cols[None, :] < n)
            if SYMMETRIC:
                valid = valid & (rows[:, None] != cols[None, :])
                pair_weight = tl.where(col_start == col_begin, 1.0, 2.0)
            else:
                pair_weight = 1.0
            acc += tl.sum(tl.where(valid, k, 0.0), axis=1) * pair_weight
        return acc

    @triton.jit
    def _mmd_forward_kernel(x_ptr, y_ptr, x_norm_ptr, y_norm_ptr, gamma_ptr, partial_ptr, n, f_dim,
                            stride_x, stride_y, shard_rank, shard_world, NUM_BW: tl.constexpr,
                            BLOCK: tl.constexpr, BLOCK_F: tl.constexpr, PRECISION: tl.constexpr):
        """partial[pid] = (S'_xx, S'_yy, S_xy) restricted to the rows of this program's block."""
        pid = tl.program_id(0)
        row_block = shard_rank + pid * shard_world
        rows = row_block * BLOCK + tl.arange(0, BLOCK)
        s_xx = _row_block_kernel_sum(x_ptr, x_ptr, x_norm_ptr, x_norm_ptr, gamma_ptr, rows, row_block, n, f_dim,
                                     stride_x, stride_x, True, NUM_BW, BLOCK, BLOCK_F, PRECISION)
        s_yy = _row_block_kernel_sum(y_ptr, y_ptr, y_norm_ptr, y_norm_ptr, gamma_ptr, rows, row_block, n, f_dim,
                                     stride_y, stride_y, True, NUM_BW, BLOCK, BLOCK_F, PRECISION)
        s_xy = _row_block_kernel_sum(x_ptr, y_ptr, x_norm_ptr, y_norm_ptr, gamma_ptr, rows, row_block, n, f_dim,
                                     stride_x, stride_y, False, NUM_BW, BLOCK, BLOCK_F, PRECISION)
        tl.store(partial_ptr + pid * 3 + 0, tl.sum(s_xx))
        tl.store(partial_ptr + pid * 3 + 1, tl.sum(s_yy))
        tl.store(partial_ptr + pid * 3 + 2, tl.sum(s_xy))

    @triton.jit
    def _row_block_gradient(a_ptr, c_ptr, a_norm_ptr, c_norm_ptr, gamma_ptr, out_ptr, rows, n, f_dim,
                            stride_a, stride_c, stride_o, coef, EXCLUDE_DIAGONAL: tl.constexpr,
                            NUM_BW: tl.constexpr, BLOCK: tl.constexpr, BLOCK_F: tl.constexpr,
                            PRECISION: tl.constexpr):
        """out[rows] += coef * W @ c over every column block; returns per-row sums of k and coef * W."""
        k_rows = tl.zeros((BLOCK,), dtype=tl.float32)
        w_rows = tl.zeros((BLOCK,), dtype=tl.float32)
        for col_start in range(0, n, BLOCK):
            cols = col_start + tl.arange(0, BLOCK)
            d2 = _squared_distances(a_ptr, c_ptr, a_norm_ptr, c_norm_ptr, rows, cols, n, f_dim, stride_a,
                                    stride_c, BLOCK, BLOCK, BLOCK_F, PRECISION)
            k, w = _kernel_and_weight(d2, gamma_ptr, NUM_BW)
            valid = (rows[:, None] < n) & (cols[None, :] < n)
            if EXCLUDE_DIAGONAL:
                valid = valid & (rows[:, None] != cols[None, :])
            k = tl.where(valid, k, 0.0)
            w = tl.where(valid, w, 0.0)
            k_rows += tl.sum(k, axis=1)
            w_rows += tl.sum(w, axis=1)
            # coef is applied after the dot: folded into W it would underflow fp16 at large N.
            w_operand = w.to(c_ptr.dtype.element_ty)
            for f_start in range(0, f_dim, BLOCK_F):
                feats = f_start + tl.arange(0, BLOCK_F)
                c = tl.load(c_ptr + cols[:, None] * stride_c + feats[None, :],
                            mask=(cols[:, None] < n) & (feats[None, :] < f_dim), other=0.0)
                update = dot(w_operand, c, tl.zeros((BLOCK, BLOCK_F), dtype=tl.float32), PRECISION) * coef
                out_ptrs = out_ptr + rows[:, None] * stride_o + feats[None, :]
                out_mask = (rows[:, None] < n) & (feats[None, :] < f_dim)
                tl.store(out_ptrs, tl.load(out_ptrs, mask=out_mask, other=0.0) + update, mask=out_mask)
        return k_rows, w_rows * coef

    @triton.jit
    def _mmd_gradient_kernel(a_ptr, b_ptr, a_norm_ptr, b_norm_ptr, gamma_ptr, out_ptr, row_weight_ptr,
                             partial_ptr, n, f_dim, stride_a, stride_b, stride_o, coef_self, coef_cross,
                             shard_rank, shard_world, NUM_BW: tl.constexpr, BLOCK: tl.constexpr,
                             BLOCK_F: tl.constexpr, PRECISION: tl.constexpr):
        """For the rows of a: out = coef_self W_aa @ a + coef_cross W_ab @ b, row_weight = the row sums
        of those scaled W, partial[pid] = (S'_aa, S_ab) of these rows. dL/da = out - row_weight * a."""
        pid = tl.program_id(0)
        row_block = shard_rank + pid * shard_world
        rows = row_block * BLOCK + tl.arange(0, BLOCK)
        k_self, w_self = _row_block_gradient(a_ptr, a_ptr, a_norm_ptr, a_norm_ptr, gamma_ptr, out_ptr, rows, n,
                                             f_dim, stride_a, stride_a, stride_o, coef_self, True, NUM_BW, BLOCK,
                                             BLOCK_F, PRECISION)
        k_cross, w_cross = _row_block_gradient(a_ptr, b_ptr, a_norm_ptr, b_norm_ptr, gamma_ptr, out_ptr, rows, n,
                                               f_dim, stride_a, stride_b, stride_o, coef_cross, False, NUM_BW,
                                               BLOCK, BLOCK_F, PRECISION)
        tl.store(row_weight_ptr + rows, w_self + w_cross, mask=rows < n)
        tl.store(partial_ptr + pid * 2 + 0, tl.sum(k_self))
        tl.store(partial_ptr + pid * 2 + 1, tl.sum(k_cross))


def _triton_pass(x, y, gammas, coef_self, coef_cross, with_grad, shard):
    """Same contract as ``_torch_pass``, on the Triton kernels. Memory: O(N F)."""
    block = TRITON_BLOCK
    n, f_dim = x.shape
    x, y = x.contiguous(), y.contiguous()
    x_norm = x.float().square().sum(dim=1)
    y_norm = y.float().square().sum(dim=1)
    log2e = 1.0 / math.log(2.0)
    gamma_table = torch.tensor([g * log2e for g in gammas] + [2.0 * g for g in gammas],
                               dtype=torch.float32, device=x.device)
    precision = dot_precision(x.dtype)
    programs = len(range(shard.rank, triton.cdiv(n, block), shard.world))
    meta = dict(NUM_BW=len(gammas), BLOCK=block, BLOCK_F=TRITON_BLOCK_F, PRECISION=precision)
    if not with_grad:
        partial = torch.zeros(max(programs, 1), 3, dtype=torch.float32, device=x.device)
        if programs:
            _mmd_forward_kernel[(programs,)](x, y, x_norm, y_norm, gamma_table, partial, n, f_dim, x.stride(0),
                                             y.stride(0), shard.rank, shard.world, **meta)
        return partial.double().sum(dim=0), None, None

    def rows_of(a, b, a_norm, b_norm):
        out = torch.zeros(n, f_dim, dtype=torch.float32, device=x.device)
        row_weight = torch.zeros(n, dtype=torch.float32, device=x.device)
        partial = torch.zeros(max(programs, 1), 2, dtype=torch.float32, device=x.device)
        if programs:
            _mmd_gradient_kernel[(programs,)](a, b, a_norm, b_norm, gamma_table, out, row_weight, partial, n, f_dim,
                                              a.stride(0), b.stride(0), out.stride(0), coef_self, coef_cross,
                                              shard.rank, shard.world, **meta)
        grad = out.sub_(row_weight[:, None] * a.float())
        return grad, partial.double().sum(dim=0)

    gx, x_sums = rows_of(x, y, x_norm, y_norm)
    gy, y_sums = rows_of(y, x, y_norm, x_norm)
    return torch.stack([x_sums[0], y_sums[0], x_sums[1]]), gx, gy


# ----------------------------------------------------------------------------------------------
# Autograd and the public functions
# ----------------------------------------------------------------------------------------------


class _RBFMMDFunction(torch.autograd.Function):
    """MMD^2 whose forward also produces the gradient when one is needed; backward scales it."""

    @staticmethod
    def forward(ctx, x, y, gammas, unbiased, backend, shard, with_grad, cross_pairs):
        n = x.shape[0]
        c_self = 1.0 / (n * (n - 1)) if unbiased else 1.0 / (n * n)
        c_cross = 1.0 / cross_pairs
        run = _triton_pass if backend == "triton" else _torch_pass
        sums, gx, gy = run(x, y, gammas, 2.0 * c_self, -2.0 * c_cross, with_grad, shard)
        if shard.world > 1:
            dist.all_reduce(sums, group=shard.group)
        s_xx, s_yy, s_xy = sums.unbind()
        if not unbiased:  # k(a, a) = number of bandwidths on each left-out diagonal term
            s_xx = s_xx + n * len(gammas)
            s_yy = s_yy + n * len(gammas)
        value = c_self * (s_xx + s_yy) - 2.0 * c_cross * s_xy
        if with_grad:
            ctx.save_for_backward(gx, gy)
            ctx.input_dtype = x.dtype
        return value.to(accumulation_dtype(x.dtype))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        gx, gy = ctx.saved_tensors
        scale = grad_output.to(gx.dtype)
        grad_x = (gx * scale).to(ctx.input_dtype) if ctx.needs_input_grad[0] else None
        grad_y = (gy * scale).to(ctx.input_dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_y, None, None, None, None, None, None


def sharded_rbf_mmd(x: torch.Tensor, y: torch.Tensor, bandwidths: Sequence[float], unbiased: bool, backend: str,
                    shard: Shard, cross_pairs: int | None = None) -> torch.Tensor:
    """``rbf_mmd`` without the sample checks, over ``shard``'s share of the pair tiles (its kernel sums are
    all-reduced over the shard's group; each rank's gradient is its share's). ``cross_pairs`` (default N^2)
    divides the xy kernel sum."""
    gammas = _gammas(check_bandwidths(bandwidths))
    chosen = choose_backend(backend, x.device, x.dtype, "MMD kernel")
    with_grad = torch.is_grad_enabled() and (x.requires_grad or y.requires_grad)
    cross_pairs = cross_pairs or x.shape[0] ** 2
    return _RBFMMDFunction.apply(x, y, gammas, bool(unbiased), chosen, shard, with_grad, cross_pairs)


def rbf_mmd(x: torch.Tensor, y: torch.Tensor, bandwidths: Sequence[float] = DEFAULT_BANDWIDTHS,
            unbiased: bool = True, backend: str = "auto") -> torch.Tensor:
    """Squared MMD between samples ``x`` and ``y`` (both ``[N, F]``) with ``sum_a exp(-|u-v|^2 / (2a))``.

    ``unbiased=True`` gives the U-statistic (diagonals left out of the ``xx``/``yy`` sums, divided by
    ``N(N-1)``; ``xy`` divided by ``N^2``), ``False`` the V-statistic. Differentiable in ``x`` and ``y``.
    Returns an fp32 scalar (fp64 for fp64 inputs). Memory O(N F): no ``N x N`` matrix is formed.
    ``backend``: ``"auto"`` (Triton on CUDA, PyTorch otherwise; env ``MMDGEN_BACKEND``), ``"triton"``,
    ``"torch"``.
    """
    _check_samples(x, y)
    return sharded_rbf_mmd(x, y, bandwidths, unbiased, backend, SINGLE_PROCESS)


# ----------------------------------------------------------------------------------------------
# The materialising baseline
# ----------------------------------------------------------------------------------------------


def _kernel_sum(sq_dist: torch.Tensor, bandwidth: float) -> torch.Tensor:
    return torch.exp((-0.5 / bandwidth) * sq_dist).sum()


def naive_rbf_mmd(x: torch.Tensor, y: torch.Tensor, bandwidths: Sequence[float] = DEFAULT_BANDWIDTHS,
                  unbiased: bool = True) -> torch.Tensor:
    """The estimator as commonly written: three N x N distance matrices, memory O(N^2).

    Kept as the baseline for benchmarks and the demo (it checkpoints each exponential, as the public
    reference does, so its backward stores the distance matrices only). Same value as ``rbf_mmd``.
    """
    from torch.utils.checkpoint import checkpoint

    n = x.shape[0]
    xx, yy, xy = x @ x.T, y @ y.T, x @ y.T
    rx, ry = xx.diagonal(), yy.diagonal()
    d_xx = rx[:, None] + rx[None, :] - 2.0 * xx
    d_yy = ry[:, None] + ry[None, :] - 2.0 * yy
    d_xy = rx[:, None] + ry[None, :] - 2.0 * xy
    c_self = 1.0 / (n * (n - 1)) if unbiased else 1.0 / (n * n)
    diagonal = n if unbiased else 0  # k(a, a) = 1 per bandwidth on the diagonal
    total = x.new_zeros(())
    for a in bandwidths:
        k_xx = checkpoint(_kernel_sum, d_xx, a, use_reentrant=False)
        k_yy = checkpoint(_kernel_sum, d_yy, a, use_reentrant=False)
        k_xy = checkpoint(_kernel_sum, d_xy, a, use_reentrant=False)
        total = total + c_self * (k_xx - diagonal + k_yy - diagonal) - 2.0 * k_xy / (n * n)
    return total
