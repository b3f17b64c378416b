"""How well a codec reconstructs audio: the trainer's multi-scale mel distance and a multi-resolution STFT
distance, with SI-SNR (``mmdgen.losses.reconstruction``), each per clip and averaged over clips by
``reconstruction_report``.

Signals are ``[..., samples]`` float waveforms in [-1, 1]; estimate and reference must have the same shape.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

import torch

from mmdgen.losses.reconstruction import MultiScaleMelLoss, si_snr

DEFAULT_FFT_SIZES = (512, 1024, 2048)


def _check_pair(estimate: torch.Tensor, reference: torch.Tensor) -> None:
    if estimate.shape != reference.shape:
        raise ValueError(f"estimate {tuple(estimate.shape)} and reference {tuple(reference.shape)} must have "
                         f"the same shape")


@lru_cache(maxsize=4)
def _mel_loss(sample_rate: int) -> MultiScaleMelLoss:
    return MultiScaleMelLoss(sample_rate)


@torch.no_grad()
def mel_distance(estimate: torch.Tensor, reference: torch.Tensor, sample_rate: int) -> float:
    """The codec trainer's "mel_distance": ``MultiScaleMelLoss`` (mean over STFT sizes 64..1024 of L1 + L2
    between log-mel spectrograms) of ``[..., samples]`` signals of at least 1024 samples.

    The loss module is the one the trainer uses, so the numbers compare with its validation log. Over a
    batch it is the mean over items (all items the same length), so per-clip values average to it.
    """
    _check_pair(estimate, reference)
    mel = _mel_loss(sample_rate).to(reference.device)
    return float(mel(estimate, reference))


@torch.no_grad()
def multi_resolution_stft_distance(estimate: torch.Tensor, reference: torch.Tensor,
                                   fft_sizes: tuple[int, ...] = DEFAULT_FFT_SIZES, eps: float = 1e-7) -> float:
    """Multi-resolution STFT distance of ``[..., samples]`` signals (at least ``max(fft_sizes)`` samples).

    For each FFT size n (Hann window of n samples, hop n / 4, centred frames), with magnitudes
    S = |STFT(reference)| and Ŝ = |STFT(estimate)| over all items, channels, frames and bins:

        spectral convergence  SC = ||S - Ŝ||_F / ||S||_F
        log-magnitude L1      LM = mean |log(S + eps) - log(Ŝ + eps)|

    and the distance is the mean over FFT sizes of SC + LM (the form of Yamamoto et al.'s Parallel
    WaveGAN loss). It is 0 for identical signals, ignores the phase (so a polarity flip costs nothing),
    and is not symmetric: SC is relative to the reference. Scaling the estimate by a gives
    |1 - a| + |log a| wherever the magnitudes are well above ``eps``. Computed in float64.
    """
    _check_pair(estimate, reference)
    if reference.shape[-1] < max(fft_sizes):
        raise ValueError(f"the multi-resolution STFT distance needs at least {max(fft_sizes)} samples "
                         f"(the largest FFT size), got {reference.shape[-1]}")
    estimate = estimate.detach().reshape(-1, estimate.shape[-1]).double()
    reference = reference.detach().reshape(-1, reference.shape[-1]).double()
    terms = []
    for n_fft in fft_sizes:
        window = torch.hann_window(n_fft, dtype=torch.float64, device=reference.device)

        def magnitude(signal: torch.Tensor) -> torch.Tensor:
            return torch.stft(signal, n_fft, n_fft // 4, window=window, center=True, return_complex=True).abs()

        target, predicted = magnitude(reference), magnitude(estimate)
        convergence = torch.linalg.vector_norm(target - predicted) / torch.linalg.vector_norm(target).clamp_min(eps)
        log_magnitude = (torch.log(target + eps) - torch.log(predicted + eps)).abs().mean()
        terms.append(convergence + log_magnitude)
    return float(torch.stack(terms).mean())


def reconstruction_report(codec, clips: Iterable[torch.Tensor]) -> dict:
    """Encode and decode each clip (``[channels, samples]`` at ``codec.cfg.sample_rate``) with ``codec``
    (an ``mmdgen.model.codec.Codec``) and average over clips: ``mel_distance`` (the trainer's),
    ``si_snr_db`` and ``mr_stft_distance``; ``clips`` is their number."""
    device = next(codec.parameters()).device
    sample_rate = codec.cfg.sample_rate
    totals = {"mel_distance": 0.0, "si_snr_db": 0.0, "mr_stft_distance": 0.0}
    count = 0
    for index, clip in enumerate(clips):
        if clip.dim() != 2 or clip.shape[0] != codec.cfg.channels:
            raise ValueError(f"clip {index}: expected [{codec.cfg.channels}, samples] audio, got {tuple(clip.shape)}")
        audio = clip.to(device, torch.float32)[None]
        decoded = codec.decode(codec.encode(audio), audio.shape[-1])
        totals["mel_distance"] += mel_distance(decoded, audio, sample_rate)
        totals["si_snr_db"] += float(si_snr(decoded, audio)[0])
        totals["mr_stft_distance"] += multi_resolution_stft_distance(decoded, audio)
        count += 1
    if count == 0:
        raise ValueError("reconstruction_report needs at least one clip, got none")
    return {"clips": count, **{name: total / count for name, total in totals.items()}}
