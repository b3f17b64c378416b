"""How reliable are the caption-adherence metrics on real corpus clips, scored against their own captions?

Takes ``--clips`` clips spread evenly over a built corpus's manifest (every split: this measures the
metrics, not a model) and prints, against the manifest's fields:

- key: exact-match rate and MIREX weighted score of the chroma / Krumhansl-Kessler estimate, with the
  count of each relation (same, fifth, relative, parallel, other). The manifest's key is music21's
  analysis (Aarden-Essen profiles) of the whole score, not of the 10 s excerpt, so the same scores are
  also printed for the Krumhansl-Kessler estimate from the excerpt's own notes (duration-weighted
  pitch-class histogram of the score): the most an audio estimate of this kind can be expected to reach;
- tempo: fraction of onset-autocorrelation estimates within 8% of the caption's bpm (a quarter-note
  rate), and also accepting half or double, overall and for simple vs compound (x/8 with 6, 9 or 12
  eighths, whose felt beat is the dotted quarter) metres;
- instrument: per MTT tag, the ROC AUC of musicnn's tag probability for the clips whose caption names it.

These are the ceilings the same measures can reach on generated clips.

    python experiments/eval_metrics_check.py --corpus runs/corpus --clips 40
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from mmdgen.data.audio import read_audio
from mmdgen.data.corpus import Work
from mmdgen.data.render import parse_work
from mmdgen.files import read_jsonl
from mmdgen.metrics.instruments import instrument_adherence
from mmdgen.metrics.key import MIREX_KEY_WEIGHTS, estimate_key, key_adherence, key_relation
from mmdgen.metrics.tempo import tempo_adherence, tempo_reliability

COMPOUND_METRES = ("6/8", "9/8", "12/8")


def spread(records: list[dict], count: int) -> list[dict]:
    """``count`` records at even spacing over the manifest (it is ordered by work, two renderings each)."""
    if count >= len(records):
        return records
    return [records[round(i * (len(records) - 1) / (count - 1))] for i in range(count)] if count > 1 else records[:1]


def excerpt_pitch_classes(record: dict, parsed) -> torch.Tensor:
    """[12] sounding quarter notes per pitch class in the clip's excerpt of the score."""
    start = record["excerpt_start_quarters"]
    end = start + record["duration"] * record["tempo_bpm"] / 60.0
    histogram = torch.zeros(12, dtype=torch.float64)
    for notes in parsed.parts:
        for onset, length, pitch in notes.tolist():
            overlap = min(onset + length, end) - max(onset, start)
            if overlap > 0:
                histogram[int(pitch) % 12] += overlap
    return histogram


def symbolic_key_relations(records: list[dict]) -> list[str]:
    """MIREX relation of the Krumhansl-Kessler key of each excerpt's notes to the manifest's key."""
    parsed = {}
    relations = []
    for record in records:
        work_id = record["work_id"]
        if work_id not in parsed:
            path, _, number = work_id.partition("#")
            parsed[work_id] = parse_work(Work(record["folder"], path, int(number) if number else None))
        tonic, mode, _ = estimate_key(excerpt_pitch_classes(record, parsed[work_id]))
        relations.append(key_relation(f"{tonic} {mode}", record["key"]))
    return relations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=Path("runs/corpus"))
    parser.add_argument("--clips", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    manifest = args.corpus / "manifest.jsonl"
    records = spread(read_jsonl(manifest), args.clips)
    sample_rate = records[0]["sample_rate"]
    clips = [read_audio(args.corpus / record["path"], sample_rate) for record in records]

    start = time.perf_counter()
    keys = key_adherence(clips, [r["key"] for r in records], sample_rate)
    key_seconds = time.perf_counter() - start
    symbolic = symbolic_key_relations(records)
    start = time.perf_counter()
    estimates, tempo = tempo_adherence(clips, [r["tempo_bpm"] for r in records], sample_rate)
    tempo_seconds = time.perf_counter() - start
    start = time.perf_counter()
    instruments = instrument_adherence(clips, [r["instrument"] for r in records], sample_rate)
    tag_seconds = time.perf_counter() - start

    print(f"{len(records)} clips of {args.corpus} ({sample_rate} Hz)\n")
    print(f"key: exact {keys.exact_rate:.3f}, MIREX weighted {keys.weighted_score:.3f}  "
          f"relations {keys.relation_counts}  ({key_seconds:.1f} s)")
    print(f"  from the excerpt's notes: exact {symbolic.count('same') / len(symbolic):.3f}, MIREX weighted "
          f"{sum(MIREX_KEY_WEIGHTS[r] for r in symbolic) / len(symbolic):.3f}  "
          f"relations { {r: symbolic.count(r) for r in MIREX_KEY_WEIGHTS} }")
    print(f"tempo: within 8% {tempo.within:.3f}, allowing octave errors {tempo.within_octave:.3f}  "
          f"({tempo_seconds:.1f} s)")
    for name, compound in (("simple", False), ("compound", True)):
        chosen = [i for i, r in enumerate(records) if (r["metre"] in COMPOUND_METRES) == compound]
        if chosen:
            part = tempo_reliability([estimates[i] for i in chosen], [records[i]["tempo_bpm"] for i in chosen])
            print(f"  {name} metres ({part.clips} clips): within 8% {part.within:.3f}, "
                  f"allowing octave errors {part.within_octave:.3f}")
    by_instrument = []
    for instrument in sorted({r["instrument"] for r in records}):
        chosen = [i for i, r in enumerate(records) if r["instrument"] == instrument]
        within = tempo_reliability([estimates[i] for i in chosen], [records[i]["tempo_bpm"] for i in chosen]).within
        by_instrument.append(f"{instrument} {round(within * len(chosen))}/{len(chosen)}")
    print("  within 8% by instrument: " + ", ".join(by_instrument))
    print(f"instrument: macro AUC {instruments.macro_auc:.3f}  ({tag_seconds:.1f} s)")
    for tag, auc in instruments.per_tag_auc.items():
        positives, negatives = instruments.per_tag_clips[tag]
        print(f"  {tag:12s} AUC {auc:.3f}  ({positives} clips vs {negatives})")
    print("\nper clip: key (estimated / caption), tempo (estimated / caption), instrument")
    for record, key, bpm in zip(records, keys.estimated, estimates):
        print(f"  {record['id']:10s} {key:9s} / {record['key']:9s}  {bpm:6.1f} / {record['tempo_bpm']:3d} "
              f"{record['metre']:5s}  {record['instrument']}")


if __name__ == "__main__":
    main()
