"""Plain, obviously correct float64 references: explicit pairwise differences, explicit loops."""

import torch


def gaussian_kernel_matrix(a: torch.Tensor, b: torch.Tensor, bandwidths) -> torch.Tensor:
    sq_dist = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    return sum(torch.exp(-sq_dist / (2.0 * bw)) for bw in bandwidths)


def reference_terms(x, y, bandwidths, unbiased):
    """The three terms of MMD^2 (xx, yy, -2 xy), float64."""
    x, y = x.double(), y.double()
    n = x.shape[0]
    k_xx, k_yy, k_xy = (gaussian_kernel_matrix(a, b, bandwidths) for a, b in ((x, x), (y, y), (x, y)))
    if unbiased:
        off_diagonal = ~torch.eye(n, dtype=torch.bool)
        return k_xx[off_diagonal].mean(), k_yy[off_diagonal].mean(), -2.0 * k_xy.mean()
    return k_xx.mean(), k_yy.mean(), -2.0 * k_xy.mean()


def reference_mmd(x, y, bandwidths, unbiased):
    return sum(reference_terms(x, y, bandwidths, unbiased))


def reference_joint_samples(latents, delay):
    """[B, K, D, T] -> [N, K * D], one sample at a time."""
    batch, stages, dim, frames = latents.shape
    first = stages - 1 if delay else 0
    rows = []
    for b in range(batch):
        for t in range(first, frames):
            shifts = range(stages) if delay else [0] * stages
            rows.append(torch.cat([latents[b, k, :, t - s] for k, s in zip(range(stages), shifts)]))
    return torch.stack(rows)


def reference_independence_loss(latents, perms, bandwidths, delay, unbiased, normalize, exclude_shared=True):
    stages, dim = latents.shape[1], latents.shape[2]
    x = reference_joint_samples(latents.double(), delay)
    if normalize:
        x = (x - x.mean(0)) / torch.sqrt(x.var(0) + 1e-8)
    n = x.shape[0]
    y = torch.empty_like(x)
    for k in range(stages):
        cols = slice(k * dim, (k + 1) * dim)
        for j in range(n):
            y[j, cols] = x[perms[k][j], cols]
    if not exclude_shared:
        return reference_mmd(x, y, bandwidths, unbiased)
    keep = torch.ones(n, n, dtype=torch.bool)  # keep[i, j]: x_i lent no codebook to y_j
    for k in range(stages):
        for j in range(n):
            keep[perms[k][j], j] = False
    xx, yy, _ = reference_terms(x, y, bandwidths, unbiased)
    return xx + yy - 2.0 * gaussian_kernel_matrix(x, y, bandwidths)[keep].mean()
