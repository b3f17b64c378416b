"""Fine-tuning (issue 17 items 1-3): ``train lm --init`` from every format the loader reads (an mmdgen LM directory,
a transformers MusicGen folder, audiocraft's files, a cache id), on tokens of its codec (``data tokenize --codec``
the same model); the frozen text encoder's states cached in the token folder (equal to recomputing them, never
recomputed during training); the fine-tuned model generating, exporting and reloading; options that disagree with
the model refused; ``train codec --init`` from a transformers EnCodec, its tokens training an LM; activation
checkpointing (same gradients, fewer saved activations) and AdamW with bf16 moments (against a float64 reference,
exact resume). Random weights at small widths throughout; FSDP is in tests/test_fsdp.py."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from safetensors import safe_open

from mmdgen import cli
from mmdgen.data.text_states import CACHE_FOLDER, CachedTextStates, cache_path, conditioner_key, fill_text_cache
from mmdgen.data.tokenize import tokenize_corpus
from mmdgen.model.codec import Codec, codec_config
from mmdgen.model.convert import codec_to_transformers
from mmdgen.model.lm import MusicLM, lm_config
from mmdgen.model.text import T5TextEncoder
from mmdgen.pretrained import export_model, load_codec_model, load_music_lm, load_music_model, save_codec
from mmdgen.pretrained.directory import tensors_sha256
from mmdgen.train.codec import CodecTrainConfig, CodecTrainer
from mmdgen.train.lm import LMTrainConfig, LMTrainer
from mmdgen.train.optim import BF16StateAdamW
from tests.test_export import SAMPLE_RATE, TEXTS, learned_lm_dir, make_t5_folder, t5_lm_dir

CAPTIONS = TEXTS + ["a calm reel on flute", "a fast jig on fiddle"]  # words the word-level T5 tokenizer knows
FORMATS = ("mmdgen", "transformers", "audiocraft", "cache-id")
REPO_ID = "someone/musicgen-tiny"


# -- fixtures: one random model in every format, a corpus at its sample rate ---------------------------------------

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The same random model (T5 conditioner, 400 Hz codec, 4 x 32 codes) as an mmdgen LM directory, a transformers
    MusicGen folder, audiocraft's exported files and a repository id in a Hugging Face cache tree."""
    root = tmp_path_factory.mktemp("models")
    t5 = make_t5_folder(root / "t5")
    source = t5_lm_dir(root / "mmdgen" / "model", t5)
    export_model(source, root / "transformers", "transformers")
    export_model(source, root / "audiocraft", "audiocraft")
    repo = root / "hub" / ("models--" + REPO_ID.replace("/", "--"))
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for file in (root / "transformers").iterdir():  # the cache's layout: snapshot files link to blobs
        blob = repo / "blobs" / file.name
        blob.parent.mkdir(exist_ok=True)
        os.link(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    return {"t5": t5, "mmdgen": source, "transformers": root / "transformers", "audiocraft": root / "audiocraft",
            "cache-id": REPO_ID, "hub": root / "hub"}


@pytest.fixture
def hub(models, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(models["hub"]))
    return models


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """Ten one-second tones at the models' 400 Hz (train 8, valid 2), four captions."""
    root = tmp_path_factory.mktemp("corpus")
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    lines = []
    for i in range(10):
        tone = 0.3 * np.sin(2 * np.pi * (20 + 9 * i) * t) + 0.1 * np.sin(2 * np.pi * (130 - 7 * i) * t)
        soundfile.write(root / f"clip{i}.wav", tone.astype(np.float32), SAMPLE_RATE)
        lines.append(json.dumps({"id": f"clip{i}", "path": f"clip{i}.wav", "caption": CAPTIONS[i % 4],
                                 "split": "valid" if i >= 8 else "train"}))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return root / "manifest.jsonl"


def _lm_cfg(tokens, out, **overrides) -> LMTrainConfig:
    base = dict(tokens=str(tokens), out=str(out), steps=2, batch_size=2, crop_frames=20, warmup_steps=1,
                ckpt_every=2, log_every=1, valid_every=100, backend="torch", lr=1e-2)
    return LMTrainConfig(**{**base, **overrides})


def _equal_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- train lm --init ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_init_from_each_format_starts_from_the_models_weights_and_trains_on_its_codecs_tokens(hub, manifest, tmp_path,
                                                                                              fmt):
    source = str(hub[fmt])
    tokens = tmp_path / "tokens"
    header = tokenize_corpus(source, manifest, tokens, progress=False)
    published = load_music_model(source, text_encoder=hub["t5"] if fmt == "audiocraft" else None)
    assert header["codec_dir"] and ("weights_sha256" in header["codec"]) == (fmt == "mmdgen")
    if fmt != "mmdgen":  # a published codec is known by its tensors
        assert header["codec"]["tensors_sha256"] == tensors_sha256(published.codec)
    trainer = LMTrainer(_lm_cfg(tokens, tmp_path / "run", init=source,
                                text_path=str(hub["t5"]) if fmt == "audiocraft" else ""), progress=False)
    assert _equal_state(trainer.lm.state_dict(), published.lm.state_dict())
    assert trainer.lm_cfg.pattern == "delay" and trainer.lm.training
    assert trainer.text_record == {"kind": "t5", "path": str(Path(published.text.folder).resolve())}
    assert [p.name for p in (tokens / CACHE_FOLDER).iterdir()] == [f"{conditioner_key(published.text)}.safetensors"]
    trainer.train()
    lm, text, config = load_music_lm(tmp_path / "run" / "model")
    assert not _equal_state(lm.state_dict(), published.lm.state_dict())  # it trained
    assert config["codec"] == header["codec"] and config["text"]["kind"] == "t5"
    bundled = load_codec_model(tmp_path / "run" / "model")
    assert _equal_state(bundled.state_dict(), published.codec.state_dict())
    reloaded = load_music_model(tmp_path / "run" / "model")  # the bundled codec checks against the recorded identity
    assert _equal_state(reloaded.lm.state_dict(), lm.state_dict())


@pytest.fixture(scope="module")
def finetuned(models, manifest, tmp_path_factory):
    """A transformers MusicGen fine-tuned through the command line."""
    root = tmp_path_factory.mktemp("finetuned")
    source = str(models["transformers"])
    assert cli.main(["data", "tokenize", "--codec", source, "--manifest", str(manifest), "--out",
                     str(root / "tokens")]) == 0
    assert cli.main(["train", "lm", "--init", source, "--tokens", str(root / "tokens"), "--out", str(root / "run"),
                     "--steps", "2", "--batch-size", "2", "--crop-frames", "20", "--warmup-steps", "1", "--lr", "1e-2",
                     "--backend", "torch", "--activation-checkpointing", "--optimizer-state", "bf16"]) == 0
    return root


def test_a_finetuned_model_generates_exports_and_reloads(finetuned, tmp_path):
    model = finetuned / "run" / "model"
    out = tmp_path / "out.wav"
    assert cli.main(["generate", TEXTS[0], "--model", str(model), "--duration", "0.1", "--out", str(out),
                     "--top-k", "5"]) == 0
    assert soundfile.info(str(out)).frames == 40
    assert cli.main(["export", str(model), "--format", "transformers", "--out", str(tmp_path / "exported")]) == 0
    ours, exported = load_music_model(model), load_music_model(tmp_path / "exported")
    assert exported.format == "transformers"
    for part in ("lm", "text", "codec"):
        assert _equal_state(getattr(ours, part).state_dict(), getattr(exported, part).state_dict()), part
    assert ours.lm.cfg == exported.lm.cfg


def test_text_states_are_computed_once_per_caption_and_equal_recomputing(models, tmp_path, monkeypatch):
    text = T5TextEncoder.from_folder(models["t5"])
    path = cache_path(tmp_path, conditioner_key(text))
    fill_text_cache(path, text, CAPTIONS[:3] + ["", "  "])
    cached = CachedTextStates(path, text.dim)
    for captions in (CAPTIONS[:3], [CAPTIONS[1], "", CAPTIONS[0]], ["", ""], [CAPTIONS[2]]):
        expected, got = text(captions), cached(captions)
        assert torch.equal(got.mask, expected.mask), captions
        torch.testing.assert_close(got.states, expected.states, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match=rf"{path}: no cached text states for the caption 'a fast jig on fiddle'"):
        cached([CAPTIONS[3]])
    calls = []
    real = T5TextEncoder.encode_texts
    monkeypatch.setattr(T5TextEncoder, "encode_texts", lambda self, c: calls.append(list(c)) or real(self, c))
    before = {k: v.clone() for k, v in cached.states.items()}
    fill_text_cache(path, text, CAPTIONS)  # only the new caption is encoded; the others keep their states
    assert calls == [[CAPTIONS[3]]]
    with safe_open(str(path), "pt") as f:
        assert json.loads(f.metadata()["captions"]) == sorted(CAPTIONS[:3]) + [CAPTIONS[3]]
    after = CachedTextStates(path, text.dim).states
    assert all(torch.equal(after[c], before[c]) for c in before)
    other = T5TextEncoder.from_folder(make_t5_folder(tmp_path / "other-t5", seed=1))
    assert conditioner_key(other) != conditioner_key(text)  # another encoder never reads these states


def test_training_reads_the_cached_states_and_never_runs_the_frozen_encoder(models, manifest, tmp_path, monkeypatch):
    tokens = tmp_path / "tokens"
    tokenize_corpus(models["transformers"], manifest, tokens, progress=False)
    init = str(models["transformers"])
    uncached = LMTrainer(_lm_cfg(tokens, tmp_path / "uncached", init=init, text_cache=False, condition_dropout=0.5),
                         progress=False)
    assert not (tokens / CACHE_FOLDER).exists()
    uncached.train()
    calls = []
    real = T5TextEncoder.encode_texts
    monkeypatch.setattr(T5TextEncoder, "encode_texts", lambda self, c: calls.append(len(c)) or real(self, c))
    trainer = LMTrainer(_lm_cfg(tokens, tmp_path / "cached", init=init, condition_dropout=0.5), progress=False)
    assert sum(calls) == len(set(CAPTIONS)) and isinstance(trainer.model.text, CachedTextStates)
    assert next(trainer.text.parameters()).device.type == "cpu"
    calls.clear()
    trainer.train()
    assert calls == []
    records = [[json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
               for run in ("uncached", "cached")]
    assert [r["step"] for r in records[1]] == [1, 2, 2]
    for a, b in zip(*records):
        key = "loss" if a["kind"] == "train" else "nll"
        assert a["kind"] == b["kind"] and a[key] == pytest.approx(b[key], rel=1e-5)


def test_options_that_disagree_with_the_init_model_are_refused(models, manifest, tmp_path, capsys):
    tokens = tmp_path / "tokens"
    tokenize_corpus(models["transformers"], manifest, tokens, progress=False)
    init = str(models["transformers"])
    for options, message in [
        (dict(preset="small"), r"init .* disagrees with the options: preset small \(dim 1024, layers 24, heads 16, "
                               r"ffn_dim 4096\) is not its size \(dim 32, layers 2, heads 4, ffn_dim 64\)"),
        (dict(pattern="flatten", delays="0,0,0,0", text="learned"),
         r"pattern flatten is not its pattern \(delay\); delays 0,0,0,0 are not its delays \(0,1,2,3\); text learned "
         r"is not its text conditioner \(t5\); leave them out"),
        (dict(text_dim=16), r"text_dim 16 sizes a learned encoder \(its conditioner is t5\)"),
        (dict(text_path=str(models["t5"])), r"text_path .*: init .* brings its own text conditioner"),
    ]:
        with pytest.raises(ValueError, match=message):
            LMTrainer(_lm_cfg(tokens, tmp_path / "run", init=init, **options), progress=False)
    assert LMTrainer(_lm_cfg(tokens, tmp_path / "fits", init=init, pattern="delay", delays="0,1,2,3", text="t5"),
                     progress=False).lm_cfg.dim == 32
    codec = Codec(codec_config("tiny"))  # 4 x 256 codes: not what the LM predicts
    save_codec(codec, tmp_path / "codec")
    tokenize_corpus(tmp_path / "codec", manifest, tmp_path / "other-tokens", progress=False)
    args = ["train", "lm", "--init", init, "--tokens", str(tmp_path / "other-tokens"), "--out", str(tmp_path / "x")]
    assert cli.main(args) == 2
    assert (f"its LM predicts 4 x 32 codes, the tokens of {tmp_path / 'other-tokens'} hold 4 x 256; tokenize with its "
            f"codec: mmdgen data tokenize --codec {init}") in capsys.readouterr().err
    assert cli.main(args[:-2] + ["--out", str(tmp_path / "x"), "--tokens", str(tokens), "--preset", "mini"]) == 2
    assert "--init" in (err := capsys.readouterr().err) and "--preset mini (dim 128" in err


def test_init_from_an_lm_with_a_learned_text_encoder_trains_the_encoder_on(manifest, tmp_path):
    source = learned_lm_dir(tmp_path / "learned" / "model")
    tokens = tmp_path / "tokens"
    tokenize_corpus(source, manifest, tokens, progress=False)
    original = load_music_model(source)
    trainer = LMTrainer(_lm_cfg(tokens, tmp_path / "run", init=str(source), text_dim=32, text_layers=1),
                        progress=False)
    assert _equal_state(trainer.text.state_dict(), original.text.state_dict())
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in optimised for p in trainer.text.parameters())
    assert trainer.text_record["kind"] == "learned" and not (tokens / CACHE_FOLDER).exists()
    with pytest.raises(ValueError, match=r"text_dim 16 is not its learned encoder's dim \(32\)"):
        LMTrainer(_lm_cfg(tokens, tmp_path / "other", init=str(source), text_dim=16), progress=False)
    trainer.train()
    tuned = load_music_model(tmp_path / "run" / "model")
    assert not _equal_state(tuned.text.state_dict(), original.text.state_dict())
    assert tuned.text([TEXTS[0]]).states.shape[-1] == 32


def test_a_resumed_finetuning_run_keeps_its_checkpoint(models, manifest, tmp_path):
    tokens = tmp_path / "tokens"
    tokenize_corpus(models["mmdgen"], manifest, tokens, progress=False)
    init = str(models["mmdgen"])
    LMTrainer(_lm_cfg(tokens, tmp_path / "straight", init=init, steps=4), progress=False).train()
    LMTrainer(_lm_cfg(tokens, tmp_path / "resumed", init=init, steps=2), progress=False).train()
    resumed = LMTrainer(_lm_cfg(tokens, tmp_path / "resumed", init=init, steps=4), progress=False)
    assert resumed.step == 2
    resumed.train()
    a, b = (load_music_lm(tmp_path / run / "model")[0].state_dict() for run in ("straight", "resumed"))
    assert _equal_state(a, b)
    with pytest.raises(ValueError, match="another configuration .*differs in .*lm"):  # without --init: a tiny LM
        LMTrainer(_lm_cfg(tokens, tmp_path / "resumed", steps=5), progress=False)


# -- train codec --init ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def encodec(tmp_path_factory):
    """A transformers EncodecModel folder (the tiny preset's shape, k-means codebooks) and clips at 32 kHz."""
    root = tmp_path_factory.mktemp("encodec")
    torch.manual_seed(0)
    codec = Codec(codec_config("tiny"))
    codec.train()
    codec(0.3 * torch.randn(2, 1, 6400))  # k-means initialisation of the codebooks
    codec_to_transformers(codec.eval()).save_pretrained(root / "encodec")
    t = np.arange(8000) / 32000
    lines = []
    for i in range(6):
        tone = 0.3 * np.sin(2 * np.pi * (200 + 60 * i) * t)
        soundfile.write(root / f"clip{i}.wav", tone.astype(np.float32), 32000)
        lines.append(json.dumps({"id": f"c{i}", "path": f"clip{i}.wav", "caption": CAPTIONS[i % 4],
                                 "split": "valid" if i >= 5 else "train"}))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _codec_cfg(encodec, out, **overrides) -> CodecTrainConfig:
    base = dict(data=str(encodec / "manifest.jsonl"), out=str(out), steps=2, batch_size=2, crop_seconds=0.1,
                disc_filters=4, mmd_weight=10.0, mmd_delay=True, ckpt_every=2, log_every=1, valid_every=100)
    return CodecTrainConfig(**{**base, **overrides})


def test_codec_init_fine_tunes_a_published_encodec_whose_tokens_train_an_lm(encodec, tmp_path):
    published = load_codec_model(encodec / "encodec")
    trainer = CodecTrainer(_codec_cfg(encodec, tmp_path / "codec", init=str(encodec / "encodec")), progress=False)
    assert _equal_state(trainer.codec.state_dict(), published.state_dict()) and trainer.codec.training
    assert not trainer.codec_cfg.quantizer.kmeans_init  # the published codebooks are kept, not re-initialised
    fresh = CodecTrainer(_codec_cfg(encodec, tmp_path / "fresh"), progress=False)
    assert trainer.codec_cfg.ratios == fresh.codec_cfg.ratios and trainer.disc.state_dict().keys() == \
        fresh.disc.state_dict().keys()
    report = trainer.train()
    assert {"mel_distance", "mi_percent_delay"} <= set(report)
    finetuned = load_codec_model(tmp_path / "codec" / "model")
    assert not _equal_state(finetuned.state_dict(), published.state_dict())
    header = tokenize_corpus(tmp_path / "codec" / "model", encodec / "manifest.jsonl", tmp_path / "tokens",
                             progress=False)
    assert "weights_sha256" in header["codec"]
    lm = LMTrainer(_lm_cfg(tmp_path / "tokens", tmp_path / "lm", steps=1, batch_size=2, crop_frames=10, text_dim=32,
                           text_layers=1), progress=False)
    lm.train()
    assert load_music_model(tmp_path / "lm" / "model").codec.cfg == finetuned.cfg


def test_a_codec_preset_that_disagrees_with_the_init_codec_is_refused(encodec, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"--init .*encodec disagrees with --preset paper: dimension 32 \(the "
                                         r"preset's 128\), .*num_filters 8 \(the preset's 64\)"):
        from mmdgen.validation import option_names

        with option_names():
            CodecTrainer(_codec_cfg(encodec, tmp_path / "a", init=str(encodec / "encodec"), preset="paper"),
                         progress=False)
    assert CodecTrainer(_codec_cfg(encodec, tmp_path / "b", init=str(encodec / "encodec"), preset="tiny"),
                        progress=False).codec_cfg.dimension == 32


# -- memory: activation checkpointing, bf16 optimiser state ------------------------------------------------------

def _saved_activation_bytes(lm: MusicLM, tokens, states, mask) -> tuple[int, dict]:
    """Bytes autograd keeps for the backward pass, and the gradients."""
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    lm.zero_grad()
    torch.manual_seed(5)  # dropout draws
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = lm(tokens, states, mask).logsumexp(-1).mean()
    loss.backward()
    return sum(saved), {name: p.grad.clone() for name, p in lm.named_parameters()}


def test_activation_checkpointing_gives_the_same_gradients_with_fewer_saved_activations():
    torch.manual_seed(0)
    lm = MusicLM(lm_config("tiny", layers=3, dropout=0.1, codebook_size=37)).train()
    tokens = torch.randint(0, 38, (3, 4, 23))
    states, mask = torch.randn(3, 5, 64), torch.tensor([[1] * 5, [1] * 2 + [0] * 3, [0] * 5]).bool()
    plain_bytes, plain = _saved_activation_bytes(lm, tokens, states, mask)
    lm.activation_checkpointing = True
    checkpointed_bytes, checkpointed = _saved_activation_bytes(lm, tokens, states, mask)
    assert checkpointed.keys() == plain.keys()
    for name in plain:  # the dropout masks are drawn again identically in the recomputation
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)
    assert checkpointed_bytes < plain_bytes / 2, (checkpointed_bytes, plain_bytes)


def _reference_adamw(params, grads, lr, betas, eps, weight_decay, round_moments):
    """AdamW in float64; with ``round_moments`` the moments are stored in bf16 (each step updates them from the
    stored values and uses the unrounded result)."""
    params = [p.double().clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for step, step_grads in enumerate(grads, start=1):
        for i, (p, g) in enumerate(zip(params, step_grads)):
            g = g.double()
            first = betas[0] * m[i] + (1 - betas[0]) * g
            second = betas[1] * v[i] + (1 - betas[1]) * g * g
            p.mul_(1 - lr * weight_decay)
            p.sub_(lr / (1 - betas[0] ** step) * first / ((second / (1 - betas[1] ** step)).sqrt() + eps))
            m[i], v[i] = (first.bfloat16().double(), second.bfloat16().double()) if round_moments else (first, second)
    return params


def test_adamw_with_bf16_moments_follows_a_float64_reference_and_resumes_exactly():
    generator = torch.Generator().manual_seed(0)
    shapes = [(7, 3), (5,), (1,)]
    start = [torch.randn(s, generator=generator) for s in shapes]
    grads = [[torch.randn(s, generator=generator) * 10.0 ** int(torch.randint(-3, 2, (), generator=generator))
              for s in shapes] for _ in range(6)]
    settings = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    params = [torch.nn.Parameter(p.clone()) for p in start]
    optimizer = BF16StateAdamW([{"params": params[:1], "weight_decay": 0.1},
                                {"params": params[1:], "weight_decay": 0.1}], lr=1e-2, betas=(0.9, 0.95))
    for step_grads in grads[:3]:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        optimizer.step()
    saved = copy.deepcopy(optimizer.state_dict())  # as read back from a file
    assert all(optimizer.state[p][name].dtype == torch.bfloat16 for p in params for name in ("exp_avg", "exp_avg_sq"))
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = BF16StateAdamW([{"params": resumed_params[:1], "weight_decay": 0.1},
                              {"params": resumed_params[1:], "weight_decay": 0.1}], lr=1e-2, betas=(0.9, 0.95))
    resumed.load_state_dict(saved)
    for group in (params, resumed_params):
        opt = optimizer if group is params else resumed
        for step_grads in grads[3:]:
            for p, g in zip(group, step_grads):
                p.grad = g.clone()
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, resumed_params))
    assert all(resumed.state[p]["exp_avg_sq"].dtype == torch.bfloat16 for p in resumed_params)
    expected = _reference_adamw(start, grads, eps=1e-8, round_moments=True, **settings)
    for got, want in zip(params, expected):
        torch.testing.assert_close(got.detach().double(), want, atol=1e-6, rtol=1e-5)
    exact = _reference_adamw(start, grads, eps=1e-8, round_moments=False, **settings)
    fp32 = [torch.nn.Parameter(p.clone()) for p in start]
    torch_adamw = torch.optim.AdamW(fp32, eps=1e-8, **settings)
    for step_grads in grads:
        for p, g in zip(fp32, step_grads):
            p.grad = g.clone()
        torch_adamw.step()
    for got, want, bf16 in zip(fp32, exact, params):  # the reference is AdamW; bf16 moments stay close to it
        torch.testing.assert_close(got.detach().double(), want, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(bf16.detach().double(), want, atol=5e-3, rtol=0)


def test_an_lm_run_with_bf16_optimizer_state_resumes_exactly(models, manifest, tmp_path):
    tokens = tmp_path / "tokens"
    tokenize_corpus(models["mmdgen"], manifest, tokens, progress=False)
    settings = dict(init=str(models["mmdgen"]), optimizer_state="bf16", activation_checkpointing=True)
    LMTrainer(_lm_cfg(tokens, tmp_path / "straight", steps=4, **settings), progress=False).train()
    LMTrainer(_lm_cfg(tokens, tmp_path / "resumed", steps=2, **settings), progress=False).train()
    state = torch.load(tmp_path / "resumed" / "checkpoint" / "training_state.pt", weights_only=True)
    assert all(s["exp_avg"].dtype == torch.bfloat16 for s in state["optimizers"]["lm"]["state"].values())
    LMTrainer(_lm_cfg(tokens, tmp_path / "resumed", steps=4, **settings), progress=False).train()
    a, b = (load_music_lm(tmp_path / run / "model")[0].state_dict() for run in ("straight", "resumed"))
    assert _equal_state(a, b)
    with pytest.raises(ValueError, match="another configuration .*differs in optimizer_state"):
        LMTrainer(_lm_cfg(tokens, tmp_path / "resumed", steps=5, init=str(models["mmdgen"])), progress=False)


def test_the_new_options_parse(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "COMMANDS", tuple(dataclasses.replace(c, run=seen.append) for c in cli.COMMANDS))
    assert cli.main(["train", "lm", "--tokens", str(tmp_path), "--init", "facebook/musicgen-small",
                     "--activation-checkpointing", "--optimizer-state", "bf16", "--fsdp", "--no-text-cache"]) == 0
    options = seen.pop()
    assert (options.init, options.activation_checkpointing, options.optimizer_state, options.fsdp,
            options.text_cache, options.preset, options.pattern, options.text) == (
        "facebook/musicgen-small", True, "bf16", True, False, None, None, None)
    assert cli.main(["train", "lm", "--tokens", str(tmp_path)]) == 0
    options = seen.pop()
    assert (options.preset, options.pattern, options.text) == ("tiny", "delay", "learned")  # the defaults
    assert cli.main(["train", "codec", "--data", str(tmp_path), "--init", "facebook/encodec_32khz"]) == 0
    options = seen.pop()
    assert (options.init, options.preset) == ("facebook/encodec_32khz", None)
    assert cli.main(["train", "codec", "--data", str(tmp_path)]) == 0 and seen.pop().preset == "tiny"
    assert cli.main(["train", "lm", "--tokens", str(tmp_path), "--optimizer-state", "fp16"]) == 2
