"""The codec trainer: exact resume, the non-finite guard, DDP on two gloo processes, validation."""

import copy
import json
import os

import numpy as np
import pytest
import soundfile
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from mmdgen.losses.reconstruction import si_snr
from mmdgen.train.codec import CodecTrainConfig, CodecTrainer


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    rng = np.random.default_rng(0)
    t = np.arange(8000) / 32000
    for i in range(8):
        tone = 0.3 * np.sin(2 * np.pi * (200 + 60 * i) * t) + 0.05 * rng.standard_normal(len(t))
        soundfile.write(folder / f"clip{i}.wav", tone.astype(np.float32), 32000)
    return folder


def _cfg(clips, out, **overrides):
    base = dict(data=str(clips), out=str(out), steps=4, batch_size=2, crop_seconds=0.1, disc_filters=4,
                mmd_weight=10.0, mmd_delay=True, ckpt_every=2, log_every=1, valid_every=100)
    base.update(overrides)
    return CodecTrainConfig(**base)


def _weights(out):
    return {**load_file(str(out / "checkpoint" / "codec.safetensors")),
            **{f"d.{k}": v for k, v in load_file(str(out / "checkpoint" / "discriminator.safetensors")).items()}}


@pytest.mark.parametrize("schedule", [{}, {"mmd_every": 2, "mmd_batches": 3, "grad_accum": 2, "ckpt_every": 3,
                                        "steps": 5}], ids=["every-step", "macro-batch"])
def test_stopped_and_resumed_run_ends_with_the_same_weights(clips, tmp_path, schedule):
    """The macro-batch case stops between independence-loss steps with re-encoding history pending."""
    CodecTrainer(_cfg(clips, tmp_path / "straight", **schedule), progress=False).train()
    stop = schedule.get("ckpt_every", 2)
    CodecTrainer(_cfg(clips, tmp_path / "resumed", **{**schedule, "steps": stop}), progress=False).train()
    resumed = CodecTrainer(_cfg(clips, tmp_path / "resumed", **schedule), progress=False)
    history = 3 * 2 - 1 if schedule else 0  # micro-batches of the last 3 steps but the current one
    assert resumed.step == stop and len(resumed.mmd_history) == resumed.mmd_history.maxlen == history
    resumed.train()
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, schedule.get("steps", 4) + 1))
    assert (tmp_path / "resumed" / "model" / "codec.safetensors").exists()


def test_resume_with_another_configuration_is_refused(clips, tmp_path):
    CodecTrainer(_cfg(clips, tmp_path / "run", steps=2), progress=False).train()
    with pytest.raises(ValueError, match="another configuration.*mmd_weight"):
        CodecTrainer(_cfg(clips, tmp_path / "run", mmd_weight=1.0), progress=False)


def test_independence_loss_runs_every_mmd_every_steps_on_the_last_mmd_batches_steps(clips, tmp_path, monkeypatch):
    import mmdgen.train.codec as codec_module

    seen = []
    real = codec_module.independence_loss

    def recording(latents, **kwargs):
        seen.append(latents.shape[0])
        return real(latents, **kwargs)

    monkeypatch.setattr(codec_module, "independence_loss", recording)
    trainer = CodecTrainer(_cfg(clips, tmp_path / "macro", steps=7, batch_size=2, grad_accum=2, mmd_every=3,
                                mmd_batches=2, adversarial=False), progress=False)
    logged = []
    for _ in range(7):
        logged.append("mmd" in trainer.train_step([next(trainer._batches()) for _ in range(2)]))
        trainer.step += 1
    # steps 0, 3, 6; the first sees only its own two micro-batches, later ones two steps' worth
    assert logged == [True, False, False, True, False, False, True]
    assert seen == [4, 8, 8]


def test_non_finite_steps_are_skipped_then_stop_the_run(clips, tmp_path):
    trainer = CodecTrainer(_cfg(clips, tmp_path / "nan", steps=6, max_nonfinite=2), progress=False)
    real = trainer._generator_losses

    def poisoned(audio, with_mmd):
        fake, losses, extra, perplexity = real(audio, with_mmd)
        losses["mel"] = losses["mel"] * float("nan")
        return fake, losses, extra, perplexity

    before = {k: v.clone() for k, v in trainer.codec.state_dict().items()}
    trainer._generator_losses = poisoned
    metrics = trainer.train_step([next(trainer._batches())])
    assert metrics["skipped"] == 1.0 and trainer.guard.skipped == 1
    after = trainer.codec.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if "stages" not in k)  # weights untouched
    with pytest.raises(RuntimeError, match="non-finite mel.*limit of 2"):
        trainer.train()


def test_validation_reports_reconstruction_and_dependence(tmp_path):
    from mmdgen.data.build import BuildConfig, build_corpus

    corpus = tmp_path / "corpus"
    build_corpus(corpus, BuildConfig(hours=24 / 3600, clip_seconds=0.5, shard_clips=8, folders=("bach",),
                                     valid_fraction=0.3, test_fraction=0.0), progress=False)
    trainer = CodecTrainer(CodecTrainConfig(data=str(corpus / "manifest.jsonl"), out=str(tmp_path / "v"), steps=1,
                                            batch_size=2, crop_seconds=0.1, disc_filters=4, adversarial=False),
                           progress=False)
    assert trainer.valid_data is not None
    report = trainer.train()
    assert set(report) == {"mel_distance", "si_snr_db", "mi_percent_delay", "mi_percent_delay_baseline"}
    assert report["mel_distance"] > 0


def test_si_snr():
    reference = torch.randn(2, 1, 1000)
    assert float(si_snr(3.0 * reference, reference).min()) > 60  # scale-invariant
    noisy = reference + 0.1 * torch.randn_like(reference)
    assert 15 < float(si_snr(noisy, reference).mean()) < 25


def _ddp_worker(rank, world, init_file, clips, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    trainer = CodecTrainer(_cfg(clips, out, steps=2, ckpt_every=5, mmd_batches=2), progress=False)
    trainer.train()
    state = {k: v.tolist() for k, v in trainer.codec.state_dict().items() if v.is_floating_point()}
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(state, f)
    torch.distributed.destroy_process_group()


def test_ddp_on_two_gloo_processes_keeps_ranks_identical(clips, tmp_path):
    out = tmp_path / "ddp"
    out.mkdir()
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(clips), str(out)), nprocs=2, join=True)
    a, b = (json.loads((out / f"rank{r}.json").read_text()) for r in range(2))
    for key in a:
        assert np.allclose(a[key], b[key], atol=1e-6), key
    assert (out / "checkpoint" / "codec.safetensors").exists()


def _step_from(trainer, model, batch):
    """One training step of ``model`` (the codec or its compiled form) from the trainer's current state: the
    losses, every parameter's gradient and the quantizer's buffers after the step; then the state is restored."""
    saved = copy.deepcopy({"codec": trainer.codec.state_dict(), "opt": trainer.g_opt.state_dict(),
                           "balancer": trainer.balancer.state_dict(), "rng": torch.get_rng_state(),
                           "mmd_generator": trainer.mmd_generator.get_state(), "history": trainer.mmd_history})
    trainer.train_model = model
    metrics = trainer.train_step([batch])
    grads = {name: p.grad.clone() for name, p in trainer.codec.named_parameters() if p.grad is not None}
    buffers = {name: b.clone() for name, b in trainer.codec.named_buffers() if name.startswith("quantizer.")}
    trainer.codec.load_state_dict(saved["codec"])
    trainer.g_opt.load_state_dict(saved["opt"])
    trainer.balancer.load_state_dict(saved["balancer"])
    torch.set_rng_state(saved["rng"])
    trainer.mmd_generator.set_state(saved["mmd_generator"])
    trainer.mmd_history = saved["history"]
    trainer.train_model = trainer.codec
    return metrics, grads, buffers


def _same_codebook_rows(a, b, atol):
    """Rows equal as sets: dead-code replacement copies batch vectors into many codewords, and the nearest of
    two identical codewords is a tie that another summation order may break the other way (the EMA update then
    lands on the other copy); a buffer left un-updated or filled differently still fails."""
    order = lambda t: t[torch.argsort(t.double() @ torch.linspace(1, 2, t.shape[-1], dtype=torch.float64))]
    return torch.allclose(order(a.reshape(a.shape[0], -1)), order(b.reshape(b.shape[0], -1)), atol=atol)


def test_compiled_training_steps_match_eager_ones(clips, tmp_path):
    """torch.compile (inductor on CPU) changes the kernels, not the maths. Compared one step at a time from the
    same state (three states along an eager run, one before and two after the k-means initialisation): losses,
    every gradient and the quantizer's EMA buffers within float tolerance. Whole runs are not compared: the
    nearest-codeword choice is discrete, so summation orders that differ per CPU instruction set let runs drift
    apart after a few steps without any difference in the maths."""
    trainer = CodecTrainer(_cfg(clips, tmp_path / "run", adversarial=False), progress=False)
    compiled = torch.compile(trainer.codec)
    batches = trainer._batches()
    for state in range(3):
        batch = next(batches)
        eager_metrics, eager_grads, eager_buffers = _step_from(trainer, trainer.codec, batch)
        metrics, grads, buffers = _step_from(trainer, compiled, batch)
        for key in ("mel", "l1", "commitment", "mmd"):
            assert metrics[key] == pytest.approx(eager_metrics[key], rel=1e-3, abs=1e-6), (state, key)
        assert grads.keys() == eager_grads.keys() and len(grads) > 20
        # the last encoder layer's bias and gain get almost no gradient from the standardised independence loss
        # (a shift or scale of a feature cancels), so their gradients are float noise: tolerances are relative to
        # each tensor's and to the whole gradient's norm (measured: at most 3e-4 of the whole, over the states)
        total = torch.cat([g.flatten() for g in eager_grads.values()]).norm().item()
        for name, grad in grads.items():
            error = (grad - eager_grads[name]).norm().item()
            assert error <= 1e-2 * eager_grads[name].norm().item() + 1e-3 * total, (state, name, error, total)
        difference = torch.cat([(grads[name] - eager_grads[name]).flatten() for name in grads]).norm().item()
        assert difference <= 2e-3 * total, (state, difference, total)
        for name, buffer in buffers.items():
            if name.endswith(("embed", "embed_sum")):
                assert _same_codebook_rows(buffer, eager_buffers[name], atol=1e-4), (state, name)
            else:
                assert torch.allclose(buffer.sort().values, eager_buffers[name].sort().values, atol=1e-4), (state,
                                                                                                           name)
        trainer.train_step([batch])  # the next state, eagerly
        trainer.step += 1
