"""``mmdgen generate``: one text to one file, or a prompts file to a folder of clips.

A prompts file is JSONL, one object per clip: ``{"text": ..., "id": optional, "duration": optional,
"seed": optional}``. Each clip lands atomically as ``<out-dir>/<id>.wav`` (so a file that exists is complete, and
a rerun skips it) and is listed in ``<out-dir>/manifest.jsonl`` with its text, duration and the seed that
reproduces it. Two schedulings:

- continuous (``mmdgen.generate.continuous``): ``batch_size`` rows decode together, each at its own step, and a
  row that finishes its clip is written out and refilled from the queue, so a job of mixed durations keeps every
  row busy. Each clip samples from its own seed's noise: it depends only on its text, seed and duration
  (``Generator.generate([text], duration, seed=seed)`` reproduces it), and a rerun makes the missing clips alone.
- bucketed: batches of consecutive prompts of equal duration; the clips of a batch share one sampling generator,
  seeded by the first clip's seed (the seed listed for each; give a clip its own batch to reproduce it alone). An
  interrupted job resumes with the same batches, audio and records.

Many processes (``torchrun --nproc-per-node N mmdgen generate --prompts ...``): rank r of N takes every N-th
clip (continuous) or batch (bucketed) from the r-th on, so each clip is generated once and the union is what one
process makes; every rank updates the one manifest under a file lock. The progress bar shows the real-time factor
(seconds of audio per second of wall time).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from mmdgen.files import read_jsonl, read_jsonl_numbered, write_audio, write_text_atomic
from mmdgen.generate.config import Sampling
from mmdgen.generate.generator import Generator
from mmdgen.validation import INT64_MAX, MAX_SECONDS, check_number

_SAFE_ID = re.compile(r"[A-Za-z0-9._-]+")  # matched whole (fullmatch): a trailing newline does not pass
PROMPT_KEYS = ("text", "id", "duration", "seed")
SCHEDULINGS = ("continuous", "bucketed")


@dataclass
class Request:
    id: str
    text: str
    duration: float
    seed: int


def read_prompts(path: str | Path, duration: float, seed: int) -> list[Request]:
    """The requests of a prompts file; ValueError naming the file and line of anything malformed."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such prompts file")
    requests, seen = [], set()
    for number, record in read_jsonl_numbered(path, required=("text",)):
        request = _request(record, f"{path}:{number}", f"{number:05d}", duration, seed + number)
        if request.id in seen:
            raise ValueError(f"{path}:{number}: id {request.id!r} is used twice (it names the output file)")
        seen.add(request.id)
        requests.append(request)
    if not requests:
        raise ValueError(f"{path}: no prompts in the file")
    return requests


def _request(record: dict, where: str, default_id: str, duration: float, seed: int) -> Request:
    """The request of one prompts line (``where``: FILE:LINE), every field checked."""
    unknown = sorted(set(record) - set(PROMPT_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}; a prompt holds {', '.join(PROMPT_KEYS)}")
    text, clip_id = record["text"], record.get("id", default_id)
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where}: text must be a non-empty string, got {text!r}")
    if not isinstance(clip_id, str) or not _SAFE_ID.fullmatch(clip_id):
        raise ValueError(f"{where}: id must be a string of letters, digits, '.', '_' and '-' (it names the output "
                         f"file), got {clip_id!r}")
    return Request(clip_id, text,
                   check_number(record.get("duration", duration), f"{where}: duration", above=0, at_most=MAX_SECONDS),
                   check_number(record.get("seed", seed), f"{where}: seed", integer=True, at_least=0,
                                at_most=INT64_MAX))


def generate_batch(generator: Generator, requests: list[Request], out_dir: str | Path, sampling: Sampling,
                   batch_size: int = 8, progress: bool = True, scheduling: str = "continuous", rank: int = 0,
                   world: int = 1) -> dict:
    """Generate every request of this rank's share whose file is missing; returns counts and the real-time factor.

    ``scheduling``: "continuous" (``batch_size`` rows refilled as clips finish; each clip's noise its own, so a
    clip depends only on its text, seed and duration) or "bucketed" (batches of equal duration cut from the whole
    request list, not from what is left, so an interrupted job resumes with the very batches, seeds and audio of an
    uninterrupted one: a batch with some clips already written is generated whole again and only its missing
    clips are written). ``rank`` of ``world`` processes (torchrun): continuous takes the requests i with
    i % world == rank, bucketed the batches j with j % world == rank; the union is the single-process job's.
    The manifest lists the clips on disk, in the prompts file's order, each with the seed that reproduces it; it is
    updated after every clip (continuous) or batch (bucketed) under a lock that every rank shares."""
    if scheduling not in SCHEDULINGS:
        raise ValueError(f"scheduling must be one of {', '.join(SCHEDULINGS)}, got {scheduling!r}")
    if not 0 <= rank < world:
        raise ValueError(f"rank must lie in [0, world={world}), got {rank}")
    for request in requests:  # every duration holds a frame: refused now, not after some batches
        generator.frames(request.duration, f"prompt {request.id}: duration")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = list(_batches(requests, batch_size)) if scheduling == "bucketed" else [[r] for r in requests]
    seeds = {r.id: group[0].seed for group in groups for r in group}  # the seed each clip is generated with
    manifest = Manifest(out_dir, requests, lambda request: _record(request, seeds[request.id]))
    manifest.reconcile()
    mine = [group for index, group in enumerate(groups) if index % world == rank]
    todo = [r for group in mine for r in group if not (out_dir / f"{r.id}.wav").exists()]
    share = sum(len(group) for group in mine)
    bar = tqdm(total=share, initial=share - len(todo), desc="generating", unit="clip", disable=not progress)
    clock = _Clock(bar)
    if scheduling == "continuous":
        _continuous(generator, todo, out_dir, sampling, batch_size, manifest, clock)
    else:
        _bucketed(generator, mine, out_dir, sampling, manifest, clock)
    bar.close()
    return {"generated": len(todo), "skipped": share - len(todo),
            "real_time_factor": clock.real_time_factor() if todo else 0.0}


def _continuous(generator: Generator, todo: list[Request], out_dir: Path, sampling: Sampling, rows: int,
                manifest: "Manifest", clock: "_Clock") -> None:
    from mmdgen.generate.continuous import ClipRequest, decode_continuously

    clips = [ClipRequest(r.text, r.duration, r.seed) for r in todo]
    for index, codes in decode_continuously(generator, clips, sampling, rows):
        request = todo[index]
        audio = generator.decode(codes[None], int(round(request.duration * generator.sample_rate)))[0]
        write_audio(out_dir / f"{request.id}.wav", audio, generator.sample_rate)
        manifest.add([request])
        clock.done([request])


def _bucketed(generator: Generator, groups: list[list[Request]], out_dir: Path, sampling: Sampling,
              manifest: "Manifest", clock: "_Clock") -> None:
    for group in groups:
        missing = [r for r in group if not (out_dir / f"{r.id}.wav").exists()]
        if not missing:
            continue
        audio = generator.generate([r.text for r in group], group[0].duration, sampling, seed=group[0].seed)
        for request, clip in zip(group, audio):
            if request.id in {r.id for r in missing}:
                write_audio(out_dir / f"{request.id}.wav", clip, generator.sample_rate)
        manifest.add(missing)
        clock.done(missing)


class _Clock:
    """Seconds of audio per second of wall time since the start, shown on the progress bar."""

    def __init__(self, bar: tqdm):
        self.bar, self.audio_seconds, self.start = bar, 0.0, time.perf_counter()

    def done(self, requests: list[Request]) -> None:
        self.audio_seconds += sum(r.duration for r in requests)
        self.bar.update(len(requests))
        self.bar.set_postfix(rtf=f"{self.real_time_factor():.2f}x")

    def real_time_factor(self) -> float:
        return self.audio_seconds / max(time.perf_counter() - self.start, 1e-9)


class Manifest:
    """``<out-dir>/manifest.jsonl``, shared by every process of a job: each change takes an exclusive lock on
    ``<out-dir>/manifest.lock``, reads the file, changes it and writes it whole (atomically) in the prompts file's
    order, so concurrent ranks never lose each other's records and a kill leaves the previous whole file."""

    def __init__(self, out_dir: Path, requests: list[Request], record: Callable[[Request], dict]):
        self.out_dir, self.path, self.record = out_dir, out_dir / "manifest.jsonl", record
        self.requests = {r.id: r for r in requests}
        self.order = {r.id: index for index, r in enumerate(requests)}

    def reconcile(self) -> None:
        """List exactly the clips on disk: drop records whose file is gone (or whose prompt is not in the file any
        more), add those written before a kill let the manifest list them."""
        with self._locked():
            on_disk = {i for i in self.order if (self.out_dir / f"{i}.wav").exists()}
            records = {i: r for i, r in self._read().items() if i in on_disk}
            records.update({i: self.record(self.requests[i]) for i in on_disk - set(records)})
            self._write(records)

    def add(self, requests: list[Request]) -> None:
        with self._locked():
            records = self._read()
            records.update({r.id: self.record(r) for r in requests})
            self._write(records)

    @contextlib.contextmanager
    def _locked(self):
        with open(self.out_dir / "manifest.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when the process dies
            yield

    def _read(self) -> dict[str, dict]:
        """The records of the file (an earlier run's, or another rank's), for the prompts of this job."""
        if not self.path.exists():
            return {}
        return {r["id"]: r for r in read_jsonl(self.path) if r.get("id") in self.order}

    def _write(self, records: dict[str, dict]) -> None:
        text = "".join(json.dumps(records[i]) + "\n" for i in sorted(records, key=self.order.get))
        if text != (self.path.read_text() if self.path.exists() else ""):
            write_text_atomic(self.path, text)


def _record(request: Request, seed: int) -> dict:
    return {"id": request.id, "path": f"{request.id}.wav", "text": request.text, "duration": request.duration,
            "seed": seed}


def _batches(requests: list[Request], size: int):
    """Consecutive runs of equal duration, at most ``size`` each."""
    group: list[Request] = []
    for request in requests:
        if group and (len(group) == size or request.duration != group[0].duration):
            yield group
            group = []
        group.append(request)
    if group:
        yield group
