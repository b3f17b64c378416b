"""Dependence measures on synthetic codes of known dependence."""

import math

import pytest
import torch

from mmdgen.metrics.dependence import (aligned_codes, dependence_report, entropy_bits, mutual_information_with_others,
                                      pairwise_mutual_information, plug_in_mi_bias_bits, total_correlation)


def _uniform(n, q, gen):
    return torch.randint(q, (n,), generator=gen)


def test_copies_are_fully_dependent_and_independent_codes_are_not():
    gen = torch.Generator().manual_seed(0)
    a = _uniform(200_000, 8, gen)
    samples = torch.stack([a, a, _uniform(200_000, 8, gen)], 1)
    mi, percent = pairwise_mutual_information(samples)
    assert mi[0, 1] == pytest.approx(3.0, abs=1e-3) and percent[0, 1] == pytest.approx(100.0, abs=0.05)
    bias = plug_in_mi_bias_bits(8, 8, 200_000)
    assert 0 <= mi[0, 2] < 4 * bias and 0 <= mi[1, 2] < 4 * bias
    tc, _ = total_correlation(samples)
    assert tc == pytest.approx(3.0, abs=1e-2)  # H(a) + H(a) + H(c) - H(a, c)


def test_noisy_copy_matches_the_channel_capacity_formula():
    """Z2 = Z1 with probability p, else uniform: I = log2 q - H(row of the channel)."""
    gen = torch.Generator().manual_seed(1)
    q, p, n = 4, 0.6, 400_000
    z1 = _uniform(n, q, gen)
    keep = torch.rand(n, generator=gen) < p
    z2 = torch.where(keep, z1, _uniform(n, q, gen))
    stay = p + (1 - p) / q
    move = (1 - p) / q
    expected = math.log2(q) + stay * math.log2(stay) + (q - 1) * move * math.log2(move)
    mi, _ = pairwise_mutual_information(torch.stack([z1, z2], 1))
    assert mi[0, 1] == pytest.approx(expected, abs=3e-3)
    others = mutual_information_with_others(torch.stack([z1, z2], 1))
    assert torch.allclose(others, torch.tensor([expected, expected], dtype=torch.float64), atol=3e-3)


def test_delay_alignment_exposes_lagged_dependence():
    gen = torch.Generator().manual_seed(2)
    source = torch.randint(16, (50, 1, 203), generator=gen)
    codes = torch.cat([source[..., k: k + 200] for k in range(3)], 1)  # stage k at t-k is the source at t
    assert entropy_bits(aligned_codes(codes, delay=True)) == pytest.approx(entropy_bits(source.reshape(-1)), abs=0.05)
    aligned = dependence_report(codes, delay=True)
    plain = dependence_report(codes, delay=False)
    assert aligned["mean_pairwise_mi_percent"] > 99
    assert plain["mean_pairwise_mi_percent"] < 5 * max(plain["baseline_mean_pairwise_mi_percent"], 0.1)
    assert aligned["baseline_mean_pairwise_mi_percent"] < 2


def test_bad_codes():
    with pytest.raises(ValueError, match=r"\[B, K, T\]"):
        aligned_codes(torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="at least 4 frames"):
        aligned_codes(torch.zeros(1, 4, 2, dtype=torch.long), delay=True)
