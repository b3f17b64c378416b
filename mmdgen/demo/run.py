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
   The MMD codec's LM generates the same clips again with int8 weights (``generated-<name>-int8/``).
6. ``evaluation.json`` and ``report.md``: dependence between codebooks, reconstruction, generation metrics,
   with plots (``mmdgen.demo.report``).

Each stage's wall time is printed at the end as a table and written into the report and ``evaluation.json``;
``phases.json`` keeps what each stage took when it last ran, so that a rerun shows a reused stage as such
(with its earlier time) rather than as a stage that ran in no time.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from mmdgen.data.build import BuildConfig, build_corpus
from mmdgen.data.tokenize import tokenize_corpus
from mmdgen.demo.config import DemoConfig, test_captions
from mmdgen.demo.report import evaluate_demo, phase_table, save_evaluation, write_report
from mmdgen.files import write_text_atomic
from mmdgen.generate import Generator, Sampling
from mmdgen.generate.batch import Request, generate_batch
from mmdgen.train.codec import CodecTrainConfig, CodecTrainer
from mmdgen.train.lm import LMTrainConfig, LMTrainer
from mmdgen.validation import check_number

PHASES = "phases.json"


class Stage:
    """One stage being timed; the stage sets ``reused`` when an earlier run had done its work."""

    def __init__(self):
        self.reused = False


class PhaseClock:
    """Each stage's wall time in this run, in the order the stages ran. A stage an earlier run finished is
    marked reused, with the time it took when it ran (kept in ``phases.json``), never with the near-zero time
    of skipping it."""

    def __init__(self, out: Path):
        self.path = out / PHASES
        self.when_ran: dict[str, float] = self._read() if self.path.exists() else {}
        self.rows: list[dict] = []

    def _read(self) -> dict[str, float]:
        """The stage -> seconds of ``phases.json``; ValueError naming the file and the entry when it is anything
        else (not JSON, not an object, a time that is not a finite number of seconds >= 0)."""
        expected = "expected the stages' times of a demo run ({\"stage\": seconds, ...})"
        try:
            when_ran = json.loads(self.path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{self.path}: not JSON ({error}); {expected}") from error
        if not isinstance(when_ran, dict):
            raise ValueError(f"{self.path}: a JSON {type(when_ran).__name__}; {expected}")
        for stage, seconds in when_ran.items():
            check_number(seconds, f"{self.path}: {stage!r}", at_least=0)
        return when_ran

    @contextmanager
    def stage(self, name: str):
        started = time.perf_counter()
        stage = Stage()
        yield stage
        if stage.reused:
            self.rows.append({"stage": name, "seconds": self.when_ran.get(name), "reused": True})
        else:
            self.when_ran[name] = time.perf_counter() - started
            self.rows.append({"stage": name, "seconds": self.when_ran[name], "reused": False})
        write_text_atomic(self.path, json.dumps(self.when_ran, indent=1))


def build_corpus_slice(cfg: DemoConfig, clock: PhaseClock, log=print) -> Path:
    manifest = cfg.path("corpus")
    log(f"[1/6] corpus: {cfg.hours:g} h of captioned clips -> {manifest.parent}")
    with clock.stage("corpus") as stage:
        built = build_corpus(manifest.parent, BuildConfig(hours=cfg.hours, seed=cfg.seed), workers=2)
        stage.reused = built["rendered_this_run"] == 0
    return manifest


def train_codecs(cfg: DemoConfig, manifest: Path, clock: PhaseClock, log=print) -> dict[str, Path]:
    models = {}
    for name, weight in cfg.codecs.items():
        run = cfg.path("codec_run", name)
        log(f"[2/6] codec {name}: tiny, {cfg.codec_steps} steps, MMD weight {weight:g} -> {run}")
        schedule = {"mmd_every": cfg.mmd_every, "mmd_batches": cfg.mmd_every} if weight > 0 else {}
        trainer_cfg = CodecTrainConfig(data=str(manifest), out=str(run), steps=cfg.codec_steps, batch_size=8,
                                       crop_seconds=1.0, mmd_weight=weight, mmd_delay=True, adversarial=False,
                                       seed=cfg.seed, device=cfg.device, valid_every=max(cfg.codec_steps // 4, 1),
                                       ckpt_every=max(cfg.codec_steps // 4, 1), **schedule)
        with clock.stage(f"codec {name}") as stage:
            stage.reused = _finished(run)
            models[name] = _train_once(CodecTrainer, trainer_cfg, run)
    return models


def tokenize(cfg: DemoConfig, codecs: dict[str, Path], manifest: Path, clock: PhaseClock,
             log=print) -> dict[str, Path]:
    folders = {}
    for name, codec_dir in codecs.items():
        folder = folders[name] = cfg.path("tokens", name)
        log(f"[3/6] tokens of codec {name} -> {folder}")
        with clock.stage(f"tokens {name}") as stage:
            stage.reused = (folder / "tokens.json").exists()
            if not stage.reused:
                tokenize_corpus(codec_dir, manifest, folder, device=cfg.device)
    return folders


def train_lms(cfg: DemoConfig, tokens: dict[str, Path], clock: PhaseClock, log=print) -> dict[str, Path]:
    models = {}
    for name, folder in tokens.items():
        run = cfg.path("lm_run", name)
        log(f"[4/6] LM on codec {name}'s codes: tiny, delay pattern, {cfg.lm_steps} steps -> {run}")
        trainer_cfg = LMTrainConfig(tokens=str(folder), out=str(run), preset="tiny", pattern="delay",
                                    steps=cfg.lm_steps, batch_size=16, crop_frames=cfg.lm_crop_frames, lr=2e-3,
                                    seed=cfg.seed, device=cfg.device, valid_every=max(cfg.lm_steps // 4, 1),
                                    ckpt_every=max(cfg.lm_steps // 4, 1))
        with clock.stage(f"LM {name}") as stage:
            stage.reused = _finished(run)
            models[name] = _train_once(LMTrainer, trainer_cfg, run)
    return models


def _finished(run: Path) -> bool:
    return (run / "model" / "config.json").exists()


def _train_once(trainer_class, trainer_cfg, run: Path) -> Path:
    """The exported model of a run: trained (or resumed) unless a finished run exported it already."""
    if not _finished(run):
        trainer_class(trainer_cfg).train()
    return run / "model"


def generate_clips(cfg: DemoConfig, lms: dict[str, Path], manifest: Path, clock: PhaseClock,
                   log=print) -> dict[str, Path]:
    """Every LM's clips, and the MMD codec's LM's again with int8 weights (the same captions and seeds)."""
    prompts = test_captions(manifest, cfg.clips, cfg.seed)
    requests = [Request(id=f"clip{i:02d}", text=p["caption"], duration=cfg.duration, seed=cfg.seed + i)
                for i, p in enumerate(prompts)]
    runs = [(name, model, None) for name, model in lms.items()] + [(cfg.int8_lm, lms[cfg.int8_lm], "int8")]
    folders = {}
    for name, model, quantize in runs:
        label = name if quantize is None else f"{name}-{quantize}"
        folder = folders[label] = cfg.path("generated", label)
        weights = "" if quantize is None else f" ({quantize} weights)"
        log(f"[5/6] {len(prompts)} clips of {cfg.duration:g} s from LM {name}{weights} -> {folder}")
        with clock.stage(f"generation {label}") as stage:
            stage.reused = all((folder / f"{request.id}.wav").exists() for request in requests)
            if not stage.reused:
                generate_batch(Generator.from_pretrained(model, device=cfg.device, quantize=quantize), requests,
                               folder, Sampling(), batch_size=len(requests))
    return folders


def run(cfg: DemoConfig, log=print) -> Path:
    """Every stage; returns the output folder."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    clock = PhaseClock(out)
    write_text_atomic(out / "demo_config.json", json.dumps(asdict(cfg), indent=1))
    manifest = build_corpus_slice(cfg, clock, log)
    codecs = train_codecs(cfg, manifest, clock, log)
    lms = train_lms(cfg, tokenize(cfg, codecs, manifest, clock, log), clock, log)
    generate_clips(cfg, lms, manifest, clock, log)
    log("[6/6] evaluation and report")
    with clock.stage("evaluation"):
        evaluation = evaluate_demo(cfg, log)
    evaluation["phases"] = clock.rows
    save_evaluation(out, evaluation)
    report = write_report(out, evaluation)
    log("\n".join(["", "time per stage:", *phase_table(clock.rows), ""]))
    log(f"done: {report}")
    return out
