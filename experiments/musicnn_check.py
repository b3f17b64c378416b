"""Does the musicnn port hear the instruments of our corpus? Per-instrument ROC AUC of the matching MTT tag.

Builds a small captioned corpus with the project's generator (music21 scores rendered on General MIDI
instruments; each caption names the instrument), tags every clip with MTT_musicnn (tag probabilities
averaged over the clip's 3 s patches) and, for each MTT tag that names one of the corpus's
instruments, computes the ROC AUC of that tag's probability for "the clip is played on it" against
all other clips. Organ, accordion, trumpet, french horn, oboe and clarinet have no MTT tag, so they
only serve as negatives. Prints the AUC table and the mean probability of each of those tags per
instrument (which shows where a tag with a low AUC also fires), and writes
``<out>/musicnn_check.json``. The corpus is cached in ``<out>``: a rerun only tags.

    python experiments/musicnn_check.py --clips 40 --out runs/musicnn-check
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import soundfile
import torch

from mmdgen.data.build import BuildConfig, build_corpus
from mmdgen.files import read_jsonl
from mmdgen.metrics.musicnn import load_musicnn, log_mel_spectrogram, tag_index

# MTT tag -> the corpus instruments (mmdgen.data.corpus.INSTRUMENTS) it names.
TAG_INSTRUMENTS = {
    "piano": ("piano",),
    "harpsichord": ("harpsichord",),
    "guitar": ("acoustic guitar",),
    "violin": ("violin", "fiddle"),  # the same instrument; General MIDI's fiddle is program 110
    "cello": ("cello",),
    "strings": ("strings",),  # General MIDI's string ensemble
    "flute": ("flute", "recorder", "pan flute"),
    "choir": ("choir",),
}
# log10(10000 x + 1) above this means 10000 x overflowed float16 in the original musicnn pipeline
FLOAT16_OVERFLOW_LOG_MEL = float(np.log10(65504.0 + 1.0))


def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counting one half."""
    greater = (positive[:, None] > negative[None, :]).mean()
    ties = (positive[:, None] == negative[None, :]).mean()
    return float(greater + 0.5 * ties)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=40)
    parser.add_argument("--clip-seconds", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/musicnn-check"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    corpus = args.out / f"corpus-{args.clips}-seed{args.seed}"
    config = BuildConfig(hours=args.clips * args.clip_seconds / 3600, clip_seconds=args.clip_seconds,
                         seed=args.seed)
    start = time.perf_counter()
    build_corpus(corpus, config, progress=False)
    render_seconds = time.perf_counter() - start
    records = read_jsonl(corpus / "manifest.jsonl")

    model = load_musicnn()
    probabilities, overflow_cells, total_cells = [], 0, 0
    start = time.perf_counter()
    for record in records:
        audio, rate = soundfile.read(str(corpus / record["path"]), dtype="float32")
        waveform = torch.from_numpy(audio.T.copy())
        probabilities.append(model.embed(waveform, rate)[1].mean(0).numpy())
        log_mel = log_mel_spectrogram(waveform, rate)
        overflow_cells += int((log_mel > FLOAT16_OVERFLOW_LOG_MEL).sum())
        total_cells += log_mel.numel()
    tag_seconds = time.perf_counter() - start
    probabilities = np.stack(probabilities)
    instruments = np.array([record["instrument"] for record in records])

    rows = []
    for tag, names in TAG_INSTRUMENTS.items():
        is_positive = np.isin(instruments, names)
        scores = probabilities[:, tag_index(tag)]
        if is_positive.any() and (~is_positive).any():
            auc = roc_auc(scores[is_positive], scores[~is_positive])
        else:
            auc = None
        rows.append({"tag": tag, "instruments": list(names), "positives": int(is_positive.sum()),
                     "negatives": int((~is_positive).sum()), "auc": auc,
                     "mean_probability_positive": float(scores[is_positive].mean()) if is_positive.any() else None,
                     "mean_probability_negative": float(scores[~is_positive].mean())})

    print(f"{len(records)} clips of {args.clip_seconds:g} s (seed {args.seed}); instruments: "
          + ", ".join(f"{name} {count}" for name, count in Counter(instruments.tolist()).most_common()))
    print(f"corpus build {render_seconds:.1f} s (clips already in --out are reused); tagging {tag_seconds:.1f} s "
          f"({tag_seconds / len(records):.2f} s per clip, {args.threads} thread(s))")
    print(f"log-mel cells where the original's float16 logarithm would overflow: "
          f"{100 * overflow_cells / total_cells:.2f}%\n")
    print("| MTT tag | corpus instruments | clips with | clips without | AUC | mean p (with) | mean p (without) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        auc = f"{row['auc']:.3f}" if row["auc"] is not None else "n/a"
        with_mean = f"{row['mean_probability_positive']:.3f}" if row["positives"] else "n/a"
        print(f"| {row['tag']} | {', '.join(row['instruments'])} | {row['positives']} | {row['negatives']} | "
              f"{auc} | {with_mean} | {row['mean_probability_negative']:.3f} |")

    # Where the tags go: a low AUC is a tag that also fires on other instruments.
    tags = list(TAG_INSTRUMENTS)
    print("\nMean tag probability per corpus instrument:\n")
    print("| instrument | clips | " + " | ".join(tags) + " |")
    print("| --- | ---: | " + " | ".join("---:" for _ in tags) + " |")
    by_instrument = {}
    for name, count in Counter(instruments.tolist()).most_common():
        means = probabilities[instruments == name][:, [tag_index(tag) for tag in tags]].mean(0)
        by_instrument[name] = dict(zip(tags, means.tolist()))
        print(f"| {name} | {count} | " + " | ".join(f"{m:.2f}" for m in means) + " |")

    results = {"clips": len(records), "seed": args.seed, "clip_seconds": args.clip_seconds,
               "render_seconds": render_seconds, "tag_seconds": tag_seconds,
               "float16_overflow_fraction": overflow_cells / total_cells, "tags": rows,
               "mean_probability_by_instrument": by_instrument}
    (args.out / "musicnn_check.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
