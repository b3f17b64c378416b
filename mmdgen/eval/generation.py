"""The generation report: a Frechet audio distance (``mmdgen.metrics.fad``) of generated clips against reference
clips, and their adherence to the captions' instrument, key and tempo (``mmdgen.metrics.instruments``,
``key``, ``tempo``), with the same adherence measures on the reference clips as the ceiling each reaches on
real audio.

Clips are ``[samples]`` or ``[channels, samples]`` float waveforms in [-1, 1] (channels are averaged).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mmdgen.metrics.fad import frechet_distance
from mmdgen.metrics.instruments import instrument_adherence_from_probabilities
from mmdgen.metrics.key import key_adherence
from mmdgen.metrics.musicnn import Musicnn, default_tagger, musicnn_outputs
from mmdgen.metrics.tempo import tempo_adherence


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
    tagger = tagger or default_tagger()
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
