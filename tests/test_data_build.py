"""The corpus build on a tiny slice: fields, captions, determinism, resume, splits, bad input."""

import json
import math

import numpy as np
import pytest
import soundfile

from mmdgen.data import build as build_module
from mmdgen.data.build import BuildConfig, build_corpus, plan_shards, split_of, stratified_works
from mmdgen.data.corpus import INSTRUMENTS, list_works
from mmdgen.data.render import RenderError

TINY = BuildConfig(hours=8 / 3600, clip_seconds=1.0, shard_clips=4, renderings=2, folders=("bach", "ryansMammoth"))


def _manifest(folder):
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    report = build_corpus(out, TINY, workers=1, progress=False)
    return out, report


def test_manifest_fields_and_audio(tiny):
    out, report = tiny
    records = _manifest(out)
    assert report["clips"] == len(records) == 8 and report["failures_by_cause"] == {}
    assert {r["folder"] for r in records} == {"bach", "ryansMammoth"}
    for r in records:
        audio, rate = soundfile.read(out / r["path"], dtype="float32")
        assert rate == 32000 and audio.ndim == 1 and len(audio) == 32000
        assert np.abs(audio).max() <= 0.99 + 1e-3
        assert np.sqrt(np.mean(audio ** 2)) > 0.02  # loudness-normalised, not silent
        assert r["program"] == INSTRUMENTS[r["instrument"]]
        assert r["mode"] in ("major", "minor") and r["key"] == f"{r['tonic']} {r['mode']}"
        if r["folder"] == "ryansMammoth":
            assert r["voices"] == 1
        assert r["split"] in ("train", "valid", "test")


def test_captions_state_the_fields(tiny):
    out, _ = tiny
    for r in _manifest(out):
        text = r["caption"].lower()
        for value in (r["key"], str(r["tempo_bpm"]), r["metre"], r["instrument"], r["genre"]):
            assert value.lower() in text, (value, r["caption"])


def test_build_is_deterministic_and_independent_of_workers(tiny, tmp_path):
    out, _ = tiny
    again = tmp_path / "again"
    build_corpus(again, TINY, workers=2, progress=False)
    assert _manifest(again) == _manifest(out)
    first = _manifest(out)[0]["path"]
    assert (again / first).read_bytes() == (out / first).read_bytes()


def test_resume_keeps_finished_shards_and_extends(tmp_path):
    out = tmp_path / "corpus"
    build_corpus(out, TINY, workers=1, progress=False)
    finished = sorted((out / "shards" / "00000").iterdir())
    stamps = [p.stat().st_mtime_ns for p in finished]
    before = _manifest(out)
    (out / "shards" / "00001.jsonl").unlink()  # as if interrupted inside shard 1
    report = build_corpus(out, TINY, workers=1, progress=False)
    assert report["rendered_this_run"] == 4
    assert [p.stat().st_mtime_ns for p in finished] == stamps
    assert _manifest(out) == before
    more = build_corpus(out, BuildConfig(**{**TINY.__dict__, "hours": 12 / 3600}), workers=1, progress=False)
    assert more["clips"] == 12 and _manifest(out)[:8] == before


def test_other_configuration_is_refused(tiny, tmp_path):
    out, _ = tiny
    with pytest.raises(ValueError, match="another configuration.*seed"):
        build_corpus(out, BuildConfig(**{**TINY.__dict__, "seed": 1}), progress=False)
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "manifest.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match="without build_config.json"):
        build_corpus(stray, TINY, progress=False)


def test_failing_works_are_counted_not_fatal(tmp_path, monkeypatch):
    real = build_module.parse_work
    broken = stratified_works(TINY)[1].work_id

    def parse(work):
        if work.work_id == broken:
            raise RenderError("parse", f"{work.work_id}: malformed")
        return real(work)

    monkeypatch.setattr(build_module, "parse_work", parse)
    report = build_corpus(tmp_path / "c", TINY, workers=1, progress=False)
    assert report["failures_by_cause"] == {"parse": 2} and report["clips"] == 6
    assert broken not in {r["work_id"] for r in _manifest(tmp_path / "c")}


def test_splits_are_by_work_and_near_their_fractions():
    cfg = BuildConfig(hours=1.0, folders=("essenFolksong",))
    works = list_works(("essenFolksong",))
    splits = [split_of(w.work_id, cfg) for w in works]
    assert abs(splits.count("test") / len(works) - 0.05) < 0.01
    assert abs(splits.count("valid") / len(works) - 0.05) < 0.01
    # every clip of a work inherits the work's split: one split per work in any plan
    per_work = {}
    for shard in plan_shards(BuildConfig(hours=5.0, folders=("bach",), clip_seconds=1.0)):
        for excerpt in shard:
            per_work.setdefault(excerpt.work.work_id, set()).add(split_of(excerpt.work.work_id, cfg))
    assert all(len(s) == 1 for s in per_work.values())


def test_plan_is_stratified_across_folders():
    cfg = BuildConfig(hours=1.0, clip_seconds=10.0)
    excerpts = [e for shard in plan_shards(cfg) for e in shard]
    assert len(excerpts) == math.ceil(360 / cfg.renderings)
    folders = [e.work.folder for e in excerpts[:13 * 4]]
    assert min(folders.count(f) for f in set(folders)) >= 4  # 13 folders, round-robin


def test_bad_configuration_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="hours must be a finite number > 0 and <= 10000, got 0"):
        build_corpus(tmp_path, BuildConfig(hours=0), progress=False)
    with pytest.raises(ValueError, match=r"folders\[0\] must be one of bach, .*, got 'nosuch'"):
        build_corpus(tmp_path / "x", BuildConfig(folders=("nosuch",)), progress=False)
    assert not (tmp_path / "x").exists()  # nothing half-written


def test_abc_voices_of_one_piece_are_one_polyphonic_work():
    from mmdgen.data.render import parse_work

    josquin = list_works(("josquin",))
    assert len(josquin) == 8 and all(w.number is None for w in josquin)
    assert parse_work(next(w for w in josquin if "milleRegrets" in w.path)).voices == 4
    ballads = [w for w in list_works(("essenFolksong",)) if w.path.endswith("ballad80.abc")]
    assert len(ballads) == 93  # variants of one ballad: a folk collection stays one work per tune


def test_unusable_scores_raise_render_errors_with_a_cause(tmp_path, monkeypatch):
    from mmdgen.data import render
    from mmdgen.data.corpus import Work

    monkeypatch.setattr(render, "corpus_root", lambda: str(tmp_path))
    (tmp_path / "bach").mkdir()
    (tmp_path / "bach" / "broken.mxl").write_bytes(b"PK\x03\x04 not a zip archive")
    (tmp_path / "bach" / "empty.abc").write_text("X:1\nT:Nothing\nM:4/4\nK:C\n")
    with pytest.raises(RenderError) as parse_failure:
        render.parse_work(Work("bach", "bach/broken.mxl"))
    assert parse_failure.value.cause == "parse" and "bach/broken.mxl" in str(parse_failure.value)
    with pytest.raises(RenderError) as empty:
        render.parse_work(Work("bach", "bach/empty.abc"))
    assert empty.value.cause == "no notes"
