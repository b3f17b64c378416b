"""Frechet audio distance (FAD): the Frechet distance between Gaussians fitted to musicnn's 200-d penultimate
features (``mmdgen.metrics.musicnn``) of every 3 s patch of the generated and the reference clips.

Patches, not per-clip means, are the samples: FAD implementations fit the distribution of frame embeddings
(VGGish FAD uses every 0.96 s frame), and a per-clip mean would both narrow that distribution and leave a third
as many samples (of 10 s clips). Even so, 40 clips of 10 s give 120 patches for 200 dimensions, so the
covariances are rank-deficient (handled: see ``frechet_distance_from_statistics``) and the estimate is biased
upward by an amount that shrinks with the number of patches: compare FADs computed from equally many patches
only.

Clips are ``[samples]`` or ``[channels, samples]`` float waveforms in [-1, 1] (channels are averaged).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mmdgen.metrics.musicnn import Musicnn, musicnn_outputs


def frechet_distance_from_statistics(mean_a: torch.Tensor, covariance_a: torch.Tensor, mean_b: torch.Tensor,
                                     covariance_b: torch.Tensor) -> float:
    """Frechet (2-Wasserstein squared) distance between N(mean_a, covariance_a) and N(mean_b, covariance_b):

        |mean_a - mean_b|^2 + tr(C_a) + tr(C_b) - 2 tr sqrt(C_a C_b)

    C_a C_b is not symmetric, but it is similar to the symmetric PSD matrix sqrt(C_a) C_b sqrt(C_a), whose
    eigenvalues (from ``eigvalsh``, clamped at 0 against rounding) give tr sqrt(C_a C_b) as the sum of
    their square roots. Unlike scipy's general ``sqrtm`` this stays real and stable for singular
    covariances (fewer samples than dimensions). Computed in float64; means ``[D]``, covariances ``[D, D]``.
    """
    mean_a, mean_b = mean_a.double(), mean_b.double()
    covariance_a, covariance_b = covariance_a.double(), covariance_b.double()
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance_a)
    sqrt_a = (eigenvectors * eigenvalues.clamp_min(0).sqrt()) @ eigenvectors.T
    product = sqrt_a @ covariance_b @ sqrt_a
    trace_sqrt = torch.linalg.eigvalsh((product + product.T) / 2).clamp_min(0).sqrt().sum()
    distance = (mean_a - mean_b).square().sum() + covariance_a.trace() + covariance_b.trace() - 2 * trace_sqrt
    return max(float(distance), 0.0)  # >= 0 exactly; rounding can leave -1e-12 for identical statistics


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to ``features_a`` ``[N, D]`` and ``features_b`` ``[M, D]``
    (sample means and unbiased covariances, in float64)."""
    for name, features in (("features_a", features_a), ("features_b", features_b)):
        if features.dim() != 2 or features.shape[0] < 2:
            raise ValueError(f"{name} must be [N, D] with N >= 2 samples, got {tuple(features.shape)}")
    if features_a.shape[1] != features_b.shape[1]:
        raise ValueError(f"features_a has {features_a.shape[1]} dimensions but features_b has {features_b.shape[1]}")
    a, b = features_a.double(), features_b.double()
    return frechet_distance_from_statistics(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T))


def audio_features(clips: Sequence[torch.Tensor], sample_rate: int, tagger: Musicnn | None = None) -> torch.Tensor:
    """``[patches, 200]`` musicnn penultimate features of every 3 s patch of every clip (float64)."""
    return torch.cat([features for features, _ in musicnn_outputs(clips, sample_rate, tagger)])


def frechet_audio_distance(generated: Sequence[torch.Tensor], reference: Sequence[torch.Tensor], sample_rate: int,
                           tagger: Musicnn | None = None) -> float:
    """FAD between two sets of clips (both at ``sample_rate``) on musicnn patch features. Biased upward
    for few patches: compare values computed from equally many."""
    return frechet_distance(audio_features(generated, sample_rate, tagger),
                            audio_features(reference, sample_rate, tagger))
