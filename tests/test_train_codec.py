"""The codec trainer: exact resume, the non-finite guard, DDP on two gloo processes, validation."""

import copy
import json
import logging

import numpy as np
import pytest
import soundfile
import torch
from safetensors.torch import load_file

from mmdgen.losses.reconstruction import si_snr
from mmdgen.train.codec import CodecTrainConfig, CodecTrainer
from mmdgen.train.loop import STATE_FILE, named_tensors
from tests.gloo_ranks import spawn_gloo_ranks


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


def _all_state(trainer):
    """Every tensor a step may change (both models' parameters and buffers, both optimisers' moments) cloned, and
    the rest of the optimisers' and the balancer's state."""
    state = {"codec": trainer.codec.state_dict(), "disc": trainer.disc.state_dict(),
             "g_opt": trainer.g_opt.state_dict()["state"], "d_opt": trainer.d_opt.state_dict()["state"]}
    settings = [{k: v for k, v in group.items() if k != "params"}
                for opt in (trainer.g_opt, trainer.d_opt) for group in opt.param_groups]
    return {name: t.clone() for name, t in named_tensors(state)}, copy.deepcopy(settings), \
        copy.deepcopy(trainer.balancer.state_dict())


def _assert_same_state(before, after):
    tensors, settings, balancer = before
    assert after[0].keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert torch.equal(after[0][name], tensor), name
    assert after[1] == settings and after[2] == balancer


@pytest.mark.parametrize("first_step", [True, False], ids=["k-means-step", "later-step"])
def test_a_skipped_step_changes_no_state_at_all(clips, tmp_path, first_step):
    """The second micro-batch is poisoned, so the first one has run its backward (and the balancer its update) and
    both forward passes updated the EMA codebooks (the first step also initialises them by k-means): all undone."""
    trainer = CodecTrainer(_cfg(clips, tmp_path / "nan", steps=8, grad_accum=2, max_nonfinite=2), progress=False)
    batches = trainer._batches()
    if not first_step:
        for _ in range(2):
            assert "skipped" not in trainer.train_step([next(batches), next(batches)])
            trainer.step += 1
    real, calls = trainer._generator_losses, []

    def poisoned(audio, with_mmd):
        fake, losses, extra, perplexity = real(audio, with_mmd)
        calls.append(with_mmd)
        if len(calls) % 2 == 0:
            losses["mel"] = losses["mel"] * float("nan")
        return fake, losses, extra, perplexity

    trainer._generator_losses = poisoned
    before = _all_state(trainer)
    moments = {name.split(".")[0] for name in before[0] if name.endswith(".exp_avg_sq")}
    assert moments == (set() if first_step else {"g_opt", "d_opt"})
    metrics = trainer.train_step([next(batches), next(batches)])
    assert metrics["skipped"] == 1.0 and (trainer.guard.in_a_row, trainer.guard.total) == (1, 1)
    assert bool(trainer.codec.quantizer.stages[0].initialized) != first_step
    _assert_same_state(before, _all_state(trainer))
    assert all(p.grad is None for p in [*trainer.codec.parameters(), *trainer.disc.parameters()])
    trainer.step += 1
    with pytest.raises(RuntimeError, match=r"non-finite mel; 3 steps in a row skipped, more than max_nonfinite=2 "
                                           r"\(--max-nonfinite\) allows"):
        trainer.train()
    _assert_same_state(before, _all_state(trainer))


def _non_finite(folder):
    """The names of the tensors of the checkpoint or model directory ``folder`` that hold a NaN or an infinity."""
    tensors = {f"{path.name}:{name}": t for path in folder.glob("*.safetensors")
               for name, t in load_file(str(path)).items()}
    if (folder / STATE_FILE).exists():
        tensors.update((f"{STATE_FILE}:{name}", t) for name, t in named_tensors(torch.load(folder / STATE_FILE,
                                                                                           weights_only=True)))
    assert any(name.startswith("codec.safetensors:quantizer.stages.3.embed") for name in tensors)
    return sorted(name for name, t in tensors.items() if t.is_floating_point() and not bool(t.isfinite().all()))


def test_a_run_stopped_by_non_finite_steps_exits_2_and_keeps_a_finite_resumable_checkpoint(clips, tmp_path, capsys,
                                                                                         caplog):
    """The issue's run: --lr 1e6 makes the first step's weights ~1e6, after which every forward pass overflows."""
    from mmdgen import cli

    out = tmp_path / "r"
    args = ["train", "codec", "--data", str(clips), "--out", str(out), "--lr", "1e6", "--steps", "4",
            "--ckpt-every", "1", "--batch-size", "2", "--crop-seconds", "0.1", "--precision", "fp32",
            "--device", "cpu", "--disc-filters", "4", "--log-every", "1"]
    assert cli.main(args + ["--max-nonfinite", "1"]) == 2
    error = capsys.readouterr().err
    assert "step 3: non-finite" in error and "more than max_nonfinite=1 (--max-nonfinite)" in error
    assert f"{out / 'checkpoint'} holds the state before them" in error
    state = torch.load(out / "checkpoint" / STATE_FILE, weights_only=True)
    assert (state["step"], state["skipped"], state["skipped_in_a_row"]) == (2, 1, 1)
    assert _non_finite(out / "checkpoint") == [] and state["optimizers"]["generator"]["state"]
    assert not (out / "model").exists()
    with caplog.at_level(logging.WARNING):
        assert cli.main(args + ["--max-nonfinite", "5", "--lr", "1e-3"]) == 0
    assert "resuming at step 2 with max_nonfinite changed: 1 -> 5" in caplog.text
    assert "resuming at step 2 with lr changed: 1000000.0 -> 0.001" in caplog.text
    state = torch.load(out / "checkpoint" / STATE_FILE, weights_only=True)
    assert (state["step"], state["skipped"], state["skipped_in_a_row"]) == (4, 3, 3)
    assert [g["lr"] for g in state["optimizers"]["generator"]["param_groups"]] == [1e-3]
    assert _non_finite(out / "checkpoint") == [] and _non_finite(out / "model") == []


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


def _ddp_worker(rank, world, clips, out):
    trainer = CodecTrainer(_cfg(clips, out, steps=2, ckpt_every=5, mmd_batches=2), progress=False)
    trainer.train()
    state = {k: v.tolist() for k, v in trainer.codec.state_dict().items() if v.is_floating_point()}
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(state, f)


def test_ddp_on_two_gloo_processes_keeps_ranks_identical(clips, tmp_path):
    out = tmp_path / "ddp"
    out.mkdir()
    spawn_gloo_ranks(_ddp_worker, 2, tmp_path / "init", str(clips), str(out))
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
    apart after a few steps without any difference in the maths. The compiled codec is five graphs, the encoder's and
    the decoder's on either side of their LSTMs and the final crop (the LSTMs and the quantizer stay eager): a break
    inside the loop over layers used to make Dynamo compile each layer apart, once per width (28 graphs)."""
    from torch._dynamo.utils import counters

    trainer = CodecTrainer(_cfg(clips, tmp_path / "run", adversarial=False), progress=False)
    torch._dynamo.reset()
    graphs_before = counters["stats"]["unique_graphs"]
    compiled = torch.compile(trainer.codec)
    batches = trainer._batches()
    for state in range(3):
        batch = next(batches)
        eager_metrics, eager_grads, eager_buffers = _step_from(trainer, trainer.codec, batch)
        metrics, grads, buffers = _step_from(trainer, compiled, batch)
        for key in ("mel", "l1", "commitment"):
            assert metrics[key] == pytest.approx(eager_metrics[key], rel=1e-3, abs=1e-6), (state, key)
        # the MMD estimate is a difference of kernel means of order 1 that nearly cancel (values near 1e-5):
        # float32 summation order moves it by a few 1e-6 (measured 3.8e-6 with ATEN_CPU_CAPABILITY=avx2), so its
        # absolute tolerance is set by the kernel means, not by the estimate
        assert metrics["mmd"] == pytest.approx(eager_metrics["mmd"], rel=1e-3, abs=5e-5), state
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
    assert counters["stats"]["unique_graphs"] - graphs_before == 5


def test_a_run_whose_final_validation_is_not_finite_exports_no_model(clips, tmp_path, monkeypatch):
    """Finite weights can still compute nothing finite (a diverged run): no model directory is handed over."""
    monkeypatch.setattr(CodecTrainer, "validate", lambda self: {"mel_distance": float("nan"), "si_snr_db": 3.0})
    trainer = CodecTrainer(_cfg(clips, tmp_path / "run", steps=1, adversarial=False), progress=False)
    with pytest.raises(RuntimeError, match=r"step 1: the model's validation mel_distance is not finite, so no model "
                                           r"was exported .*lower --lr"):
        trainer.train()
    assert not (tmp_path / "run" / "model").exists()
