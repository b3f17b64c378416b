"""Does fine-tuning work? An LM pretrained on one part of the corpus (folk), fine-tuned on another (baroque and
renaissance), against the same LM trained from scratch on that second part for the same steps.

Stages, each kept under ``--out`` (default runs/finetune) and skipped when its output is there (an interrupted
training resumes from its checkpoint):

1. ``corpus/``: the rendered corpus (or ``--corpus MANIFEST``), split by its ``folder`` field into part A (the
   folk folders) and part B (Bach chorales, Palestrina, Josquin, Monteverdi, trecento), each part keeping the
   corpus's own train/valid/test split: ``part-A.jsonl``, ``part-B.jsonl``.
2. ``codec/``: one codec on the whole corpus (or ``--codec MODEL``); ``tokens-A/``, ``tokens-B/``: its codes of
   each part; ``text_tokenizer.model``: one caption tokenizer for the captions of both parts, so that every LM
   reads captions the same way (the fine-tuned one inherits it from LM A).
3. ``lm-A/``: the LM from scratch on part A for ``--steps-a`` steps.
4. ``lm-B-scratch/`` and ``lm-B-finetune-lr<lr>/``: on part B for ``--steps-b`` steps, same seed, batch, crops,
   warm-up and cosine schedule, run side by side (``--threads`` each); the fine-tunes start from LM A's model
   (``--init``) at their own peak learning rates (``--finetune-lrs``). Each is validated on part B's validation
   split before its first step (``valid_step0.json``) and every ``--valid-every`` steps (its ``metrics.jsonl``).
   With ``--long-scratch-steps N`` also ``lm-B-scratch-<N>steps/``: from scratch on part B for N steps (1300: as
   many as LM A and a fine-tune together), to see whether training from scratch catches up given the same compute.
5. ``docs/finetune_results.json`` and ``docs/figures/finetune.png``: validation NLL per codebook (nats per code)
   over the steps for every part-B run, and the table of the last validation (printed as Markdown).

The run reported in docs/results.md ("Fine-tuning a pretrained LM"):

    python experiments/finetune.py --out runs/finetune --hours 3 --codec-steps 600 --preset mini \\
        --steps-a 800 --steps-b 500 --finetune-lrs 1e-3 2e-3

Only the results (step 5) from runs already there: ``--results-only``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

FOLK = ("essenFolksong", "oneills1850", "ryansMammoth", "miscFolk", "airdsAirs")
EARLY = ("bach", "palestrina", "josquin", "monteverdi", "trecento")  # baroque chorales and renaissance polyphony
PARTS = {"A": FOLK, "B": EARLY}
SPLITS = ("train", "valid", "test")
SCRIPT = "experiments/finetune.py"


# -- splitting the corpus ------------------------------------------------------------------------------------


def split_records(records: Sequence[dict], parts: dict[str, Sequence[str]], source: str,
                  key: str = "folder") -> dict[str, list[dict]]:
    """The records of each part: those whose ``key`` is one of the part's styles, in the manifest's order, each
    keeping its own split. Records of no part are left out. ValueError (naming ``source``) for a style named in
    two parts, a record without ``key``, or a part left without training or validation clips."""
    owner = {}
    for name, styles in parts.items():
        for style in styles:
            if style in owner:
                raise ValueError(f"{source}: style {style!r} is in parts {owner[style]} and {name}; expected each "
                                 "style in one part")
            owner[style] = name
    chosen: dict[str, list[dict]] = {name: [] for name in parts}
    for line, record in enumerate(records, 1):
        if key not in record:
            raise ValueError(f"{source}: record {line} ({record.get('id', 'no id')}) has no {key!r} field; "
                             f"expected every clip to name its {key}")
        if record[key] in owner:
            chosen[owner[record[key]]].append(record)
    for name, part in chosen.items():
        counts = Counter(r.get("split") for r in part)
        if not counts["train"] or not counts["valid"]:
            raise ValueError(f"{source}: part {name} ({key} in {', '.join(parts[name])}) has {counts['train']} "
                             f"training and {counts['valid']} validation clips; expected at least one of each")
    return chosen


def part_summary(part: Sequence[dict], styles: Sequence[str], key: str = "folder") -> dict:
    """Clips per split and per style (a style without clips counts 0), and hours."""
    return {"clips": len(part), "hours": round(sum(r["duration"] for r in part) / 3600, 3),
            "by_split": {split: sum(r.get("split") == split for r in part) for split in SPLITS},
            "by_style": {style: sum(r[key] == style for r in part) for style in styles}}


def write_parts(manifest: Path, parts: dict[str, Sequence[str]], out: Path) -> dict[str, Path]:
    """``out/part-<name>.jsonl`` for each part, the clips' paths made absolute (the parts live elsewhere than the
    corpus), and ``out/parts.json`` (clips per split and style)."""
    from mmdgen.files import read_jsonl, write_text_atomic

    records = read_jsonl(manifest, required=("path", "split", "duration"))
    chosen = split_records(records, parts, str(manifest))
    paths, summary = {}, {}
    for name, part in chosen.items():
        paths[name] = out / f"part-{name}.jsonl"
        absolute = [{**r, "path": str((manifest.parent / r["path"]).resolve())} for r in part]
        write_text_atomic(paths[name], "".join(json.dumps(r) + "\n" for r in absolute))
        summary[name] = part_summary(part, parts[name])
    write_text_atomic(out / "parts.json", json.dumps(summary, indent=1))
    return paths


# -- reading the runs and writing the results ----------------------------------------------------------------


def validation_curve(run: Path) -> list[dict]:
    """A run's validations in step order: ``valid_step0.json`` (before training) then the ``valid`` lines of
    its ``metrics.jsonl`` (the last one per step: a resumed run may repeat a step)."""
    from mmdgen.files import read_jsonl

    by_step = {}
    start = run / "valid_step0.json"
    if start.exists():
        by_step[0] = {"step": 0, **json.loads(start.read_text())}
    metrics = run / "metrics.jsonl"
    if metrics.exists():
        for row in read_jsonl(metrics, required=("kind", "step")):
            if row["kind"] == "valid":
                by_step[row["step"]] = {k: v for k, v in row.items() if k not in ("kind", "time")}
    return [by_step[step] for step in sorted(by_step)]


def codebooks_of(curves: dict[str, list[dict]]) -> int:
    """K, the number of ``nll_k*`` fields, the same in every validation; ValueError otherwise."""
    counts = {name: {sum(key.startswith("nll_k") for key in point) for point in curve}
              for name, curve in curves.items()}
    found = set().union(*counts.values())
    if not curves or any(not curve for curve in curves.values()) or len(found) != 1 or 0 in found:
        raise ValueError(f"validation curves: per-codebook NLLs (nll_k*) per run {counts}; expected every run to "
                         "have validations with the same number of codebooks")
    return found.pop()


def final_table(curves: dict[str, list[dict]]) -> list[dict]:
    """Per run: the step and the NLL per codebook and mean of its last validation."""
    k = codebooks_of(curves)
    return [{"run": name, "step": curve[-1]["step"], **{f"nll_k{i}": curve[-1][f"nll_k{i}"] for i in range(k)},
             "nll": sum(curve[-1][f"nll_k{i}"] for i in range(k)) / k} for name, curve in curves.items()]


def markdown_table(rows: list[dict]) -> str:
    k = sum(key.startswith("nll_k") for key in rows[0])
    lines = ["| run | step | " + " | ".join(f"NLL k{i}" for i in range(k)) + " | mean |",
             "|---|---:|" + "---:|" * (k + 1)]
    for row in rows:
        lines.append(f"| {row['run']} | {row['step']} | " + " | ".join(f"{row[f'nll_k{i}']:.3f}" for i in range(k))
                     + f" | {row['nll']:.3f} |")
    return "\n".join(lines)


def plot_curves(curves: dict[str, list[dict]], path: Path, title: str = "") -> Path:
    """One panel per codebook and one for their mean: validation NLL against the step, a line per run."""
    from matplotlib.figure import Figure

    from mmdgen.files import write_atomic

    k = codebooks_of(curves)
    figure = Figure(figsize=(3.2 * (k + 1), 3.2))
    panels = figure.subplots(1, k + 1, sharex=True)
    for index, (name, curve) in enumerate(curves.items()):
        steps = [point["step"] for point in curve]
        for codebook, axes in enumerate(panels[:k]):
            axes.plot(steps, [point[f"nll_k{codebook}"] for point in curve], marker=".", color=f"C{index}",
                      label=name)
        panels[k].plot(steps, [sum(point[f"nll_k{i}"] for i in range(k)) / k for point in curve], marker=".",
                       color=f"C{index}", label=name)
    for codebook, axes in enumerate(panels):
        axes.set_title(f"codebook {codebook}" if codebook < k else "mean over codebooks")
        axes.set_xlabel("step on part B")
        axes.grid(alpha=0.3)
    panels[0].set_ylabel("validation NLL (nats per code)")
    panels[k].legend(fontsize=8)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    return path


def write_results(curves: dict[str, list[dict]], setup: dict, json_path: Path, figure_path: Path) -> list[dict]:
    """The JSON (setup, curves, final table) and the figure; returns the final table."""
    from mmdgen.files import write_text_atomic

    rows = final_table(curves)
    plot_curves(curves, figure_path, "Part B (baroque + renaissance): fine-tuned from part A (folk) vs from scratch")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(json_path, json.dumps({"setup": setup, "final": rows, "curves": curves}, indent=1))
    return rows


# -- the stages ----------------------------------------------------------------------------------------------


def timed(stage: str, timings_path: Path, function, *args, **kwargs):
    """``function``'s result; its wall time added to the stage's in ``timings_path`` (a resumed or skipped stage
    adds what it took this time)."""
    start = time.perf_counter()
    result = function(*args, **kwargs)
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    timings[stage] = round(timings.get(stage, 0.0) + time.perf_counter() - start, 1)
    timings_path.write_text(json.dumps(timings, indent=1))
    print(f"[{stage}] {timings[stage]:.0f} s in all", flush=True)
    return result


def build_corpus_stage(args) -> Path:
    from mmdgen.data.build import BuildConfig, build_corpus

    if args.corpus:
        return args.corpus
    folder = args.out / "corpus"
    cfg = BuildConfig(hours=args.hours, seed=args.seed, valid_fraction=args.valid_fraction,
                      folders=FOLK + EARLY)
    if not (folder / "manifest.jsonl").exists():
        build_corpus(folder, cfg, workers=args.threads * 2)
    return folder / "manifest.jsonl"


def codec_stage(args, manifest: Path) -> Path:
    import torch

    from mmdgen.train.codec import CodecTrainConfig, CodecTrainer

    if args.codec:
        return args.codec
    run = args.out / "codec"
    if not (run / "model" / "config.json").exists():
        torch.set_num_threads(args.threads * 2)
        every = max(args.codec_steps // 6, 1)
        CodecTrainer(CodecTrainConfig(data=str(manifest), out=str(run), steps=args.codec_steps, batch_size=8,
                                      crop_seconds=1.0, mmd_weight=3.0, mmd_delay=True, mmd_every=8, mmd_batches=8,
                                      adversarial=False, seed=args.seed, device="cpu", valid_every=every,
                                      ckpt_every=every)).train()
    return run / "model"


def tokens_stage(args, codec: Path, parts: dict[str, Path]) -> dict[str, Path]:
    from mmdgen.data.tokenize import tokenize_corpus

    folders = {}
    for name, manifest in parts.items():
        folders[name] = args.out / f"tokens-{name}"
        if not (folders[name] / "tokens.json").exists():
            tokenize_corpus(codec, manifest, folders[name])
    return folders


def caption_tokenizer_stage(args, parts: dict[str, Path]) -> Path:
    from mmdgen.model.text.tokenizer import captions_from_manifest, train_caption_tokenizer

    path = args.out / "text_tokenizer.model"
    if not path.exists():
        train_caption_tokenizer([c for manifest in parts.values() for c in captions_from_manifest(manifest)], path)
    return path


def lm_fields(args, tokens: Path, out: Path, steps: int, **changes) -> dict:
    """The LMTrainConfig fields shared by every run (as a dict: it crosses to a spawned process)."""
    every = args.valid_every or max(steps // 10, 1)
    return {"tokens": str(tokens), "out": str(out), "preset": args.preset, "pattern": "delay", "steps": steps,
            "batch_size": args.batch_size, "crop_frames": args.crop_frames, "lr": args.lr,
            "warmup_steps": args.warmup_steps, "seed": args.seed, "device": "cpu", "valid_every": every,
            "ckpt_every": every, "valid_clips": 10**6, **changes}


def train_lm(fields: dict, threads: int) -> None:
    """One LM run in this process: validated before its first step (``valid_step0.json``), then trained or
    resumed (nothing when its model is exported)."""
    import torch

    from mmdgen.files import write_text_atomic
    from mmdgen.train.lm import LMTrainConfig, LMTrainer

    torch.set_num_threads(threads)
    out = Path(fields["out"])
    if (out / "model" / "config.json").exists():
        return
    trainer = LMTrainer(LMTrainConfig(**fields))
    if trainer.step == 0 and not (out / "valid_step0.json").exists():
        write_text_atomic(out / "valid_step0.json", json.dumps(trainer.validate()))
    trainer.train()


def train_side_by_side(runs: list[dict], threads: int) -> None:
    """The runs in parallel processes (spawned: each sets its own threads); RuntimeError naming a failed one."""
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=train_lm, args=(fields, threads)) for fields in runs]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    failed = [fields["out"] for fields, process in zip(runs, processes) if process.exitcode != 0]
    if failed:
        raise RuntimeError(f"LM runs failed: {', '.join(failed)}; rerun to resume them")


def b_runs(args, tokens_b: Path, lm_a: Path, tokenizer: Path) -> dict[str, dict]:
    runs = {"B-scratch": lm_fields(args, tokens_b, args.out / "lm-B-scratch", args.steps_b, text_path=str(tokenizer))}
    for lr in args.finetune_lrs:
        name = f"B-finetune-lr{lr:g}"
        runs[name] = lm_fields(args, tokens_b, args.out / f"lm-{name}", args.steps_b, lr=lr, init=str(lm_a),
                               preset=None, pattern=None)
    if args.long_scratch_steps:  # the fine-tune's whole budget (A's steps and B's) spent on part B alone
        name = f"B-scratch-{args.long_scratch_steps}steps"
        runs[name] = lm_fields(args, tokens_b, args.out / f"lm-{name}", args.long_scratch_steps,
                               text_path=str(tokenizer))
    return runs


def check_arguments(args) -> None:
    """ValueError naming the first option out of range (before any stage starts its hours of work)."""
    from mmdgen.model.lm import PRESETS
    from mmdgen.validation import check_number

    check_number(args.hours, "--hours", above=0, at_most=10000)
    check_number(args.valid_fraction, "--valid-fraction", above=0, below=1)
    for name in ("codec_steps", "steps_a", "steps_b", "batch_size", "crop_frames", "threads"):
        check_number(getattr(args, name), "--" + name.replace("_", "-"), integer=True, at_least=1)
    for name in ("long_scratch_steps", "warmup_steps", "valid_every", "seed"):
        check_number(getattr(args, name), "--" + name.replace("_", "-"), integer=True, at_least=0)
    check_number(args.lr, "--lr", above=0, at_most=1)
    for lr in args.finetune_lrs:
        check_number(lr, "--finetune-lrs", above=0, at_most=1)
    if args.preset not in PRESETS:
        raise ValueError(f"--preset must be one of {', '.join(PRESETS)}, got {args.preset!r}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/finetune"))
    parser.add_argument("--corpus", type=Path, help="a corpus manifest.jsonl to split instead of building one")
    parser.add_argument("--hours", type=float, default=3.0, help="hours of corpus to build (both parts)")
    parser.add_argument("--valid-fraction", type=float, default=0.1, help="share of works held out for validation")
    parser.add_argument("--codec", type=Path, help="a codec (any format the loader reads) instead of training one")
    parser.add_argument("--codec-steps", type=int, default=600)
    parser.add_argument("--preset", default="mini", help="LM preset (tiny, mini, small)")
    parser.add_argument("--steps-a", type=int, default=800, help="steps of LM A on part A")
    parser.add_argument("--steps-b", type=int, default=500, help="steps of each run on part B")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--crop-frames", type=int, default=150)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak lr of the runs from scratch")
    parser.add_argument("--finetune-lrs", type=float, nargs="+", default=[1e-3, 2e-3], help="peak lr of each fine-tune")
    parser.add_argument("--long-scratch-steps", type=int, default=0,
                        help="also a run from scratch on part B for this many steps (0: none)")
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument("--valid-every", type=int, default=0, help="steps between validations (0: a tenth)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per LM run (part B's run in parallel)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results-only", action="store_true", help="only write the results from existing runs")
    parser.add_argument("--docs", type=Path, default=Path("docs"), help="where the JSON and figures/ go")
    args = parser.parse_args(argv)
    try:
        check_arguments(args)
    except ValueError as error:
        parser.error(str(error))
    args.out.mkdir(parents=True, exist_ok=True)
    timings = args.out / "timings.json"
    tokens_b, tokenizer, lm_a = args.out / "tokens-B", args.out / "text_tokenizer.model", args.out / "lm-A" / "model"
    if not args.results_only:
        manifest = timed("corpus", timings, build_corpus_stage, args)
        parts = write_parts(manifest, PARTS, args.out)
        codec = timed("codec", timings, codec_stage, args, manifest)
        tokens = timed("tokenize", timings, tokens_stage, args, codec, parts)
        tokenizer = caption_tokenizer_stage(args, parts)
        timed("lm-A", timings, train_lm, lm_fields(args, tokens["A"], args.out / "lm-A", args.steps_a,
                                                   text_path=str(tokenizer)), args.threads)
        timed("lm-B", timings, train_side_by_side, list(b_runs(args, tokens_b, lm_a, tokenizer).values()),
              args.threads)
    runs = b_runs(args, tokens_b, lm_a, tokenizer)
    curves = {name: validation_curve(Path(fields["out"])) for name, fields in runs.items()}
    setup = {"command": f"python {SCRIPT} " + " ".join(argv if argv is not None else sys.argv[1:]),
             "arguments": {k: str(v) for k, v in vars(args).items()}, "parts": PARTS,
             "part_clips": json.loads((args.out / "parts.json").read_text()),
             "runs": runs, "seconds_per_stage": json.loads(timings.read_text()) if timings.exists() else {}}
    rows = write_results(curves, setup, args.docs / "finetune_results.json", args.docs / "figures" / "finetune.png")
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
