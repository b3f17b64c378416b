"""Continuous batching: every clip of a job of mixed durations and texts equals the same prompt generated alone
(same seed and duration): greedy and sampled, with and without guidance, more rows than clips, clips beyond the
LM's context; rows are refilled as they finish. The prompts-file job on it: an exact manifest, a killed job
resumes with the uninterrupted clips, ranks sharing a job make the one-process job."""

import copy
import dataclasses
import json
import subprocess
import sys

import pytest
import soundfile
import torch

import mmdgen.generate.batch as batch_module

from mmdgen.generate import Generator, Sampling
from mmdgen.generate.batch import Request, generate_batch
from mmdgen.generate.continuous import ClipRequest, decode_continuously
from mmdgen.model.lm import MusicLM, lm_config
from mmdgen.model.quantize import quantize_lm
from tests.tiny_parts import tiny_parts

TEXTS = ["a calm jig on flute", "a fast reel on fiddle with drums and a loud bass line", "piano",
         "slow strings", "a bright march for brass band", "drums"]


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    lm, text, codec = tiny_parts(tmp_path_factory.mktemp("continuous"), TEXTS)
    with torch.no_grad():
        for head in lm.heads:  # sharper logits, as a trained model has: choices far from ties
            head.weight.mul_(8.0)
    return Generator(lm, text, codec)


def _clips(durations):  # frames at 50 per second: 0.1 s = 5 frames
    return [ClipRequest(TEXTS[i % len(TEXTS)], duration, seed=100 + i) for i, duration in enumerate(durations)]


def _alone(generator, clip, sampling):
    return generator.generate_codes([clip.text], clip.duration, sampling, seed=clip.seed)[0]


SAMPLINGS = {
    "greedy-guided": Sampling(guidance_scale=3.0, temperature=0.0),
    "sampled-guided": Sampling(guidance_scale=3.0, top_k=20),
    "sampled-top-p": Sampling(guidance_scale=3.0, top_k=0, top_p=0.9),
    "greedy-unguided": Sampling(guidance_scale=None, temperature=0.0),
    "sampled-unguided": Sampling(guidance_scale=None, top_k=50),
}


@pytest.mark.parametrize("name", list(SAMPLINGS))
def test_each_clip_equals_its_prompt_generated_alone(generator, name):
    sampling = SAMPLINGS[name]
    clips = _clips([0.3, 0.1, 0.24, 0.06, 0.16, 0.1, 0.2])  # mixed: rows finish and are refilled at odd steps
    finished = list(decode_continuously(generator, clips, sampling, rows=3))
    assert sorted(index for index, _ in finished) == list(range(len(clips)))
    assert [index for index, _ in finished] != list(range(len(clips)))  # short clips overtook long ones
    for index, codes in finished:
        expected = _alone(generator, clips[index], sampling)
        assert codes.shape == expected.shape == (4, round(clips[index].duration * 50))
        assert torch.equal(codes, expected), index
    if sampling.temperature > 0:  # the noise is each clip's own: same text and duration, another seed differs
        other = dataclasses.replace(clips[0], seed=7)
        assert not torch.equal(finished[[i for i, _ in finished].index(0)][1], _alone(generator, other, sampling))


def test_a_16_bit_kv_cache_serves_continuous_batching_and_the_fixed_batch_loop_alike(generator, monkeypatch):
    """``Generator(kv_cache="bfloat16")``: both loops allocate their caches in bf16 (the refilled rows' keys are
    rounded as the fixed batch's are), so each clip still equals its prompt generated alone."""
    half = Generator(generator.lm, generator.text, generator.codec, kv_cache="bfloat16")
    allocated = []
    new_caches = MusicLM.new_caches
    monkeypatch.setattr(MusicLM, "new_caches", lambda self, *args: allocated.append(args) or new_caches(self, *args))
    sampling = SAMPLINGS["sampled-guided"]
    clips = _clips([0.2, 0.06, 0.1])
    for index, codes in decode_continuously(half, clips, sampling, rows=2):
        assert torch.equal(codes, _alone(half, clips[index], sampling)), index
    assert len(allocated) == 4 and all(args[-1] == torch.bfloat16 for args in allocated)
    with pytest.raises(ValueError, match="kv_cache must be one of model, bfloat16, float16, got 'fp8'"):
        Generator(generator.lm, generator.text, generator.codec, kv_cache="fp8")


def test_an_int8_dynamic_lm_keeps_each_clip_equal_to_its_prompt_alone(generator):
    """int8-dynamic rounds each row of activations on its own step, so a clip still does not depend on the rows
    beside it (a rounding per tensor, as fbgemm's, would tie every row's codes to its neighbours')."""
    quantized = Generator(quantize_lm(copy.deepcopy(generator.lm), "int8-dynamic"), generator.text, generator.codec)
    sampling = SAMPLINGS["sampled-guided"]
    clips = _clips([0.2, 0.06, 0.14, 0.1])
    finished = list(decode_continuously(quantized, clips, sampling, rows=3))
    assert sorted(index for index, _ in finished) == list(range(len(clips)))
    for index, codes in finished:
        assert torch.equal(codes, _alone(quantized, clips[index], sampling)), index


def test_more_rows_than_clips(generator):
    sampling = SAMPLINGS["sampled-guided"]
    clips = _clips([0.12, 0.04])
    finished = dict(decode_continuously(generator, clips, sampling, rows=8))
    for index, clip in enumerate(clips):
        assert torch.equal(finished[index], _alone(generator, clip, sampling))


def test_a_clip_does_not_depend_on_its_neighbours(generator):
    sampling = SAMPLINGS["sampled-guided"]
    clips = _clips([0.2, 0.1, 0.14, 0.08])
    together = dict(decode_continuously(generator, clips, sampling, rows=2))
    reordered = dict(decode_continuously(generator, clips[::-1], sampling, rows=3))
    for index in range(len(clips)):
        assert torch.equal(together[index], reordered[len(clips) - 1 - index])


def test_clips_beyond_the_context_are_generated_in_windows(generator):
    lm = MusicLM(dataclasses.replace(generator.lm.cfg, context_frames=8))
    lm.load_state_dict(generator.lm.state_dict())
    windowed = Generator(lm, generator.text, generator.codec)
    sampling = SAMPLINGS["sampled-guided"]
    clips = _clips([0.3, 0.1, 0.16])  # 15 frames: two windows; 5 and 8 frames: batched
    finished = dict(decode_continuously(windowed, clips, sampling, rows=2))
    for index, clip in enumerate(clips):
        assert torch.equal(finished[index], _alone(windowed, clip, sampling))


def test_bad_requests_are_refused(generator):
    with pytest.raises(ValueError, match="rows must be an integer >= 1, got 0"):
        list(decode_continuously(generator, _clips([0.1]), Sampling(), rows=0))
    with pytest.raises(ValueError, match=r"clip 1: duration must be a finite number > 0 and <= 3600, got -1"):
        list(decode_continuously(generator, _clips([0.1, -1.0]), Sampling()))
    prefix = Generator(MusicLM(lm_config("tiny", text_dim=32, conditioning="prefix")), generator.text, generator.codec)
    with pytest.raises(ValueError, match="continuous batching needs a cross-attention LM; this one is "
                                         "prefix-conditioned"):
        list(decode_continuously(prefix, _clips([0.1]), Sampling()))


# -- the prompts-file job ---------------------------------------------------------------------------------------

def _requests():
    durations = [0.2, 0.06, 0.12, 0.3, 0.1, 0.04, 0.16]
    return [Request(f"c{i}", TEXTS[i % len(TEXTS)], duration, seed=10 + i) for i, duration in enumerate(durations)]


def _job(generator, out_dir, **kwargs):
    return generate_batch(generator, _requests(), out_dir, SAMPLINGS["sampled-guided"], batch_size=3,
                          progress=False, **kwargs)


def _read(path):
    return soundfile.read(path, dtype="float32")[0]


def test_the_job_writes_each_clip_as_its_prompt_alone_and_an_exact_manifest(generator, tmp_path):
    report = _job(generator, tmp_path)
    assert report["generated"] == 7 and report["skipped"] == 0
    manifest = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert manifest == [{"id": r.id, "path": f"{r.id}.wav", "text": r.text, "duration": r.duration, "seed": r.seed}
                        for r in _requests()]  # each clip's own seed, in the prompts file's order
    for request in _requests():
        alone = generator.generate([request.text], request.duration, SAMPLINGS["sampled-guided"], seed=request.seed)
        written = _read(tmp_path / f"{request.id}.wav")
        assert written.shape == (round(request.duration * generator.sample_rate),)
        assert torch.allclose(torch.from_numpy(written), alone[0, 0], atol=1 / 2 ** 14), request.id  # 16-bit wav
    assert _job(generator, tmp_path)["generated"] == 0


@pytest.mark.parametrize("killed_after", [0, 3])
def test_a_killed_job_resumes_with_the_uninterrupted_clips_and_manifest(generator, tmp_path, monkeypatch,
                                                                          killed_after):
    _job(generator, tmp_path / "straight")
    real_write, written = batch_module.write_audio, []

    def write_then_die(path, audio, rate):
        real_write(path, audio, rate)
        written.append(path)
        if len(written) == killed_after + 1:
            raise KeyboardInterrupt  # the kill: after the clip's file, before the manifest lists it

    monkeypatch.setattr(batch_module, "write_audio", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        _job(generator, tmp_path / "resumed")
    monkeypatch.setattr(batch_module, "write_audio", real_write)
    listed = (tmp_path / "resumed" / "manifest.jsonl")
    assert len(listed.read_text().splitlines()) == killed_after if listed.exists() else killed_after == 0
    report = _job(generator, tmp_path / "resumed")
    assert report["generated"] == 7 - killed_after - 1 and report["skipped"] == killed_after + 1
    straight, resumed = ((tmp_path / run / "manifest.jsonl").read_text() for run in ("straight", "resumed"))
    assert resumed == straight
    for request in _requests():
        assert (_read(tmp_path / "straight" / f"{request.id}.wav") ==
                _read(tmp_path / "resumed" / f"{request.id}.wav")).all(), request.id


def test_ranks_share_the_clips_and_make_the_one_process_job(generator, tmp_path):
    _job(generator, tmp_path / "one")
    reports = [_job(generator, tmp_path / "shared", rank=rank, world=2) for rank in (1, 0)]
    assert [r["generated"] for r in reports] == [3, 4]  # clips 1, 3, 5 and 0, 2, 4, 6
    assert (tmp_path / "shared" / "manifest.jsonl").read_text() == (tmp_path / "one" / "manifest.jsonl").read_text()
    for request in _requests():
        assert (_read(tmp_path / "one" / f"{request.id}.wav") ==
                _read(tmp_path / "shared" / f"{request.id}.wav")).all(), request.id


def test_torchrun_processes_share_a_prompts_file_and_make_the_one_process_job(generator, tmp_path):
    from mmdgen import cli
    from mmdgen.pretrained.directory import codec_identity, save_codec, save_music_lm

    model = tmp_path / "model"
    save_codec(generator.codec, model / "codec")
    save_music_lm(model, generator.lm, generator.text,
                  {"kind": "learned", "config": dataclasses.asdict(generator.text.config)},
                  codec_identity(model / "codec"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(dataclasses.asdict(r)) + "\n" for r in _requests()))
    args = ["generate", "--prompts", str(prompts), "--model", str(model), "--top-k", "20", "--batch-size", "3",
            "--backend", "torch", "--out-dir"]
    assert cli.main(args + [str(tmp_path / "one")]) == 0
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               "-m", "mmdgen.cli", *args, str(tmp_path / "shared")],
                              capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert "(rank 0 of 2): 4 clips generated" in launched.stdout
    assert "(rank 1 of 2): 3 clips generated" in launched.stdout
    assert (tmp_path / "shared" / "manifest.jsonl").read_text() == (tmp_path / "one" / "manifest.jsonl").read_text()
    for request in _requests():  # torchrun runs one thread per process: other float reductions than this one's
        one, shared = (_read(tmp_path / run / f"{request.id}.wav") for run in ("one", "shared"))
        assert abs(one - shared).max() <= 4 / 2 ** 15, (request.id, abs(one - shared).max())  # a few 16-bit steps


def test_the_triton_kernels_give_the_same_clips(generator):  # the per-row key mask through the Triton attention
    triton = Generator(generator.lm, generator.text, generator.codec, backend="triton")
    sampling = SAMPLINGS["sampled-guided"]
    clips = _clips([0.02, 0.06, 0.04])  # 4, 6, 5 steps: row 0 is refilled at step 4
    for index, codes in decode_continuously(triton, clips, sampling, rows=2):
        assert torch.equal(codes, _alone(triton, clips[index], sampling)), index
