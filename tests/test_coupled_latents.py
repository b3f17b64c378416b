"""The coupled-latents toy (`mmdgen eval coupled-latents`) and the command line around it."""

import pytest

from mmdgen import cli
from mmdgen.eval.coupled_latents import CoupledLatentsConfig, run


def test_the_loss_drives_coupled_latents_to_independence():
    result = run(CoupledLatentsConfig(steps=60, compare_sizes=(300,)), log=lambda *_: None)
    first, last = result["history"][0], result["history"][-1]
    assert last["loss_delay"] < 0.2 * first["loss_delay"]
    assert last["coupling"] < 0.25 * first["coupling"]
    assert last["corr_aligned"] < 0.5 * first["corr_aligned"]
    # the coupling links codes of one delay step: only the aligned loss sees it
    assert first["loss_no_delay"] < 0.2 * first["loss_delay"]
    (row,) = result["comparison"]
    assert row["mmdgen_value"] == pytest.approx(row["naive_value"], rel=1e-3, abs=1e-6)


def test_cli_coupled_latents_prints_both_parts(capsys):
    assert cli.main(["eval", "coupled-latents", "--steps", "6", "--compare-sizes", "128"]) == 0
    out = capsys.readouterr().out
    assert "loss (delay)" in out and "naive MMD^2" in out
    assert out.count("\n") > 10


def test_cli_rejects_bad_arguments(capsys):
    assert cli.main(["eval", "coupled-latents", "--steps", "0"]) == 2
    assert "--steps must be an integer >= 1, got 0" in capsys.readouterr().err
    assert cli.main(["eval", "coupled-latents", "--steps", "2", "--backend", "triton", "--device", "meta"]) == 2
    assert "cannot run" in capsys.readouterr().err
