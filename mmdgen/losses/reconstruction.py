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


class _STFTMagnitude(torch.autograd.Function):
    """|rfft(frames)| over the last dimension, [..., n] -> [..., n // 2 + 1], with the adjoint written out.

    The backward pass is one inverse real FFT of the bins' gradient (interior bins halved, so that
    ``n * irfft`` is the adjoint of the one-sided ``rfft``), where autograd's own backward of ``rfft`` pads to a
    full complex FFT of the same size: several times the cost on CPU. A zero bin gets no gradient (``sgn(0) = 0``,
    as autograd's ``abs``)."""

    @staticmethod
    def forward(ctx, frames: torch.Tensor) -> torch.Tensor:
        spectrum = torch.fft.rfft(frames)
        magnitude = spectrum.abs()
        ctx.save_for_backward(spectrum, magnitude)
        ctx.n = frames.shape[-1]
        return magnitude

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        spectrum, magnitude = ctx.saved_tensors
        n = ctx.n
        bins = spectrum * (grad / torch.where(magnitude > 0, magnitude, torch.ones_like(magnitude)))
        weights = torch.full((bins.shape[-1],), 0.5, dtype=magnitude.dtype, device=magnitude.device)
        weights[0] = 1.0
        if n % 2 == 0:  # the Nyquist bin is its own mirror, like bin 0
            weights[-1] = 1.0
        return torch.fft.irfft(bins * weights, n=n) * n


class MultiScaleMelLoss(nn.Module):
    """Mean over STFT sizes of L1 + L2 between log-mel spectrograms (n_fft 64..1024, hop n_fft/4).

    Per size: frames of ``n_fft`` samples every ``n_fft / 4`` (no padding), a periodic Hann window scaled to unit
    energy, STFT magnitudes, HTK mel filters without normalisation (torchaudio's ``MelSpectrogram`` with
    ``normalized=True, center=False, power=1``, whose values this reproduces), log of the mels floored at
    ``floor``. The windows and filterbanks are made once; the reference signal's spectrograms are computed
    without a graph when it needs no gradient, and the magnitudes' backward pass is ``_STFTMagnitude``'s.
    """

    def __init__(self, sample_rate: int, n_ffts: tuple[int, ...] = (64, 128, 256, 512, 1024), n_mels: int = 64,
                 floor: float = 1e-5):
        super().__init__()
        from torchaudio.functional import melscale_fbanks

        self.floor = floor
        self.n_ffts = n_ffts
        for n in n_ffts:
            window = torch.hann_window(n)
            self.register_buffer(f"window_{n}", window / window.square().sum().sqrt(), persistent=False)
            with warnings.catch_warnings():
                # 64 mels over the 33 bins of a 64-point STFT leave some filters empty: they add nothing, by design
                warnings.filterwarnings("ignore", message="At least one mel filterbank has all zero values")
                filters = melscale_fbanks(n // 2 + 1, 0.0, float(sample_rate // 2), n_mels, sample_rate)
            self.register_buffer(f"filters_{n}", filters, persistent=False)

    def log_mel(self, audio: torch.Tensor, n_fft: int) -> torch.Tensor:
        """[..., L] -> log-mels [..., frames, n_mels] at STFT size ``n_fft``."""
        frames = audio.float().unfold(-1, n_fft, n_fft // 4) * getattr(self, f"window_{n_fft}")
        mels = _STFTMagnitude.apply(frames) @ getattr(self, f"filters_{n_fft}")
        return torch.log(mels.clamp_min(self.floor))

    def forward(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        if real.shape[-1] < max(self.n_ffts):
            raise ValueError(f"the mel loss needs at least {max(self.n_ffts)} samples, got {real.shape[-1]}")
        terms = []
        for n in self.n_ffts:
            log_fake = self.log_mel(fake, n)
            with torch.set_grad_enabled(real.requires_grad and torch.is_grad_enabled()):
                log_real = self.log_mel(real, n)
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
