"""Instrument adherence: musicnn's MTT tag probability (mean over patches) of the tag that names the caption's
instrument (``INSTRUMENT_TAGS``), and per tag the ROC AUC of that probability for "the caption names this tag"
against all other clips, with the macro average over tags. On rendered corpus clips the AUC is 0.88-1.00 for
piano, harpsichord, guitar, strings, flute and choir, but only about 0.6-0.7 for violin and cello
(experiments/musicnn_check.py): report per tag.

Clips are ``[samples]`` or ``[channels, samples]`` float waveforms in [-1, 1] (channels are averaged).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mmdgen.metrics.musicnn import MTT_TAGS, Musicnn, musicnn_outputs, tag_index

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
