"""L_inde, the independence-promoting loss: the MMD^2 between the joint distribution of the K per-stage latents
of the RVQ and the product of their marginals (Lemercier et al., ICML 2024).

Steps: delay-align (optional; stage k shifted by k frames so that a sample groups the codes the delay pattern
predicts in one step), flatten batch and time to N samples of ``K * D``, standardise each feature over the N
samples, permute the samples independently per codebook (the product-of-marginals sample), and the MMD^2 of
the two samples with ``mmdgen.kernels.mmd``'s fused, memory-linear estimator. Pairs (x_i, y_j) where y_j took a
codebook from x_i are left out of the xy average (``shared_pairs``), which makes the unbiased estimate exactly
unbiased for independent codebooks.

Distributed: every rank's samples are gathered into one global batch (the permutation spans ranks), rank 0's
permutations are broadcast, the pair tiles are split across ranks, the kernel sums all-reduced and the partial
gradients summed in the gather's backward. Every rank gets the global loss and the exact gradient of its own
samples. Memory O(N K D), as the kernel's.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from mmdgen.kernels.backend import accumulation_dtype, resolve_backend
from mmdgen.kernels.mmd import (DEFAULT_BANDWIDTHS, SINGLE_PROCESS, Shard, check_bandwidths, check_finite,
                                sharded_rbf_mmd)

STANDARDIZE_EPS = 1e-8


def joint_samples(latents: torch.Tensor, delay: bool = False) -> torch.Tensor:
    """[B, K, D, T] per-stage latents -> [N, K, D] joint samples, N = B * T (or B * (T - K + 1)).

    With ``delay`` the sample at step t groups stage k at frame t - k, i.e. exactly the codes the delay
    pattern predicts in one step; frames where a stage would be padded are cropped.
    """
    batch, stages, dim, frames = latents.shape
    if delay:
        if frames < stages:
            raise ValueError(f"delay alignment of {stages} stages needs at least {stages} frames, got T={frames}")
        kept = frames - stages + 1
        latents = torch.stack([latents[:, k, :, stages - 1 - k: stages - 1 - k + kept] for k in range(stages)], 1)
    return latents.permute(0, 3, 1, 2).reshape(-1, stages, dim)


def standardize(samples: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance per feature over the N samples (unbiased variance, eps 1e-8)."""
    mean = samples.mean(dim=0, keepdim=True)
    var = samples.var(dim=0, keepdim=True)
    return (samples - mean) / torch.sqrt(var + STANDARDIZE_EPS)


def codebook_permutations(num_samples: int, stages: int, generator: torch.Generator | None,
                          device: torch.device) -> torch.Tensor:
    """[K, N] independent permutations of the N samples, one per codebook."""
    if generator is not None:
        perms = [torch.randperm(num_samples, generator=generator, device=generator.device) for _ in range(stages)]
    else:
        perms = [torch.randperm(num_samples, device=device) for _ in range(stages)]
    return torch.stack(perms).to(device)


def product_of_marginals(samples: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    """y[n, k] = samples[perms[k, n], k]: the codebooks decoupled, each marginal kept."""
    return torch.stack([samples[perms[k], k] for k in range(samples.shape[1])], dim=1)


def shared_pairs(perms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index pairs (i, j) where the joint sample x_i lent a codebook to y_j (i = perms[k, j] for some k).

    Such a pair holds the same vector twice, so its kernel value is larger than that of two independent
    draws: kept in the xy average, it biases the estimate below zero by O(K/N), as large as its
    standard deviation at any N. Each pair appears once even when several codebooks came from x_i.
    """
    sources, _ = perms.T.sort(dim=1)  # [N, K]: the samples y_j drew its codebooks from
    first = torch.ones_like(sources, dtype=torch.bool)
    first[:, 1:] = sources[:, 1:] != sources[:, :-1]
    cols = torch.arange(sources.shape[0], device=perms.device)[:, None].expand_as(sources)
    return sources[first], cols[first]


def _pair_kernel_sum(a: torch.Tensor, b: torch.Tensor, bandwidths: tuple[float, ...]) -> torch.Tensor:
    """sum_p k(a_p, b_p) over row pairs, from exact differences."""
    sq_dist = (a - b).square().sum(dim=1)
    return sum(torch.exp(-(1.0 / (2.0 * bandwidth)) * sq_dist).sum() for bandwidth in bandwidths)


class _AllReduceValue(torch.autograd.Function):
    """The sum over ranks in forward; the gradient of this rank's own term in backward (the
    ranks' partial gradients are summed by the gather's backward)."""

    @staticmethod
    def forward(ctx, local, group):
        total = local.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _active_group(process_group):
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


class _GatherSamples(torch.autograd.Function):
    """All ranks' samples concatenated in rank order; backward sums the ranks' partial gradients."""

    @staticmethod
    def forward(ctx, local, group):
        world = dist.get_world_size(group)
        count = torch.tensor([local.shape[0]], dtype=torch.int64, device=local.device)
        counts = [torch.zeros_like(count) for _ in range(world)]
        dist.all_gather(counts, count, group=group)
        counts = [int(c) for c in counts]
        padded = local.new_zeros((max(counts),) + tuple(local.shape[1:]))
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous(), group=group)
        ctx.group, ctx.counts, ctx.rank = group, counts, dist.get_rank(group)
        return torch.cat([part[:c] for part, c in zip(parts, counts)])

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        start = sum(ctx.counts[: ctx.rank])
        return grad[start: start + ctx.counts[ctx.rank]], None


def independence_loss(latents: torch.Tensor, *, delay: bool = False,
                      bandwidths: Sequence[float] = DEFAULT_BANDWIDTHS, unbiased: bool = True,
                      normalize: bool = True, generator: torch.Generator | None = None, backend: str = "auto",
                      exclude_shared: bool = True, process_group=None) -> torch.Tensor:
    """L_inde: MMD^2 between the joint distribution of the K per-stage latents and the product of marginals.

    ``latents``: ``[B, K, D, T]``, the quantized latents of each RVQ stage. Steps: delay-align
    (optional), flatten batch and time to N samples of ``K * D``, standardise each feature over the N
    samples (optional), draw the product-of-marginals sample by an independent permutation of the
    samples per codebook (seeded by ``generator``), return ``rbf_mmd``. The gradient reaches
    ``latents`` through both samples.

    ``exclude_shared`` (default): the xy average leaves out the pairs (x_i, y_j) where y_j took a
    codebook from x_i (at most K per j, see ``shared_pairs``), dividing by the number of pairs kept.
    With it the unbiased estimate is exactly unbiased for independent codebooks; without it (the
    public reference's form, ``rbf_mmd`` on the two samples as they are) it sits about K/N below.

    Distributed: when torch.distributed is initialised with more than one rank (``process_group`` or
    the world), the samples of every rank form one global batch, rank 0 draws the permutations, the
    pair work is split across ranks, and each rank gets the global loss with the exact gradient for
    its own latents. Every rank must call this (and backward) collectively. DDP averages parameter
    gradients over ranks, so under DDP multiply this loss by the world size to get dL/dtheta.
    """
    if not isinstance(latents, torch.Tensor) or latents.dim() != 4:
        shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(f"latents must have shape [B, K, D, T], got {shape}")
    if not latents.is_floating_point():
        raise ValueError(f"latents must be floating point, got {latents.dtype}")
    resolve_backend(backend, latents.device)  # a bad backend fails before any collective
    bandwidths = check_bandwidths(bandwidths)
    check_finite("latents", latents)
    stages = latents.shape[1]
    samples = joint_samples(latents, delay)
    group = _active_group(process_group)
    if group is not None:
        samples = _GatherSamples.apply(samples, group)
    num_samples = samples.shape[0]
    if num_samples < 2:
        raise ValueError(f"the independence loss needs at least 2 samples (B * T after delay), got {num_samples}")
    if normalize:
        samples = standardize(samples)
    perms = codebook_permutations(num_samples, stages, generator, samples.device)
    if group is not None:
        dist.broadcast(perms, group=group, group_src=0)
    marginals = product_of_marginals(samples, perms)
    shard = SINGLE_PROCESS if group is None else Shard(dist.get_rank(group), dist.get_world_size(group), group)
    x = samples.reshape(num_samples, -1)
    y = marginals.reshape(num_samples, -1)
    if not exclude_shared:
        return sharded_rbf_mmd(x, y, bandwidths, unbiased, backend, shard)
    rows, cols = shared_pairs(perms)
    cross_pairs = num_samples * num_samples - rows.numel()
    value = sharded_rbf_mmd(x, y, bandwidths, unbiased, backend, shard, cross_pairs=cross_pairs)
    mine = cols % shard.world == shard.rank
    dtype = accumulation_dtype(x.dtype)
    shared = _pair_kernel_sum(x[rows[mine]].to(dtype), y[cols[mine]].to(dtype), bandwidths)
    if shard.world > 1:
        shared = _AllReduceValue.apply(shared, shard.group)
    return value + (2.0 / cross_pairs) * shared.to(value.dtype)
