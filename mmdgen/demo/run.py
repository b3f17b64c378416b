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
   with plots (``mmdgen.demo.report``).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from mmdgen.data.build import BuildConfig, build_corpus
from mmdgen.data.tokenize import tokenize_corpus
from mmdgen.demo.config import DemoConfig, test_captions
from mmdgen.demo.report import evaluate_demo, write_report
from mmdgen.files import write_text_atomic
from mmdgen.generate import Generator, Sampling
from mmdgen.generate.batch import Request, generate_batch
from mmdgen.train.codec import CodecTrainConfig, CodecTrainer
from mmdgen.train.lm import LMTrainConfig, LMTrainer


def build_corpus_slice(cfg: DemoConfig, log=print) -> Path:
    manifest = cfg.path("corpus")
    log(f"[1/6] corpus: {cfg.hours:g} h of captioned clips -> {manifest.parent}")
    build_corpus(manifest.parent, BuildConfig(hours=cfg.hours, seed=cfg.seed), workers=2)
    return manifest


def train_codecs(cfg: DemoConfig, manifest: Path, log=print) -> dict[str, Path]:
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
    folders = {}
    for name, codec_dir in codecs.items():
        folder = folders[name] = cfg.path("tokens", name)
        log(f"[3/6] tokens of codec {name} -> {folder}")
        if not (folder / "tokens.json").exists():
            tokenize_corpus(codec_dir, manifest, folder, device=cfg.device)
    return folders


def train_lms(cfg: DemoConfig, tokens: dict[str, Path], log=print) -> dict[str, Path]:
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


def generate_clips(cfg: DemoConfig, lms: dict[str, Path], manifest: Path, log=print) -> dict[str, Path]:
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
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    write_text_atomic(out / "demo_config.json", json.dumps(asdict(cfg), indent=1))
    manifest = build_corpus_slice(cfg, log)
    codecs = train_codecs(cfg, manifest, log)
    lms = train_lms(cfg, tokenize(cfg, codecs, manifest, log), log)
    generate_clips(cfg, lms, manifest, log)
    log("[6/6] evaluation and report")
    report = write_report(out, evaluate_demo(cfg, log))
    log(f"done in {time.perf_counter() - started:.0f} s: {report}")
    return out
