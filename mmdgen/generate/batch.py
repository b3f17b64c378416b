"""``mmdgen generate``: one text to one file, or a prompts file to a folder of clips.

A prompts file is JSONL, one object per clip: ``{"text": ..., "id": optional, "duration": optional,
"seed": optional}``. Clips are generated in batches of equal duration; each lands atomically as
``<out-dir>/<id>.wav`` (so a file that exists is complete, and a rerun skips it) and is listed in
``<out-dir>/manifest.jsonl`` with its text, duration and the seed of its batch (the clips of a batch share
one sampling generator, seeded by the first clip's seed; give a clip its own batch to reproduce it alone). An
interrupted job resumes with the same batches, audio and records. The progress bar shows the real-time factor
(seconds of audio per second of wall time).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from mmdgen.files import read_jsonl, read_jsonl_numbered, write_audio, write_text_atomic
from mmdgen.generate.config import Sampling
from mmdgen.generate.generator import Generator
from mmdgen.validation import INT64_MAX, MAX_SECONDS, check_number

_SAFE_ID = re.compile(r"[A-Za-z0-9._-]+")  # matched whole (fullmatch): a trailing newline does not pass
PROMPT_KEYS = ("text", "id", "duration", "seed")


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
                   batch_size: int = 8, progress: bool = True) -> dict:
    """Generate every request whose file is missing; returns counts and the real-time factor.

    The batches are cut from the whole request list (not from what is left), so an interrupted job resumes with
    the very batches, seeds and audio of an uninterrupted one: a batch with some clips already written is
    generated whole again and only its missing clips are written. The manifest is rewritten after every batch
    and lists the clips on disk with the seed their batch used."""
    for request in requests:  # every duration holds a frame: refused now, not after some batches
        generator.frames(request.duration, f"prompt {request.id}: duration")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    done = {r.id for r in requests if (out_dir / f"{r.id}.wav").exists()}
    records = {r["id"]: r for r in _previous_manifest(out_dir) if r.get("id") in done}
    groups = list(_batches(requests, batch_size))
    for group in groups:  # clips written before the manifest listed them (a kill between the two)
        records.update({r.id: _record(r, group[0].seed) for r in group if r.id in done and r.id not in records})
    todo = [r for r in requests if r.id not in done]
    audio_seconds, start = 0.0, time.perf_counter()
    bar = tqdm(total=len(requests), initial=len(done), desc="generating", unit="clip", disable=not progress)
    for group in groups:
        missing = [r for r in group if r.id not in done]
        if not missing:
            continue
        audio = generator.generate([r.text for r in group], group[0].duration, sampling, seed=group[0].seed)
        for request, clip in zip(group, audio):
            if request.id not in done:
                write_audio(out_dir / f"{request.id}.wav", clip, generator.sample_rate)
                records[request.id] = _record(request, group[0].seed)
        done.update(r.id for r in missing)
        manifest = "".join(json.dumps(records[r.id]) + "\n" for r in requests if r.id in records)
        write_text_atomic(out_dir / "manifest.jsonl", manifest)
        audio_seconds += group[0].duration * len(missing)
        bar.update(len(missing))
        bar.set_postfix(rtf=f"{audio_seconds / (time.perf_counter() - start):.2f}x")
    bar.close()
    if not todo:  # nothing generated: the manifest still lists every clip there
        write_text_atomic(out_dir / "manifest.jsonl", "".join(json.dumps(records[r.id]) + "\n" for r in requests))
    elapsed = time.perf_counter() - start
    return {"generated": len(todo), "skipped": len(requests) - len(todo),
            "real_time_factor": audio_seconds / elapsed if todo else 0.0}


def _record(request: Request, seed: int) -> dict:
    return {"id": request.id, "path": f"{request.id}.wav", "text": request.text, "duration": request.duration,
            "seed": seed}


def _previous_manifest(out_dir: Path) -> list[dict]:
    """The records of an earlier run (atomic writes: a kill leaves the previous whole file)."""
    path = out_dir / "manifest.jsonl"
    return read_jsonl(path) if path.exists() else []


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
