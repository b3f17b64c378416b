"""Prompt-file jobs in bucketed batches: an interrupted job resumes with the batches, seeds and audio of an
uninterrupted one; ranks sharing a job make the one-process job's clips and manifest. (Continuous batching:
test_generate_continuous.py.)"""

import json

import pytest
import soundfile
import torch

import mmdgen.generate.batch as batch_module
from mmdgen.generate import Sampling
from mmdgen.generate.batch import Request, generate_batch


class BatchDependentGenerator:
    """Audio that depends on the batch's seed and on each clip's place in its batch, as sampled audio does."""

    sample_rate = 100

    def frames(self, duration, name="duration"):
        return round(duration * 10)

    def generate(self, texts, duration, sampling, seed):
        noise = torch.randn(len(texts), 1, int(duration * self.sample_rate), generator=torch.Generator().manual_seed(seed))
        return noise * 0.1


def _bucketed(requests, out_dir, batch_size, **kwargs):
    return generate_batch(BatchDependentGenerator(), requests, out_dir, Sampling(), batch_size=batch_size,
                          progress=False, scheduling="bucketed", **kwargs)


def _requests(count):
    return [Request(f"p{i:02d}", f"clip {i}", 0.5, seed=i) for i in range(1, count + 1)]


@pytest.mark.parametrize("killed_after", [6, 4], ids=["between-batches", "mid-batch"])
def test_a_killed_job_resumes_with_the_uninterrupted_seeds_and_audio(tmp_path, monkeypatch, killed_after):
    requests = _requests(12)
    _bucketed(requests, tmp_path / "straight", 3)

    real_write, written = batch_module.write_audio, []

    def write_then_die(path, audio, rate):
        if len(written) == killed_after:
            raise KeyboardInterrupt  # the kill
        real_write(path, audio, rate)
        written.append(path)

    monkeypatch.setattr(batch_module, "write_audio", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        _bucketed(requests, tmp_path / "resumed", 3)
    monkeypatch.setattr(batch_module, "write_audio", real_write)
    report = _bucketed(requests, tmp_path / "resumed", 3)
    assert report["generated"] == 12 - killed_after and report["skipped"] == killed_after

    straight, resumed = ((tmp_path / run / "manifest.jsonl").read_text() for run in ("straight", "resumed"))
    assert resumed == straight
    assert [json.loads(line)["seed"] for line in straight.splitlines()] == [1, 1, 1, 4, 4, 4, 7, 7, 7, 10, 10, 10]
    for request in requests:
        a, _ = soundfile.read(tmp_path / "straight" / f"{request.id}.wav")
        b, _ = soundfile.read(tmp_path / "resumed" / f"{request.id}.wav")
        assert (a == b).all(), request.id


def test_the_manifest_lists_the_finished_clips_after_every_batch(tmp_path, monkeypatch):
    seen = []
    real_write_text = batch_module.write_text_atomic

    def record(path, text):
        seen.append([json.loads(line)["id"] for line in text.splitlines()])
        real_write_text(path, text)

    monkeypatch.setattr(batch_module, "write_text_atomic", record)
    _bucketed(_requests(5), tmp_path, 2)
    assert seen == [["p01", "p02"], ["p01", "p02", "p03", "p04"], ["p01", "p02", "p03", "p04", "p05"]]


def test_a_damaged_manifest_is_named(tmp_path):
    _bucketed(_requests(2), tmp_path, 2)
    (tmp_path / "manifest.jsonl").write_text('{"id": "p01"\n')
    with pytest.raises(ValueError, match=r"manifest.jsonl:1: not valid JSON"):
        _bucketed(_requests(2), tmp_path, 2)


def _same_clips(a, b, requests):
    assert (a / "manifest.jsonl").read_text() == (b / "manifest.jsonl").read_text()
    for request in requests:
        assert (soundfile.read(a / f"{request.id}.wav")[0] == soundfile.read(b / f"{request.id}.wav")[0]).all()


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_share_the_batches_and_make_the_one_process_job(tmp_path, world):
    requests = _requests(7) + [Request("long", "a long clip", 0.8, seed=50)]
    _bucketed(requests, tmp_path / "one", 3)
    reports = [_bucketed(requests, tmp_path / "shared", 3, rank=rank, world=world) for rank in range(world)]
    assert sum(r["generated"] for r in reports) == len(requests)  # each clip once
    assert all(r["generated"] > 0 for r in reports)
    _same_clips(tmp_path / "one", tmp_path / "shared", requests)
    again = [_bucketed(requests, tmp_path / "shared", 3, rank=rank, world=world) for rank in range(world)]
    assert sum(r["generated"] for r in again) == 0


def test_a_clip_deleted_after_the_job_leaves_the_manifest_on_the_rerun_and_is_made_again(tmp_path, monkeypatch):
    requests = _requests(4)
    _bucketed(requests, tmp_path, 2)
    (tmp_path / "p03.wav").unlink()
    real_write = batch_module.write_audio
    monkeypatch.setattr(batch_module, "write_audio", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        _bucketed(requests, tmp_path, 2)
    assert [json.loads(line)["id"] for line in (tmp_path / "manifest.jsonl").read_text().splitlines()] == \
        ["p01", "p02", "p04"]
    monkeypatch.setattr(batch_module, "write_audio", real_write)
    assert _bucketed(requests, tmp_path, 2)["generated"] == 1
    assert len((tmp_path / "manifest.jsonl").read_text().splitlines()) == 4


def test_bad_schedulings_and_ranks_are_refused(tmp_path):
    with pytest.raises(ValueError, match="scheduling must be one of continuous, bucketed, got 'fifo'"):
        generate_batch(BatchDependentGenerator(), _requests(1), tmp_path, Sampling(), scheduling="fifo")
    with pytest.raises(ValueError, match=r"rank must lie in \[0, world=2\), got 2"):
        _bucketed(_requests(1), tmp_path, 1, rank=2, world=2)
