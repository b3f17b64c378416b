"""`mmdgen demo` end to end on a micro configuration, its reuse of finished stages, and `mmdgen eval report`."""

import json
import math
import re

import pytest

from mmdgen import cli
from mmdgen.demo.config import DemoConfig
from mmdgen.demo.run import run

MICRO = dict(hours=0.1, codec_steps=8, lm_steps=8, clips=2, duration=4.0)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    run(DemoConfig(out=str(out), **MICRO), log=lambda *_: None)
    return out


def test_the_demo_runs_every_stage_and_reports_them(demo_run):
    evaluation = json.loads((demo_run / "evaluation.json").read_text())
    assert set(evaluation["codecs"]) == set(evaluation["lms"]) == {"mmd0", "mmd3"}
    assert evaluation["codecs"]["mmd3"]["mmd_weight"] == 3.0
    for result in evaluation["codecs"].values():
        dependence = result["dependence"]
        assert len(dependence["pairwise_mi_percent"]) == 4 and dependence["samples"] > 0
        assert all(math.isfinite(v) for v in result["reconstruction"].values())
    for result in evaluation["lms"].values():
        assert len(result["clips"]) == 2 and math.isfinite(result["generation"]["fad"])
        for clip in result["clips"]:
            assert (demo_run / clip["wav"]).stat().st_size > 1000
    int8 = evaluation["int8"]
    assert int8["lm"] == "mmd3" and int8["generation"]["generated_clips"] == 2
    assert math.isfinite(int8["generation"]["fad"]) and (demo_run / "generated-mmd3-int8" / "clip01.wav").exists()
    stages = ["corpus", "codec mmd0", "codec mmd3", "tokens mmd0", "tokens mmd3", "LM mmd0", "LM mmd3",
              "generation mmd0", "generation mmd3", "generation mmd3-int8", "evaluation"]
    assert [row["stage"] for row in evaluation["phases"]] == stages
    assert all(row["seconds"] > 0 and not row["reused"] for row in evaluation["phases"])
    report = (demo_run / "report.md").read_text()
    assert "| mmd0 | 0 |" in report and "| mmd3 | 3 |" in report
    assert "| mmd3, int8 weights | - |" in report
    assert "## Time" in report and "| codec mmd3 |" in report and "reused:" not in report.split("## Time")[1]
    linked = [part.split(")")[0] for part in report.split("](")[1:]]
    assert linked and all((demo_run / path).exists() for path in linked)  # every figure and clip it links
    assert all((demo_run / path).read_bytes()[:4] == b"\x89PNG" for path in linked if path.endswith(".png"))


def test_a_second_run_reuses_every_finished_stage(demo_run):
    watched = [demo_run / "codec-mmd0" / "model" / "codec.safetensors", demo_run / "lm-mmd3" / "model" /
               "lm.safetensors", demo_run / "generated-mmd0" / "clip00.wav", demo_run / "tokens-mmd0" / "tokens.json"]
    before = [path.stat().st_mtime_ns for path in watched]
    first = {row["stage"]: row["seconds"] for row in json.loads((demo_run / "evaluation.json").read_text())["phases"]}
    logged = []
    run(DemoConfig(out=str(demo_run), **MICRO), log=logged.append)
    assert [path.stat().st_mtime_ns for path in watched] == before
    phases = json.loads((demo_run / "evaluation.json").read_text())["phases"]
    # a reused stage shows the time it took when it ran, not the instant of skipping it
    assert [(row["stage"], row["seconds"]) for row in phases if row["reused"]] == [
        (stage, seconds) for stage, seconds in first.items() if stage != "evaluation"]
    assert [row["stage"] for row in phases if not row["reused"]] == ["evaluation"]
    table = next(message for message in logged if "time per stage" in message)
    assert "| codec mmd0 | " in table and "reused: an earlier run" in table and "10 reused" in table


def test_eval_report_rewrites_the_report_of_a_run(demo_run, capsys, tmp_path):
    (demo_run / "report.md").unlink()
    assert cli.main(["eval", "report", str(demo_run)]) == 0
    assert (demo_run / "report.md").exists() and str(demo_run / "report.md") in capsys.readouterr().out
    assert cli.main(["eval", "report", str(tmp_path)]) == 2
    assert "demo_config.json: missing" in capsys.readouterr().err


@pytest.mark.parametrize("content, problem", [
    ('{"lms": ', "evaluation.json: not JSON"), ("[1]", "evaluation.json: a JSON list, expected a demo's evaluation"),
    ("{}", r"evaluation.json: not a demo's evaluation \(KeyError: 'config'\)"),
    ('{"phases": [{"stage": "corpus", "seconds": -2, "reused": false}]}',
     r"evaluation.json: phases: \{'stage': 'corpus', 'seconds': -2, 'reused': False\} is not a stage's time")])
def test_a_damaged_evaluation_is_named_in_one_line(demo_run, capsys, tmp_path, content, problem):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("demo_config.json", "evaluation.json"):  # a copy: the fixture's run is shared
        (run_dir / name).write_text((demo_run / name).read_text())
    assert cli.main(["eval", "report", str(run_dir)]) == 0  # the run's own evaluation passes the checks
    (run_dir / "report.md").unlink()
    (run_dir / "evaluation.json").write_text(content)
    assert cli.main(["eval", "report", str(run_dir)]) == 2
    error = capsys.readouterr().err.strip()
    assert re.search(problem, error) and error.endswith("evaluates the run again") and len(error.splitlines()) == 1
    assert not (run_dir / "report.md").exists()


def test_bad_demo_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="codec_steps must be an integer >= 1, got 0"):
        run(DemoConfig(out=str(tmp_path), codec_steps=0))
    assert not any(tmp_path.iterdir())  # nothing written before the check


@pytest.mark.parametrize("content, problem", [
    ("[1, 2]", "a JSON list"), ('{"corpus": 3', "not JSON"), ('{"corpus": NaN}', "'corpus' must be a finite number"),
    ('{"corpus": -1}', "'corpus' must be a finite number >= 0, got -1"),
    ('{"corpus": "fast"}', "'corpus' must be a finite number >= 0, got 'fast'")])
def test_a_damaged_stage_times_file_is_named_before_any_work(tmp_path, content, problem):
    (tmp_path / "phases.json").write_text(content)
    with pytest.raises(ValueError, match=f"phases.json: {problem}"):
        run(DemoConfig(out=str(tmp_path), hours=0.01))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["phases.json"]  # nothing else written


def test_eval_codec_measures_ours_and_a_transformers_encodec_alike(demo_run, tmp_path, capsys):
    """The demo's weight-3 codec, and the same weights saved as a transformers EncodecModel folder: the same
    codes, hence the same dependence; both reported with figures."""
    from mmdgen.model.convert import codec_to_transformers
    from mmdgen.pretrained.directory import load_codec

    ours = demo_run / "codec-mmd3" / "model"
    codec_to_transformers(load_codec(ours)).save_pretrained(tmp_path / "hf-encodec")
    manifest = demo_run / "corpus" / "manifest.jsonl"
    argv = ["eval", "codec", f"ours={ours}", f"theirs={tmp_path / 'hf-encodec'}", "--manifest", str(manifest),
            "--split", "train", "--clips", "3", "--out", str(tmp_path / "report")]
    assert cli.main(argv) == 0
    results = json.loads((tmp_path / "report" / "codecs.json").read_text())["results"]
    assert results["ours"]["dependence"] == results["theirs"]["dependence"]
    assert results["ours"]["dependence"]["samples"] > 0
    assert (tmp_path / "report" / "figures" / "mi-theirs.png").exists()
    assert "| theirs | - |" in (tmp_path / "report" / "codecs.md").read_text()
    assert cli.main(["eval", "codec", str(tmp_path), "--manifest", str(manifest), "--out", str(tmp_path / "x")]) == 2
    assert "not a codec: expected codec.safetensors (mmdgen)" in capsys.readouterr().err
