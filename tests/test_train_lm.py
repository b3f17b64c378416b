"""Tokenizing a corpus, the LM's teacher forcing and loss, and its trainer: exact resume, DDP, bad input."""

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from safetensors.torch import load_file, save_file

from mmdgen.data.tokenize import CODES, HEADER, TokenSet, tokenize_corpus
from mmdgen.losses.lm import IGNORE, codebook_losses
from mmdgen.model.codec import Codec, codec_config
from mmdgen.model.lm import MusicLM, lm_config
from mmdgen.model.patterns import make_pattern
from mmdgen.pretrained.directory import load_music_lm, save_codec
from mmdgen.train.lm import LMTrainConfig, LMTrainer, learning_rate, teacher_forcing
from tests.gloo_ranks import spawn_gloo_ranks

CAPTIONS = ["a calm jig on flute", "a fast reel on fiddle", "a slow air on oboe", "a baroque chorale on organ"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A tiny codec and a manifest of 10 one-second tones (train 8, valid 2), tokenized."""
    root = tmp_path_factory.mktemp("lmcorpus")
    torch.manual_seed(0)
    codec = Codec(codec_config("tiny"))
    codec.train()
    codec(torch.randn(2, 1, 6400))  # k-means initialisation of the codebooks
    save_codec(codec.eval(), root / "codec")
    t = np.arange(32000) / 32000
    lines = []
    for i in range(10):
        tone = 0.3 * np.sin(2 * np.pi * (180 + 40 * i) * t)
        soundfile.write(root / f"clip{i}.wav", tone.astype(np.float32), 32000)
        lines.append(json.dumps({"id": f"clip{i}", "path": f"clip{i}.wav", "caption": CAPTIONS[i % 4],
                                 "split": "valid" if i >= 8 else "train"}))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    tokenize_corpus(root / "codec", root / "manifest.jsonl", root / "tokens", batch_size=3, progress=False)
    return root


def test_tokenize_writes_each_clips_own_codes(corpus):
    from mmdgen.data.audio import read_audio
    from mmdgen.pretrained.directory import load_codec

    tokens = TokenSet(corpus / "tokens", "train")
    assert len(tokens) == 8 and len(TokenSet(corpus / "tokens", "valid")) == 2
    assert tokens.num_codebooks == 4 and tokens.codebook_size == 256
    codec = load_codec(corpus / "codec")
    clip = tokens[5]
    assert clip.id == "clip5" and clip.caption == CAPTIONS[1]
    expected = codec.encode(read_audio(corpus / "clip5.wav", 32000)[None])[0]
    assert torch.equal(clip.codes, expected) and clip.codes.shape == (4, 50)
    assert not (corpus / "tokens.tmp").exists()
    assert len(tokens.codec["weights_sha256"]) == 64


def test_a_token_folder_with_codes_outside_the_codebook_is_refused(corpus, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    header = json.loads((corpus / "tokens" / HEADER).read_text())
    (broken / HEADER).write_text(json.dumps(header))
    codes = load_file(str(corpus / "tokens" / CODES))
    codes["codes.train"][2, 7] = 300
    save_file(codes, str(broken / CODES))
    with pytest.raises(ValueError, match=r"codes in \[.*300\], outside the codebook \[0, 256\)"):
        TokenSet(broken, "train")
    with pytest.raises(ValueError, match="tokens.json: missing"):
        TokenSet(tmp_path, "train")


def test_teacher_forcing_shifts_the_delay_sequence_behind_the_special_token():
    codes = torch.tensor([[[1, 2, 3], [4, 5, 6]]])
    inputs, targets = teacher_forcing(codes, make_pattern("delay", 2), special=9)
    assert inputs.tolist() == [[[9, 1, 2, 3], [9, 9, 4, 5]]]
    assert targets.tolist() == [[[1, 2, 3, IGNORE], [IGNORE, 4, 5, 6]]]


@pytest.mark.parametrize("pattern", ["delay", "flatten"])
def test_fused_and_plain_losses_agree(pattern):
    torch.manual_seed(0)
    lm = MusicLM(lm_config("tiny"))
    codes = torch.randint(0, 256, (2, 4, 6))
    inputs, targets = teacher_forcing(codes, make_pattern(pattern, 4), 256)
    states, mask = torch.randn(2, 3, 64), torch.ones(2, 3, dtype=torch.bool)
    results = []
    for fused in (True, False):
        lm.zero_grad()
        loss, per_codebook = codebook_losses(lm, lm.hidden(inputs, states, mask), targets, fused=fused,
                                             backend="torch")
        loss.backward()
        results.append((loss.detach(), per_codebook, lm.layers[0].fc1.weight.grad.clone(), lm.heads[2].weight.grad))
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    assert abs(float(results[0][0]) - np.log(256)) < 0.5  # an untrained model is near uniform


def test_learning_rate_warms_up_then_decays_to_zero():
    cfg = LMTrainConfig(tokens=".", lr=1e-3, warmup_steps=10, steps=110)
    assert learning_rate(0, cfg) == pytest.approx(1e-4)
    assert learning_rate(9, cfg) == pytest.approx(1e-3)
    assert learning_rate(60, cfg) == pytest.approx(5e-4)
    assert learning_rate(110, cfg) == pytest.approx(0.0, abs=1e-12)


def _cfg(corpus, out, **overrides):
    base = dict(tokens=str(corpus / "tokens"), out=str(out), steps=4, batch_size=2, crop_frames=20, warmup_steps=2,
                text_dim=32, text_layers=1, ckpt_every=2, log_every=1, valid_every=100, backend="torch")
    return LMTrainConfig(**{**base, **overrides})


def test_stopped_and_resumed_lm_run_ends_with_the_same_weights(corpus, tmp_path):
    LMTrainer(_cfg(corpus, tmp_path / "straight"), progress=False).train()
    LMTrainer(_cfg(corpus, tmp_path / "resumed", steps=2), progress=False).train()
    resumed = LMTrainer(_cfg(corpus, tmp_path / "resumed"), progress=False)
    assert resumed.step == 2
    report = resumed.train()
    for name in ("lm", "text"):
        a = load_file(str(tmp_path / "straight" / "checkpoint" / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "resumed" / "checkpoint" / f"{name}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert set(report) >= {"nll", "nll_k0", "nll_k3", "ppl_k0"}


def test_trained_model_directory_loads_back_with_the_same_outputs(corpus, tmp_path):
    trainer = LMTrainer(_cfg(corpus, tmp_path / "run", steps=2, pattern="flatten"), progress=False)
    trainer.train()
    lm, text, config = load_music_lm(tmp_path / "run" / "model")
    assert config["lm"]["pattern"] == "flatten" and config["codec"] == trainer.codec
    tokens = torch.randint(0, 257, (2, 4, 7))
    trainer.model.eval()
    with torch.no_grad():
        expected_condition = trainer.text(["a calm jig on flute", ""])
        got_condition = text(["a calm jig on flute", ""])
        assert torch.allclose(got_condition.states, expected_condition.states)
        assert torch.allclose(lm(tokens, got_condition.states, got_condition.mask),
                              trainer.lm(tokens, expected_condition.states, expected_condition.mask), atol=1e-6)


def test_the_lm_learns_the_corpus(corpus, tmp_path):
    trainer = LMTrainer(_cfg(corpus, tmp_path / "learn", steps=40, lr=3e-3, warmup_steps=5, condition_dropout=0.0,
                             valid_every=1000), progress=False)
    before = trainer.validate()["nll"]
    after = trainer.train()["nll"]
    assert after < before - 1.0, (before, after)  # nats per code, from near log(256) = 5.5


def test_bad_lm_configurations_fail_before_training(corpus, tmp_path):
    with pytest.raises(ValueError, match=r"delays=\(0, 1\) has length 2.*K=4"):
        LMTrainer(_cfg(corpus, tmp_path / "a", delays="0,1"), progress=False)
    with pytest.raises(ValueError, match="no 'train' clip has 80 frames"):
        LMTrainer(_cfg(corpus, tmp_path / "b", crop_frames=80), progress=False)
    with pytest.raises(ValueError, match="tokens .*nowhere: no such folder"):
        LMTrainer(_cfg(corpus, tmp_path / "c", tokens=str(tmp_path / "nowhere")), progress=False)
    with pytest.raises(ValueError, match="text t5 needs text_path"):
        LMTrainer(_cfg(corpus, tmp_path / "d", text="t5"), progress=False)
    LMTrainer(_cfg(corpus, tmp_path / "e", steps=2), progress=False).train()
    with pytest.raises(ValueError, match="another configuration.*pattern"):
        LMTrainer(_cfg(corpus, tmp_path / "e", pattern="parallel"), progress=False)


def _ddp_worker(rank, world, corpus, out, dropout):
    trainer = LMTrainer(_cfg(corpus, out, steps=2, ckpt_every=5, condition_dropout=dropout), progress=False)
    trainer.train()
    torch.save({k: v for k, v in trainer.model.state_dict().items()}, f"{out}/rank{rank}.pt")


@pytest.mark.parametrize("dropout", [0.0, 1.0], ids=["captions", "all-dropped"])
def test_lm_ddp_on_two_gloo_processes_keeps_ranks_identical(corpus, tmp_path, dropout):
    """All captions dropped: the learned text encoder gets no gradient, which DDP must accept."""
    out = tmp_path / "ddp"
    out.mkdir()
    spawn_gloo_ranks(_ddp_worker, 2, tmp_path / "init", corpus, str(out), dropout)
    a, b = (torch.load(out / f"rank{r}.pt") for r in range(2))
    single = LMTrainer(_cfg(corpus, tmp_path / "single", steps=1), progress=False).model.state_dict()
    assert any(not torch.equal(a[k], single[k]) for k in a)  # the ranks trained
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key


def test_resuming_on_codes_of_another_codec_is_refused(corpus, tmp_path):
    LMTrainer(_cfg(corpus, tmp_path / "run", steps=2), progress=False).train()
    other = tmp_path / "other-tokens"
    header = json.loads((corpus / "tokens" / HEADER).read_text())
    header["codec"]["weights_sha256"] = "0" * 64
    other.mkdir()
    (other / HEADER).write_text(json.dumps(header))
    (other / CODES).write_bytes((corpus / "tokens" / CODES).read_bytes())
    with pytest.raises(ValueError, match="another configuration.*codec"):
        LMTrainer(_cfg(corpus, tmp_path / "run", tokens=str(other)), progress=False)


def test_a_frozen_minilm_conditioner_is_neither_trained_nor_checkpointed(corpus, tmp_path):
    trainer = LMTrainer(_cfg(corpus, tmp_path / "minilm", steps=1, text="minilm"), progress=False)
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in optimised for p in trainer.text.parameters())
    assert trainer.lm_cfg.text_dim == 384
    trainer.train()
    assert sorted(p.name for p in (tmp_path / "minilm" / "checkpoint").glob("*.safetensors")) == ["lm.safetensors"]
    lm, text, _ = load_music_lm(tmp_path / "minilm" / "model")
    assert text.dim == 384 and lm.cfg.text_dim == 384


def test_tokenize_text_tokenizer_and_train_lm_commands(corpus, tmp_path, capsys):
    from mmdgen import cli

    tokens = tmp_path / "tokens"
    assert cli.main(["data", "tokenize", "--codec", str(corpus / "codec"), "--manifest", str(corpus / "manifest.jsonl"),
                     "--out", str(tokens)]) == 0
    assert "10 clips, 4 x 256 codes at 50 frames/s" in capsys.readouterr().out
    assert cli.main(["text", "tokenizer", "--manifest", str(corpus / "manifest.jsonl"), "--out",
                     str(tmp_path / "captions.model"), "--vocab-size", "5000"]) == 0
    assert "sentencepiece model with" in capsys.readouterr().out
    out = tmp_path / "lm"
    assert cli.main(["train", "lm", "--tokens", str(tokens), "--out", str(out), "--steps", "2", "--batch-size", "2",
                     "--crop-frames", "20", "--text-path", str(tmp_path / "captions.model"), "--text-dim", "32",
                     "--pattern", "valle"]) == 0
    assert load_music_lm(out / "model")[2]["lm"]["pattern"] == "valle"
    assert cli.main(["train", "lm", "--tokens", str(tokens), "--out", str(out), "--delays", "0,x"]) == 2
    assert "delays must be comma-separated integers" in capsys.readouterr().err


def test_the_exported_model_directory_generates_with_its_bundled_codec(corpus, tmp_path):
    from mmdgen.generate import Generator, Sampling

    LMTrainer(_cfg(corpus, tmp_path / "run", steps=1), progress=False).train()
    model = tmp_path / "run" / "model"
    assert (model / "codec" / "codec.safetensors").read_bytes() == (corpus / "codec" / "codec.safetensors").read_bytes()
    audio = Generator.from_pretrained(model).generate(["a calm jig on flute"], duration=0.1, sampling=Sampling(top_k=5))
    assert audio.shape == (1, 1, 3200) and torch.isfinite(audio).all()
    other = Codec(codec_config("tiny"))
    save_codec(other, tmp_path / "other-codec")
    with pytest.raises(ValueError, match="is not the codec .* was trained on"):
        Generator.from_pretrained(model, codec=tmp_path / "other-codec")


def test_generate_command_for_one_text_and_for_a_prompts_file(corpus, tmp_path, capsys):
    from mmdgen import cli

    LMTrainer(_cfg(corpus, tmp_path / "run", steps=1), progress=False).train()
    model = str(tmp_path / "run" / "model")
    one = tmp_path / "one.wav"
    assert cli.main(["generate", "a calm jig on flute", "--model", model, "--duration", "0.1", "--out", str(one),
                     "--top-k", "5"]) == 0
    assert soundfile.info(str(one)).frames == 3200
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"text": "a fast reel", "id": "reel"}\n{"text": "a slow air"}\n'
                       '{"text": "a chorale", "duration": 0.06}\n')
    outs = tmp_path / "outs"
    args = ["generate", "--prompts", str(prompts), "--model", model, "--out-dir", str(outs), "--duration", "0.1",
            "--batch-size", "2"]
    assert cli.main(args) == 0
    assert "3 clips generated, 0 already there" in capsys.readouterr().out
    manifest = [json.loads(line) for line in (outs / "manifest.jsonl").read_text().splitlines()]
    assert [m["id"] for m in manifest] == ["reel", "00002", "00003"]
    assert [m["seed"] for m in manifest] == [1, 2, 3]  # continuous batching: each clip its own noise
    assert soundfile.info(str(outs / "00003.wav")).frames == 1920
    assert cli.main(args) == 0
    assert "0 clips generated, 3 already there" in capsys.readouterr().out
    assert cli.main([*args[:5], "--out-dir", str(tmp_path / "bucketed"), *args[7:], "--scheduling", "bucketed"]) == 0
    bucketed = [json.loads(line) for line in (tmp_path / "bucketed" / "manifest.jsonl").read_text().splitlines()]
    assert [m["seed"] for m in bucketed] == [1, 1, 3]  # one batch of two 0.1 s clips, one generator
    prompts.write_text('{"text": "fine"}\n{"caption": "no text key"}\n')
    assert cli.main(args) == 2
    assert "prompts.jsonl:2: expected a JSON object with a \"text\"" in capsys.readouterr().err
    assert cli.main(["generate", "--model", model]) == 2
    assert "give either a text or --prompts" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.tmp"))


def _lm_args(tokens, out, *extra):
    return ["train", "lm", "--tokens", str(tokens), "--out", str(out), "--batch-size", "2", "--crop-frames", "20",
            "--warmup-steps", "2", "--text-dim", "32", "--text-layers", "1", "--log-every", "1", "--ckpt-every", "1",
            "--valid-every", "100", "--backend", "torch", *extra]


def _logged_steps(run):
    records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [record["step"] for record in records if record["kind"] == "train"]


def test_a_checkpoint_with_the_skip_count_at_its_limit_resumes_with_new_optimisation_settings(corpus, tmp_path,
                                                                                             monkeypatch, capsys,
                                                                                             caplog):
    """Steps 2 and 3 have non-finite losses: the run stops at step 3 (2 in a row > --max-nonfinite 1), its checkpoint
    (step 2) holds one skip, the limit. A resume with a higher limit and another --lr skips step 3 again, then the
    good steps reset the count and follow the new schedule."""
    from mmdgen import cli

    real = LMTrainer._losses

    def poisoned(self, model, batch, captions):
        loss, per_codebook = real(self, model, batch, captions)
        return (loss * float("nan"), per_codebook) if self.step in (1, 2) else (loss, per_codebook)

    monkeypatch.setattr(LMTrainer, "_losses", poisoned)
    run = tmp_path / "run"
    assert cli.main(_lm_args(corpus / "tokens", run, "--steps", "5", "--max-nonfinite", "1")) == 2
    error = capsys.readouterr().err
    assert "step 3: non-finite loss; 2 steps in a row skipped, more than max_nonfinite=1 (--max-nonfinite)" in error
    assert f"{run / 'checkpoint'} holds the state before them" in error
    state = torch.load(run / "checkpoint" / "training_state.pt", weights_only=True)
    assert (state["step"], state["skipped"], state["skipped_in_a_row"]) == (2, 1, 1)
    assert not (run / "model").exists() and _logged_steps(run) == [1, 2, 3]
    with caplog.at_level(logging.WARNING):
        assert cli.main(_lm_args(corpus / "tokens", run, "--steps", "5", "--max-nonfinite", "3", "--lr", "2e-3",
                                 "--warmup-steps", "3")) == 0
    for change in ("max_nonfinite changed: 1 -> 3", "lr changed: 0.001 -> 0.002", "warmup_steps changed: 2 -> 3"):
        assert f"{run / 'checkpoint'}: resuming at step 2 with {change}" in caplog.text
    records = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5] and [r.get("skipped") for r in records] == [
        None, 1.0, 1.0, None, None]
    new = LMTrainConfig(tokens=".", steps=5, lr=2e-3, warmup_steps=3)
    assert [r["lr"] for r in records[2:]] == [pytest.approx(learning_rate(step, new)) for step in (2, 3, 4)]
    state = torch.load(run / "checkpoint" / "training_state.pt", weights_only=True)
    assert (state["step"], state["skipped"], state["skipped_in_a_row"]) == (5, 2, 0)
    assert [g["lr"] for g in state["optimizers"]["lm"]["param_groups"]] == [pytest.approx(learning_rate(4, new))] * 2
    assert load_music_lm(run / "model")[0].cfg.num_codebooks == 4


def test_a_torn_last_line_of_the_metrics_is_dropped_on_resume(corpus, tmp_path, capsys, caplog):
    from mmdgen import cli

    run = tmp_path / "run"
    assert cli.main(_lm_args(corpus / "tokens", run, "--steps", "2")) == 0
    metrics = run / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"kind": "train", "step": 3, "time": 17')  # the run was killed while appending step 3
    with caplog.at_level(logging.WARNING):
        assert cli.main(_lm_args(corpus / "tokens", run, "--steps", "3")) == 0
    assert f"{metrics}: dropped a torn final line" in caplog.text
    assert _logged_steps(run) == [1, 2, 3]
    metrics.write_text(metrics.read_text().replace('"step": 2', '"step" 2'))  # damaged, not torn: refused
    assert cli.main(_lm_args(corpus / "tokens", run, "--steps", "4")) == 2
    assert f"{metrics}:2: not valid JSON" in capsys.readouterr().err


def _copy_checkpoint_as_before_relative_paths(checkpoint):
    """The checkpoint as runs before relative paths wrote it: every path as given, the settings a resume could
    change then left out, the count of skips in a row missing from the training state."""
    config = json.loads((checkpoint / "config.json").read_text())
    run = Path(config["train"]["out"])
    config["train"]["tokens"] = str((run / config["train"]["tokens"]).resolve())
    config["text"]["config"]["tokenizer_path"] = str(run / "text_tokenizer.model")
    for name in ("steps", "out", "log_every", "ckpt_every", "valid_every", "workers", "device", "compile", "backend"):
        del config["train"][name]
    (checkpoint / "config.json").write_text(json.dumps(config, indent=1))
    state = torch.load(checkpoint / "training_state.pt", weights_only=True)
    del state["skipped_in_a_row"]
    torch.save(state, checkpoint / "training_state.pt")


def test_a_moved_or_copied_run_folder_resumes(corpus, tmp_path, capsys, caplog):
    from mmdgen import cli

    project = tmp_path / "project"
    shutil.copytree(corpus / "tokens", project / "tokens")
    run = project / "runs" / "lm"
    assert cli.main(_lm_args(project / "tokens", run, "--steps", "1")) == 0
    saved = json.loads((run / "checkpoint" / "config.json").read_text())
    assert (saved["train"]["tokens"], saved["train"]["out"]) == ("../../tokens", str(run))
    assert saved["text"]["config"]["tokenizer_path"] == "text_tokenizer.model"
    # the project copied elsewhere: the run folder and its tokens together
    shutil.copytree(project, tmp_path / "copy")
    assert cli.main(_lm_args(tmp_path / "copy" / "tokens", tmp_path / "copy" / "runs" / "lm", "--steps", "2")) == 0
    # the run folder moved alone, its tokens where they were
    moved = tmp_path / "elsewhere" / "lm"
    shutil.move(run, moved)
    with caplog.at_level(logging.WARNING):
        assert cli.main(_lm_args(project / "tokens", moved, "--steps", "2")) == 0
    assert f"resuming at step 1 with out changed: {run} -> {moved}" in caplog.text
    # a checkpoint written before paths were relative resumes when nothing moved
    _copy_checkpoint_as_before_relative_paths(moved / "checkpoint")
    assert cli.main(_lm_args(project / "tokens", moved, "--steps", "3")) == 0
    assert json.loads((moved / "checkpoint" / "config.json").read_text())["train"]["tokens"] == "../../project/tokens"
    # other tokens (a copy that moved neither with the run nor stayed where it was) are still another configuration
    capsys.readouterr()
    assert cli.main(_lm_args(tmp_path / "copy" / "tokens", moved, "--steps", "4")) == 2
    assert f"{moved / 'checkpoint'} was written by a run with another configuration (differs in tokens)" in \
        capsys.readouterr().err


def test_an_lm_directory_is_not_written_with_a_non_finite_weight(corpus, tmp_path):
    trainer = LMTrainer(_cfg(corpus, tmp_path / "run", steps=1), progress=False)
    trainer.train()
    model = tmp_path / "run" / "model"
    before = {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()}
    with torch.no_grad():
        trainer.text.token_embedding.weight[3, 1] = float("nan")
    with pytest.raises(ValueError, match=rf"{model / 'text.safetensors'}: not written: tensor token_embedding.weight "
                                         r"of the text encoder holds 1 non-finite"):
        trainer.export()
    assert {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()} == before
