"""Build the captioned music corpus: plan, render shards in parallel, write the manifest.

Layout of an output folder::

    build_config.json       what was asked (a different configuration is refused, never mixed)
    shards/00000/*.flac     the clips of shard 0
    shards/00000.jsonl      its manifest lines: written last and atomically, so it marks the shard done
    shards/00000.report.json  its failures by cause
    manifest.jsonl          all finished shards in plan order (rewritten atomically at the end)
    build_report.json       clips, hours, failures by cause, rate

The plan is deterministic given the configuration and a prefix of the plan for more hours: works are
shuffled per corpus folder and taken round-robin across folders (so the few polyphonic works are not
drowned by thousands of folk tunes), each excerpt is rendered ``renderings`` times with other
instruments and tempi, and every random draw is seeded by (seed, excerpt, rendering). Splits are by
work. An interrupted build resumes at the first unfinished shard; finished shards are never rewritten.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import multiprocessing
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import numpy as np
from tqdm import tqdm

from mmdgen.data.captions import caption
from mmdgen.data.corpus import INSTRUMENTS, STYLES, Work, list_works
from mmdgen.data.render import RenderError, check_renderer, excerpt_start, parse_work, render_clip
from mmdgen.choices import AudioFormat, Split
from mmdgen.files import read_jsonl, write_atomic, write_text_atomic
from mmdgen.validation import INT64_MAX, MAX_SECONDS, check_fields, label, option

SPLITS = get_args(Split)


@dataclass(frozen=True)
class BuildConfig:
    hours: float = option(1.0, "hours of audio to render", above=0, at_most=10000)
    clip_seconds: float = option(10.0, "seconds per clip", at_least=0.1, at_most=MAX_SECONDS)
    sample_rate: int = option(32000, "the clips' sample rate in Hz", at_least=8000, at_most=192000)
    renderings: int = option(2, "instrument/tempo renderings per excerpt", at_least=1)
    seed: int = option(0, "seed of the plan and of every rendering's draws", at_least=0, at_most=INT64_MAX)
    valid_fraction: float = option(0.05, "share of the works held out for validation", at_least=0, below=1)
    test_fraction: float = option(0.05, "share of the works held out for testing", at_least=0, below=1)
    shard_clips: int = option(32, "clips per shard (the unit of resumption)", at_least=1)
    folders: tuple[str, ...] | None = option(None, "corpus folders to draw from (default: all with a style)",
                                             choices=tuple(STYLES))
    audio_format: AudioFormat = option("flac", "the clips' file format", flag="format")

    def __post_init__(self):
        check_fields(self)
        if self.shard_clips < self.renderings:
            raise ValueError(f"{label('renderings')} ({self.renderings}) must be at most {label('shard_clips')} "
                             f"({self.shard_clips}): a shard holds every rendering of its excerpts")
        if not self.valid_fraction + self.test_fraction < 1:
            raise ValueError(f"{label('valid_fraction')} + {label('test_fraction')} must be below 1, got "
                             f"{self.valid_fraction} + {self.test_fraction}")

    def identity(self) -> dict:
        """What fixes the content of every shard: all but the amount of audio."""
        fields = dataclasses.asdict(self)
        fields.pop("hours")
        fields["folders"] = list(self.folders) if self.folders else None
        return fields


@dataclass(frozen=True)
class Excerpt:
    index: int  # position in the plan: seeds every draw for this excerpt
    work: Work


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in keys])


def split_of(work_id: str, cfg: BuildConfig) -> str:
    digest = hashlib.sha256(f"{cfg.seed}:{work_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < cfg.test_fraction:
        return "test"
    if u < cfg.test_fraction + cfg.valid_fraction:
        return "valid"
    return "train"


def stratified_works(cfg: BuildConfig) -> list[Work]:
    """All works, shuffled per folder and interleaved round-robin across folders."""
    by_folder: dict[str, list[Work]] = {}
    for work in list_works(tuple(cfg.folders) if cfg.folders else None):
        by_folder.setdefault(work.folder, []).append(work)
    queues = []
    for i, folder in enumerate(sorted(by_folder)):
        works = by_folder[folder]
        order = _rng(cfg.seed, i).permutation(len(works))
        queues.append([works[j] for j in order])
    interleaved = []
    for depth in range(max(len(q) for q in queues)):
        interleaved.extend(q[depth] for q in queues if depth < len(q))
    return interleaved


def plan_shards(cfg: BuildConfig) -> list[list[Excerpt]]:
    """Excerpts grouped per shard; more hours extend the plan without changing its start."""
    works = stratified_works(cfg)
    clips = math.ceil(cfg.hours * 3600 / cfg.clip_seconds)
    excerpts = [Excerpt(i, works[i % len(works)]) for i in range(math.ceil(clips / cfg.renderings))]
    per_shard = cfg.shard_clips // cfg.renderings
    return [excerpts[i: i + per_shard] for i in range(0, len(excerpts), per_shard)]


def _write_audio_atomic(path: Path, audio: np.ndarray, sample_rate: int, audio_format: str) -> None:
    import soundfile

    write_atomic(path, lambda tmp: soundfile.write(str(tmp), audio, sample_rate, format=audio_format.upper(),
                                                   subtype="PCM_16"))


def clip_fields(excerpt: Excerpt, rendering: int, parsed, cfg: BuildConfig) -> dict:
    style = excerpt.work.style
    rng = _rng(cfg.seed, excerpt.index, rendering, 1)
    instrument = str(rng.choice(style.instruments))
    bpm = int(rng.integers(style.tempo_range[0], style.tempo_range[1] + 1))
    tonic, mode = parsed.key.rsplit(" ", 1)
    return {"instrument": instrument, "program": INSTRUMENTS[instrument], "tempo_bpm": bpm, "key": parsed.key,
            "tonic": tonic, "mode": mode, "metre": parsed.metre, "voices": parsed.voices, "genre": style.genre,
            "composer": style.composer, "folder": excerpt.work.folder, "work_id": excerpt.work.work_id}


def build_shard(index: int, excerpts: list[Excerpt], out: Path, cfg: BuildConfig) -> dict:
    """Render one shard; returns its failures and clip count. Skips a shard already finished."""
    shard_dir = out / "shards" / f"{index:05d}"
    manifest = out / "shards" / f"{index:05d}.jsonl"
    report_path = out / "shards" / f"{index:05d}.report.json"
    if manifest.exists():
        return {"index": index, "clips": _count_lines(manifest), "skipped": True, **json.loads(report_path.read_text())}
    shard_dir.mkdir(parents=True, exist_ok=True)
    records, failures = [], Counter()
    for excerpt in excerpts:
        try:
            parsed = parse_work(excerpt.work)
        except RenderError as error:
            failures[error.cause] += cfg.renderings
            continue
        # one excerpt for all renderings, long enough at the style's fastest tempo
        span = cfg.clip_seconds * excerpt.work.style.tempo_range[1] / 60.0
        start = excerpt_start(parsed, span, _rng(cfg.seed, excerpt.index, 2))
        for rendering in range(cfg.renderings):
            fields = clip_fields(excerpt, rendering, parsed, cfg)
            try:
                audio = render_clip(parsed, start, fields["tempo_bpm"], fields["instrument"], cfg.clip_seconds,
                                    cfg.sample_rate)
            except RenderError as error:
                failures[error.cause] += 1
                continue
            clip_id = f"{excerpt.index:07d}-{rendering}"
            path = shard_dir / f"{clip_id}.{cfg.audio_format}"
            _write_audio_atomic(path, audio, cfg.sample_rate, cfg.audio_format)
            fields["excerpt_start_quarters"] = start
            records.append({"id": clip_id, "path": str(path.relative_to(out)), "duration": cfg.clip_seconds,
                            "sample_rate": cfg.sample_rate, "split": split_of(excerpt.work.work_id, cfg),
                            "caption": caption(fields, _rng(cfg.seed, excerpt.index, rendering, 3)), **fields})
    write_text_atomic(report_path, json.dumps({"failures": dict(failures)}))
    write_text_atomic(manifest, "".join(json.dumps(r) + "\n" for r in records))
    return {"index": index, "clips": len(records), "skipped": False, "failures": dict(failures)}


def _count_lines(path: Path) -> int:
    with open(path) as f:
        return sum(1 for _ in f)


def _check_existing(out: Path, cfg: BuildConfig) -> None:
    config_path = out / "build_config.json"
    if config_path.exists():
        previous = json.loads(config_path.read_text())
        mine = cfg.identity()
        differing = {k: (previous.get(k), v) for k, v in mine.items() if previous.get(k) != v}
        if differing:
            detail = ", ".join(f"{k}: {a!r} there, {b!r} asked" for k, (a, b) in differing.items())
            raise ValueError(f"{out} holds a corpus built with another configuration ({detail}); "
                             "use another output folder or remove it")
    elif (out / "manifest.jsonl").exists() or (out / "shards").exists():
        raise ValueError(f"{out} holds a manifest or shards without build_config.json; refusing to mix them")


def _run_shard(args):
    return build_shard(*args)


def build_corpus(out: str | Path, cfg: BuildConfig, workers: int = 1, progress: bool = True) -> dict:
    """Build (or resume) the corpus in ``out``; returns the build report (``cfg`` was checked when made)."""
    check_renderer()
    out = Path(out)
    _check_existing(out, cfg)
    shards = plan_shards(cfg)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "build_config.json", json.dumps(cfg.identity(), indent=1))
    jobs = [(i, excerpts, out, cfg) for i, excerpts in enumerate(shards)]
    start = time.perf_counter()
    results = []
    total_clips = sum(len(e) for e in shards) * cfg.renderings
    with tqdm(total=total_clips, desc="rendering clips", unit="clip", disable=not progress) as bar:
        if workers > 1:
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                for result in pool.imap_unordered(_run_shard, jobs):
                    results.append(result)
                    bar.update(len(shards[result["index"]]) * cfg.renderings)
        else:
            for job in jobs:
                results.append(_run_shard(job))
                bar.update(len(job[1]) * cfg.renderings)
    elapsed = time.perf_counter() - start
    lines = []
    for i in range(len(shards)):
        lines.append((out / "shards" / f"{i:05d}.jsonl").read_text())
    write_text_atomic(out / "manifest.jsonl", "".join(lines))
    report = _report(results, cfg, elapsed, out)
    write_text_atomic(out / "build_report.json", json.dumps(report, indent=1))
    return report


def _report(results: list[dict], cfg: BuildConfig, elapsed: float, out: Path) -> dict:
    failures = Counter()
    for r in results:
        failures.update(r.get("failures", {}))
    records = read_jsonl(out / "manifest.jsonl")
    rendered_now = sum(r["clips"] for r in results if not r["skipped"])
    return {
        "clips": len(records),
        "hours": round(len(records) * cfg.clip_seconds / 3600, 4),
        "works": len({r["work_id"] for r in records}),
        "clips_by_split": dict(Counter(r["split"] for r in records)),
        "clips_by_folder": dict(Counter(r["folder"] for r in records)),
        "failures_by_cause": dict(failures),
        "rendered_this_run": rendered_now,
        "seconds_this_run": round(elapsed, 2),
        "audio_seconds_per_second": round(rendered_now * cfg.clip_seconds / elapsed, 2) if elapsed > 0 else None,
    }
