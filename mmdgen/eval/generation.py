"""Generation metrics: a Frechet audio distance and adherence to the caption's instrument, key and tempo.

- Frechet audio distance (FAD): the Frechet distance between Gaussians fitted to musicnn's 200-d
  penultimate features (``mmdgen.eval.musicnn``) of every 3 s patch of the generated and the reference
  clips. Patches, not per-clip means, are the samples: FAD implementations fit the distribution of
  frame embeddings (VGGish FAD uses every 0.96 s frame), and a per-clip mean would both narrow that
  distribution and leave a third as many samples (of 10 s clips). Even so, 40 clips of 10 s give 120
  patches for 200 dimensions, so the covariances are rank-deficient (handled: see
  ``frechet_distance_from_statistics``) and the estimate is biased upward by an amount that shrinks
  with the number of patches: compare FADs computed from equally many patches only.
- Instrument adherence: musicnn's MTT tag probability (mean over patches) of the tag that names the
  caption's instrument (``INSTRUMENT_TAGS``), and per tag the ROC AUC of that probability for
  "the caption names this tag" against all other clips, with the macro average over tags. On rendered
  corpus clips the AUC is 0.88-1.00 for piano, harpsichord, guitar, strings, flute and choir, but only
  about 0.6-0.7 for violin and cello (experiments/musicnn_check.py): report per tag.
- Key adherence: a chroma vector from the STFT, the Krumhansl-Kessler key profiles, and the exact-match
  rate and MIREX weighted score against the caption's key. The corpus's key is music21's analysis of
  the whole score, so even real clips match it only partly: on 240 corpus clips the audio estimate is
  exact for 45% (MIREX score 0.57), the same profiles applied to the excerpt's own notes for 55% (0.65).
- Tempo: autocorrelation of an onset-strength envelope. On the same 240 clips it is within 8% of the
  caption's (quarter-note) bpm for 69% of clips, 85% allowing octave errors; worst on legato
  instruments (choir, strings, cello, flute) and compound metres. Report tempo agreement only next to
  the same measure on real clips with their own captions (``generation_report`` gives both when given
  reference fields). Measured with experiments/eval_metrics_check.py.

Clips are ``[samples]`` or ``[channels, samples]`` float waveforms in [-1, 1] (channels are averaged).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from mmdgen.eval.musicnn import MTT_TAGS, Musicnn, load_musicnn, tag_index

# --------------------------------------------------------------------------------------------
# Frechet distance


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


# --------------------------------------------------------------------------------------------
# musicnn features and tags


@lru_cache(maxsize=1)
def _default_tagger() -> Musicnn:
    return load_musicnn()


def _mono(clip: torch.Tensor, name: str) -> torch.Tensor:
    if clip.dim() == 2:
        return clip.float().mean(0)
    if clip.dim() == 1:
        return clip.float()
    raise ValueError(f"{name}: expected [samples] or [channels, samples], got {tuple(clip.shape)}")


def musicnn_outputs(clips: Sequence[torch.Tensor], sample_rate: int, tagger: Musicnn | None = None
                    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per clip, musicnn's (penultimate features ``[P, 200]``, tag probabilities ``[P, 50]``) for its P
    non-overlapping 3 s patches. Every clip must last at least one patch (2.98 s)."""
    if len(clips) == 0:
        raise ValueError("musicnn needs at least one clip, got none")
    tagger = tagger or _default_tagger()
    config = tagger.config
    shortest = (config.patch_frames - 1) * config.hop_length / config.sample_rate
    outputs = []
    with torch.no_grad():
        for index, clip in enumerate(clips):
            audio = _mono(clip, f"clip {index}")
            if audio.shape[-1] < math.ceil(shortest * sample_rate):
                raise ValueError(f"clip {index} lasts {audio.shape[-1] / sample_rate:.2f} s; musicnn needs at "
                                 f"least {shortest:.2f} s (one {config.patch_frames}-frame patch)")
            features, probabilities = tagger.embed(audio, sample_rate)
            outputs.append((features.double().cpu(), probabilities.double().cpu()))
    return outputs


def audio_features(clips: Sequence[torch.Tensor], sample_rate: int, tagger: Musicnn | None = None) -> torch.Tensor:
    """``[patches, 200]`` musicnn penultimate features of every 3 s patch of every clip (float64)."""
    return torch.cat([features for features, _ in musicnn_outputs(clips, sample_rate, tagger)])


def frechet_audio_distance(generated: Sequence[torch.Tensor], reference: Sequence[torch.Tensor], sample_rate: int,
                           tagger: Musicnn | None = None) -> float:
    """FAD between two sets of clips (both at ``sample_rate``) on musicnn patch features. Biased upward
    for few patches: compare values computed from equally many."""
    return frechet_distance(audio_features(generated, sample_rate, tagger),
                            audio_features(reference, sample_rate, tagger))


# --------------------------------------------------------------------------------------------
# Instrument adherence

# The MTT tag naming each instrument captions may name (every name in mmdgen.data.corpus.INSTRUMENTS),
# or None where the 50 MTT tags have none: those clips are only ever negatives. A few General MIDI
# instruments outside the corpus that do have a tag are listed too.
INSTRUMENT_TAGS: dict[str, str | None] = {
    "piano": "piano",
    "harpsichord": "harpsichord",
    "organ": None,
    "accordion": None,
    "acoustic guitar": "guitar",
    "electric guitar": "guitar",
    "violin": "violin",
    "fiddle": "violin",  # the same instrument; General MIDI's fiddle is program 110
    "cello": "cello",
    "strings": "strings",  # General MIDI's string ensemble
    "harp": "harp",
    "sitar": "sitar",
    "choir": "choir",
    "trumpet": None,
    "french horn": None,
    "oboe": None,
    "clarinet": None,
    "flute": "flute",
    "recorder": "flute",
    "pan flute": "flute",
}


def instrument_tag(instrument: str) -> str | None:
    """The MTT tag of a caption's instrument (``INSTRUMENT_TAGS``), None when it has none."""
    try:
        return INSTRUMENT_TAGS[instrument]
    except KeyError:
        raise ValueError(f"unknown instrument {instrument!r}; known: {', '.join(sorted(INSTRUMENT_TAGS))}") from None


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Area under the ROC curve: P(score of a random positive > score of a random negative), ties counting
    one half. Computed from ranks (the Mann-Whitney U statistic), tied scores taking their mean rank."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    if scores.shape != labels.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must be 1-d of the same length")
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        raise ValueError(f"the AUC needs positives and negatives, got {positives} and {negatives}")
    _, group, counts = np.unique(scores, return_inverse=True, return_counts=True)
    first_rank = np.cumsum(counts) - counts + 1  # 1-based rank of each group's first member
    ranks = (first_rank + (counts - 1) / 2)[group]
    u = ranks[labels].sum() - positives * (positives + 1) / 2
    return float(u / (positives * negatives))


@dataclass
class InstrumentAdherence:
    caption_tag_probability: list[float | None]  # per clip: P(tag of its caption's instrument); None: no tag
    per_tag_auc: dict[str, float]  # tags with at least one positive and one negative clip
    per_tag_clips: dict[str, tuple[int, int]]  # tag -> (positive clips, negative clips)
    macro_auc: float | None  # mean of per_tag_auc; None when no tag has an AUC

    @property
    def mean_caption_tag_probability(self) -> float | None:
        values = [p for p in self.caption_tag_probability if p is not None]
        return sum(values) / len(values) if values else None


def instrument_adherence_from_probabilities(probabilities: torch.Tensor, instruments: Sequence[str]
                                            ) -> InstrumentAdherence:
    """Instrument adherence of clips with MTT tag probabilities ``[N, 50]`` (one row per clip) whose captions
    name ``instruments`` (N names from ``INSTRUMENT_TAGS``)."""
    if probabilities.dim() != 2 or probabilities.shape != (len(instruments), len(MTT_TAGS)):
        raise ValueError(f"probabilities must be [{len(instruments)} clips, {len(MTT_TAGS)} tags], "
                         f"got {tuple(probabilities.shape)}")
    tags = [instrument_tag(name) for name in instruments]
    per_clip = [None if tag is None else float(probabilities[i, tag_index(tag)]) for i, tag in enumerate(tags)]
    per_tag_auc, per_tag_clips = {}, {}
    for tag in sorted({tag for tag in tags if tag is not None}):
        labels = [t == tag for t in tags]
        positives = sum(labels)
        per_tag_clips[tag] = (positives, len(labels) - positives)
        if 0 < positives < len(labels):
            per_tag_auc[tag] = roc_auc(probabilities[:, tag_index(tag)].tolist(), labels)
    macro = sum(per_tag_auc.values()) / len(per_tag_auc) if per_tag_auc else None
    return InstrumentAdherence(per_clip, per_tag_auc, per_tag_clips, macro)


def instrument_adherence(clips: Sequence[torch.Tensor], instruments: Sequence[str], sample_rate: int,
                         tagger: Musicnn | None = None) -> InstrumentAdherence:
    """Instrument adherence of ``clips`` whose captions name ``instruments`` (one per clip), from musicnn's
    tag probabilities averaged over each clip's patches."""
    if len(clips) != len(instruments):
        raise ValueError(f"{len(clips)} clips but {len(instruments)} instruments; expected one per clip")
    probabilities = torch.stack([p.mean(0) for _, p in musicnn_outputs(clips, sample_rate, tagger)])
    return instrument_adherence_from_probabilities(probabilities, instruments)


# --------------------------------------------------------------------------------------------
# Key

PITCH_CLASSES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
_NATURALS = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}
_ACCIDENTALS = {"#": 1, "b": -1, "-": -1}  # "-" is music21's flat
MODES = ("major", "minor")

# Krumhansl & Kessler (1982) probe-tone ratings, tonic first (Krumhansl 1990, Table 2.1).
KRUMHANSL_KESSLER = {
    "major": (6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88),
    "minor": (6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17),
}

# MIREX key-detection weights (as mir_eval.key.weighted_score): "fifth" is the estimate a perfect fifth
# above the reference in the same mode (a fifth below scores 0).
MIREX_KEY_WEIGHTS = {"same": 1.0, "fifth": 0.5, "relative": 0.3, "parallel": 0.2, "other": 0.0}


def parse_key(key: str) -> tuple[int, str]:
    """"F# minor", "Bb major" or "B- major" -> (pitch class 0-11 with C = 0, mode)."""
    parts = key.split()
    if len(parts) != 2 or parts[1].lower() not in MODES or not parts[0] or parts[0][0].upper() not in _NATURALS \
            or any(c not in _ACCIDENTALS for c in parts[0][1:]):
        raise ValueError(f"cannot read key {key!r}; expected a tonic and a mode such as 'F# minor' or 'Bb major'")
    tonic = _NATURALS[parts[0][0].upper()] + sum(_ACCIDENTALS[c] for c in parts[0][1:])
    return tonic % 12, parts[1].lower()


def key_name(tonic: int, mode: str) -> str:
    return f"{PITCH_CLASSES[tonic % 12]} {mode}"


def chroma(waveform: torch.Tensor, sample_rate: int, window_seconds: float = 1.0, min_hz: float = 60.0,
           max_hz: float = 2000.0) -> torch.Tensor:
    """``[12, frames]`` pitch-class energy (C = 0) of a ``[samples]`` or ``[channels, samples]`` waveform.

    Power spectrum of Hann-windowed frames (the window about ``window_seconds`` long, rounded to a power of
    two of samples, hop a quarter of it); each bin between ``min_hz`` and ``max_hz`` adds its power to the
    pitch class of the nearest equal-tempered semitone (A4 = 440 Hz). A 1 s window resolves 1 Hz, a third
    of a semitone at 60 Hz; the key needs no finer time resolution. Harmonics land on other pitch classes
    (the 3rd on the fifth): the key profiles are matched against that, as in every chroma key finder.
    """
    audio = _mono(waveform, "waveform").double()
    n_fft = 2 ** round(math.log2(window_seconds * sample_rate))
    if audio.shape[-1] < n_fft:
        raise ValueError(f"chroma needs at least {n_fft} samples ({n_fft / sample_rate:.2f} s), "
                         f"got {audio.shape[-1]}")
    window = torch.hann_window(n_fft, dtype=torch.float64)
    spectrum = torch.stft(audio, n_fft, n_fft // 4, window=window, center=False, return_complex=True)
    power = spectrum.real.square() + spectrum.imag.square()  # [bins, frames]
    frequencies = torch.arange(power.shape[0], dtype=torch.float64) * sample_rate / n_fft
    used = (frequencies >= min_hz) & (frequencies <= max_hz)
    pitch_class = (torch.round(69 + 12 * torch.log2(frequencies[used] / 440.0)).long()) % 12
    return torch.zeros(12, power.shape[1], dtype=torch.float64).index_add_(0, pitch_class, power[used])


def estimate_key(chroma_vector: torch.Tensor) -> tuple[str, str, float]:
    """(tonic name, mode, correlation) of the key whose rotated Krumhansl-Kessler profile correlates best
    (Pearson) with ``chroma_vector`` (``[12]``, or ``[12, frames]`` summed over frames)."""
    if chroma_vector.dim() == 2:
        chroma_vector = chroma_vector.sum(1)
    if chroma_vector.shape != (12,):
        raise ValueError(f"chroma must be [12] or [12, frames], got {tuple(chroma_vector.shape)}")
    values = chroma_vector.double()
    if float(values.std()) == 0:
        raise ValueError("chroma is flat (silence?): no key can be estimated")
    best = (-2.0, 0, "major")
    for mode, profile in KRUMHANSL_KESSLER.items():
        profile = torch.tensor(profile, dtype=torch.float64)
        for tonic in range(12):
            rotated = torch.roll(profile, tonic)  # the profile's tonic weight moves to pitch class ``tonic``
            correlation = float(torch.corrcoef(torch.stack([values, rotated]))[0, 1])
            if correlation > best[0]:
                best = (correlation, tonic, mode)
    correlation, tonic, mode = best
    return PITCH_CLASSES[tonic], mode, correlation


def key_relation(estimated: str, reference: str) -> str:
    """The MIREX relation of an estimated key to the reference: same, fifth, relative, parallel or other."""
    (est, est_mode), (ref, ref_mode) = parse_key(estimated), parse_key(reference)
    if est_mode == ref_mode:
        if est == ref:
            return "same"
        return "fifth" if (est - ref) % 12 == 7 else "other"
    if est == ref:
        return "parallel"
    relative = (ref - 3) % 12 if ref_mode == "major" else (ref + 3) % 12  # A minor <-> C major
    return "relative" if est == relative else "other"


def mirex_key_score(estimated: str, reference: str) -> float:
    """1 same key, 0.5 a fifth above, 0.3 relative, 0.2 parallel, else 0."""
    return MIREX_KEY_WEIGHTS[key_relation(estimated, reference)]


@dataclass
class KeyAdherence:
    estimated: list[str]  # per clip, e.g. "F# minor"
    relations: list[str]  # per clip: same, fifth, relative, parallel or other
    exact_rate: float  # fraction of clips whose estimated key is the caption's
    weighted_score: float  # mean MIREX score

    @property
    def relation_counts(self) -> dict[str, int]:
        return {relation: self.relations.count(relation) for relation in MIREX_KEY_WEIGHTS}


def key_adherence(clips: Sequence[torch.Tensor], keys: Sequence[str], sample_rate: int) -> KeyAdherence:
    """Estimated key of each clip against its caption's key (``keys``, e.g. "D minor")."""
    if len(clips) != len(keys):
        raise ValueError(f"{len(clips)} clips but {len(keys)} keys; expected one per clip")
    if not clips:
        raise ValueError("key_adherence needs at least one clip, got none")
    estimated = []
    for clip in clips:
        tonic, mode, _ = estimate_key(chroma(clip, sample_rate))
        estimated.append(f"{tonic} {mode}")
    relations = [key_relation(est, ref) for est, ref in zip(estimated, keys)]
    return KeyAdherence(estimated, relations, relations.count("same") / len(relations),
                        sum(MIREX_KEY_WEIGHTS[r] for r in relations) / len(relations))


# --------------------------------------------------------------------------------------------
# Tempo


def onset_strength(waveform: torch.Tensor, sample_rate: int, hop_seconds: float = 0.01) -> torch.Tensor:
    """``[frames]`` spectral flux at one frame per ``hop_seconds``: the summed increase, frame to frame, of the
    log-compressed STFT magnitude (window about 46 ms, rounded to a power of two of samples)."""
    audio = _mono(waveform, "waveform").double()
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


# --------------------------------------------------------------------------------------------
# Everything for one set of generated clips


def adherence(clips: Sequence[torch.Tensor], fields: Sequence[dict],
              outputs: Sequence[tuple[torch.Tensor, torch.Tensor]], sample_rate: int) -> dict:
    """Instrument, key and tempo adherence of ``clips`` to their ``fields``, from their ``musicnn_outputs``."""
    probabilities = torch.stack([p.mean(0) for _, p in outputs])
    instruments = instrument_adherence_from_probabilities(probabilities, [f["instrument"] for f in fields])
    keys = key_adherence(clips, [f["key"] for f in fields], sample_rate)
    _, tempo = tempo_adherence(clips, [f["tempo_bpm"] for f in fields], sample_rate)
    return {"instrument_per_tag_auc": instruments.per_tag_auc, "instrument_macro_auc": instruments.macro_auc,
            "instrument_caption_tag_probability": instruments.mean_caption_tag_probability,
            "key_exact": keys.exact_rate, "key_weighted": keys.weighted_score,
            "tempo_within_8_percent": tempo.within, "tempo_within_8_percent_or_octave": tempo.within_octave}


def generation_report(generated: Sequence[torch.Tensor], fields: Sequence[dict], reference: Sequence[torch.Tensor],
                      sample_rate: int, reference_fields: Sequence[dict] | None = None,
                      tagger: Musicnn | None = None) -> dict:
    """FAD of ``generated`` against ``reference`` and the adherence of ``generated`` to the captions' fields
    (``fields``: per clip a dict with ``instrument``, ``key`` and ``tempo_bpm``, as in the corpus manifest).
    With ``reference_fields`` (the reference clips' own fields) the same adherence measures on the reference
    clips come too, under "reference": the ceiling each measure reaches on real audio (for tempo, its
    reliability). Each clip passes through musicnn once."""
    if len(generated) != len(fields):
        raise ValueError(f"{len(generated)} generated clips but {len(fields)} field records; expected one per clip")
    tagger = tagger or _default_tagger()
    generated_outputs = musicnn_outputs(generated, sample_rate, tagger)
    reference_outputs = musicnn_outputs(reference, sample_rate, tagger)
    fad = frechet_distance(torch.cat([f for f, _ in generated_outputs]), torch.cat([f for f, _ in reference_outputs]))
    report = {"fad": fad, "generated_clips": len(generated), "reference_clips": len(reference),
              "generated_patches": sum(f.shape[0] for f, _ in generated_outputs),
              "reference_patches": sum(f.shape[0] for f, _ in reference_outputs),
              **adherence(generated, fields, generated_outputs, sample_rate)}
    if reference_fields is not None:
        if len(reference_fields) != len(reference):
            raise ValueError(f"{len(reference)} reference clips but {len(reference_fields)} reference field records")
        report["reference"] = adherence(reference, reference_fields, reference_outputs, sample_rate)
    return report
