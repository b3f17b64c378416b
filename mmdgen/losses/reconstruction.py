"""Reconstruction losses of the codec: waveform L1, the multi-scale mel loss, and SI-SNR (a validation measure
the trainer logs, and a metric of the codec reports).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn


def waveform_l1(fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    return F.l1_loss(fake, real)


class MultiScaleMelLoss(nn.Module):
    """Mean over STFT sizes of L1 + L2 between log-mel spectrograms (n_fft 64..1024, hop n_fft/4)."""

    def __init__(self, sample_rate: int, n_ffts: tuple[int, ...] = (64, 128, 256, 512, 1024), n_mels: int = 64,
                 floor: float = 1e-5):
        super().__init__()
        import torchaudio

        self.floor = floor
        with warnings.catch_warnings():
            # 64 mels over the 33 bins of a 64-point STFT leave some filters empty: they add nothing, by design
            warnings.filterwarnings("ignore", message="At least one mel filterbank has all zero values")
            self.mels = nn.ModuleList(
                torchaudio.transforms.MelSpectrogram(sample_rate=sample_rate, n_fft=n, win_length=n,
                                                     hop_length=n // 4, n_mels=n_mels, normalized=True,
                                                     center=False, power=1.0)
                for n in n_ffts)
        self.n_ffts = n_ffts

    def forward(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        if real.shape[-1] < max(self.n_ffts):
            raise ValueError(f"the mel loss needs at least {max(self.n_ffts)} samples, got {real.shape[-1]}")
        terms = []
        for mel in self.mels:
            log_fake = torch.log(mel(fake.float()).clamp_min(self.floor))
            log_real = torch.log(mel(real.float()).clamp_min(self.floor))
            terms.append(F.l1_loss(log_fake, log_real) + F.mse_loss(log_fake, log_real))
        return torch.stack(terms).mean()


def si_snr(estimate: torch.Tensor, reference: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scale-invariant signal-to-noise ratio in dB, per item ([B, C, L] -> [B]).

    Both signals are made zero-mean per channel; the target is the projection of the estimate on the
    reference (per channel), the noise the rest; the ratio sums energies over channels and samples.
    """
    estimate = estimate - estimate.mean(-1, keepdim=True)
    reference = reference - reference.mean(-1, keepdim=True)
    scale = (estimate * reference).sum(-1, keepdim=True) / (reference.square().sum(-1, keepdim=True) + eps)
    target = scale * reference
    noise = estimate - target
    ratio = target.square().sum((-1, -2)) / (noise.square().sum((-1, -2)) + eps)
    return 10 * torch.log10(ratio + eps)
