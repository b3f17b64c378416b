"""Does the codec generalise beyond our rendered corpus? Reconstruction on real recordings (out of domain)
against held-out corpus clips (in domain).

Our codecs train on audio rendered from scores with General MIDI instruments. The out-of-domain set is
real, mixed and mastered music from Debian's game-music packages (see ``mmdgen.data.external``), fetched
once into ``--audio`` (a rerun reuses it). For each codec directory given (a folder holding config.json
and codec.safetensors, or a training run folder holding ``model/``), every clip is encoded to tokens and
decoded at the codec's own sample rate, and scored with the codec trainer's validation metrics: the
multi-scale mel distance (``MultiScaleMelLoss``, lower is better) and SI-SNR (dB, higher is better),
on ``--clips`` corpus test clips and as many out-of-domain clips (taken round-robin over the packages).
The MMD weight comes from the run's training configuration (``<run>/checkpoint/config.json``).
Prints a Markdown table and writes ``--results`` (JSON, with a per-package breakdown).

    python experiments/codec_out_of_domain.py runs/exp-*/*/model
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from mmdgen.data.audio import AudioDataset, Entry, collate, manifest_entries
from mmdgen.data.external import fetch_debian_music, package_summaries
from mmdgen.files import write_text_atomic
from mmdgen.losses.reconstruction import MultiScaleMelLoss, si_snr
from mmdgen.pretrained.directory import load_codec

# Orchestral and acoustic-leaning soundtracks, about 100 MB of downloads together. The descriptions rest
# on the packages' copyright files and on MTT_musicnn's top tags per track (mmdgen.metrics.musicnn).
PACKAGES = {
    "drascula-music": "the score of the 1996 adventure game Drascula (Alcachofa Soft): mostly slow piano, "
                      "string and orchestral pieces, some guitar, synth and sung tracks",
    "hyperrogue-music": "HyperRogue's soundtrack by Shawn Parrotte, Lincoln Domina and Will Savino: cinematic "
                        "pieces on strings, piano, flute, guitar and choir, some over drums or electronic beats",
}


def codec_folder(path: Path) -> Path:
    """``path`` itself when it holds a codec, else its ``model/`` (a training run folder)."""
    return path / "model" if not (path / "codec.safetensors").exists() and (path / "model").is_dir() else path


def training_settings(folder: Path) -> dict:
    """The independence-loss settings the codec was trained with (None where the run folder has no record)."""
    config = folder.parent / "checkpoint" / "config.json"
    train = json.loads(config.read_text()).get("train", {}) if config.exists() else {}
    return {key: train.get(key) for key in ("mmd_weight", "mmd_every", "mmd_batches")}


def round_robin(entries: list[Entry], count: int, seed: int) -> list[Entry]:
    """``count`` entries taken in turn from each package (shuffled with ``seed`` within each), so every
    package weighs about the same whatever its length."""
    by_package: dict[str, list[Entry]] = {}
    for entry in entries:
        by_package.setdefault(entry.fields["package"], []).append(entry)
    rng = np.random.default_rng(seed)
    queues = [[group[i] for i in rng.permutation(len(group))] for group in by_package.values()]
    chosen = []
    while len(chosen) < count and any(queues):
        chosen.extend(queue.pop(0) for queue in queues if queue)
    return chosen[:count]


@torch.no_grad()
def reconstruction(codec, entries: list[Entry], clip_seconds: float, batch: int = 8) -> list[dict]:
    """Per clip: its package (or None), mel distance and SI-SNR of the codec's token round trip."""
    rate = codec.cfg.sample_rate
    data = AudioDataset(entries, rate, crop_seconds=clip_seconds, random_crop=False)
    if data.skipped:
        raise ValueError(f"unusable clips: {data.skipped[:3]}")  # a silent or short clip would skew the means
    mel = MultiScaleMelLoss(rate)
    scores = []
    for start in range(0, len(data), batch):
        items = [data[i] for i in range(start, min(start + batch, len(data)))]
        audio = collate(items)["audio"]
        decoded = codec.decode(codec.encode(audio), audio.shape[-1])
        for item, real, fake, snr in zip(items, audio, decoded, si_snr(decoded, audio)):
            scores.append({"package": item["fields"].get("package"), "mel_distance": mel(fake[None], real[None]).item(),
                           "si_snr_db": snr.item()})
    return scores


def summary(scores: list[dict]) -> dict:
    return {"clips": len(scores), "mel_distance": float(np.mean([s["mel_distance"] for s in scores])),
            "si_snr_db": float(np.mean([s["si_snr_db"] for s in scores]))}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("codecs", type=Path, nargs="+", help="codec directories or training run folders")
    parser.add_argument("--packages", nargs="+", default=list(PACKAGES))
    parser.add_argument("--audio", type=Path, default=Path("runs/ood-audio"), help="where the fetched clips go")
    parser.add_argument("--corpus", type=Path, default=Path("runs/corpus/manifest.jsonl"))
    parser.add_argument("--split", default="test", help="the corpus split of the in-domain clips")
    parser.add_argument("--clips", type=int, default=40, help="clips of each kind")
    parser.add_argument("--clip-seconds", type=float, default=10.0)
    # fetched once at the corpus's rate; a codec at another rate gets the clips resampled on reading
    parser.add_argument("--sample-rate", type=int, default=32000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", type=Path, default=Path("docs/codec_out_of_domain_results.json"))
    args = parser.parse_args(argv)

    manifest = fetch_debian_music(args.packages, args.audio, args.sample_rate, clip_seconds=args.clip_seconds)
    out_of_domain = round_robin(manifest_entries(manifest), args.clips, args.seed)
    corpus_clips = manifest_entries(args.corpus, args.split)
    in_domain = [corpus_clips[i] for i in sorted(np.random.default_rng(args.seed).permutation(len(corpus_clips))
                                                 [: args.clips])]
    results = []
    for path in args.codecs:
        folder = codec_folder(path)
        codec = load_codec(folder)
        ood_scores = reconstruction(codec, out_of_domain, args.clip_seconds)
        per_package = {p: summary([s for s in ood_scores if s["package"] == p]) for p in args.packages}
        results.append({"codec": str(folder), **training_settings(folder), "sample_rate": codec.cfg.sample_rate,
                        "in_domain": summary(reconstruction(codec, in_domain, args.clip_seconds)),
                        "out_of_domain": {**summary(ood_scores), "per_package": per_package}})
        print(f"{folder}: done", flush=True)

    packages = [{**s, "description": PACKAGES.get(s["package"])} for s in package_summaries(args.audio, args.packages)]
    report = {"config": {**vars(args), "codecs": [str(c) for c in args.codecs]}, "packages": packages,
              "results": results}
    write_text_atomic(args.results, json.dumps(report, indent=1, default=str) + "\n")
    print(f"\n{len(in_domain)} in-domain clips (corpus {args.split} split), {len(out_of_domain)} out-of-domain "
          f"clips ({', '.join(args.packages)}), {args.clip_seconds:g} s each\n")
    print("| codec | MMD weight | in-domain mel | in-domain SI-SNR (dB) | out-of-domain mel | "
          "out-of-domain SI-SNR (dB) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        weight = "?" if r["mmd_weight"] is None else f"{r['mmd_weight']:g}"
        print(f"| {r['codec']} | {weight} | {r['in_domain']['mel_distance']:.3f} | {r['in_domain']['si_snr_db']:.2f} | "
              f"{r['out_of_domain']['mel_distance']:.3f} | {r['out_of_domain']['si_snr_db']:.2f} |")


if __name__ == "__main__":
    main()
