"""The shared training loop's pieces on their own: the non-finite guard, checkpoints that refuse non-finite
tensors, the metrics log's torn final line."""

import json
import logging

import pytest
import torch
from torch import nn

from mmdgen.files import load_weights
from mmdgen.train.loop import STATE_FILE, MetricLog, NonFiniteGuard, load_state, save_checkpoint


def test_the_guard_counts_skips_in_a_row_and_a_good_step_resets_the_count(tmp_path):
    guard = NonFiniteGuard(2, tmp_path / "checkpoint")
    good, bad = {"loss": 1.0}, {"loss": float("nan"), "mel": 2.0, "grad_norm": float("inf")}
    for step, metrics in enumerate([bad, bad, good, bad, bad, good, bad, bad], start=1):
        assert guard.check(metrics) == (metrics is good)
        guard.stop_if_exhausted(step)
    assert (guard.in_a_row, guard.total, guard.exhausted) == (2, 6, False)
    assert not guard.check(bad) and guard.exhausted
    with pytest.raises(RuntimeError, match=r"step 9: non-finite grad_norm, loss; 3 steps in a row skipped, more than "
                                           r"max_nonfinite=2 \(--max-nonfinite\) allows; no checkpoint was written"):
        guard.stop_if_exhausted(9)
    assert guard.total == 7


def test_the_guard_follows_the_ranks_verdict_and_names_the_last_checkpoint(tmp_path):
    save_checkpoint(tmp_path / "checkpoint", {}, {}, {"step": 3})
    elsewhere = NonFiniteGuard(0, tmp_path / "checkpoint", any_rank=lambda flag: True)  # another rank saw a NaN
    assert not elsewhere.check({"loss": 1.0})
    with pytest.raises(RuntimeError, match=r"step 4: non-finite values on another rank; 1 step in a row .*"
                                           + str(tmp_path / "checkpoint") + " holds the state before them"):
        elsewhere.stop_if_exhausted(4)
    assert NonFiniteGuard(0, tmp_path, any_rank=lambda flag: False).check({"loss": float("nan")})


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 5)
        self.register_buffer("count", torch.tensor(4))


def _train_once(model: nn.Module) -> torch.optim.Optimizer:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.linear(torch.randn(2, 3)).square().sum().backward()
    optimizer.step()
    return optimizer


@pytest.mark.parametrize("where", ["weights", "state"])
def test_a_checkpoint_with_a_non_finite_tensor_is_refused_and_the_previous_one_kept(tmp_path, where):
    torch.manual_seed(0)
    model = _Tiny()
    optimizer = _train_once(model)
    folder = tmp_path / "checkpoint"
    save_checkpoint(folder, {"step": 1}, {"tiny": model}, {"step": 1, "optimizers": {"adam": optimizer.state_dict()}})
    good = {k: v.clone() for k, v in model.state_dict().items()}
    if where == "weights":
        model.linear.bias.data[3] = float("inf")
        expected = rf"{folder / 'tiny.safetensors'}: not written: tensor linear.bias of the tiny holds 1 non-finite"
    else:
        optimizer.state[model.linear.weight]["exp_avg"][1, 2] = float("nan")
        expected = (rf"{folder / STATE_FILE}: not written: tensor optimizers.adam.state.0.exp_avg of the training "
                    r"state holds 1 non-finite values \(NaN or infinity\) among 15")
    with pytest.raises(ValueError, match=expected):
        save_checkpoint(folder, {"step": 2}, {"tiny": model},
                        {"step": 2, "optimizers": {"adam": optimizer.state_dict()}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]  # no temporary folder left
    assert json.loads((folder / "config.json").read_text()) == {"step": 1} and load_state(folder)["step"] == 1
    restored = _Tiny()
    load_weights(folder / "tiny.safetensors", restored, "the tiny")
    assert all(torch.equal(restored.state_dict()[k], v) for k, v in good.items())


def test_a_torn_final_line_of_the_metrics_log_is_dropped(tmp_path, caplog):
    log = MetricLog(tmp_path)
    for step in (1, 2, 3):
        log.write("train", step, {"loss": 1.0 / step})
    whole = log.path.read_text()
    log.path.write_text(whole + '{"kind": "train", "step": 4, "ti')  # killed while appending
    with caplog.at_level(logging.WARNING):
        log.truncate_after(2)
    assert f"{log.path}: dropped a torn final line" in caplog.text
    assert [json.loads(line)["step"] for line in log.path.read_text().splitlines()] == [1, 2]
    log.path.write_text(whole.rstrip("\n"))  # a whole last record that only lost its newline is kept
    log.truncate_after(5)
    assert [json.loads(line)["step"] for line in log.path.read_text().splitlines()] == [1, 2, 3]
    log.path.write_text('{"step": 1}\n{"step": 2, \n{"step": 3}\n')  # not torn: damaged inside
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not valid JSON"):
        log.truncate_after(3)
    log.path.write_text('{"step": 1}\n{"kind": "train"}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: expected a JSON object with a \"step\""):
        log.truncate_after(3)
