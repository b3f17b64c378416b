"""The codec report (``mmdgen eval codec``): per codec, the dependence between its codebooks on the delay-aligned
codes of a corpus split (pairwise MI as a percentage of the pair's joint entropy, with the shuffled-codes baseline
that measures the estimator's bias; MI of each codebook with all others; total correlation) and its
reconstruction (mel distance, SI-SNR, multi-resolution STFT distance), with figures.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mmdgen.data.audio import read_audio
from mmdgen.eval.plots import plot_mi_heatmap, plot_mi_with_others
from mmdgen.files import read_jsonl, write_text_atomic
from mmdgen.metrics.dependence import dependence_report
from mmdgen.metrics.reconstruction import reconstruction_report
from mmdgen.pretrained.loader import load_codec_model


def read_clips(manifest: Path, records: list[dict], sample_rate: int) -> list[torch.Tensor]:
    """The audio of a manifest's ``records`` at ``sample_rate``, ``[1, samples]`` each."""
    return [read_audio(manifest.parent / r["path"], sample_rate) for r in records]


def codec_evaluation(codec, clips: list[torch.Tensor], figure: Path, name: str) -> dict:
    """Dependence between the codebooks of ``codec``'s codes of ``clips`` (delay-aligned; heatmap written to
    ``figure``) and its reconstruction of them. ``clips``: ``[channels, samples]`` at the codec's rate."""
    with torch.no_grad():
        codes = [codec.encode(clip[None])[0] for clip in clips]
        frames = min(c.shape[-1] for c in codes)
        dependence = dependence_report(torch.stack([c[:, :frames] for c in codes]), delay=True)
        reconstruction = reconstruction_report(codec, clips)
    plot_mi_heatmap(dependence["pairwise_mi_percent"], figure, title=f"{name}: pairwise MI (delay-aligned)")
    return {"dependence": dependence, "reconstruction": reconstruction, "heatmap": figure.name}


def codec_report(codecs: dict[str, str | Path], manifest: str | Path, out: str | Path, split: str = "test",
                 limit: int = 64, log=print) -> Path:
    """``mmdgen eval codec``: dependence and reconstruction of each codec on ``limit`` clips of a corpus split,
    with a heatmap per codec and the MI-with-others bars; writes ``codecs.json`` and ``codecs.md`` to ``out``."""
    manifest, out = Path(manifest), Path(out)
    records = [r for r in read_jsonl(manifest) if r.get("split") == split][:limit]
    if not records:
        raise ValueError(f"{manifest}: no clips in the {split!r} split")
    loaded = {name: load_codec_model(path) for name, path in codecs.items()}  # every one loads before a file is made
    (out / "figures").mkdir(parents=True, exist_ok=True)
    results = {}
    for name, codec in loaded.items():
        log(f"{name}: {len(records)} {split} clips")
        results[name] = codec_evaluation(codec, read_clips(manifest, records, codec.cfg.sample_rate),
                                         out / "figures" / f"mi-{name}.png", name)
    plot_mi_with_others({n: r["dependence"]["mi_with_others_bits"] for n, r in results.items()},
                        out / "figures" / "mi-with-others.png")
    write_text_atomic(out / "codecs.json", json.dumps({"manifest": str(manifest), "split": split,
                                                      "codecs": {n: str(p) for n, p in codecs.items()},
                                                      "results": results}, indent=1))
    lines = [f"# Codecs on {len(records)} {split} clips of {manifest}", "", *codec_table(
        {name: (None, result) for name, result in results.items()}), "",
        "![MI of each codebook with the others](figures/mi-with-others.png)", ""]
    lines += [f"![{name}](figures/{result['heatmap']})" for name, result in results.items()]
    path = out / "codecs.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


def codec_table(rows: dict[str, tuple[float | None, dict]]) -> list[str]:
    """Markdown rows: per codec (MMD weight or None, codec_evaluation's result)."""
    lines = ["| codec | MMD weight | mel distance | SI-SNR (dB) | MR-STFT | pairwise MI % (shuffled baseline) "
             "| excess | total correlation % (baseline) | MI with others, bits per codebook |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, (weight, result) in rows.items():
        dep, rec = result["dependence"], result["reconstruction"]
        excess = dep["mean_pairwise_mi_percent"] - dep["baseline_mean_pairwise_mi_percent"]
        lines.append(f"| {name} | {'-' if weight is None else f'{weight:g}'} | {rec['mel_distance']:.3f} | "
                     f"{rec['si_snr_db']:.2f} | {rec['mr_stft_distance']:.3f} | {dep['mean_pairwise_mi_percent']:.2f} "
                     f"({dep['baseline_mean_pairwise_mi_percent']:.2f}) | {excess:.2f} | "
                     f"{dep['total_correlation_percent']:.1f} ({dep['baseline_total_correlation_percent']:.1f}) | "
                     + ", ".join(f"{v:.3f}" for v in dep["mi_with_others_bits"]) + " |")
    return lines
