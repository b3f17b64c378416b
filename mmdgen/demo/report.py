"""A demo run measured and shown: ``evaluate_demo`` writes ``evaluation.json`` and the figures, ``write_report``
turns them into ``report.md`` (``mmdgen eval report RUN_DIR``).

Measured on the run's held-out clips (the corpus's test and validation splits):
- per codec: dependence between its codebooks on the delay-aligned codes (pairwise MI as a percentage of the
  pair's joint entropy, with the shuffled-codes baseline that measures the estimator's bias; MI of each
  codebook with all others; total correlation), and reconstruction (mel distance, SI-SNR, multi-resolution
  STFT distance);
- per LM (one per codec): its generated clips against the held-out clips (FAD on musicnn features) and
  against their captions (instrument tag AUC, key, tempo), with the same adherence measures on the real
  clips as the ceiling each reaches on this material;
- the MMD codec's LM once more with int8 weights: its clips for the same captions and seeds, measured alike;
- each stage's wall time (``mmdgen.demo.run`` adds it to ``evaluation.json`` after the evaluation).
"""

from __future__ import annotations

import json
from pathlib import Path

from mmdgen.data.audio import read_audio
from mmdgen.demo.config import DemoConfig, test_captions
from mmdgen.eval.codec import codec_evaluation, codec_table, read_clips
from mmdgen.eval.generation import generation_report
from mmdgen.eval.plots import plot_mi_with_others, plot_spectrogram, plot_training_curves
from mmdgen.files import read_jsonl, write_text_atomic
from mmdgen.pretrained.directory import load_codec
from mmdgen.validation import Spec, value_problem

EVALUATION = "evaluation.json"
REPORT = "report.md"
HELD_OUT = ("test", "valid")
SPECTROGRAMS_PER_LM = 3


def _held_out_records(manifest: Path, limit: int) -> list[dict]:
    held_out = [r for r in read_jsonl(manifest) if r.get("split") in HELD_OUT]
    if not held_out:
        raise ValueError(f"{manifest}: no clips in the {' or '.join(HELD_OUT)} splits to evaluate on")
    return held_out[:limit]


def evaluate_demo(cfg: DemoConfig, log=print) -> dict:
    """Measure every codec and LM of a demo run; writes the figures and
    ``evaluation.json`` into the run folder and returns the evaluation."""
    out = Path(cfg.out)
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    manifest = cfg.path("corpus")
    held_out = _held_out_records(manifest, limit=32)
    evaluation: dict = {"config": {k: v for k, v in vars(cfg).items()}, "held_out_clips": len(held_out),
                        "codecs": {}, "lms": {}}
    for name, weight in cfg.codecs.items():
        log(f"  codec {name}: dependence and reconstruction on {len(held_out)} held-out clips")
        codec = load_codec(cfg.path("codec", name))
        result = codec_evaluation(codec, read_clips(manifest, held_out, codec.cfg.sample_rate),
                                  figures / f"mi-{name}.png", f"codec {name}")
        result["mmd_weight"] = weight
        metrics = cfg.path("codec_run", name) / "metrics.jsonl"
        result["curves"] = plot_training_curves(metrics, _logged(metrics, ["mel", "mel_distance", "si_snr_db"]),
                                                figures / f"train-codec-{name}.png", title=f"codec {name}").name
        evaluation["codecs"][name] = result
    plot_mi_with_others({name: r["dependence"]["mi_with_others_bits"] for name, r in evaluation["codecs"].items()},
                        figures / "mi-with-others.png")
    evaluation["mi_with_others"] = "mi-with-others.png"
    for name in cfg.codecs:
        log(f"  LM {name}: generated clips against the held-out clips and their captions")
        evaluation["lms"][name] = _lm_evaluation(cfg, name, manifest, held_out, figures)
    log(f"  LM {cfg.int8_lm} with int8 weights: its clips measured alike")
    generated, fields, rate = _generated_clips(cfg, f"{cfg.int8_lm}-int8", manifest)
    evaluation["int8"] = {"lm": cfg.int8_lm, "generation": generation_report(
        generated, fields, read_clips(manifest, held_out, rate), rate)}
    save_evaluation(out, evaluation)
    return evaluation


def save_evaluation(out: str | Path, evaluation: dict) -> None:
    write_text_atomic(Path(out) / EVALUATION, json.dumps(evaluation, indent=1))


def _generated_clips(cfg: DemoConfig, label: str, manifest: Path) -> tuple[list, list[dict], int]:
    """The clips of ``generated-<label>`` (as its manifest lists them), their captions' fields, the sample rate."""
    listed = read_jsonl(cfg.path("generated", label) / "manifest.jsonl")
    by_caption = {p["caption"]: p for p in test_captions(manifest, cfg.clips, cfg.seed)}
    fields = [by_caption[clip["text"]] for clip in listed]
    rate = fields[0]["sample_rate"]
    folder = cfg.path("generated", label)
    return [read_audio(folder / f"{clip['id']}.wav", rate) for clip in listed], fields, rate


def _lm_evaluation(cfg: DemoConfig, name: str, manifest: Path, held_out: list[dict], figures: Path) -> dict:
    folder = cfg.path("generated", name)
    listed = read_jsonl(folder / "manifest.jsonl")
    generated, fields, rate = _generated_clips(cfg, name, manifest)
    report = generation_report(generated, fields, read_clips(manifest, held_out, rate), rate, reference_fields=held_out)
    clips = []
    for index, (clip, audio) in enumerate(zip(listed, generated)):
        entry = {"id": clip["id"], "caption": clip["text"], "wav": f"{folder.name}/{clip['id']}.wav"}
        if index < SPECTROGRAMS_PER_LM:
            entry["spectrogram"] = plot_spectrogram(audio, rate, figures / f"spectrogram-{name}-{clip['id']}.png",
                                                    title=clip["text"][:80]).name
        clips.append(entry)
    metrics = cfg.path("lm_run", name) / "metrics.jsonl"
    curves = plot_training_curves(metrics, _logged(metrics, ["loss", "nll"]), figures / f"train-lm-{name}.png",
                                  title=f"LM on codec {name}").name
    valid = [row for row in read_jsonl(metrics) if row.get("kind") == "valid"]
    return {"generation": report, "clips": clips, "curves": curves, "final_validation": valid[-1] if valid else {}}


def _logged(metrics: Path, keys: list[str]) -> list[str]:
    """The ``keys`` a trainer's metrics.jsonl holds (a short run may not have validated)."""
    seen = set().union(*(row.keys() for row in read_jsonl(metrics)))
    return [key for key in keys if key in seen]


def _number(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _generation_row(label: str, nll: float | None, gen: dict) -> str:
    return (f"| {label} | {_number(nll)} | {gen['fad']:.2f} | {_number(gen['instrument_macro_auc'])} | "
            f"{gen['instrument_caption_tag_probability']:.3f} | {gen['key_exact']:.2f} | {gen['key_weighted']:.2f} | "
            f"{gen['tempo_within_8_percent']:.2f} |")


def phase_table(rows: list[dict]) -> list[str]:
    """The stages' wall times (``mmdgen.demo.run.PhaseClock``'s rows) as a Markdown table: the demo prints it and
    the report holds it."""
    lines = ["| stage | wall time | |", "|---|---:|---|"]
    for row in rows:
        seconds = "?" if row["seconds"] is None else _duration(row["seconds"])
        note = "reused: an earlier run took this time" if row["reused"] else ""
        lines.append(f"| {row['stage']} | {seconds} | {note} |")
    ran = sum(row["seconds"] for row in rows if not row["reused"])
    reused = sum(row["reused"] for row in rows)
    lines.append(f"| **this run** | **{_duration(ran)}** | {f'{reused} reused' if reused else ''} |")
    return lines


def _duration(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:04.1f} s" if seconds >= 60 else f"{seconds:.1f} s"


def write_report(out: str | Path, evaluation: dict) -> Path:
    """``report.md`` in ``out`` from ``evaluate_demo``'s result (figures and WAVs linked relatively)."""
    out = Path(out)
    cfg = evaluation["config"]
    lines = ["# mmdgen demo report", "",
             f"Corpus slice {cfg['hours']:g} h; tiny codecs ({cfg['codec_steps']} steps, batch 8 x 1 s), one "
             f"without and one with the delay-aligned independence loss (weight {cfg['mmd_weight']:g}, every "
             f"{cfg['mmd_every']} steps on {cfg['mmd_every']} steps' batches); a tiny delay-pattern LM per codec "
             f"({cfg['lm_steps']} steps); {len(next(iter(evaluation['lms'].values()))['clips'])} clips of "
             f"{cfg['duration']:g} s per LM. Measured on "
             f"{evaluation['held_out_clips']} held-out clips. At this scale the numbers show the pipeline "
             "working, not the paper's effect sizes (docs/results.md has the longer runs).", "",
             "## Codecs", "",
             *codec_table({name: (r["mmd_weight"], r) for name, r in evaluation["codecs"].items()})]
    lines += ["", f"![MI of each codebook with the others](figures/{evaluation['mi_with_others']})", ""]
    for name, result in evaluation["codecs"].items():
        lines += [f"![codec {name}: pairwise MI](figures/{result['heatmap']}) "
                  f"![codec {name}: training](figures/{result['curves']})", ""]
    lines += ["## Generation", "",
              "| LM on codec | validation NLL (nats/code) | FAD (musicnn) | instrument AUC (macro) | caption's tag "
              "probability | key exact | key MIREX | tempo within 8% |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, result in evaluation["lms"].items():
        lines.append(_generation_row(name, result["final_validation"].get("nll"), result["generation"]))
    if "int8" in evaluation:  # evaluations written before the int8 row have none
        int8 = evaluation["int8"]
        lines.append(_generation_row(f"{int8['lm']}, int8 weights", None, int8["generation"]))
    reference = next(iter(evaluation["lms"].values()))["generation"].get("reference")
    if reference:
        lines.append(f"| *held-out real clips (ceiling)* | | 0 | {_number(reference['instrument_macro_auc'])} | "
                     f"{reference['instrument_caption_tag_probability']:.3f} | {reference['key_exact']:.2f} | "
                     f"{reference['key_weighted']:.2f} | {reference['tempo_within_8_percent']:.2f} |")
    lines += ["", "Instrument AUC: the caption's MTT tag ranking clips of that instrument above the others "
              "(macro over tags with both classes present; '-' when no tag has). Key from chroma with the "
              "Krumhansl-Kessler profiles; tempo from onset autocorrelation: the ceiling row is their reliability "
              "on real clips of this corpus. The int8 row: the same LM, captions and seeds, its decoder's and heads' "
              "weights in int8 (`Generator(..., quantize=\"int8\")`).", ""]
    for name, result in evaluation["lms"].items():
        lines += [f"### LM on codec {name}", "", f"![LM {name}: training](figures/{result['curves']})", ""]
        for clip in result["clips"]:
            lines.append(f"- [{clip['id']}]({clip['wav']}): {clip['caption']}")
            if "spectrogram" in clip:
                lines.append(f"  ![{clip['id']}](figures/{clip['spectrogram']})")
        lines.append("")
    if "phases" in evaluation:
        lines += ["## Time", "", "Wall time of each stage of the run that wrote this report (a stage an earlier run "
                  "finished is reused, shown with the time it took then).", "", *phase_table(evaluation["phases"]), ""]
    path = out / REPORT
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


def report(run_dir: str | Path, recompute: bool = False, log=print) -> Path:
    """``mmdgen eval report``: the report of a demo run, evaluating it first when needed."""
    run_dir = Path(run_dir)
    cfg = DemoConfig.load(run_dir)
    cfg.out = str(run_dir)
    stored = run_dir / EVALUATION
    if stored.exists() and not recompute:
        evaluation = _read_evaluation(stored)
        try:
            return write_report(run_dir, evaluation)
        except (KeyError, TypeError, AttributeError, ValueError) as error:  # a field missing or of another kind
            raise ValueError(f"{stored}: not a demo's evaluation ({type(error).__name__}: {error}); "
                             f"{_RECOMPUTE}") from error
    try:  # the run's times stay with its measures, when an earlier evaluation holds them
        phases = _read_evaluation(stored).get("phases") if stored.exists() else None
    except ValueError:
        phases = None  # a damaged file is recomputed, not read
    evaluation = evaluate_demo(cfg, log)
    if phases is not None:
        evaluation["phases"] = phases
        save_evaluation(run_dir, evaluation)
    return write_report(run_dir, evaluation)


_RECOMPUTE = "`mmdgen eval report RUN --recompute` evaluates the run again"


def _is_phase_row(row) -> bool:
    """Whether ``row`` is one of ``PhaseClock``'s rows: a stage's name, its seconds (None: unknown), reused."""
    if not isinstance(row, dict) or not isinstance(row.get("stage"), str) or not isinstance(row.get("reused"), bool):
        return False
    seconds = row.get("seconds")
    return seconds is None or value_problem(seconds, float, Spec("", at_least=0), "seconds") is None


def _read_evaluation(path: Path) -> dict:
    """``evaluation.json`` as ``evaluate_demo`` and ``mmdgen demo`` wrote it; ValueError naming the file when it is
    not JSON, not an object, or its stage times are not rows of (stage, seconds >= 0 or null, reused)."""
    try:
        evaluation = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not JSON ({error}); {_RECOMPUTE}") from error
    if not isinstance(evaluation, dict):
        raise ValueError(f"{path}: a JSON {type(evaluation).__name__}, expected a demo's evaluation; {_RECOMPUTE}")
    phases = evaluation.get("phases", [])
    for row in phases if isinstance(phases, list) else [phases]:
        if not _is_phase_row(row):
            raise ValueError(f"{path}: phases: {row!r} is not a stage's time ({{\"stage\": name, \"seconds\": "
                             f"s >= 0 or null, \"reused\": true or false}}); {_RECOMPUTE}")
    return evaluation
