"""Tempo adherence: autocorrelation of an onset-strength envelope.

On 240 corpus clips the estimate is within 8% of the caption's (quarter-note) bpm for 69% of clips, 85% allowing
octave errors; worst on legato instruments (choir, strings, cello, flute) and compound metres. Report tempo
agreement only next to the same measure on real clips with their own captions (``mmdgen.eval.generation``'s
report gives both when given reference fields). Measured with experiments/eval_metrics_check.py.

Clips are ``[samples]`` or ``[channels, samples]`` float waveforms in [-1, 1] (channels are averaged).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mmdgen.metrics.waveform import mono


def onset_strength(waveform: torch.Tensor, sample_rate: int, hop_seconds: float = 0.01) -> torch.Tensor:
    """``[frames]`` spectral flux at one frame per ``hop_seconds``: the summed increase, frame to frame, of the
    log-compressed STFT magnitude (window about 46 ms, rounded to a power of two of samples)."""
    audio = mono(waveform, "waveform").double()
    n_fft = 2 ** round(math.log2(0.046 * sample_rate))
    hop = max(1, round(hop_seconds * sample_rate))
    if audio.shape[-1] < n_fft + hop:
        raise ValueError(f"onset strength needs at least {n_fft + hop} samples, got {audio.shape[-1]}")
    window = torch.hann_window(n_fft, dtype=torch.float64)
    magnitude = torch.stft(audio, n_fft, hop, window=window, center=False, return_complex=True).abs()
    compressed = torch.log1p(1000.0 * magnitude)  # compression makes soft onsets count, not only the loudest
    return (compressed[:, 1:] - compressed[:, :-1]).clamp_min(0).sum(0)


def estimate_tempo(waveform: torch.Tensor, sample_rate: int, min_bpm: float = 40.0, max_bpm: float = 240.0,
                   prior_bpm: float = 120.0, prior_octaves: float = 1.0, hop_seconds: float = 0.01) -> float:
    """Tempo in beats per minute: the lag of the highest peak of the onset envelope's autocorrelation between
    ``min_bpm`` and ``max_bpm``, weighted by a log-normal prior (centre ``prior_bpm``, standard deviation
    ``prior_octaves``; librosa's defaults) that settles which of the multiples of the beat period to report.
    The autocorrelation is unbiased (each lag divided by its number of terms) so that long lags are not
    penalised for short clips; the peak is refined by parabolic interpolation."""
    envelope = onset_strength(waveform, sample_rate, hop_seconds)
    envelope = envelope - envelope.mean()
    frames = envelope.shape[0]
    shortest_lag = max(2, math.floor(60.0 / (max_bpm * hop_seconds)))  # >= 2: the margin lag below is >= 1
    longest_lag = math.ceil(60.0 / (min_bpm * hop_seconds))
    if frames < 2 * longest_lag:
        raise ValueError(f"tempo down to {min_bpm} bpm needs at least {2 * longest_lag * hop_seconds:.1f} s of "
                         f"audio, got {frames * hop_seconds:.1f} s")
    spectrum = torch.fft.rfft(envelope, n=2 * frames)
    autocorrelation = torch.fft.irfft(spectrum.abs().square(), n=2 * frames)[:frames]
    autocorrelation = autocorrelation / torch.arange(frames, 0, -1, dtype=torch.float64)
    lags = torch.arange(shortest_lag - 1, longest_lag + 2, dtype=torch.float64)  # one lag of margin each side
    bpm = 60.0 / (lags * hop_seconds)
    prior = torch.exp(-0.5 * (torch.log2(bpm / prior_bpm) / prior_octaves).square())
    weighted = autocorrelation[lags.long()] * prior
    peak = int(weighted[1:-1].argmax()) + 1
    left, centre, right = (float(weighted[i]) for i in (peak - 1, peak, peak + 1))
    curvature = left - 2 * centre + right
    offset = 0.5 * (left - right) / curvature if curvature < 0 else 0.0
    return 60.0 / ((float(lags[peak]) + offset) * hop_seconds)


@dataclass
class TempoReliability:
    clips: int
    within: float  # fraction of clips whose estimate is within the tolerance of the reference bpm
    within_octave: float  # the same, also accepting half or double the reference bpm


def tempo_reliability(estimated_bpm: Sequence[float], reference_bpm: Sequence[float], tolerance: float = 0.08
                      ) -> TempoReliability:
    """How often tempo estimates agree with reference tempi within a relative ``tolerance``."""
    if len(estimated_bpm) != len(reference_bpm) or not estimated_bpm:
        raise ValueError(f"need equally many estimates and references, at least one; got {len(estimated_bpm)} "
                         f"and {len(reference_bpm)}")
    if min(reference_bpm) <= 0:
        raise ValueError(f"reference tempi must be positive bpm, got {min(reference_bpm)}")

    def close(estimate: float, reference: float) -> bool:
        return abs(estimate / reference - 1) <= tolerance

    within = [close(e, r) for e, r in zip(estimated_bpm, reference_bpm)]
    octave = [any(close(e, r * factor) for factor in (0.5, 1.0, 2.0)) for e, r in zip(estimated_bpm, reference_bpm)]
    return TempoReliability(len(within), sum(within) / len(within), sum(octave) / len(octave))


def tempo_adherence(clips: Sequence[torch.Tensor], bpms: Sequence[float], sample_rate: int
                    ) -> tuple[list[float], TempoReliability]:
    """(estimated bpm per clip, their agreement with the captions' ``bpms``)."""
    if len(clips) != len(bpms):
        raise ValueError(f"{len(clips)} clips but {len(bpms)} tempi; expected one per clip")
    estimates = [estimate_tempo(clip, sample_rate) for clip in clips]
    return estimates, tempo_reliability(estimates, bpms)
