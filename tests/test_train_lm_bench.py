"""bench/train_lm.py's step split on its smallest cases: the JSON it writes (every case, every phase, the device
named) and phases that tile the step (each hook fired once a step, in order), one process and FSDP on two."""

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        import train_lm
        yield train_lm
    finally:
        sys.path.remove(str(BENCH))


def _check_split(bench, row):
    phases = row["phases"]
    assert set(phases) == set(bench.PHASES)
    assert all(value > 0 for value in phases.values()), phases  # every mark after the one before it
    assert sum(phases.values()) == pytest.approx(row["seconds"], rel=1e-6)  # one repeat: the medians are the step's
    assert row["tokens_per_s"] == pytest.approx(row["batch_size"] * row["processes"] * 4 * row["frames"]
                                                / row["seconds"])
    assert row["peak_bytes"] > 0 and row["t5_per_step"] > 0


def test_the_quick_run_writes_every_case_with_phases_that_add_up_to_the_step(bench, tmp_path):
    out = tmp_path / "train_lm.json"
    bench.main(["--quick", "--device", "cpu", "--out", str(out)])
    result = json.loads(out.read_text())
    assert "threads" in result["device"] and "fused_ce" not in result
    rows = result["split"]
    assert [(r["label"], r["checkpointing"], r["fused"], r["text_cache"]) for r in rows] == [
        ("fused CE", False, True, True), ("+ act. ckpt", True, True, True), ("plain CE", False, False, True),
        ("T5 every step", False, True, False)]
    for row in rows:
        assert (row["preset"], row["batch_size"], row["frames"], row["processes"]) == ("tiny", 2, 20, 1)
        assert len(row["times"]) == 1
        _check_split(bench, row)


def test_the_fsdp_case_splits_the_step_of_two_gloo_ranks(bench, tmp_path):
    t5 = bench.t5_base_folder(tmp_path / "t5", layers=1)
    spec = {"table": "split", "preset": "tiny", "batch_size": 2, "frames": 20, "fused": True, "checkpointing": True,
            "text_cache": True, "processes": 2, "repeats": 1, "device": "cpu", "t5": t5}
    row = {**spec, **bench.measure(spec)}
    assert row["threads_per_rank"] >= 1
    _check_split(bench, row)
