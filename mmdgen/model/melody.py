"""Melody conditioning (MusicGen-melody): the chroma of a reference recording, one pitch class per frame.

``ChromaExtractor`` computes what transformers' ``MusicgenMelodyFeatureExtractor`` (a port of audiocraft's
``ChromaExtractor``) computes, with torch and torchaudio only:
1. the audio resampled to the model's rate (torchaudio's windowed sinc with transformers' settings: roll-off
   0.945, 24 zero crossings), averaged to mono and cut to its first ``chunk_length`` seconds; audio shorter
   than one FFT window is zero-padded on both sides to one window;
2. the power spectrogram: periodic Hann window of ``n_fft``, hop ``hop_length``, centred frames (reflect padding
   of ``n_fft / 2`` on each side), the complex spectrum divided by the square root of the window's energy before
   squaring (torchaudio's ``normalized=True``);
3. librosa's chroma filter bank (``chroma_filter_bank``) summing the frequency bins into ``num_chroma`` classes;
4. each frame divided by its largest class (eps 1e-6) and replaced by the one-hot of its argmax.
The result is ``[B, frames, num_chroma]`` float32 with ``frames = 1 + samples // hop_length`` (samples after the
cut and padding of step 1; 235 frames for 30 s at 32 kHz): MusicGen-melody hears which pitch class dominates
each 128 ms, nothing else.

Near ties: the one-hot keeps only the argmax, so two classes within rounding of each other may swap between any
two implementations (here and transformers differ in summation order only). Step 4's normalised chroma is
``pitch_classes``; tests compare it with tolerances and the one-hot where the top two classes are apart.

``null_chroma`` is the null melody: the one-hot of class 0, what step 4 makes of silence (the argmax of an
all-zero frame); transformers and audiocraft condition on it when no melody is given and in guidance's null rows.

Memory: the resampled recording, then the spectrogram of its first ``chunk_length`` seconds,
``[B, n_fft / 2 + 1, frames]`` complex64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmdgen.validation import check_fields, option

# transformers' resampler settings for a melody at another rate (torchaudio's defaults are 0.99 and 6)
RESAMPLE_ROLLOFF = 0.945
RESAMPLE_ZERO_CROSSINGS = 24
NORM_EPS = 1e-6  # the floor of a frame's largest class in step 4 (a silent frame stays all zero)


@dataclass
class ChromaConfig:
    """transformers' ``MusicgenMelodyFeatureExtractor`` settings (its defaults are the published checkpoints')."""

    sample_rate: int = option(32000, "the rate the melody is resampled to before its spectrogram", at_least=1)
    n_fft: int = option(16384, "the spectrogram's FFT size (samples)", at_least=1)
    hop_length: int = option(4096, "samples between chroma frames", at_least=1)
    num_chroma: int = option(12, "chroma classes per frame", at_least=1)
    chunk_length: int = option(30, "seconds of the melody heard; a longer recording is cut", at_least=1)

    def __post_init__(self):
        check_fields(self)


def chroma_filter_bank(sample_rate: int, n_fft: int, num_chroma: int = 12) -> torch.Tensor:
    """``[num_chroma, n_fft // 2 + 1]`` float64: librosa's chroma filters (A440 tuning, classes from C).

    Every FFT bin gets a Gaussian bump around its pitch class (width two bins' spacing on the chroma scale, at
    least one class), the columns are scaled to unit L2 norm, and the whole is weighted by a Gaussian over octaves
    centred 5 octaves above A0 (27.5 Hz) with a half-width of 2 octaves, so very low and very high bins count little.
    """
    frequencies = torch.arange(1, n_fft, dtype=torch.float64) * (sample_rate / n_fft)  # the bins above DC
    positions = num_chroma * torch.log2(frequencies / (440.0 / 16))  # in classes above A0
    # the DC bin has no pitch: place it 1.5 octaves below the first bin (half a turn of the chroma circle away)
    positions = torch.cat([positions[:1] - 1.5 * num_chroma, positions])
    widths = torch.cat([(positions[1:] - positions[:-1]).clamp(min=1.0), positions.new_ones(1)])
    half = round(num_chroma / 2)
    # distance of every bin to every class on the chroma circle, in [-half, half); + 10 turns keeps it positive
    distance = positions[None, :] - torch.arange(num_chroma, dtype=torch.float64)[:, None]
    distance = torch.remainder(distance + half + 10 * num_chroma, num_chroma) - half
    filters = torch.exp(-0.5 * (2 * distance / widths) ** 2)
    filters = filters / filters.pow(2).sum(dim=0, keepdim=True).sqrt()
    filters = filters * torch.exp(-0.5 * ((positions / num_chroma - 5.0) / 2.0) ** 2)
    filters = torch.roll(filters, -3 * (num_chroma // 12), dims=0)  # class 0 is C, not A
    return filters[:, : n_fft // 2 + 1].contiguous()


def null_chroma(batch: int, frames: int, num_chroma: int, dtype: torch.dtype = torch.float32,
                device: torch.device | str | None = None) -> torch.Tensor:
    """``[batch, frames, num_chroma]``: the null melody, every frame the one-hot of class 0 (silence's chroma)."""
    chroma = torch.zeros(batch, frames, num_chroma, dtype=dtype, device=device)
    chroma[..., 0] = 1
    return chroma


class ChromaExtractor(nn.Module):
    """Audio ``[B, channels, samples]`` at any rate -> one-hot chroma ``[B, frames, num_chroma]`` (module docstring).

    The window and the filter bank are derived buffers (never saved); ``.to(device)`` moves them."""

    def __init__(self, cfg: ChromaConfig | None = None):
        super().__init__()
        self.cfg = cfg or ChromaConfig()
        self.register_buffer("window", torch.hann_window(self.cfg.n_fft), persistent=False)
        self.register_buffer("filters", chroma_filter_bank(self.cfg.sample_rate, self.cfg.n_fft,
                                                           self.cfg.num_chroma).float(), persistent=False)

    def pitch_classes(self, audio: torch.Tensor, sample_rate: int) -> torch.Tensor:
        """``[B, frames, num_chroma]``: each frame's chroma divided by its largest class (step 4 before the argmax)."""
        _check_audio(audio, sample_rate)
        audio = audio.to(self.window.device, torch.float32)
        if sample_rate != self.cfg.sample_rate:
            import torchaudio.functional as AF

            audio = AF.resample(audio, sample_rate, self.cfg.sample_rate, rolloff=RESAMPLE_ROLLOFF,
                                lowpass_filter_width=RESAMPLE_ZERO_CROSSINGS)
        mono = audio.mean(dim=1)[:, : self.cfg.chunk_length * self.cfg.sample_rate]
        n_fft, hop = self.cfg.n_fft, self.cfg.hop_length
        if mono.shape[-1] < n_fft:  # the reflect padding of centred frames needs more than half a window
            missing = n_fft - mono.shape[-1]
            mono = F.pad(mono, (missing // 2, missing - missing // 2))
        spectrum = torch.stft(mono, n_fft, hop, window=self.window, center=True, pad_mode="reflect",
                              return_complex=True)
        power = (spectrum / self.window.pow(2).sum().sqrt()).abs().pow(2)  # [B, bins, frames]
        chroma = torch.einsum("cf,bft->bct", self.filters, power)
        return F.normalize(chroma, p=math.inf, dim=1, eps=NORM_EPS).transpose(1, 2)

    def forward(self, audio: torch.Tensor, sample_rate: int) -> torch.Tensor:
        """One-hot chroma ``[B, frames, num_chroma]`` float32 of ``audio`` ``[B, channels, samples]`` recorded at
        ``sample_rate``."""
        chroma = self.pitch_classes(audio, sample_rate)
        return F.one_hot(chroma.argmax(dim=-1), self.cfg.num_chroma).to(torch.float32)


def _check_audio(audio: torch.Tensor, sample_rate: int) -> None:
    if not isinstance(audio, torch.Tensor) or audio.dim() != 3:
        found = tuple(audio.shape) if isinstance(audio, torch.Tensor) else type(audio).__name__
        raise ValueError(f"melody audio: expected a tensor [batch, channels, samples], got {found}")
    if not audio.is_floating_point():
        raise ValueError(f"melody audio: expected floating-point samples, got {audio.dtype}")
    if audio.shape[0] == 0 or audio.shape[1] == 0 or audio.shape[2] == 0:
        raise ValueError(f"melody audio is empty: shape {tuple(audio.shape)} (expected at least one sample)")
    if not torch.isfinite(audio).all():
        raise ValueError(f"melody audio holds {int((~torch.isfinite(audio)).sum())} non-finite samples (expected "
                         "finite values)")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate < 1:
        raise ValueError(f"melody sample rate: expected a positive integer (Hz), got {sample_rate!r}")
