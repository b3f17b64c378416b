"""The `mmdgen` command line: made from the configuration dataclasses (help text, defaults, choices; `--help` loads
neither torch nor triton), every existing option name still parsed, and every bad input refused before anything is
written, with one line on stderr naming the option, the file or the line, and exit status 2 (issue 13 items 3, 5, 6,
9 and 12 and its property test; issue 14 item 3)."""

import contextlib
import dataclasses
import io
import json
import math
import os
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mmdgen import cli
from mmdgen.cli.commands import COMMANDS, GROUPS
from mmdgen.model.codec import Codec, codec_config
from mmdgen.pretrained.directory import save_codec

ROOT = Path(__file__).resolve().parents[1]


def refused(capsys, argv: list[str], *named: str) -> str:
    """Run the command line; assert it refused with one line naming each of ``named``; that line."""
    rc = cli.main([str(word) for word in argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, (rc, err)
    assert lines[0].startswith("mmdgen ") and ": error: " in lines[0] and "Traceback" not in err
    for name in named:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


def _tone(path: Path, step: float = 0.05, rate: int = 32000, value: float | None = None) -> Path:
    """Half a second of a sine (``step`` radians per sample), one sample set to ``value`` if given."""
    samples = 0.3 * np.sin(np.arange(rate // 2) * step)
    if value is not None:
        samples[len(samples) // 2] = value
    soundfile.write(path, samples.astype(np.float32), rate, subtype="FLOAT")
    return path


@pytest.fixture(scope="module")
def codec_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = codec_config("tiny")
    cfg.quantizer.kmeans_init = False
    return save_codec(Codec(cfg), tmp_path_factory.mktemp("codec"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, codec_dir):
    """A run of `mmdgen train lm` (one step) on a token folder of four tones: its folder and its arguments."""
    from mmdgen.data.tokenize import tokenize_corpus
    from mmdgen.model.text import build_tokenizer_from_manifest

    root = tmp_path_factory.mktemp("trained")
    lines = [json.dumps({"path": _tone(root / f"t{i}.wav", 0.05 + 0.01 * i).name, "caption": f"tone {i} on flute",
                         "split": "train"}) for i in range(4)]
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    tokenize_corpus(codec_dir, root / "manifest.jsonl", root / "tokens", progress=False)
    # a tokenizer outside the run folder, so that a copy of the folder still resumes
    build_tokenizer_from_manifest(root / "manifest.jsonl", root / "captions.model", 40)
    args = ["train", "lm", "--tokens", root / "tokens", "--out", root / "run", "--steps", "1", "--batch-size", "2",
            "--crop-frames", "10", "--text-path", root / "captions.model", "--text-dim", "32", "--text-layers", "1",
            "--valid-clips", "0", "--backend", "torch", "--device", "cpu"]
    assert cli.main([str(a) for a in args]) == 0
    return root / "run", args


# -- issue 14 item 3: the command line made from the configurations ----------------------------------------------

def _all_commands() -> list[tuple[str, ...]]:
    return [()] + list(GROUPS) + [command.words for command in COMMANDS]


def test_help_of_every_command_loads_neither_torch_nor_triton():
    script = ("import json, sys, contextlib, io\nfrom mmdgen.cli import main\nhelps = {}\n"
              f"for words in {_all_commands()!r}:\n"
              "    out = io.StringIO()\n"
              "    with contextlib.redirect_stdout(out):\n"
              "        try:\n            main(list(words) + ['--help'])\n"
              "        except SystemExit as done:\n            assert done.code == 0, words\n"
              "    helps[' '.join(words)] = out.getvalue()\n"
              "assert 'torch' not in sys.modules and 'triton' not in sys.modules, 'imported torch or triton'\n"
              "print(json.dumps(helps))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    helps = {command: " ".join(text.split()) for command, text in json.loads(done.stdout).items()}  # unwrapped
    assert set(helps) == {" ".join(words) for words in _all_commands()}
    codec = helps["train codec"]
    assert "--mmd-weight MMD_WEIGHT" in codec and "weight of the independence loss (0: off) (default: 0.0)" in codec
    assert "--preset {tiny,paper}" in codec and "--betas BETAS BETAS" in codec and "(default: 0.5 0.9)" in codec
    assert "--pattern {parallel,delay,flatten,valle}" in helps["train lm"]
    generate = helps["generate"]
    assert "--guidance GUIDANCE" in generate and "(default: 3.0)" in generate and "--top-k TOP_K" in generate
    assert "--format {flac,wav}" in helps["data build"] and "(default: 32000)" in helps["data build"]
    assert "--text-path" in helps["train lm"] and "--cuda-graph, --no-cuda-graph" in generate


def _record_options(patch: pytest.MonkeyPatch) -> list:
    """Swap every command's function for one that keeps the options it was given (and runs nothing)."""
    seen = []
    patch.setattr(cli, "COMMANDS", tuple(dataclasses.replace(command, run=seen.append) for command in COMMANDS))
    return seen


def test_every_existing_option_name_still_parses_to_its_typed_value(monkeypatch, tmp_path, codec_dir):
    seen = _record_options(monkeypatch)
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("")
    audio = _tone(tmp_path / "a.wav")
    runs = {
        ("demo", "--out", tmp_path / "d", "--hours", "0.1", "--codec-steps", "3", "--mmd-weight", "2", "--lm-steps",
         "4", "--clips", "2", "--duration", "1.5", "--seed", "7", "--device", "cpu"): dict(codec_steps=3, duration=1.5),
        ("eval", "report", tmp_path, "--recompute"): dict(recompute=True),
        ("eval", "codec", f"a={codec_dir}", "--manifest", manifest, "--split", "train", "--clips", "3", "--out",
         tmp_path / "r"): dict(codecs=(f"a={codec_dir}",), clips=3, split="train"),
        ("eval", "coupled-latents", "--steps", "6", "--seed", "1", "--backend", "torch", "--device", "cpu",
         "--compare-sizes", "128", "256"): dict(steps=6, compare_sizes=(128, 256)),
        ("data", "build", "--out", tmp_path / "c", "--hours", "0.5", "--clip-seconds", "2", "--sample-rate", "16000",
         "--renderings", "1", "--shard-clips", "4", "--seed", "3", "--folders", "bach", "--format", "wav",
         "--workers", "2"): dict(workers=2),
        ("data", "tokenize", "--codec", codec_dir, "--manifest", manifest, "--out", tmp_path / "t", "--batch-size",
         "4", "--device", "cpu"): dict(batch_size=4),
        ("text", "tokenizer", "--manifest", manifest, "--out", tmp_path / "x.model", "--vocab-size", "50", "--split",
         "valid"): dict(vocab_size=50, split="valid"),
        ("train", "codec", "--data", tmp_path, "--steps", "2", "--betas", "0.6", "0.8", "--mmd-delay",
         "--no-adversarial", "--stage-latent", "residual_after"): dict(betas=(0.6, 0.8), mmd_delay=True,
                                                                        adversarial=False),
        ("train", "lm", "--tokens", tmp_path, "--pattern", "valle", "--delays", "0,1,2,3", "--text", "minilm",
         "--condition-dropout", "0.1", "--no-fused-ce"): dict(pattern="valle", fused_ce=False),
        ("generate", "a jig", "--model", tmp_path, "--codec", codec_dir, "--out", tmp_path / "o.flac", "--duration",
         "2", "--guidance", "0", "--top-k", "5", "--top-p", "0.5", "--temperature", "0.7", "--seed", "3",
         "--prompt-audio", audio, "--device", "cpu", "--backend", "torch", "--compile", "--cuda-graph"):
            dict(text="a jig", duration=2.0, compile=True),
        ("codec", "encode", audio, tmp_path / "c.pt", "--model", codec_dir): dict(output=str(tmp_path / "c.pt")),
    }
    for argv, expected in runs.items():
        assert cli.main([str(word) for word in argv]) == 0, argv
        options = seen.pop()
        for name, value in expected.items():
            assert getattr(options, name) == value, (argv, name)
    assert cli.main(["generate", "--model", str(tmp_path), "--prompts", str(manifest), "--out-dir",
                     str(tmp_path / "g"), "--batch-size", "3", "--scheduling", "bucketed"]) == 0
    options = seen.pop()
    assert options.batch_size == 3 and options.scheduling == "bucketed"
    assert cli.main(["generate", "t", "--model", str(tmp_path), "--guidance", "0"]) == 0
    sampling = seen.pop().sampling
    assert sampling.guidance_scale is None and sampling.top_k == 250  # 0: off; the default from Sampling
    assert cli.main(["data", "build", "--out", str(tmp_path / "c")]) == 0
    assert seen.pop().build.sample_rate == 32000 and not (tmp_path / "c").exists()  # nothing ran


def test_the_kv_cache_option_reaches_the_generator_and_refuses_other_dtypes(capsys, monkeypatch, tmp_path):
    from mmdgen.generate.generator import Generator

    given = []

    def record(model, *args, **kwargs):  # stands for loading the model: the options are what is checked
        given.append(kwargs)
        raise ValueError("recorded")

    monkeypatch.setattr(Generator, "from_pretrained", staticmethod(record))
    for argv, expected in ((["--kv-cache", "bfloat16"], "bfloat16"), (["--kv-cache", "float16"], "float16"),
                           ([], "model")):
        assert cli.main(["generate", "a jig", "--model", str(tmp_path), *argv]) == 2
        assert given.pop()["kv_cache"] == expected
    capsys.readouterr()
    refused(capsys, ["generate", "a jig", "--model", tmp_path, "--kv-cache", "int8"], "--kv-cache", "int8")


def test_the_cpu_linear_option_parses_and_refuses_what_cannot_be_packed(capsys, monkeypatch, tmp_path):
    seen = _record_options(monkeypatch)
    for value in ("auto", "packed", "plain"):
        assert cli.main(["generate", "a jig", "--model", str(tmp_path), "--cpu-linear", value]) == 0
        assert seen.pop().cpu_linear == value
    assert cli.main(["generate", "a jig", "--model", str(tmp_path)]) == 0 and seen.pop().cpu_linear == "auto"
    assert cli.main(["generate", "a jig", "--model", str(tmp_path), "--device", "cuda"]) == 0  # auto: plain there
    assert seen.pop().cpu_linear == "auto"
    refused(capsys, ["generate", "a jig", "--model", tmp_path, "--cpu-linear", "onednn"], "--cpu-linear", "onednn")
    refused(capsys, ["generate", "a jig", "--model", tmp_path, "--cpu-linear", "packed", "--device", "cuda"],
            "--cpu-linear packed", "--device cuda")
    refused(capsys, ["generate", "a jig", "--model", tmp_path, "--cpu-linear", "packed", "--quantize", "int8"],
            "--cpu-linear packed", "--quantize int8")
    assert not seen


# -- issue 13 item 3: NaN is never "off" -------------------------------------------------------------------------

def test_nan_or_negative_weights_and_guidance_are_refused(capsys, tmp_path):
    out = tmp_path / "run"
    for value in ("nan", "-1", "inf"):
        refused(capsys, ["train", "codec", "--data", tmp_path, "--out", out, "--mmd-weight", value], "--mmd-weight",
                value)
        refused(capsys, ["generate", "a jig", "--model", tmp_path, "--guidance", value], "--guidance", value)
    refused(capsys, ["demo", "--out", out, "--mmd-weight", "nan"], "--mmd-weight")
    refused(capsys, ["train", "lm", "--tokens", tmp_path, "--condition-dropout", "nan"], "--condition-dropout")
    assert not out.exists()
    from mmdgen.generate import Sampling
    from mmdgen.train.codec import CodecTrainConfig

    with pytest.raises(ValueError, match="mmd_weight must be a finite number >= 0, got nan"):
        CodecTrainConfig(data=str(tmp_path), mmd_weight=math.nan)
    with pytest.raises(ValueError, match="guidance_scale must be a finite number >= 0, got nan"):
        Sampling(guidance_scale=math.nan)


# -- item 5: audio with NaN or infinite samples -------------------------------------------------------------------

def test_audio_with_nan_or_infinite_samples_is_refused_by_every_reader(capsys, tmp_path, codec_dir, trained):
    model = trained[0] / "model"
    for value in (math.nan, math.inf):
        bad = _tone(tmp_path / f"bad-{value}.wav", value=value)
        refused(capsys, ["codec", "encode", bad, tmp_path / "c.pt", "--model", codec_dir], bad.name,
                "non-finite samples")
        refused(capsys, ["codec", "reconstruct", bad, tmp_path / "r.wav", "--model", codec_dir], bad.name)
        refused(capsys, ["generate", "a jig", "--model", model, "--duration", "0.5", "--prompt-audio", bad,
                         "--out", tmp_path / "g.wav"], bad.name, "non-finite samples")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bad-inf.wav", "bad-nan.wav"]


# -- item 6: values that ran as something else ---------------------------------------------------------------------

def test_durations_outside_one_frame_to_an_hour_are_refused(capsys, tmp_path, trained):
    model = trained[0] / "model"
    out = tmp_path / "x.wav"
    line = refused(capsys, ["generate", "a jig", "--model", model, "--duration", "1e-9", "--out", out], "--duration",
                   "at least one frame")
    assert "0.02 s" in line  # the codec's frame
    refused(capsys, ["generate", "a jig", "--model", model, "--duration", "1e9", "--out", out], "--duration", "3600")
    refused(capsys, ["demo", "--duration", "1e9"], "--duration")
    prompts = _prompts(tmp_path, '{"text": "a jig", "duration": 1}', '{"text": "a reel", "duration": 1e-9}')
    refused(capsys, ["generate", "--model", model, "--prompts", prompts, "--out-dir", tmp_path / "clips"],
            "prompt 00002: duration must hold at least one frame")
    assert not out.exists() and not (tmp_path / "clips").exists()  # refused before the first clip
    assert cli.main(["generate", "a jig", "--model", str(model), "--duration", "0.1", "--out", str(out)]) == 0
    assert soundfile.info(str(out)).frames == 3200


def test_batch_sizes_below_one_and_a_zero_learning_rate_are_refused(capsys, tmp_path):
    for size in ("0", "-1"):
        refused(capsys, ["generate", "--model", tmp_path, "--prompts", __file__, "--out-dir", tmp_path / "o",
                         "--batch-size", size], "--batch-size", size)
        refused(capsys, ["train", "codec", "--data", tmp_path, "--batch-size", size], "--batch-size")
        refused(capsys, ["data", "tokenize", "--codec", tmp_path, "--manifest", __file__, "--out", tmp_path / "t",
                         "--batch-size", size], "--batch-size")
    refused(capsys, ["train", "codec", "--data", tmp_path, "--lr", "0"], "--lr", "> 0")
    refused(capsys, ["train", "lm", "--tokens", tmp_path, "--lr", "0"], "--lr")


def test_data_build_refuses_a_sample_rate_it_cannot_render(capsys, tmp_path):
    for rate in ("-8000", "0", "7999", "1e5"):
        refused(capsys, ["data", "build", "--out", tmp_path / "corpus", "--sample-rate", rate], "--sample-rate")
    assert not (tmp_path / "corpus").exists()


def _prompts(tmp_path: Path, *lines: str | bytes) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))
    return path


def test_prompts_lines_with_a_list_as_text_or_an_id_with_a_newline_are_refused(capsys, tmp_path):
    base = ["generate", "--model", tmp_path, "--out-dir", tmp_path / "out", "--prompts"]
    good = '{"text": "a jig"}'
    cases = [('{"text": ["a", "b"]}', "text must be a non-empty string, got ['a', 'b']"),
             ('{"text": "a", "id": "x\\n"}', r"id must be a string of letters, digits"),
             ('{"text": "a", "id": 7}', "got 7"),
             ('{"text": "   "}', "text must be a non-empty string"),
             ('{"text": "a", "seed": 1.5}', "seed must be an integer >= 0"),
             ('{"text": "a", "durations": 3}', "unknown key 'durations'")]
    for line, expected in cases:
        refused(capsys, base + [_prompts(tmp_path, good, line)], "prompts.jsonl:2:", expected)
    refused(capsys, base + [_prompts(tmp_path, '{"text": "a", "id": "x"}', '{"text": "b", "id": "x"}')],
            "prompts.jsonl:2:", "'x' is used twice")
    assert not (tmp_path / "out").exists()
    from mmdgen.generate.batch import read_prompts

    assert [r.id for r in read_prompts(_prompts(tmp_path, good, '{"text": "b", "id": "b.2"}'), 1.0, 0)] == \
        ["00001", "b.2"]


# -- item 9: messages that named neither the option nor the file ----------------------------------------------------

def test_infinite_duration_and_outputs_that_are_existing_files_are_refused(capsys, tmp_path, codec_dir):
    existing = tmp_path / "existing.txt"
    existing.write_text("keep me")
    refused(capsys, ["generate", "a jig", "--model", tmp_path, "--duration", "inf"], "--duration", "inf")
    refused(capsys, ["generate", "--model", tmp_path, "--prompts", __file__, "--out-dir", existing], "--out-dir",
            "existing.txt", "an existing file")
    refused(capsys, ["generate", "a jig", "--model", tmp_path, "--out", tmp_path], "--out", "an existing folder")
    refused(capsys, ["generate", "a jig", "--model", tmp_path, "--out", existing / "x.wav"], "--out",
            "existing.txt is a file, not a folder")
    refused(capsys, ["data", "build", "--out", existing], "--out", "an existing file")
    refused(capsys, ["train", "codec", "--data", tmp_path, "--out", existing], "--out", "an existing file")
    refused(capsys, ["demo", "--out", existing], "--out")
    refused(capsys, ["data", "tokenize", "--codec", codec_dir, "--manifest", __file__, "--out", existing], "--out")
    refused(capsys, ["eval", "codec", codec_dir, "--manifest", __file__, "--out", existing], "--out")
    assert existing.read_text() == "keep me"


def test_a_truncated_or_misshapen_codec_file_is_named(capsys, tmp_path, codec_dir):
    audio = _tone(tmp_path / "a.wav")
    broken = tmp_path / "broken"
    shutil.copytree(codec_dir, broken)
    weights = broken / "codec.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    refused(capsys, ["codec", "encode", audio, tmp_path / "c.pt", "--model", broken], str(weights))
    refused(capsys, ["codec", "reconstruct", audio, tmp_path / "r.wav", "--model", broken], str(weights))
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"path": "a.wav", "caption": "a tone", "split": "test"}) + "\n")
    refused(capsys, ["eval", "codec", f"b={broken}", "--manifest", manifest, "--clips", "1", "--out", tmp_path / "e"],
            str(weights))
    refused(capsys, ["data", "tokenize", "--codec", broken, "--manifest", manifest, "--out", tmp_path / "t"],
            str(weights))
    cfg = codec_config("tiny")
    cfg.num_filters = 4
    shutil.copy(save_codec(Codec(cfg), tmp_path / "other") / "codec.safetensors", weights)  # other widths
    refused(capsys, ["codec", "encode", audio, tmp_path / "c.pt", "--model", broken], str(weights), "tensor ",
            "has shape")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a.wav", "broken", "m.jsonl", "other"]


def test_a_truncated_or_pickled_training_state_is_named(capsys, tmp_path, trained):
    run, args = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    state = copy / "checkpoint" / "training_state.pt"
    argv = [copy if word == run else word for word in args]
    argv[argv.index("--steps") + 1] = "2"
    state.write_bytes(state.read_bytes()[:200])
    refused(capsys, argv, str(state), "weights_only")
    torch.save({"step": Fraction(1, 3)}, state)  # an object loading would have to run code for
    refused(capsys, argv, str(state), "weights_only")
    assert not (copy / "checkpoint.tmp").exists()


def test_prompts_files_that_are_not_utf8_or_hold_a_nan_duration_are_named(capsys, tmp_path):
    base = ["generate", "--model", tmp_path, "--out-dir", tmp_path / "out", "--prompts"]
    refused(capsys, base + [_prompts(tmp_path, '{"text": "a"}', b'{"text": "caf\xe9"}')], "prompts.jsonl:2:",
            "not UTF-8")
    for value in ("NaN", "Infinity", "-1", '"5"', "0"):
        refused(capsys, base + [_prompts(tmp_path, f'{{"text": "a", "duration": {value}}}')],
                "prompts.jsonl:1: duration must be a finite number > 0")


# -- item 12: Debian package names ------------------------------------------------------------------------------------

def test_package_names_are_checked_and_never_read_as_options(tmp_path, monkeypatch):
    from mmdgen.data import external

    asked = []
    for name in ("-oops", "a/b", "Capital", "x", "", "../up"):
        with pytest.raises(ValueError, match=f"package {name!r} is not a Debian package name"):
            external.fetch_debian_music(["fine-name", name], tmp_path / "out", 16000,
                                        download=lambda *args: asked.append(args))
    assert not asked and not (tmp_path / "out").exists()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "apt-get").write_text('#!/bin/sh\necho "args: $*" >&2\nexit 100\n')
    (bin_dir / "apt-get").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(external.ExternalAudioError, match="args: download -q -- g0.1\\+x"):
        external.apt_download("g0.1+x", tmp_path)


# -- the property: random values never pass as something meaningless ---------------------------------------------

INT64 = 2**63 - 1


def _integer(low: int, high: int = INT64):
    return ("integer", lambda v: isinstance(v, int) and low <= v <= high)


def _number(test):
    return ("number", lambda v: math.isfinite(v) and test(v))


# option -> (kind, whether a value of that kind is meaningful), written from the issue and the docs, not the code
RULES = {
    "generate": {"--duration": _number(lambda v: 0 < v <= 3600), "--batch-size": _integer(1),
                 "--guidance": _number(lambda v: v >= 0), "--temperature": _number(lambda v: v >= 0),
                 "--top-k": _integer(0), "--top-p": _number(lambda v: 0 <= v <= 1), "--seed": _integer(0)},
    "train codec": {"--steps": _integer(1), "--batch-size": _integer(1), "--grad-accum": _integer(1),
                    "--lr": _number(lambda v: v > 0), "--mmd-weight": _number(lambda v: v >= 0),
                    "--crop-seconds": _number(lambda v: 0 < v <= 3600), "--mmd-every": _integer(1),
                    "--l1-weight": _number(lambda v: v >= 0), "--max-nonfinite": _integer(0), "--seed": _integer(0),
                    "--valid-clips": _integer(0), "--workers": _integer(0)},
    "train lm": {"--lr": _number(lambda v: v > 0), "--condition-dropout": _number(lambda v: 0 <= v <= 1),
                 "--grad-clip": _number(lambda v: v > 0), "--warmup-steps": _integer(0),
                 "--crop-frames": _integer(1), "--weight-decay": _number(lambda v: v >= 0),
                 "--text-dim": _integer(1)},
    "data build": {"--hours": _number(lambda v: 0 < v <= 10000), "--clip-seconds": _number(lambda v: 0.1 <= v <= 3600),
                   "--sample-rate": _integer(8000, 192000), "--renderings": _integer(1, 32),  # at most --shard-clips
                   "--shard-clips": _integer(2), "--workers": _integer(1), "--seed": _integer(0)},
}

WORDS = st.one_of(
    st.integers(min_value=-10**6, max_value=10**6).map(str),
    st.sampled_from([0, 1, -1, 2, INT64, INT64 + 1, 10**30, -10**30]).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["nan", "-nan", "inf", "-inf", "1e-9", "1e9", "1e300", "-0.0", "0.5", "1e3", "3600", "3600.5"]),
    st.sampled_from(["", "abc", "0x10", "1,5", "true", "None", "[1]", "--", "1 2", "\n", "١"]),
)


FIELD_OF = {"--guidance": "guidance_scale"}  # options named otherwise than their field


def _given_value(options, flag: str):
    """The value the command's options hold for ``flag`` (in a nested configuration if need be)."""
    name = FIELD_OF.get(flag, flag[2:].replace("-", "_"))
    for holder in (options, getattr(options, "sampling", None), getattr(options, "build", None)):
        if holder is not None and hasattr(holder, name):
            return getattr(holder, name)
    raise AssertionError(f"no field for {flag}")


def _meaning(word: str, kind: str):
    """What ``word`` stands for as an option of ``kind``, or None when it is no such value."""
    try:
        return int(word) if kind == "integer" else float(word)
    except ValueError:
        return None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(command=st.sampled_from(sorted(RULES)), data=st.data(), word=WORDS)
def test_random_values_are_refused_in_one_line_or_accepted_only_when_meaningful(command, data, word, tmp_path_factory):
    flag = data.draw(st.sampled_from(sorted(RULES[command])))
    kind, meaningful = RULES[command][flag]
    folder = tmp_path_factory.getbasetemp()
    base = {"generate": ["generate", "a jig", "--model", folder], "train codec": ["train", "codec", "--data", folder],
            "train lm": ["train", "lm", "--tokens", folder], "data build": ["data", "build", "--out", folder / "c"]}
    err = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(err):
        seen = _record_options(patch)
        rc = cli.main([str(part) for part in base[command]] + [f"{flag}={word}"])
    value = _meaning(word, kind)
    event("meaningful: accepted" if value is not None and meaningful(value) else "meaningless: refused")
    if value is not None and meaningful(value):
        assert rc == 0 and not err.getvalue(), (flag, word, err.getvalue())
        found = _given_value(seen[0], flag)
        assert found == value or (flag == "--guidance" and value == 0 and found is None)  # 0: off
    else:
        lines = err.getvalue().strip().splitlines()
        assert rc == 2 and not seen, (flag, word)
        assert len(lines) == 1 and lines[0].startswith(f"mmdgen {command}: error: ") and flag in lines[0], lines
        assert "Traceback" not in err.getvalue()



@pytest.mark.parametrize("environment, message", [
    ({"WORLD_SIZE": "abc", "RANK": "0"}, "RANK, WORLD_SIZE and LOCAL_RANK must be integers, got RANK='0' "
                                         "WORLD_SIZE='abc'"),
    ({"WORLD_SIZE": "2"}, "must be integers, got RANK=None WORLD_SIZE='2'"),
    ({"WORLD_SIZE": "2", "RANK": "5"}, r"RANK=5 must lie in [0, WORLD_SIZE=2)"),
    ({"WORLD_SIZE": "0", "RANK": "0"}, r"RANK=0 must lie in [0, WORLD_SIZE=0)"),
    ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "-1"}, "LOCAL_RANK must be >= 0, got -1"),
])
def test_a_prompts_job_under_a_broken_torchrun_environment_is_refused(monkeypatch, environment, message):
    from types import SimpleNamespace

    from mmdgen.cli.commands import _process_share

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError) as error:
        _process_share(SimpleNamespace(prompts="prompts.jsonl", device="cpu"))
    assert message in str(error.value)


@pytest.mark.parametrize("world,leaves", [("", False), ("1", False), ("x", False), ("2", True)])
def test_the_program_exits_with_mains_status_and_skips_exit_destructors_under_torchrun(monkeypatch, capsys, world,
                                                                                       leaves):
    """Under torchrun (WORLD_SIZE > 1) the flushed process leaves through os._exit; otherwise through sys.exit."""
    monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setattr(sys, "argv", ["mmdgen", "generate", "--duration", "0"])
    left = []

    def fake_exit(code):
        left.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(os, "_exit", fake_exit)
    with pytest.raises(SystemExit) as stopped:
        cli.entry()
    assert stopped.value.code == 2 and left == ([2] if leaves else [])
    assert "mmdgen generate: error:" in capsys.readouterr().err
