"""The paper's three results at our scale, from the codecs and LMs already trained on this machine.

1. Figure 2: for every codec found (``--codecs``, default ``runs/exp-*/*``: tiny codecs trained with
   different independence-loss weights), the dependence between its codebooks on the delay-aligned codes of
   the corpus's test split (the clips encoded once with that codec; codes cached under ``<out>/codes``):
   mean pairwise mutual information as % of the pair's joint entropy, its shuffled baseline (the same
   plug-in estimate on codes whose stages were permuted independently: estimator bias) and the excess over
   it, against the MMD weight -> ``<figures>/dependence_vs_weight.png`` (symlog x, seeds marked).
2. Figures 4-5: the mutual information of each codebook with all the others, I(Z_k; Z_-k), with its
   shuffled baseline, for the seed-0 codecs of weights 0, 3 and 10 -> ``<figures>/mi_with_others.png``;
   and the pairwise MI heatmaps of weights 0 and 3 -> ``mi_heatmap_w0.png``, ``mi_heatmap_w3.png``.
   With 256-entry codebooks Z_-k has 256^3 cells, against ~40k delay-aligned test samples: the plug-in
   estimate is all bias (it comes out below its own shuffled baseline), so the figure's second panel gives
   a proxy the test split can estimate: per codebook, the sum over the others of the pairwise MI
   I(Z_k; Z_j) (65k cells each), as excess over the same sum on shuffled codes.
3. Table 1: each LM (codec weight 0 / 10 x delay / flatten) generates ``--clips`` clips of ``--duration``
   s from captions spread over the test split (the same captions and seeds for every LM; guidance 3, top-k
   250: MusicGen's defaults; batches of ``--batch-size``), written as WAVs under ``<out>/generated/<lm>``.
   Reported: FAD on musicnn patch features against the test clips (with a bootstrap spread over the
   generated clips, and FAD against half of the test clips beside the "real vs real" floor, 32 real clips
   of the other half, over random splits), instrument macro AUC and caption-tag probability, key exact /
   MIREX, tempo within 8% (and the same on the real clips whose captions were used: the ceiling), the
   decoding steps for the duration (nominal single pass, and those sampled), and the measured decode time
   (text to codes only; the codec's decode is timed apart) per clip and per batched step, eager or
   compiled, with the thread count and the load average around each LM's generation. Beside the LMs, the
   ceiling each codec sets: the caption clips encoded and decoded by it (WAVs under
   ``<out>/reconstructed``), through the same measures; and ``<figures>/<--table1-figure>`` shows it all.

The LMs were trained on crops of ``crop_frames`` frames (2 s); as MusicGen does beyond its 30 s, longer
audio is generated in overlapping windows of that context (``mmdgen.generate``), which the exported models
of these runs do not record: ``--context-frames auto`` takes it from the training configuration,
``--context-frames 0`` generates in one pass.

FAD is the same computation as ``mmdgen.eval.generation.generation_report`` (``frechet_distance`` of the
musicnn patch features), and so are the adherence measures; musicnn runs once per clip here so that the
spreads can be computed from the same features.

Writes ``--results`` (JSON) and the PNGs under ``--figures``, and prints Markdown tables.

    python experiments/paper_tables.py              # ~4 min on 2 CPU cores (2.5 min with the codes cached)
    # Table 1 only, on the 10-h corpus (210 test clips) with 128 clips per LM (~14 min for six LMs):
    python experiments/paper_tables.py --skip-dependence --corpus runs/corpus-10h --clips 128 \
        --codecs runs/exp-a/mmd-0 runs/exp-c/mmd-3-every8x8 --lms w0-delay=... w3-delay=... \
        --out runs/paper-tables-large --results docs/paper_tables_large_results.json \
        --table1-figure table1_large.png
    python experiments/paper_tables.py --quick      # smoke test: 4 clips of 4 s, outputs under <out>/quick
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import platform
import re
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mmdgen.eval.generation import adherence
from mmdgen.files import read_jsonl

DEFAULT_CODECS = "runs/exp-*/*"
# name: (LM run folder, pattern); the codec is found by the weights hash the LM recorded
DEFAULT_LMS = {
    "w0-delay": "runs/lm-base/lm-base-delay",
    "w0-flatten": "runs/lm-base/lm-base-flatten",
    "w10-delay": "runs/lm-mmd10/lm-mmd10-delay",
    "w10-flatten": "runs/lm-mmd10/lm-mmd10-flatten",
}


# --------------------------------------------------------------------------------------------
# Inputs: checked up front, every missing piece named


def fail(message: str) -> None:
    raise SystemExit(f"paper_tables: {message}")


def read_manifest(corpus: Path, split: str) -> list[dict]:
    manifest = corpus / "manifest.jsonl"
    if not manifest.exists():
        fail(f"{manifest}: missing; the corpus folder is made by `mmdgen data build --out {corpus} --hours 3`")
    records = read_jsonl(manifest)
    chosen = [r for r in records if r.get("split") == split]
    if not chosen:
        fail(f"{manifest}: no clips in the {split!r} split")
    return chosen


def find_codecs(patterns: list[str]) -> list[dict]:
    """Every codec run folder matching ``patterns`` (globs or folders): its model dir, MMD weight and seed."""
    folders: list[Path] = []
    for pattern in patterns:
        matches = sorted(Path(p) for p in glob.glob(pattern)) if glob.has_magic(pattern) else [Path(pattern)]
        if not glob.has_magic(pattern) and Path(pattern).is_file():
            continue  # a shell glob's stray file (runs/exp-a/results.json)
        matches = [m for m in matches if m.is_dir()]
        if not matches:
            fail(f"no codec run folder matches {pattern!r} (a folder holding model/ and checkpoint/config.json, "
                 "made by experiments/codec_independence.py)")
        folders += [m for m in matches if m not in folders]
    codecs = []
    for folder in folders:
        model = folder / "model" if (folder / "model").is_dir() else folder
        run = model.parent if model != folder else folder.parent
        config = run / "checkpoint" / "config.json"
        for needed in (model / "config.json", model / "codec.safetensors", config):
            if not needed.exists():
                fail(f"codec run {folder}: {needed} is missing (a codec run folder holds model/config.json, "
                     "model/codec.safetensors and checkpoint/config.json with its mmd_weight)")
        train = json.loads(config.read_text()).get("train", {})
        if train.get("mmd_weight") is None:
            fail(f"{config}: no train.mmd_weight recorded")
        codecs.append({"run": str(run), "model": str(model), "mmd_weight": float(train["mmd_weight"]),
                       "seed": int(train.get("seed", 0)), "mmd_every": train.get("mmd_every"),
                       "mmd_batches": train.get("mmd_batches")})
    if not codecs:
        fail(f"no codec run folder among {' '.join(patterns)}")
    return sorted(codecs, key=lambda c: (c["seed"], c["mmd_weight"], c["run"]))


def trained_steps(metrics: Path) -> int | None:
    """The last training step logged in an LM run's metrics.jsonl (the checkpoint config leaves the step
    count out, so that a run can be resumed for more steps)."""
    if not metrics.exists():
        return None
    steps = [row.get("step") for row in read_jsonl(metrics) if row.get("kind") == "train"]
    return max((s for s in steps if s is not None), default=None)


def find_lms(specs: list[str], codecs: list[dict]) -> dict[str, dict]:
    """name=folder pairs -> the LM's model dir, pattern, codec dir (matched by weights hash) and training crop."""
    from mmdgen.pretrained.directory import codec_identity

    hashes = {codec_identity(c["model"])["weights_sha256"]: c for c in codecs}
    lms = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            fail(f"--lms takes name=LM-run-folder pairs, got {spec!r}")
        run = Path(folder)
        model = run / "model"
        for needed in (model / "config.json", model / "lm.safetensors"):
            if not needed.exists():
                fail(f"LM {name}: {needed} is missing (an LM run folder holds model/ as exported by "
                     "experiments/lm_patterns.py)")
        config = json.loads((model / "config.json").read_text())
        wanted = config["codec"]["weights_sha256"]
        if (model / "codec" / "codec.safetensors").exists():
            codec_dir, codec = model / "codec", hashes.get(wanted)
        elif wanted in hashes:
            codec = hashes[wanted]
            codec_dir = Path(codec["model"])
        else:
            fail(f"LM {name} ({run}): its codec (weights sha256 {wanted[:12]}...) is neither in {model / 'codec'} "
                 f"nor among the codecs found ({', '.join(c['run'] for c in codecs)}); pass its run with --codecs")
        train_config = run / "checkpoint" / "config.json"
        train = json.loads(train_config.read_text())["train"] if train_config.exists() else {}
        lms[name] = {"run": str(run), "model": str(model), "codec": str(codec_dir), "pattern": config["lm"]["pattern"],
                     "codec_mmd_weight": None if codec is None else codec["mmd_weight"],
                     "codec_seed": None if codec is None else codec["seed"],
                     "train_crop_frames": train.get("crop_frames"), "train_steps": trained_steps(run / "metrics.jsonl"),
                     "train_batch_size": train.get("batch_size"), "train_seed": train.get("seed"),
                     "train_tokens": train.get("tokens"),
                     "recorded_context_frames": config["lm"].get("context_frames")}
    return lms


# --------------------------------------------------------------------------------------------
# 1 and 2: dependence between codebooks


def slug(path: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", path.strip("/"))


@torch.no_grad()
def test_codes(codec_model: str, corpus: Path, records: list[dict], cache: Path, batch: int = 8) -> torch.Tensor:
    """[clips, K, frames] codes of ``records`` with the codec, cached (keyed by the codec's weights hash and
    the clip ids)."""
    from safetensors.torch import load_file, save_file

    from mmdgen.data.audio import read_audio
    from mmdgen.files import write_atomic
    from mmdgen.pretrained.directory import codec_identity, load_codec

    key = {"weights_sha256": codec_identity(codec_model)["weights_sha256"],
           "clips": ",".join(r["id"] for r in records)}
    path = cache / f"{slug(codec_model)}.safetensors"
    if path.exists():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            if handle.metadata() == key:
                return load_file(str(path))["codes"].long()
    codec = load_codec(codec_model)
    rate = codec.cfg.sample_rate
    codes = []
    for start in range(0, len(records), batch):
        audio = [read_audio(corpus / r["path"], rate) for r in records[start: start + batch]]
        length = min(a.shape[-1] for a in audio)
        codes.append(codec.encode(torch.stack([a[..., :length] for a in audio])))
    frames = min(c.shape[-1] for c in codes)
    codes = torch.cat([c[..., :frames] for c in codes])
    write_atomic(path, lambda tmp: save_file({"codes": codes.to(torch.int16).contiguous()}, str(tmp), metadata=key))
    return codes


def dependence(codecs: list[dict], corpus: Path, records: list[dict], cache: Path) -> list[dict]:
    from mmdgen.metrics.dependence import (aligned_codes, dependence_report, pairwise_mutual_information,
                                           shuffled_baseline)

    results = []
    for codec in tqdm(codecs, desc="codecs: encode test split + dependence", unit="codec"):
        codes = test_codes(codec["model"], corpus, records, cache)
        report = dependence_report(codes, delay=True)
        stages = codes.shape[1]
        # the baseline's pairwise matrix (dependence_report keeps only its mean): the same shuffle (seed 0)
        baseline_mi, _ = pairwise_mutual_information(shuffled_baseline(aligned_codes(codes, True),
                                                                       torch.Generator().manual_seed(0)))
        mi = torch.tensor(report["pairwise_mi_bits"])
        off = ~torch.eye(stages, dtype=torch.bool)
        results.append({**codec, "clips": codes.shape[0], "frames": codes.shape[-1], **report,
                        "baseline_pairwise_mi_bits": baseline_mi.tolist(),
                        # per codebook: sum over the other codebooks of the pairwise MI (bits), and its baseline
                        "pairwise_mi_sum_bits": (mi * off).sum(1).tolist(),
                        "baseline_pairwise_mi_sum_bits": (baseline_mi * off).sum(1).tolist(),
                        "excess_mean_pairwise_mi_percent": report["mean_pairwise_mi_percent"]
                        - report["baseline_mean_pairwise_mi_percent"],
                        "code_entropy_bits": [report["pairwise_mi_bits"][k][k] for k in range(stages)]})
    return results


def save_png(figure, path: Path) -> Path:
    from mmdgen.files import write_atomic

    write_atomic(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    return path


def plot_dependence_vs_weight(results: list[dict], path: Path) -> Path:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 3.8))
    left, right = figure.subplots(1, 2)
    markers = {0: "o", 1: "s", 2: "^", 3: "D"}
    for seed in sorted({r["seed"] for r in results}):
        rows = sorted((r for r in results if r["seed"] == seed), key=lambda r: r["mmd_weight"])
        weights = [r["mmd_weight"] for r in rows]
        marker = markers.get(seed, "x")
        colour = f"C{seed % 10}"
        right.plot(weights, [r["excess_mean_pairwise_mi_percent"] for r in rows], marker=marker, color=colour,
                   label=f"seed {seed}", linestyle="-" if len(rows) > 1 else "none")
        left.plot(weights, [r["mean_pairwise_mi_percent"] for r in rows], marker=marker, color=colour,
                  label=f"seed {seed}: measured")
        left.plot(weights, [r["baseline_mean_pairwise_mi_percent"] for r in rows], marker=marker, color=colour,
                  linestyle=":", markerfacecolor="none", label=f"seed {seed}: shuffled baseline")
    ticks = sorted({r["mmd_weight"] for r in results})
    for axes in (left, right):
        axes.set_xscale("symlog", linthresh=1.0)  # 0 sits at 0, weights >= 1 on a log scale
        axes.set_xticks(ticks, [f"{t:g}" for t in ticks])
        axes.set_xlabel("MMD (independence-loss) weight")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    left.set_ylabel("mean pairwise MI (% of joint entropy)")
    left.set_title("pairwise MI, delay-aligned test codes")
    right.set_ylabel("excess over shuffled baseline (points)")
    right.set_title("dependence beyond estimator bias")
    figure.tight_layout()
    return save_png(figure, path)


def plot_mi_with_others_baseline(rows: dict[str, dict], path: Path) -> Path:
    """Left: grouped bars of I(Z_k; Z_-k) per codebook, one bar per codec, a black tick in each bar at its
    shuffled baseline (what independent codes with the same marginals score: the estimator's bias). Right: the
    same per codebook for the sum over the other codebooks of the pairwise MI, as excess over its baseline
    (a lower-order proxy whose histograms the test split can fill; see the module docstring)."""
    from matplotlib.figure import Figure

    stages = len(next(iter(rows.values()))["mi_with_others_bits"])
    width = 0.8 / len(rows)
    figure = Figure(figsize=(11, 3.9))
    left, right = figure.subplots(1, 2)
    positions = np.arange(stages)
    for index, (name, row) in enumerate(rows.items()):
        x = positions + (index - (len(rows) - 1) / 2) * width
        left.bar(x, row["mi_with_others_bits"], width, label=name, color=f"C{index}")
        left.hlines(row["baseline_mi_with_others_bits"], x - width / 2, x + width / 2, colors="black",
                    label="shuffled baseline" if index == 0 else None)
        excess = np.asarray(row["pairwise_mi_sum_bits"]) - np.asarray(row["baseline_pairwise_mi_sum_bits"])
        right.bar(x, excess, width, label=name, color=f"C{index}")
    for axes in (left, right):
        axes.set_xticks(positions, [str(k + 1) for k in range(stages)])
        axes.set_xlabel("codebook k")
        axes.legend(fontsize=8, ncol=2, loc="upper right")
    top = max(max(row["mi_with_others_bits"] + row["baseline_mi_with_others_bits"]) for row in rows.values())
    left.set_ylim(0, 1.35 * top)  # room for the legend above the bars
    left.set_ylabel("I(Z_k; Z_-k) (bits)")
    left.set_title("MI with all others (plug-in; bias-dominated here)", fontsize=10)
    right.set_ylabel("sum_j I(Z_k; Z_j) - baseline (bits)")
    right.set_title("pairwise MI with each other codebook, summed: excess", fontsize=10)
    figure.suptitle("delay-aligned test codes", fontsize=10)
    figure.tight_layout()
    return save_png(figure, path)


# --------------------------------------------------------------------------------------------
# 3: generation


def plot_table1(gen: dict, path: Path) -> Path:
    """Table 1 as a picture: left, each LM's FAD against the test clips with its 90% bootstrap interval over
    the generated clips, beside the codec's own reconstructions of the same caption clips (the ceiling an LM
    over that codec can reach) and a line at the real-vs-real floor; right, caption adherence (instrument macro
    AUC, key MIREX score, tempo within 8%), the real caption clips last."""
    from matplotlib.figure import Figure

    rows = [(name, run, f"C{0 if run['pattern'] == 'delay' else 1}") for name, run in gen["lms"].items()]
    rows += [(name.replace(" reconstruction", " recon."), run, "0.55")
             for name, run in gen.get("codec_reconstructions", {}).items()]
    figure = Figure(figsize=(11, 0.42 * (len(rows) + 1) + 1.6))
    left, right = figure.subplots(1, 2, sharey=True)
    y = np.arange(len(rows) + 1)[::-1]
    left.barh(y[:-1], [run["fad"] for _, run, _ in rows], color=[colour for *_, colour in rows])
    # the interval is drawn on its own: resampling repeats clips, which biases FAD, so the point estimate
    # can fall outside its bootstrap interval when there are few clips
    low, high = (np.array([run["fad_bootstrap"][q] for _, run, _ in rows]) for q in ("p05", "p95"))
    left.errorbar((low + high) / 2, y[:-1], xerr=(high - low) / 2, fmt="none", ecolor="black", capsize=2)
    floor = gen["fad_real_vs_real"]["real_vs_real_mean"]
    left.axvline(floor, color="C2", linestyle="--", label=f"real vs real: {floor:.1f}")
    left.set_yticks(y, [name for name, *_ in rows] + ["real caption clips"], fontsize=8)
    left.set_xlabel("FAD vs the test clips (musicnn; 90% bootstrap interval)")
    left.set_title("lower is better; grey: the codec's own reconstructions", fontsize=9)
    left.legend(fontsize=8, loc="lower right")
    measures = [("instrument_macro_auc", "instrument AUC"), ("key_weighted", "key MIREX"),
                ("tempo_within_8_percent", "tempo within 8%")]
    runs = [run for _, run, _ in rows] + [gen["real"]["caption_sources"]]
    height = 0.8 / len(measures)
    for index, (key, label) in enumerate(measures):
        values = [np.nan if run.get(key) is None else run[key] for run in runs]
        right.barh(y + (1 - index) * height, values, height, label=label, color=f"C{index + 3}")
    right.set_xlim(0, 1)
    right.set_xlabel("caption adherence")
    right.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3)
    figure.suptitle(f"{gen['clips']} clips of {gen['duration_seconds']:g} s per LM, {gen['reference_clips']} "
                    "test clips as reference", fontsize=10)
    figure.tight_layout()
    return save_png(figure, path)


def spread_captions(records: list[dict], count: int) -> list[dict]:
    """``count`` records spread evenly over ``records`` (every step-th)."""
    if count > len(records):
        fail(f"--clips {count}: the test split has only {len(records)} clips to take captions from")
    return [records[int(i * len(records) / count)] for i in range(count)]


def generate_all(name: str, lm: dict, prompts: list[dict], args, folder: Path) -> dict:
    """Generate every prompt's clip with one LM; timings of the decode (text to codes) and of the codec."""
    import soundfile

    from mmdgen.generate import Generator, Sampling
    from mmdgen.model.patterns import decoding_steps

    generator = Generator.from_pretrained(lm["model"], codec=lm["codec"], compile=args.compile)
    context = args.context_frames
    if context == "auto":
        context = lm["recorded_context_frames"] or lm["train_crop_frames"]
    generator.lm.cfg.context_frames = int(context) or None  # 0: one pass over the whole duration
    sampling = Sampling(guidance_scale=3.0, top_k=250)
    frames = generator.frames(args.duration)
    k = generator.lm.cfg.num_codebooks
    batches = [prompts[i: i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
    # warm-up, untimed: compiled, the first batch's shape compiles (a full generation); eager, a short one
    warm = time.perf_counter()
    generator.generate_codes([p["caption"] for p in batches[0]],
                             args.duration if args.compile else min(args.duration, 1.0), sampling, seed=12345)
    warm = time.perf_counter() - warm
    folder.mkdir(parents=True, exist_ok=True)
    decode_seconds, codec_seconds, steps_per_batch, listing = [], [], [], []
    load_before = os.getloadavg()
    for index, batch in enumerate(tqdm(batches, desc=f"generate {name}", unit="batch")):
        counter = [0]
        start = time.perf_counter()
        codes = generator.generate_codes([p["caption"] for p in batch], args.duration, sampling,
                                         seed=args.seed + index,
                                         on_step=lambda step, seq: counter.__setitem__(0, counter[0] + 1))
        decode_seconds.append(time.perf_counter() - start)
        steps_per_batch.append(counter[0])
        start = time.perf_counter()
        with torch.no_grad():
            audio = generator.codec.decode(codes, int(round(args.duration * generator.sample_rate)))
        codec_seconds.append(time.perf_counter() - start)
        for offset, (prompt, clip) in enumerate(zip(batch, audio)):
            clip_id = f"clip{index * args.batch_size + offset:03d}"
            soundfile.write(str(folder / f"{clip_id}.wav"), clip.mean(0).numpy(), generator.sample_rate)
            listing.append({"id": clip_id, "caption": prompt["caption"], "source_clip": prompt["id"],
                            "seed": args.seed + index, "row": offset})
    load_after = os.getloadavg()
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in listing))
    total, steps = sum(decode_seconds), sum(steps_per_batch)
    return {**lm, "name": name, "context_frames": generator.lm.cfg.context_frames, "frames": frames,
            "nominal_decoding_steps": decoding_steps(lm["pattern"], k, frames),
            "sampled_steps_per_batch": steps_per_batch, "batches": len(batches), "batch_size": args.batch_size,
            "mode": "compiled" if args.compile else "eager", "threads": torch.get_num_threads(),
            "warmup_seconds": warm, "decode_seconds_per_batch": decode_seconds,
            "codec_decode_seconds_per_batch": codec_seconds,
            "decode_seconds_per_clip": total / len(prompts),
            "decode_seconds_per_batched_step": total / steps,
            "codec_decode_seconds_per_clip": sum(codec_seconds) / len(prompts),
            "load_average_1min_before_after": [load_before[0], load_after[0]],
            "wavs": str(folder), "sample_rate": generator.sample_rate}


def musicnn_per_clip(clips: list[torch.Tensor], rate: int, tagger, desc: str
                     ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from mmdgen.metrics.musicnn import musicnn_outputs

    return [musicnn_outputs([clip], rate, tagger)[0] for clip in tqdm(clips, desc=desc, unit="clip", leave=False)]


def features(outputs) -> torch.Tensor:
    return torch.cat([f for f, _ in outputs])


def fad_spreads(generated: dict[str, list], reference: list, args, rng: np.random.Generator) -> dict:
    """Bootstrap over generated clips (FAD against all reference clips), and split-half FADs: the reference
    split at random into halves A and B; each LM's clips against A, and the real floor, ``count`` clips of B
    against A (count = the number of generated clips, capped by B's size), over ``--fad-splits`` splits."""
    from mmdgen.metrics.fad import frechet_distance

    reference_features = features(reference)
    out: dict = {"bootstrap": {}, "paired_differences": {}, "split_half": {"lms": {}, "splits": args.fad_splits}}
    # clip i of every LM comes from the same caption and seed: one resample of the clip indices serves all
    # LMs (paired), so the differences between LMs get their own spread
    clips = min(len(o) for o in generated.values())
    draws = {name: [] for name in generated}
    for _ in range(args.bootstrap):
        chosen = rng.integers(0, clips, clips)
        for name, outputs in generated.items():
            draws[name].append(frechet_distance(features([outputs[i] for i in chosen]), reference_features))
    for name, values in draws.items():
        out["bootstrap"][name] = {"resamples": args.bootstrap, "std": float(np.std(values, ddof=1)),
                                  "p05": float(np.percentile(values, 5)), "p95": float(np.percentile(values, 95))}
    names = list(generated)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            difference = np.asarray(draws[a]) - np.asarray(draws[b])
            out["paired_differences"][f"{a} - {b}"] = {
                "mean": float(difference.mean()), "std": float(difference.std(ddof=1)),
                "p05": float(np.percentile(difference, 5)), "p95": float(np.percentile(difference, 95))}
    half = len(reference) // 2
    count = min(min(len(o) for o in generated.values()), len(reference) - half)
    floors, per_lm = [], {name: [] for name in generated}
    for _ in range(args.fad_splits):
        order = rng.permutation(len(reference))
        a = features([reference[i] for i in order[:half]])
        b = features([reference[i] for i in order[half:][:count]])
        floors.append(frechet_distance(b, a))
        for name, outputs in generated.items():
            per_lm[name].append(frechet_distance(features(outputs), a))
    out["split_half"].update({"reference_half_clips": half, "compared_clips": count,
                              "real_vs_real_mean": float(np.mean(floors)),
                              "real_vs_real_std": float(np.std(floors, ddof=1)) if len(floors) > 1 else 0.0,
                              "real_vs_real_values": floors})
    for name, values in per_lm.items():
        out["split_half"]["lms"][name] = {"mean": float(np.mean(values)),
                                          "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}
    return out


def reconstruct_sources(lms: dict[str, dict], sources: list[torch.Tensor], rate: int, folder: Path) -> dict[str, dict]:
    """The codec ceiling: the caption-source clips encoded and decoded by each codec the LMs use, written as
    WAVs the way the generated clips are (mono, 16-bit) so that both go through the same evaluation."""
    import soundfile

    from mmdgen.pretrained.directory import load_codec

    ceilings = {}
    codecs = {(lm["codec"], lm["codec_mmd_weight"], lm["codec_seed"]) for lm in lms.values()}
    for codec_dir, weight, seed in sorted(codecs, key=lambda c: (c[1] is None, c[1] or 0.0, c[2] or 0, c[0])):
        # seed-0 codecs keep the short name; a codec of unknown weight is named by its folder
        name = (f"{codec_dir} reconstruction" if weight is None
                else f"codec w{weight:g}{f' seed {seed}' if seed else ''} reconstruction")
        codec = load_codec(codec_dir)
        if codec.cfg.sample_rate != rate:
            fail(f"codec {codec_dir} runs at {codec.cfg.sample_rate} Hz, the generated clips at {rate} Hz")
        out = folder / slug(codec_dir)
        out.mkdir(parents=True, exist_ok=True)
        for index, clip in enumerate(tqdm(sources, desc=f"reconstruct ({name})", unit="clip", leave=False)):
            with torch.no_grad():
                audio = codec.decode(codec.encode(clip[None]), clip.shape[-1])[0]
            soundfile.write(str(out / f"clip{index:03d}.wav"), audio.mean(0).numpy(), rate)
        ceilings[name] = {"codec": codec_dir, "codec_mmd_weight": weight, "wavs": str(out)}
    return ceilings


def flatten_over_delay(runs: dict[str, dict]) -> dict[str, dict]:
    """Decode time and sampled steps of flattening over delay, for each codec weight and LM training recipe
    (steps, batch, crop, seed) that has both patterns."""
    groups: dict[tuple, dict[str, dict]] = {}
    for run in runs.values():
        recipe = (run["codec_mmd_weight"], run.get("train_steps"), run.get("train_batch_size"),
                  run.get("train_crop_frames"), run.get("train_seed"))
        groups.setdefault(recipe, {})[run["pattern"]] = run
    ratios = {}
    for (weight, steps, batch, crop, seed), pair in groups.items():
        if "delay" in pair and "flatten" in pair:
            key = f"codec weight {'?' if weight is None else f'{weight:g}'}, LMs {steps} x {batch} x {crop}, seed {seed}"
            ratios[key] = {
                "delay": pair["delay"]["name"], "flatten": pair["flatten"]["name"],
                "flatten_over_delay_seconds_per_clip": pair["flatten"]["decode_seconds_per_clip"]
                / pair["delay"]["decode_seconds_per_clip"],
                "flatten_over_delay_sampled_steps": sum(pair["flatten"]["sampled_steps_per_batch"])
                / sum(pair["delay"]["sampled_steps_per_batch"])}
    return ratios


def table1(lms: dict[str, dict], prompts: list[dict], test_records: list[dict], args) -> dict:
    from mmdgen.data.audio import read_audio
    from mmdgen.metrics.fad import frechet_distance
    from mmdgen.metrics.musicnn import load_musicnn

    tagger = load_musicnn()
    rate = 32000
    runs = {}
    for name, lm in lms.items():
        runs[name] = generate_all(name, lm, prompts, args, args.out / "generated" / name)
        rate = runs[name]["sample_rate"]
    reference = [read_audio(args.corpus / r["path"], rate) for r in tqdm(test_records, desc="read test clips",
                                                                          leave=False)]
    reference_outputs = musicnn_per_clip(reference, rate, tagger, "musicnn: test clips")
    by_id = {r["id"]: i for i, r in enumerate(test_records)}
    sources = [by_id[p["id"]] for p in prompts]  # the real clips whose captions were used
    real = {"caption_sources": adherence([reference[i] for i in sources], prompts,
                                         [reference_outputs[i] for i in sources], rate),
            "all_test_clips": adherence(reference, test_records, reference_outputs, rate),
            "fad_caption_sources_vs_all_test": frechet_distance(features([reference_outputs[i] for i in sources]),
                                                                features(reference_outputs))}
    ceilings = reconstruct_sources(lms, [reference[i] for i in sources], rate, args.out / "reconstructed")
    generated_outputs = {}
    for name, run in {**runs, **ceilings}.items():
        clips = [read_audio(Path(run["wavs"]) / f"clip{i:03d}.wav", rate) for i in range(len(prompts))]
        generated_outputs[name] = musicnn_per_clip(clips, rate, tagger, f"musicnn: {name}")
        run["fad"] = frechet_distance(features(generated_outputs[name]), features(reference_outputs))
        run["generated_patches"] = int(features(generated_outputs[name]).shape[0])
        run.update(adherence(clips, prompts, generated_outputs[name], rate))
    spreads = fad_spreads(generated_outputs, reference_outputs, args, np.random.default_rng(args.seed))
    for name, run in {**runs, **ceilings}.items():
        run["fad_bootstrap"] = spreads["bootstrap"][name]
        run["fad_vs_half"] = spreads["split_half"]["lms"][name]
    ratios = flatten_over_delay(runs)
    return {"clips": len(prompts), "duration_seconds": args.duration, "reference_clips": len(test_records),
            "reference_patches": int(features(reference_outputs).shape[0]),
            "captions": [{"caption": p["caption"], "source_clip": p["id"], "instrument": p["instrument"],
                          "key": p["key"], "tempo_bpm": p["tempo_bpm"]} for p in prompts],
            "lms": runs, "codec_reconstructions": ceilings, "real": real,
            "fad_paired_bootstrap_differences": spreads["paired_differences"],
            "fad_real_vs_real": {k: v for k, v in spreads["split_half"].items()
                                                           if k != "lms"},
            "time_ratios": ratios}


def dependence_figures(codecs: list[dict], test_records: list[dict], results: dict, args) -> dict[str, str]:
    """Figures 2 and 4-5: fills ``results["dependence"]`` and ``results["mi_with_others"]``; the PNG paths."""
    from mmdgen.eval.plots import plot_mi_heatmap

    compare = {}
    for weight in args.compare_weights:
        match = [c for c in codecs if c["seed"] == 0 and c["mmd_weight"] == weight]
        if not match:
            fail(f"--compare-weights {weight:g}: no seed-0 codec of that weight among "
                 f"{', '.join(c['run'] for c in codecs)}")
        compare[f"weight {weight:g}"] = match[0]["run"]
    results["dependence"] = dependence(codecs, args.corpus, test_records, args.out / "codes")
    by_run = {r["run"]: r for r in results["dependence"]}
    figures = {"dependence_vs_weight": str(plot_dependence_vs_weight(results["dependence"],
                                                                     args.figures / "dependence_vs_weight.png"))}
    results["mi_with_others"] = {name: {key: by_run[run][key] for key in
                                        ("run", "mmd_weight", "mi_with_others_bits", "baseline_mi_with_others_bits",
                                         "pairwise_mi_sum_bits", "baseline_pairwise_mi_sum_bits")}
                                 for name, run in compare.items()}
    figures["mi_with_others"] = str(plot_mi_with_others_baseline(results["mi_with_others"],
                                                                 args.figures / "mi_with_others.png"))
    for name, run in list(compare.items())[:2]:
        weight = by_run[run]["mmd_weight"]
        figures[f"mi_heatmap_w{weight:g}"] = str(plot_mi_heatmap(
            by_run[run]["pairwise_mi_percent"], args.figures / f"mi_heatmap_w{weight:g}.png",
            title=f"pairwise MI, codec MMD weight {weight:g} (seed 0)"))
    return figures


# --------------------------------------------------------------------------------------------
# Output


def fmt(value, digits: int = 2) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def print_tables(results: dict) -> None:
    if "dependence" in results:
        print_dependence(results)
    if "generation" in results:
        print_table1(results["generation"])


def print_dependence(results: dict) -> None:
    print("\n## Figure 2 at our scale: dependence vs MMD weight (delay-aligned codes, test split)\n")
    print("| codec run | seed | MMD weight | code entropy (bits, mean) | pairwise MI % (shuffled baseline) | "
          "excess | total correlation % (baseline) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results["dependence"]:
        print(f"| {r['run']} | {r['seed']} | {r['mmd_weight']:g} | {np.mean(r['code_entropy_bits']):.2f} | "
              f"{r['mean_pairwise_mi_percent']:.2f} ({r['baseline_mean_pairwise_mi_percent']:.2f}) | "
              f"{r['excess_mean_pairwise_mi_percent']:.2f} | {r['total_correlation_percent']:.1f} "
              f"({r['baseline_total_correlation_percent']:.1f}) |")
    compare = results.get("mi_with_others")
    if compare:
        names = list(compare)
        print("\n## Figures 4-5 at our scale: I(Z_k; Z_-k) in bits (shuffled baseline), excess; then the sum over "
              "j != k of I(Z_k; Z_j), excess over its baseline\n")
        print("| codebook | " + " | ".join(f"{n}: I(Z_k; Z_-k)" for n in names) + " | "
              + " | ".join(f"{n}: pairwise sum, excess" for n in names) + " |")
        print("|---:|" + "---:|" * (2 * len(names)))
        stages = len(compare[names[0]]["mi_with_others_bits"])
        for k in range(stages):
            values = [(compare[n]["mi_with_others_bits"][k], compare[n]["baseline_mi_with_others_bits"][k])
                      for n in names]
            cells = [f"{mi:.3f} ({base:.3f}), {mi - base:+.3f}" for mi, base in values]
            cells += [f"{compare[n]['pairwise_mi_sum_bits'][k] - compare[n]['baseline_pairwise_mi_sum_bits'][k]:.3f}"
                      for n in names]
            print(f"| {k + 1} | " + " | ".join(cells) + " |")


def print_table1(gen: dict) -> None:
    lms = gen["lms"]
    first = next(iter(lms.values()))
    print(f"\n## Table 1 at our scale: {gen['clips']} clips of {gen['duration_seconds']:g} s per LM "
          f"(guidance 3, top-k 250), FAD against {gen['reference_clips']} test clips\n")
    print("| LM | training (steps x batch x crop frames, seed) | codec weight | pattern | steps (nominal; sampled) | "
          "FAD (bootstrap sd) | FAD vs half (sd over splits) | instrument macro AUC | caption-tag prob. | key exact | "
          "key MIREX | tempo within 8% | decode s / clip | ms / batched step |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, run in lms.items():
        steps = run["sampled_steps_per_batch"][0]
        weight = "?" if run["codec_mmd_weight"] is None else f"{run['codec_mmd_weight']:g}"
        training = (f"{run.get('train_steps')} x {run.get('train_batch_size')} x {run.get('train_crop_frames')}, "
                    f"{run.get('train_seed')}")
        print(f"| {name} | {training} | {weight} | {run['pattern']} | {run['nominal_decoding_steps']}; {steps} | "
              f"{run['fad']:.2f} "
              f"({run['fad_bootstrap']['std']:.2f}) | {run['fad_vs_half']['mean']:.2f} "
              f"({run['fad_vs_half']['std']:.2f}) | "
              f"{fmt(run['instrument_macro_auc'])} | {fmt(run['instrument_caption_tag_probability'], 3)} | "
              f"{run['key_exact']:.2f} | {run['key_weighted']:.2f} | {run['tempo_within_8_percent']:.2f} | "
              f"{run['decode_seconds_per_clip']:.2f} | {1000 * run['decode_seconds_per_batched_step']:.1f} |")
    for name, run in gen.get("codec_reconstructions", {}).items():
        print(f"| {name} (the {gen['clips']} caption clips) | - | {run['codec_mmd_weight']:g} | - | - | "
              f"{run['fad']:.2f} ({run['fad_bootstrap']['std']:.2f}) "
              f"| {run['fad_vs_half']['mean']:.2f} ({run['fad_vs_half']['std']:.2f}) | "
              f"{fmt(run['instrument_macro_auc'])} | {fmt(run['instrument_caption_tag_probability'], 3)} | "
              f"{run['key_exact']:.2f} | {run['key_weighted']:.2f} | {run['tempo_within_8_percent']:.2f} | - | - |")
    real, floor = gen["real"]["caption_sources"], gen["fad_real_vs_real"]
    print(f"| real (the {gen['clips']} caption clips) | - | - | - | - | "
          f"{gen['real']['fad_caption_sources_vs_all_test']:.2f} "
          f"(subset of the reference) | {floor['real_vs_real_mean']:.2f} ({floor['real_vs_real_std']:.2f}): "
          f"{floor['compared_clips']} real vs {floor['reference_half_clips']} | {fmt(real['instrument_macro_auc'])} | "
          f"{fmt(real['instrument_caption_tag_probability'], 3)} | {real['key_exact']:.2f} | "
          f"{real['key_weighted']:.2f} | "
          f"{real['tempo_within_8_percent']:.2f} | - | - |")
    codec_times = ", ".join(f"{n}: {r['codec_decode_seconds_per_clip']:.2f} s/clip" for n, r in lms.items())
    print(f"\nDecode timing: {first['mode']}, {first['threads']} threads, batch {first['batch_size']} "
          f"({2 * first['batch_size']} rows with guidance), text to codes only; codec decode apart "
          f"({codec_times}).")
    for recipe, ratio in gen["time_ratios"].items():
        print(f"{recipe}: flatten / delay decode time {ratio['flatten_over_delay_seconds_per_clip']:.2f}x "
              f"(sampled steps {ratio['flatten_over_delay_sampled_steps']:.2f}x)")
    print("FAD differences between LMs, paired bootstrap over the clips (the same captions and seeds): "
          + "; ".join(f"{pair} = {d['mean']:+.2f} (90%: {d['p05']:+.2f} to {d['p95']:+.2f})"
                      for pair, d in gen["fad_paired_bootstrap_differences"].items()))
    print(f"FAD is noisy at {gen['clips']} clips: the bootstrap sd over generated clips is given beside each value, "
          f"and the real-vs-real floor ({floor['compared_clips']} real test clips against a disjoint half of "
          f"{floor['reference_half_clips']}, {floor['splits']} random splits) beside the LMs' FAD against the same "
          "halves. The musicnn FAD is biased upward at this few patches: compare only equally sized sets.")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=Path("runs/corpus"))
    parser.add_argument("--split", default="test")
    parser.add_argument("--codecs", nargs="+", default=[DEFAULT_CODECS],
                        help="codec run folders or globs (each holds model/ and checkpoint/config.json)")
    parser.add_argument("--compare-weights", type=float, nargs="+", default=[0.0, 3.0, 10.0],
                        help="the seed-0 codecs of Figures 4-5 (the first two also get heatmaps)")
    parser.add_argument("--lms", nargs="+", default=[f"{k}={v}" for k, v in DEFAULT_LMS.items()],
                        help="name=LM-run-folder pairs")
    parser.add_argument("--out", type=Path, default=Path("runs/paper-tables"), help="codes cache and generated WAVs")
    parser.add_argument("--results", type=Path, default=None, help="default docs/paper_tables_results.json")
    parser.add_argument("--figures", type=Path, default=None, help="default docs/figures")
    parser.add_argument("--clips", type=int, default=32)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--context-frames", default="auto",
                        help="LM window in frames: auto (the training crop), or 0 for one pass")
    parser.add_argument("--compile", action="store_true", help="decode step through torch.compile")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (0: torch's default). 1 by default: on a shared 2-core machine two "
                             "threads made a decode step 20-100x slower whenever another process held a core")
    parser.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples of the FAD")
    parser.add_argument("--fad-splits", type=int, default=20, help="random half splits for the real-vs-real FAD")
    parser.add_argument("--skip-generation", action="store_true", help="only the codec results (Figures 2, 4-5)")
    parser.add_argument("--table1-figure", default="table1.png", help="file name of Table 1's figure under --figures")
    parser.add_argument("--skip-dependence", action="store_true",
                        help="only Table 1 (for LMs evaluated on another corpus than the codec sweep's)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 4 clips of 4 s, batch 4, few resamples; outputs under <out>/quick")
    args = parser.parse_args(argv)
    if args.quick:
        args.clips, args.duration, args.batch_size, args.bootstrap, args.fad_splits = 4, 4.0, 4, 20, 3
        args.out = args.out / "quick"
        args.results = args.results or args.out / "paper_tables_results.json"
        args.figures = args.figures or args.out / "figures"
    args.results = args.results or Path("docs/paper_tables_results.json")
    args.figures = args.figures or Path("docs/figures")
    if args.context_frames != "auto":
        args.context_frames = int(args.context_frames)
    if args.threads:
        torch.set_num_threads(args.threads)

    began = time.perf_counter()
    test_records = read_manifest(args.corpus, args.split)
    codecs = find_codecs(args.codecs)
    lms = {} if args.skip_generation else find_lms(args.lms, codecs)
    if args.skip_dependence and args.skip_generation:
        fail("--skip-dependence with --skip-generation leaves nothing to do")
    timings = {}
    results: dict = {"config": {k: str(v) for k, v in vars(args).items()},
                     "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                                 "torch": torch.__version__, "platform": platform.platform()}}
    figures = {}
    if not args.skip_dependence:
        start = time.perf_counter()
        figures = dependence_figures(codecs, test_records, results, args)
        timings["codecs_seconds"] = time.perf_counter() - start
    if lms:
        start = time.perf_counter()
        prompts = spread_captions(test_records, args.clips)
        results["generation"] = table1(lms, prompts, test_records, args)
        figures["table1"] = str(plot_table1(results["generation"], args.figures / args.table1_figure))
        timings["generation_and_evaluation_seconds"] = time.perf_counter() - start
    results["figures"] = figures
    timings["total_seconds"] = time.perf_counter() - began
    results["timings"] = timings
    from mmdgen.files import write_text_atomic

    write_text_atomic(args.results, json.dumps(results, indent=1, default=str) + "\n")
    print_tables(results)
    print(f"\nwrote {args.results} and {len(figures)} figures under {args.figures}; "
          f"took {timings['total_seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
