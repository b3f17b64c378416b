"""FSDP2 (``train lm --fsdp``) on two gloo processes on the CPU: the same losses and the same exported model as one
process on the same global batch; checkpoints through torch.distributed.checkpoint that resume exactly on two
processes and onto one (the data position and the caption dropout carried over in items of the global batch)."""

import json
import shutil

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from mmdgen.train.lm import LMTrainConfig, LMTrainer
from tests.gloo_ranks import spawn_gloo_ranks
from tests.test_train_lm import corpus  # noqa: F401 (the fixture: a tiny codec's tokens, 8 train clips)


def _cfg(corpus_dir, out, **overrides):
    """2 steps an epoch over 8 clips at 4 clips a step; a learned text encoder (in the root FSDP unit), captions
    dropped with 0.3, activation checkpointing (as the sharded runs use it)."""
    base = dict(tokens=str(corpus_dir / "tokens"), out=str(out), steps=4, batch_size=2, crop_frames=20, warmup_steps=2,
                text_dim=32, text_layers=1, ckpt_every=2, log_every=1, valid_every=100, backend="torch", fsdp=True,
                activation_checkpointing=True, condition_dropout=0.3)
    return LMTrainConfig(**{**base, **overrides})


def _train_sharded(rank, world, corpus_dir, root):
    straight = LMTrainer(_cfg(corpus_dir, root / "straight"), progress=False)
    weight = straight.lm.layers[0].fc1.weight  # each rank holds half of each layer's rows
    assert type(weight).__name__ == "DTensor" and weight.to_local().shape[0] * 2 == weight.shape[0]
    straight.train()
    LMTrainer(_cfg(corpus_dir, root / "stopped", steps=2), progress=False).train()
    if rank == 0:
        shutil.copytree(root / "stopped", root / "onto-one")
    dist.barrier()
    LMTrainer(_cfg(corpus_dir, root / "stopped"), progress=False).train()


def _train_records(run):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record["kind"] == "train"]


def _model(run):
    model = run / "model"
    return {**load_file(str(model / "lm.safetensors")),
            **{f"text.{k}": v for k, v in load_file(str(model / "text.safetensors")).items()}}


def test_fsdp_on_two_gloo_processes_matches_one_process_and_resumes_exactly(corpus, tmp_path):  # noqa: F811
    spawn_gloo_ranks(_train_sharded, 2, tmp_path / "init", corpus, tmp_path)
    checkpoint = tmp_path / "straight" / "checkpoint"
    assert (checkpoint / ".metadata").exists() and not list(checkpoint.glob("*.safetensors"))
    assert torch.load(checkpoint / "training_state.pt", weights_only=True)["world"] == 2

    # one process, the same global batch of 4, neither sharded nor checkpointed activations
    LMTrainer(_cfg(corpus, tmp_path / "single", batch_size=4, fsdp=False, activation_checkpointing=False),
              progress=False).train()
    sharded, single = _train_records(tmp_path / "straight"), _train_records(tmp_path / "single")
    assert [r["step"] for r in sharded] == [r["step"] for r in single] == [1, 2, 3, 4]
    for a, b in zip(sharded, single):
        for key in ["loss", "loss_k0", "loss_k3", "grad_norm"]:
            assert abs(a[key] - b[key]) <= 1e-5 * abs(b[key]), (a["step"], key, a[key], b[key])
    expected = _model(tmp_path / "single")
    got = _model(tmp_path / "straight")  # gathered on rank 0 from the shards
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=2e-5, rtol=1e-4, msg=name)

    # stopped at step 2 and resumed on two processes: exactly the uninterrupted run
    resumed = _model(tmp_path / "stopped")
    assert all(torch.equal(resumed[name], got[name]) for name in got)
    assert [r["step"] for r in _train_records(tmp_path / "stopped")] == [1, 2, 3, 4]

    # the 2-process checkpoint resumed on one process, its global batch of 4 kept
    onto_one = LMTrainer(_cfg(corpus, tmp_path / "onto-one", batch_size=4), progress=False)
    assert (onto_one.step, onto_one.epoch, onto_one.consumed) == (2, 0, 8)  # 4 items on each of 2
    onto_one.train()
    for a, b in zip(_train_records(tmp_path / "onto-one")[2:], sharded[2:]):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * b["loss"], (a, b)
    for name, value in _model(tmp_path / "onto-one").items():
        torch.testing.assert_close(value, got[name], atol=2e-5, rtol=1e-4, msg=name)


def test_resuming_on_another_number_of_processes_needs_the_same_global_batch(corpus, tmp_path):  # noqa: F811
    LMTrainer(_cfg(corpus, tmp_path / "run", steps=1, batch_size=4), progress=False).train()
    state = torch.load(tmp_path / "run" / "checkpoint" / "training_state.pt", weights_only=True)
    state["world"] = 2  # as if two processes of 4 items had written it
    torch.save(state, tmp_path / "run" / "checkpoint" / "training_state.pt")
    with pytest.raises(ValueError, match=r"written by 2 processes with a global batch of 8 items; on 1, batch_size "
                                         r"x grad_accum x processes must stay 8 \(it is 4\)"):
        LMTrainer(_cfg(corpus, tmp_path / "run", steps=2, batch_size=4), progress=False)
    resumed = LMTrainer(_cfg(corpus, tmp_path / "run", steps=2, batch_size=4, grad_accum=2), progress=False)
    assert resumed.step == 1 and resumed.consumed == 8  # 4 items on each of 2 processes: 8 of the epoch's order
