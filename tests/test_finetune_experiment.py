"""experiments/finetune.py's own logic: splitting a manifest into parts by style, reading the runs' validations,
and the results (table, JSON, figure) from tiny fake metrics. The experiment itself is not run here."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_experiment():
    spec = importlib.util.spec_from_file_location("finetune_experiment", ROOT / "experiments" / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


experiment = load_experiment()
PARTS = {"A": ("folkX", "folkY"), "B": ("bach", "josquin")}


def record(index: int, folder: str, split: str) -> dict:
    return {"id": f"clip{index}", "path": f"shards/00000/clip{index}.flac", "duration": 10.0, "split": split,
            "caption": f"a {folder} tune", "folder": folder}


def corpus() -> list[dict]:
    layout = [("folkX", "train"), ("bach", "valid"), ("folkY", "valid"), ("bach", "train"), ("quartet", "train"),
              ("folkX", "test"), ("bach", "train")]
    return [record(i, folder, split) for i, (folder, split) in enumerate(layout)]


def test_each_part_gets_its_styles_in_order_with_their_own_splits():
    parts = experiment.split_records(corpus(), PARTS, "m.jsonl")
    assert [r["id"] for r in parts["A"]] == ["clip0", "clip2", "clip5"]
    assert [r["id"] for r in parts["B"]] == ["clip1", "clip3", "clip6"]
    assert [r["split"] for r in parts["A"]] == ["train", "valid", "test"]
    # the quartet belongs to no part and is left out
    assert all(r["folder"] != "quartet" for part in parts.values() for r in part)


def test_a_style_without_clips_counts_zero():
    parts = experiment.split_records(corpus(), PARTS, "m.jsonl")
    summary = experiment.part_summary(parts["B"], PARTS["B"])
    assert summary["by_style"] == {"bach": 3, "josquin": 0}
    assert summary["by_split"] == {"train": 2, "valid": 1, "test": 0}
    assert math.isclose(summary["hours"], 30 / 3600, abs_tol=1e-3)


def test_an_empty_part_is_refused_by_name():
    with pytest.raises(ValueError, match=r"m\.jsonl: part C \(folder in mozart, haydn\) has 0 training and 0 "
                                         r"validation clips"):
        experiment.split_records(corpus(), {**PARTS, "C": ("mozart", "haydn")}, "m.jsonl")


def test_a_part_without_validation_clips_is_refused():
    records = [r for r in corpus() if not (r["folder"] == "bach" and r["split"] == "valid")]
    with pytest.raises(ValueError, match="part B .* has 2 training and 0 validation clips"):
        experiment.split_records(records, PARTS, "m.jsonl")


def test_a_style_in_two_parts_is_refused():
    with pytest.raises(ValueError, match="m.jsonl: style 'bach' is in parts A and B"):
        experiment.split_records(corpus(), {"A": ("folkX", "bach"), "B": ("bach",)}, "m.jsonl")


def test_a_record_without_the_field_is_refused():
    records = corpus()
    del records[3]["folder"]
    with pytest.raises(ValueError, match="m.jsonl: record 4 \\(clip3\\) has no 'folder' field"):
        experiment.split_records(records, PARTS, "m.jsonl")


def test_part_manifests_point_at_the_corpus_clips(tmp_path):
    corpus_dir = tmp_path / "corpus"
    corpus_dir.mkdir()
    manifest = corpus_dir / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in corpus()))
    out = tmp_path / "run"
    out.mkdir()
    paths = experiment.write_parts(manifest, PARTS, out)
    part_b = [json.loads(line) for line in paths["B"].read_text().splitlines()]
    assert [Path(r["path"]) for r in part_b] == [(corpus_dir / r["path"]).resolve()
                                                for r in corpus() if r["folder"] == "bach"]
    assert json.loads((out / "parts.json").read_text())["A"]["by_style"] == {"folkX": 2, "folkY": 1}


def fake_run(folder: Path, steps: list[int], start: list[float] | None, slope: float) -> list[list[float]]:
    """A run folder with metrics.jsonl (train lines, valid lines; the last step validated twice, as a resumed run
    may) and optionally valid_step0.json; returns the NLLs per validation written last per step."""
    folder.mkdir(parents=True)
    expected = []
    if start is not None:
        (folder / "valid_step0.json").write_text(json.dumps({"nll": sum(start) / 3,
                                                             **{f"nll_k{k}": v for k, v in enumerate(start)}}))
        expected.append(start)
    lines = []
    for step in steps:
        nll = [5.0 - slope * step + 0.1 * k for k in range(3)]
        lines.append({"kind": "train", "step": step, "time": 0.0, "loss": 1.0})
        lines.append({"kind": "valid", "step": step, "time": 0.0, "nll": sum(nll) / 3,
                      **{f"nll_k{k}": v for k, v in enumerate(nll)}, **{f"ppl_k{k}": math.exp(v) for k, v in
                                                                         enumerate(nll)}})
        expected.append(nll)
    stale = dict(lines[-1], nll_k0=99.0)
    lines.insert(len(lines) - 1, stale)  # an earlier pass at the last step, superseded by the line after it
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return expected


def test_curves_table_json_and_figure_from_fake_metrics(tmp_path):
    expected = {"B-scratch": fake_run(tmp_path / "scratch", [10, 20, 30], None, 0.05),
                "B-finetune": fake_run(tmp_path / "finetune", [10, 20, 30], [4.0, 4.5, 5.0], 0.02)}
    curves = {"B-scratch": experiment.validation_curve(tmp_path / "scratch"),
              "B-finetune": experiment.validation_curve(tmp_path / "finetune")}
    for name, curve in curves.items():
        assert [[point[f"nll_k{k}"] for k in range(3)] for point in curve] == expected[name]
    assert [point["step"] for point in curves["B-finetune"]] == [0, 10, 20, 30]

    json_path, figure = tmp_path / "docs" / "results.json", tmp_path / "docs" / "figures" / "curves.png"
    rows = experiment.write_results(curves, {"steps": 30}, json_path, figure)
    assert [row["run"] for row in rows] == ["B-scratch", "B-finetune"]
    for row, name in zip(rows, expected):
        last = expected[name][-1]
        assert row["step"] == 30
        assert [row[f"nll_k{k}"] for k in range(3)] == last
        assert math.isclose(row["nll"], sum(last) / 3)
    written = json.loads(json_path.read_text())
    assert written["setup"] == {"steps": 30} and written["final"] == rows and written["curves"] == curves
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = experiment.markdown_table(rows).splitlines()
    assert table[0] == "| run | step | NLL k0 | NLL k1 | NLL k2 | mean |"
    assert table[2] == "| B-scratch | 30 | 3.500 | 3.600 | 3.700 | 3.600 |"


def test_runs_without_validations_or_with_other_codebook_counts_are_refused(tmp_path):
    fake_run(tmp_path / "three", [10], None, 0.0)
    (tmp_path / "empty").mkdir()
    three = experiment.validation_curve(tmp_path / "three")
    with pytest.raises(ValueError, match="expected every run to have validations"):
        experiment.final_table({"three": three, "empty": experiment.validation_curve(tmp_path / "empty")})
    two = [{"step": 10, "nll_k0": 1.0, "nll_k1": 2.0}]
    with pytest.raises(ValueError, match="the same number of codebooks"):
        experiment.final_table({"three": three, "two": two})


@pytest.mark.parametrize("options, message", [
    (["--steps-a", "0"], "--steps-a must be an integer >= 1, got 0"),
    (["--hours", "nan"], "--hours must be a finite number > 0 and <= 10000, got nan"),
    (["--finetune-lrs", "1e-3", "-1"], "--finetune-lrs must be a finite number > 0 and <= 1, got -1.0"),
    (["--lr", "inf"], "--lr must be a finite number > 0 and <= 1, got inf"),
    (["--valid-fraction", "1"], "--valid-fraction must be a finite number > 0 and < 1, got 1.0"),
    (["--preset", "huge"], "--preset must be one of tiny, mini, small, got 'huge'"),
])
def test_options_out_of_range_are_refused_before_any_stage(tmp_path, capsys, options, message):
    with pytest.raises(SystemExit) as exit_info:
        experiment.main(["--out", str(tmp_path / "run"), *options])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
