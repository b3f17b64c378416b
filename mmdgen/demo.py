"""`mmdgen demo`: the whole system end to end, on CPU, in minutes, on a small slice of the corpus.

Stages, each kept under ``out/`` and reused by a later run (a finished stage is skipped, an interrupted
training resumes from its checkpoint):

1. ``corpus/``: ``hours`` of captioned clips rendered from the symbolic corpus (``mmdgen.data.build``).
2. ``codec-mmd0/``, ``codec-mmd<w>/``: the tiny codec trained twice, without and with the delay-aligned
   independence loss (weight ``mmd_weight``, every ``mmd_every`` steps on that many steps' batches: the
   schedule that kept reconstruction intact in our sweep, docs/results.md).
3. ``tokens-*/``: each codec's codes of the corpus.
4. ``lm-*/``: a tiny delay-pattern LM on each codec's codes.
5. ``generated-*/``: clips from each LM for captions of the test split (the same captions and seeds).
6. ``evaluation.json`` and ``report.md``: dependence between codebooks, reconstruction, generation metrics,
   with plots (``mmdgen.eval.report``).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from mmdgen.files import write_text_atomic


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    hours: float = 0.5
    codec_steps: int = 700
    mmd_weight: float = 3.0
    mmd_every: int = 8
    lm_steps: int = 600
    lm_crop_frames: int = 150
    clips: int = 6  # generated per LM
    duration: float = 10.0
    seed: int = 0
    device: str = "cpu"

    def check(self) -> None:
        problems = [f"{name} must be positive, got {getattr(self, name)}"
                    for name in ("hours", "codec_steps", "mmd_weight", "mmd_every", "lm_steps", "lm_crop_frames",
                                 "clips", "duration") if not getattr(self, name) > 0]
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def codecs(self) -> dict[str, float]:
        """Run name -> MMD weight: the codec without and with the independence loss."""
        return {"mmd0": 0.0, f"mmd{self.mmd_weight:g}": self.mmd_weight}

    def path(self, stage: str, name: str = "") -> Path:
        """Where a stage keeps its output: corpus (the manifest), codec, tokens, lm (their exported models or
        folders, per codec name), generated (per codec name)."""
        out = Path(self.out)
        return {"corpus": out / "corpus" / "manifest.jsonl", "codec": out / f"codec-{name}" / "model",
                "codec_run": out / f"codec-{name}", "tokens": out / f"tokens-{name}",
                "lm": out / f"lm-{name}" / "model", "lm_run": out / f"lm-{name}",
                "generated": out / f"generated-{name}"}[stage]

    @classmethod
    def load(cls, run_dir: str | Path) -> "DemoConfig":
        """The configuration a demo run recorded in ``run_dir/demo_config.json``."""
        path = Path(run_dir) / "demo_config.json"
        if not path.exists():
            raise ValueError(f"{path}: missing; expected the folder of a `mmdgen demo` run")
        try:
            return cls(**json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as error:
            raise ValueError(f"{path}: not a demo configuration ({error})") from error


def build_corpus_slice(cfg: DemoConfig, log=print) -> Path:
    from mmdgen.data.build import BuildConfig, build_corpus

    manifest = cfg.path("corpus")
    log(f"[1/6] corpus: {cfg.hours:g} h of captioned clips -> {manifest.parent}")
    build_corpus(manifest.parent, BuildConfig(hours=cfg.hours, seed=cfg.seed), workers=2)
    return manifest


def train_codecs(cfg: DemoConfig, manifest: Path, log=print) -> dict[str, Path]:
    from mmdgen.train.codec import CodecTrainConfig, CodecTrainer

    models = {}
    for name, weight in cfg.codecs.items():
        run = cfg.path("codec_run", name)
        log(f"[2/6] codec {name}: tiny, {cfg.codec_steps} steps, MMD weight {weight:g} -> {run}")
        schedule = {"mmd_every": cfg.mmd_every, "mmd_batches": cfg.mmd_every} if weight > 0 else {}
        trainer_cfg = CodecTrainConfig(data=str(manifest), out=str(run), steps=cfg.codec_steps, batch_size=8,
                                       crop_seconds=1.0, mmd_weight=weight, mmd_delay=True, adversarial=False,
                                       seed=cfg.seed, device=cfg.device, valid_every=max(cfg.codec_steps // 4, 1),
                                       ckpt_every=max(cfg.codec_steps // 4, 1), **schedule)
        models[name] = _train_once(CodecTrainer, trainer_cfg, run)
    return models


def tokenize(cfg: DemoConfig, codecs: dict[str, Path], manifest: Path, log=print) -> dict[str, Path]:
    from mmdgen.data.tokenize import tokenize_corpus

    folders = {}
    for name, codec_dir in codecs.items():
        folder = folders[name] = cfg.path("tokens", name)
        log(f"[3/6] tokens of codec {name} -> {folder}")
        if not (folder / "tokens.json").exists():
            tokenize_corpus(codec_dir, manifest, folder, device=cfg.device)
    return folders


def train_lms(cfg: DemoConfig, tokens: dict[str, Path], log=print) -> dict[str, Path]:
    from mmdgen.train.lm import LMTrainConfig, LMTrainer

    models = {}
    for name, folder in tokens.items():
        run = cfg.path("lm_run", name)
        log(f"[4/6] LM on codec {name}'s codes: tiny, delay pattern, {cfg.lm_steps} steps -> {run}")
        trainer_cfg = LMTrainConfig(tokens=str(folder), out=str(run), preset="tiny", pattern="delay",
                                    steps=cfg.lm_steps, batch_size=16, crop_frames=cfg.lm_crop_frames, lr=2e-3,
                                    seed=cfg.seed, device=cfg.device, valid_every=max(cfg.lm_steps // 4, 1),
                                    ckpt_every=max(cfg.lm_steps // 4, 1))
        models[name] = _train_once(LMTrainer, trainer_cfg, run)
    return models


def _train_once(trainer_class, trainer_cfg, run: Path) -> Path:
    """The exported model of a run: trained (or resumed) unless a finished run exported it already."""
    model = run / "model"
    if not (model / "config.json").exists():
        trainer_class(trainer_cfg).train()
    return model


def test_captions(manifest: Path, count: int, seed: int) -> list[dict]:
    """``count`` held-out clips' records (caption, instrument, key, tempo), spread over the test split and then
    the validation split (a small slice has few test clips)."""
    records = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    held_out = [r for r in records if r.get("split") == "test"] + [r for r in records if r.get("split") == "valid"]
    if not held_out:
        raise ValueError(f"{manifest}: no test or validation clips to take captions from")
    step = max(len(held_out) // count, 1)
    return held_out[(seed % step)::step][:count]


def generate_clips(cfg: DemoConfig, lms: dict[str, Path], manifest: Path, log=print) -> dict[str, Path]:
    from mmdgen.generate import Generator, Sampling
    from mmdgen.generate.batch import Request, generate_batch

    prompts = test_captions(manifest, cfg.clips, cfg.seed)
    folders = {}
    for name, model in lms.items():
        folder = folders[name] = cfg.path("generated", name)
        log(f"[5/6] {len(prompts)} clips of {cfg.duration:g} s from LM {name} -> {folder}")
        requests = [Request(id=f"clip{i:02d}", text=p["caption"], duration=cfg.duration, seed=cfg.seed + i)
                    for i, p in enumerate(prompts)]
        generate_batch(Generator.from_pretrained(model, device=cfg.device), requests, folder, Sampling(),
                       batch_size=len(requests))
    return folders


def run(cfg: DemoConfig, log=print) -> Path:
    """Every stage; returns the output folder."""
    cfg.check()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    write_text_atomic(out / "demo_config.json", json.dumps(asdict(cfg), indent=1))
    manifest = build_corpus_slice(cfg, log)
    codecs = train_codecs(cfg, manifest, log)
    lms = train_lms(cfg, tokenize(cfg, codecs, manifest, log), log)
    generate_clips(cfg, lms, manifest, log)
    from mmdgen.eval.report import evaluate_demo, write_report

    log("[6/6] evaluation and report")
    report = write_report(out, evaluate_demo(cfg, log))
    log(f"done in {time.perf_counter() - started:.0f} s: {report}")
    return out
