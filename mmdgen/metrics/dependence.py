"""Dependence between codebooks, measured on codes with histograms (plug-in estimates, in bits).

- ``pairwise_mutual_information``: I(Z_i; Z_j) for every pair, and as a percentage of the pair's joint
  entropy H(Z_i, Z_j) (the paper's figure: total correlation of two codebooks over their joint entropy).
- ``mutual_information_with_others``: I(Z_k; Z_{-k}) per codebook (the paper's Figures 4-5).
- ``total_correlation``: sum_k H(Z_k) - H(Z_1..Z_K), and as a percentage of H(Z_1..Z_K).

Optionally on delay-aligned codes (sample t groups stage k at frame t - k: the codes the delay pattern
predicts together). Bias: a plug-in entropy of a histogram with C cells from N samples is low by about
(C - 1) / (2 N ln 2) bits, so mutual information is high by about (C_i - 1)(C_j - 1) / (2 N ln 2).
For a pair of 2048-entry codebooks that needs N in the tens of millions to be small; with K = 4 the
joint histogram has 2048^4 cells and the total correlation is dominated by bias at any N we can
afford. ``shuffled_baseline`` measures the bias directly: the same estimate on codes whose stages were
permuted independently (true dependence 0). Report the pairwise measure, with its baseline.
"""

from __future__ import annotations

import math

import torch

from mmdgen.losses.independence import joint_samples


def aligned_codes(codes: torch.Tensor, delay: bool = False) -> torch.Tensor:
    """[B, K, T] codes -> [N, K] samples (delay: stage k at frame t - k, padded frames cropped)."""
    if codes.dim() != 3:
        raise ValueError(f"codes must be [B, K, T], got {tuple(codes.shape)}")
    return joint_samples(codes[:, :, None, :], delay)[:, :, 0]  # the alignment the independence loss uses


def entropy_bits(samples: torch.Tensor) -> float:
    """Plug-in entropy of the rows of ``samples`` ([N] or [N, m] integer codes), in bits."""
    rows = samples if samples.dim() == 2 else samples[:, None]
    _, counts = torch.unique(rows, dim=0, return_counts=True)
    p = counts.double() / rows.shape[0]
    return float(-(p * torch.log2(p)).sum())


def pairwise_mutual_information(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([K, K] I(Z_i; Z_j) in bits, [K, K] that as % of H(Z_i, Z_j)); diagonals hold H(Z_k) and 100."""
    stages = samples.shape[1]
    marginal = [entropy_bits(samples[:, k]) for k in range(stages)]
    mi = torch.zeros(stages, stages, dtype=torch.float64)
    percent = torch.zeros_like(mi)
    for i in range(stages):
        mi[i, i], percent[i, i] = marginal[i], 100.0
        for j in range(i + 1, stages):
            joint = entropy_bits(samples[:, [i, j]])
            value = marginal[i] + marginal[j] - joint
            mi[i, j] = mi[j, i] = value
            percent[i, j] = percent[j, i] = 100.0 * value / joint if joint > 0 else 0.0
    return mi, percent


def mutual_information_with_others(samples: torch.Tensor) -> torch.Tensor:
    """[K] I(Z_k; Z_{-k}) = H(Z_k) + H(Z_{-k}) - H(Z), in bits."""
    stages = samples.shape[1]
    joint = entropy_bits(samples)
    return torch.tensor([entropy_bits(samples[:, k]) + entropy_bits(samples[:, [j for j in range(stages) if j != k]])
                         - joint for k in range(stages)], dtype=torch.float64)


def total_correlation(samples: torch.Tensor) -> tuple[float, float]:
    """(sum_k H(Z_k) - H(Z), in bits; that as % of H(Z))."""
    joint = entropy_bits(samples)
    value = sum(entropy_bits(samples[:, k]) for k in range(samples.shape[1])) - joint
    return value, (100.0 * value / joint if joint > 0 else 0.0)


def shuffled_baseline(samples: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The samples with each codebook permuted independently: same marginals, no dependence."""
    n = samples.shape[0]
    return torch.stack([samples[torch.randperm(n, generator=generator), k] for k in range(samples.shape[1])], 1)


def plug_in_mi_bias_bits(cells_i: int, cells_j: int, num_samples: int) -> float:
    """First-order upward bias of a plug-in mutual information estimate (Miller-Madow)."""
    return (cells_i - 1) * (cells_j - 1) / (2 * num_samples * math.log(2))


def dependence_report(codes: torch.Tensor, delay: bool = False, seed: int = 0) -> dict:
    """Everything above for [B, K, T] codes, with the shuffled baseline of each measure."""
    samples = aligned_codes(codes, delay)
    baseline = shuffled_baseline(samples, torch.Generator().manual_seed(seed))
    mi, percent = pairwise_mutual_information(samples)
    base_mi, base_percent = pairwise_mutual_information(baseline)
    stages = samples.shape[1]
    off = ~torch.eye(stages, dtype=torch.bool)
    tc, tc_percent = total_correlation(samples)
    base_tc, base_tc_percent = total_correlation(baseline)
    return {
        "samples": samples.shape[0], "delay": delay,
        "pairwise_mi_bits": mi.tolist(), "pairwise_mi_percent": percent.tolist(),
        "mean_pairwise_mi_percent": float(percent[off].mean()) if stages > 1 else 0.0,
        "baseline_mean_pairwise_mi_percent": float(base_percent[off].mean()) if stages > 1 else 0.0,
        "mi_with_others_bits": mutual_information_with_others(samples).tolist(),
        "baseline_mi_with_others_bits": mutual_information_with_others(baseline).tolist(),
        "total_correlation_bits": tc, "total_correlation_percent": tc_percent,
        "baseline_total_correlation_percent": base_tc_percent,
    }
