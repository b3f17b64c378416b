"""Prompt-file jobs: an interrupted job resumes with the batches, seeds and audio of an uninterrupted one."""

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


def _requests(count):
    return [Request(f"p{i:02d}", f"clip {i}", 0.5, seed=i) for i in range(1, count + 1)]


@pytest.mark.parametrize("killed_after", [6, 4], ids=["between-batches", "mid-batch"])
def test_a_killed_job_resumes_with_the_uninterrupted_seeds_and_audio(tmp_path, monkeypatch, killed_after):
    requests, sampling = _requests(12), Sampling()
    generate_batch(BatchDependentGenerator(), requests, tmp_path / "straight", sampling, batch_size=3, progress=False)

    real_write, written = batch_module.write_audio, []

    def write_then_die(path, audio, rate):
        if len(written) == killed_after:
            raise KeyboardInterrupt  # the kill
        real_write(path, audio, rate)
        written.append(path)

    monkeypatch.setattr(batch_module, "write_audio", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        generate_batch(BatchDependentGenerator(), requests, tmp_path / "resumed", sampling, batch_size=3,
                       progress=False)
    monkeypatch.setattr(batch_module, "write_audio", real_write)
    report = generate_batch(BatchDependentGenerator(), requests, tmp_path / "resumed", sampling, batch_size=3,
                            progress=False)
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
    generate_batch(BatchDependentGenerator(), _requests(5), tmp_path, Sampling(), batch_size=2, progress=False)
    assert seen == [["p01", "p02"], ["p01", "p02", "p03", "p04"], ["p01", "p02", "p03", "p04", "p05"]]


def test_a_damaged_manifest_is_named(tmp_path):
    generate_batch(BatchDependentGenerator(), _requests(2), tmp_path, Sampling(), batch_size=2, progress=False)
    (tmp_path / "manifest.jsonl").write_text('{"id": "p01"\n')
    with pytest.raises(ValueError, match=r"manifest.jsonl:1: not valid JSON"):
        generate_batch(BatchDependentGenerator(), _requests(2), tmp_path, Sampling(), batch_size=2, progress=False)
