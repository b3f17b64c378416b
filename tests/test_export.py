"""Exports (mmdgen.pretrained.export) read back by the libraries they are for: an LM trained here with a T5
conditioner -> a transformers MusicgenForConditionalGeneration whose greedy ``generate`` gives our Generator's codes
and audio (mono with and without guidance, stereo); other conditioners -> the decoder and codec transformers loads
(our logits and codes) and a README naming what was left out; audiocraft's files -> mmdgen's audiocraft reader
(identical weights and logits), audiocraft-written files re-exported tensor for tensor, transformers -> audiocraft ->
transformers identical; refusals that write nothing. audiocraft's own loaders read an export in
tests/audiocraft_export_check.py (its result is tests/fixtures/audiocraft_export/result.json)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from safetensors.torch import load_file

from mmdgen.generate import Generator, Sampling
from mmdgen.model.codec import Codec, CodecConfig
from mmdgen.model.convert import codec_config_from_dict, codec_config_to_dict, lm_config_from_dict, lm_config_to_dict
from mmdgen.model.lm import LMConfig, MusicLM
from mmdgen.model.quantizer import QuantizerConfig
from mmdgen.model.text import (LearnedTextEncoder, T5TextEncoder, TextConditioner, TextConditioning,
                              train_caption_tokenizer, word_level_t5_tokenizer)
from mmdgen.model.text.t5 import T5Config
from mmdgen.pretrained import codec_identity, copy_codec, export_model, load_codec_model, load_music_model, \
    save_codec, save_music_lm
from tests.transformers_musicgen import their_codes_and_audio

TEXTS = ["a calm jig on flute", "a fast reel on fiddle with drums"]
FRAMES = 6  # also the LM's context: transformers' default generation length
SAMPLE_RATE, HOP = 400, 8  # 50 frames/s
AUDIOCRAFT_FIXTURES = Path(__file__).resolve().parent / "fixtures" / "audiocraft"
EXPORT_FIXTURES = Path(__file__).resolve().parent / "fixtures" / "audiocraft_export"


# -- fixtures: random tiny models -----------------------------------------------------------------------------------

def make_t5_folder(folder: Path, width: int = 24, heads: int = 2, seed: int = 0) -> Path:
    """A random transformers T5 encoder (one layer, non-trivial norms) with a word-level T5 tokenizer."""
    torch.manual_seed(seed)
    tokenizer = word_level_t5_tokenizer(TEXTS)
    model = transformers.T5EncoderModel(transformers.T5Config(vocab_size=len(tokenizer), d_model=width,
                                                              d_kv=width // heads, d_ff=32, num_layers=1,
                                                              num_heads=heads))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "layer_norm" in name:
                parameter.copy_(1 + 0.2 * torch.randn_like(parameter))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_codec(seed: int = 0) -> Codec:
    """A random 400 Hz codec, 4 x 32 codes at 50 frames/s, its codebooks at the scale of its latents."""
    torch.manual_seed(seed)
    codec = Codec(CodecConfig(sample_rate=SAMPLE_RATE, num_filters=4, ratios=(4, 2), dimension=8, lstm_layers=1,
                              quantizer=QuantizerConfig(dim=8, codebook_size=32, num_codebooks=4, kmeans_init=False)))
    with torch.no_grad():
        scale = codec.encoder(0.3 * torch.randn(2, 1, 400)).std()
        for stage in codec.quantizer.stages:
            stage.embed.mul_(scale)
    return codec.eval()


def make_lm(text_dim: int, channels: int = 1, seed: int = 0, **overrides) -> MusicLM:
    """A random LM over 4 x 32 codes per channel (stereo: interleaved, delays 0, 0, 1, 1, ...), sharp heads so
    that greedy choices are far from ties, non-trivial norms."""
    torch.manual_seed(seed)
    codebooks = 4 * channels
    delays = tuple(k for k in range(4) for _ in range(channels)) if channels == 2 else None
    settings = dict(num_codebooks=codebooks, codebook_size=32, dim=32, layers=2, heads=4, ffn_dim=64,
                    text_dim=text_dim, context_frames=FRAMES, audio_channels=channels, delays=delays)
    lm = MusicLM(LMConfig(**{**settings, **overrides})).eval()
    with torch.no_grad():
        for name, parameter in lm.named_parameters():
            if "norm" in name:
                parameter.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(parameter))
        for head in lm.heads:
            head.weight.mul_(20.0)
    return lm


def make_lm_dir(folder: Path, lm: MusicLM, text, record: dict, codec: Codec) -> Path:
    """An LM directory as the trainer exports it, its codec bundled."""
    codec_dir = save_codec(codec, folder.with_name(folder.name + "-codec"))
    save_music_lm(folder, lm, text, record, codec_identity(codec_dir))
    copy_codec(codec_dir, folder / "codec")
    return folder


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory) -> Path:
    return make_t5_folder(tmp_path_factory.mktemp("t5"))


def t5_lm_dir(folder: Path, t5: Path, channels: int = 1, seed: int = 0) -> Path:
    text = T5TextEncoder.from_folder(t5)
    return make_lm_dir(folder, make_lm(text.dim, channels, seed), text, {"kind": "t5", "path": str(t5)},
                       make_codec(seed))


@pytest.fixture(scope="module")
def mono(tmp_path_factory, t5_folder) -> tuple[Path, Path]:
    """Our LM directory (T5 conditioner) and its transformers export."""
    source = t5_lm_dir(tmp_path_factory.mktemp("mono") / "model", t5_folder)
    out = tmp_path_factory.mktemp("exports") / "musicgen"
    export_model(source, out, "transformers")
    return source, out


def learned_lm_dir(folder: Path, text_dim: int = 32, **overrides) -> Path:
    tokenizer = train_caption_tokenizer(TEXTS * 4, folder.with_name("captions.model"), vocab_size=40)
    torch.manual_seed(3)
    text = LearnedTextEncoder.from_tokenizer_file(tokenizer.path, dim=text_dim, layers=1, heads=4).eval()
    record = {"kind": "learned", "config": dataclasses.asdict(text.config)}
    return make_lm_dir(folder, make_lm(text_dim, **overrides), text, record, make_codec())


# -- transformers: the whole MusicGen ----------------------------------------------------------------------------

@pytest.mark.parametrize("guidance", [None, 3.0], ids=["no-guidance", "guidance-3"])
def test_a_t5_model_exported_to_transformers_generates_our_greedy_codes_and_audio(mono, guidance):
    source, out = mono
    model = transformers.MusicgenForConditionalGeneration.from_pretrained(out).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    if guidance is None:  # 1 switches the exported generation config's guidance off; the length is asked for
        codes, audio = their_codes_and_audio(model, tokenizer, TEXTS, guidance_scale=1.0, max_new_tokens=FRAMES + 3)
    else:  # guidance 3 and the length (the LM's context of FRAMES frames) from generation_config.json
        codes, audio = their_codes_and_audio(model, tokenizer, TEXTS)
    ours = Generator.from_pretrained(source)
    sampling = Sampling(guidance_scale=guidance, temperature=0)
    expected = ours.generate_codes(TEXTS, duration=FRAMES / 50, sampling=sampling)
    assert codes.shape == expected.shape == (2, 4, FRAMES) and torch.equal(codes, expected)
    assert len(set(codes.flatten().tolist())) > 6
    ours_audio = ours.generate(TEXTS, duration=FRAMES / 50, sampling=sampling)
    assert audio.shape == ours_audio.shape == (2, 1, FRAMES * HOP)
    torch.testing.assert_close(audio, ours_audio, atol=1e-5, rtol=1e-4)


def test_the_transformers_export_holds_the_model_and_reads_back(mono, t5_folder):
    source, out = mono
    generation = transformers.GenerationConfig.from_pretrained(out)
    assert (generation.do_sample, generation.top_k, generation.guidance_scale) == (True, 250, 3.0)
    assert generation.decoder_start_token_id == generation.pad_token_id == 32 and generation.max_length == FRAMES + 3
    assert {"tokenizer.json", "tokenizer_config.json", "README.txt"} <= {p.name for p in out.iterdir()}
    tokens = transformers.AutoProcessor.from_pretrained(out)(text=TEXTS, padding=True, return_tensors="pt")
    ids, mask = T5TextEncoder.from_folder(t5_folder).tokenize(TEXTS)
    assert torch.equal(tokens["input_ids"], ids) and torch.equal(tokens["attention_mask"].bool(), mask)
    original, exported = load_music_model(source), load_music_model(out)
    assert exported.format == "transformers"
    for part in ("lm", "codec", "text"):
        expected = getattr(original, part).state_dict()
        got = getattr(exported, part).state_dict()
        assert expected.keys() == got.keys() and all(torch.equal(got[name], value) for name, value in expected.items())
    # the context comes back from generation_config.json's max_length (the published 30 s when it is 1500)
    assert exported.lm.cfg == original.lm.cfg and exported.lm.cfg.context_frames == FRAMES


def test_a_stereo_model_exported_to_transformers_generates_our_greedy_codes(tmp_path, t5_folder):
    source = t5_lm_dir(tmp_path / "stereo", t5_folder, channels=2, seed=1)
    summary = export_model(source, tmp_path / "out", "transformers")
    assert "8 x 32 codes, stereo" in summary
    model = transformers.MusicgenForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    assert model.config.decoder.audio_channels == 2
    codes, audio = their_codes_and_audio(model, transformers.AutoTokenizer.from_pretrained(tmp_path / "out"), TEXTS)
    ours = Generator.from_pretrained(source)
    sampling = Sampling(guidance_scale=3.0, temperature=0)
    expected = ours.generate_codes(TEXTS, duration=FRAMES / 50, sampling=sampling)
    assert codes.shape == expected.shape == (2, 8, FRAMES) and torch.equal(codes, expected)
    torch.testing.assert_close(audio, ours.generate(TEXTS, duration=FRAMES / 50, sampling=sampling), atol=1e-5,
                               rtol=1e-4)


# -- transformers: what it can hold of other models ---------------------------------------------------------------

def test_a_learned_conditioner_exports_the_decoder_and_codec_transformers_load(tmp_path):
    source = learned_lm_dir(tmp_path / "learned")
    out = tmp_path / "out"
    summary = export_model(source, out, "transformers")
    assert "in parts: decoder/ (MusicgenForCausalLM) and audio_encoder/ (EncodecModel)" in summary
    assert "left out: the learned text conditioner" in summary
    readme = (out / "README.txt").read_text()
    assert "left out: the learned text conditioner: transformers' MusicGen conditions on a T5 encoder only" in readme
    assert sorted(p.name for p in out.iterdir()) == ["README.txt", "audio_encoder", "decoder"]

    parts = load_music_model(source)
    decoder = transformers.MusicgenForCausalLM.from_pretrained(out / "decoder").eval()
    conditioning = parts.text(TEXTS)
    tokens = torch.randint(0, 33, (2, 4, 7), generator=torch.Generator().manual_seed(0))  # 32: the special token
    with torch.no_grad():
        theirs = decoder(input_ids=tokens.reshape(8, 7), encoder_hidden_states=conditioning.states,
                         encoder_attention_mask=conditioning.mask.long()).logits.reshape(2, 4, 7, 32)
        expected = parts.lm(tokens, conditioning.states, conditioning.mask)
    torch.testing.assert_close(theirs, expected, atol=1e-5, rtol=1e-5)

    encodec = transformers.EncodecModel.from_pretrained(out / "audio_encoder").eval()
    audio = 0.3 * torch.randn(2, 1, 100, generator=torch.Generator().manual_seed(1))  # not a multiple of the hop
    with torch.no_grad():
        codes = encodec.encode(audio).audio_codes[0]
        decoded = encodec.decode(codes[None], [None]).audio_values
    assert torch.equal(codes, parts.codec.encode(audio)) and len(set(codes.flatten().tolist())) > 4
    torch.testing.assert_close(decoded, parts.codec.decode(codes), atol=1e-5, rtol=1e-4)
    assert all(torch.equal(value, parts.codec.state_dict()[name])
               for name, value in load_codec_model(out / "audio_encoder").state_dict().items())


def test_a_pattern_transformers_does_not_generate_is_named(tmp_path):
    out = tmp_path / "out"
    summary = export_model(learned_lm_dir(tmp_path / "flatten", pattern="flatten"), out, "transformers")
    assert "left out: the flatten pattern (transformers generates with delays [0, 1, 2, 3])" in summary
    assert ("left out: the codebook pattern (flatten): transformers' MusicGen generates with delays [0, 1, 2, 3], so "
            "its generate would decode this LM wrongly") in (out / "README.txt").read_text()


def test_an_lm_transformers_cannot_hold_is_refused_and_nothing_is_written(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"transformers' format cannot hold this LM: the learned text conditioner"
                                         r".*the decoder: its 16-wide text states are projected to its width 32"):
        export_model(learned_lm_dir(tmp_path / "projected", text_dim=16), out, "transformers")
    with pytest.raises(ValueError, match=r"the decoder: norm_eps=1e-06"):
        export_model(learned_lm_dir(tmp_path / "eps", norm_eps=1e-6), out, "transformers")
    assert not out.exists() and not out.with_name("out.tmp").exists()


# -- audiocraft -------------------------------------------------------------------------------------------------

def test_an_audiocraft_export_reads_back_with_identical_weights_and_logits(mono, tmp_path, t5_folder):
    source, _ = mono
    out = tmp_path / "audiocraft"
    summary = export_model(source, out, "audiocraft")
    assert "T5 name unset: set conditioners.description.t5.name in xp.cfg" in summary
    assert "padded batches differ" in summary and summary.endswith("(see README.txt)")
    readme = (out / "README.txt").read_text()
    assert "xp.cfg leaves conditioners.description.t5.name unset (???)" in readme
    assert "this LM masks the padding of shorter texts in a batch, audiocraft's attends to it" in readme
    assert sorted(p.name for p in out.iterdir()) == ["README.txt", "compression_state_dict.bin", "state_dict.bin"]
    for name in ("state_dict.bin", "compression_state_dict.bin"):
        payload = torch.load(out / name, weights_only=True)
        assert set(payload) == {"best_state", "xp.cfg", "version", "exported"} and payload["exported"] is True
        assert isinstance(payload["xp.cfg"], str) and all(isinstance(v, torch.Tensor)
                                                          for v in payload["best_state"].values())
    config = yaml.safe_load(torch.load(out / "state_dict.bin", weights_only=True)["xp.cfg"])
    assert config["conditioners"]["description"]["t5"]["name"] == "???"
    with pytest.raises(ValueError, match=r"state_dict.bin: xp.cfg does not name its text encoder"):
        load_music_model(out)

    original, exported = load_music_model(source), load_music_model(out, text_encoder=t5_folder)
    assert exported.format == "audiocraft" and exported.lm.cfg.attend_text_padding
    assert exported.lm.cfg == dataclasses.replace(original.lm.cfg, attend_text_padding=True, delays=(0, 1, 2, 3))
    for part in ("lm", "codec"):
        expected = getattr(original, part).state_dict()
        got = getattr(exported, part).state_dict()
        assert expected.keys() == got.keys() and all(torch.equal(got[name], value) for name, value in expected.items())
    conditioning = original.text(TEXTS + [""])  # a padded row and a null condition
    tokens = torch.randint(0, 33, (3, 4, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = exported.lm(tokens, conditioning.states, conditioning.mask)
        unmasked = MusicLM(exported.lm.cfg).eval()
        unmasked.load_state_dict(original.lm.state_dict())
        assert torch.equal(logits, unmasked(tokens, conditioning.states, conditioning.mask))
        masked = original.lm(tokens, conditioning.states, conditioning.mask)
    whole = [row for row in range(3) if conditioning.mask[row].all() or not conditioning.mask[row].any()]
    assert len(whole) == 2 and torch.equal(logits[whole], masked[whole])
    assert not torch.allclose(logits[0], masked[0])  # the padded row: audiocraft's rule differs there
    sampling = Sampling(guidance_scale=3.0, temperature=0)  # one text: the same greedy codes under either rule
    codes = Generator(exported.lm, exported.text, exported.codec).generate_codes(TEXTS[1:], FRAMES / 50, sampling)
    assert torch.equal(codes, Generator.from_pretrained(source).generate_codes(TEXTS[1:], FRAMES / 50, sampling))


def test_a_t5_from_the_hugging_face_cache_is_named_for_audiocraft(tmp_path, monkeypatch):
    """A T5 read from the cache's t5-base snapshot (t5-base's width) is written as ``t5-base``, which mmdgen's
    reader then finds in the cache by itself; a name of another width is refused."""
    cache = tmp_path / "hub"
    snapshot = make_t5_folder(cache / "models--google-t5--t5-base" / "snapshots" / "0123abcd", width=768, heads=12)
    (cache / "models--google-t5--t5-base" / "refs").mkdir()
    (cache / "models--google-t5--t5-base" / "refs" / "main").write_text("0123abcd")
    source = t5_lm_dir(tmp_path / "model", snapshot)
    summary = export_model(source, tmp_path / "out", "audiocraft")
    assert "(T5 t5-base)" in summary and "name unset" not in summary
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    exported = load_music_model(tmp_path / "out")
    assert torch.equal(exported.text.encoder.token_embedding.weight,
                       load_music_model(source).text.encoder.token_embedding.weight)
    with pytest.raises(ValueError, match=r"t5_name 't5-small': expected one of audiocraft's T5 names 768 wide "
                                         r"\(t5-base, google/flan-t5-base\)"):
        export_model(source, tmp_path / "small", "audiocraft", t5_name="t5-small")


@pytest.fixture(scope="module")
def t5_base_wide(tmp_path_factory) -> Path:
    return make_t5_folder(tmp_path_factory.mktemp("t5-base"), width=768, heads=12)


def test_audiocraft_written_files_export_back_tensor_for_tensor(tmp_path, t5_base_wide):
    """tests/fixtures/audiocraft (written by audiocraft 1.3.0 itself) -> mmdgen -> audiocraft: every tensor under
    audiocraft's own name, and a configuration that describes the same model."""
    source = tmp_path / "audiocraft-source"
    source.mkdir()
    for name in ("state_dict.bin", "compression_state_dict.bin"):
        os.link(AUDIOCRAFT_FIXTURES / name, source / name)
    summary = export_model(source, tmp_path / "out", "audiocraft", text_encoder=t5_base_wide)
    assert "(T5 t5-base)" in summary and "padding" not in summary  # audiocraft's own rule: nothing differs
    for name in ("state_dict.bin", "compression_state_dict.bin"):
        theirs = torch.load(AUDIOCRAFT_FIXTURES / name, weights_only=True)["best_state"]
        ours = torch.load(tmp_path / "out" / name, weights_only=True)["best_state"]
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[key], value) for key, value in theirs.items())
    original = load_music_model(source, text_encoder=t5_base_wide)
    exported = load_music_model(tmp_path / "out", text_encoder=t5_base_wide)
    assert exported.lm.cfg == original.lm.cfg and exported.codec.cfg == original.codec.cfg


class FixedStates(TextConditioner):
    """Every caption gets the given states (the T5 stand-in of tests/audiocraft_export_check.py)."""

    def __init__(self, states: torch.Tensor):
        super().__init__()
        self.states, self.dim = states, states.shape[-1]

    def encode_texts(self, captions):
        states = self.states.expand(len(captions), -1, -1)
        return TextConditioning(states, torch.ones(states.shape[:2], dtype=torch.bool))


@pytest.mark.parametrize("name", ["mono", "stereo"])
def test_exports_audiocraft_read_are_what_mmdgen_writes_and_computes(name, tmp_path, t5_base_wide):
    """tests/fixtures/audiocraft_export: exports audiocraft 1.3.0's loaders and MusicGen matched (result.json, by
    tests/audiocraft_export_check.py). Re-exported today they are the same files; read by mmdgen they give the
    reference audiocraft was compared with: logits, greedy codes with guidance, the codec's codes and audio."""
    result = json.loads((EXPORT_FIXTURES / "result.json").read_text())
    assert result["audiocraft"] == "1.3.0" and result["all_within_tolerance"] and result[name]["greedy_codes_equal"]
    reference = load_file(EXPORT_FIXTURES / "reference.safetensors")
    export_model(EXPORT_FIXTURES / name, tmp_path / "again", "audiocraft", text_encoder=t5_base_wide)
    for file in ("state_dict.bin", "compression_state_dict.bin"):
        committed = torch.load(EXPORT_FIXTURES / name / file, weights_only=True)
        again = torch.load(tmp_path / "again" / file, weights_only=True)
        assert yaml.safe_load(again["xp.cfg"]) == yaml.safe_load(committed["xp.cfg"])
        assert again["best_state"].keys() == committed["best_state"].keys()
        assert all(torch.equal(again["best_state"][key], value) for key, value in committed["best_state"].items())

    model = load_music_model(EXPORT_FIXTURES / name, text_encoder=t5_base_wide)
    with torch.no_grad():
        logits = model.lm(reference[f"{name}.tokens"], reference[f"{name}.text_states"], reference[f"{name}.text_mask"])
    torch.testing.assert_close(logits, reference[f"{name}.logits"], atol=1e-4, rtol=1e-5)  # logits up to ~50
    generator = Generator(model.lm, FixedStates(reference[f"{name}.prompt_states"]), model.codec)
    codes = generator.generate_codes(["one text"], duration=8 / 50, sampling=Sampling(guidance_scale=3.0,
                                                                                       temperature=0))
    assert torch.equal(codes, reference[f"{name}.generated"]) and codes.shape == (1, 4 * model.lm.cfg.audio_channels, 8)
    assert torch.equal(model.codec.encode(reference["codec.input"]), reference[f"{name}.codec_codes"])
    torch.testing.assert_close(model.codec.decode(reference[f"{name}.codec_codes"]), reference[f"{name}.codec_audio"],
                               atol=1e-5, rtol=1e-5)


def test_learned_conditioners_are_refused_by_the_audiocraft_format(tmp_path):
    with pytest.raises(ValueError, match=r"its learned text conditioner has no audiocraft counterpart"):
        export_model(learned_lm_dir(tmp_path / "learned"), tmp_path / "out", "audiocraft")
    assert not (tmp_path / "out").exists()


# -- round trips ------------------------------------------------------------------------------------------------

def test_transformers_to_audiocraft_to_transformers_gives_identical_tensors(tmp_path):
    """A MusicGen folder transformers itself saved -> audiocraft -> transformers: the same tensors under the same
    names (the T5 given back from the original folder, since audiocraft's files do not hold it)."""
    torch.manual_seed(4)
    tokenizer = word_level_t5_tokenizer(TEXTS)
    config = transformers.MusicgenConfig(
        text_encoder=transformers.T5Config(vocab_size=len(tokenizer), d_model=24, d_kv=12, d_ff=32, num_layers=1,
                                           num_heads=2).to_dict(),
        audio_encoder=transformers.EncodecConfig(target_bandwidths=[1.0], sampling_rate=400, hidden_size=8,
                                                 num_filters=4, upsampling_ratios=[4, 2], num_lstm_layers=1,
                                                 codebook_size=32, use_causal_conv=False).to_dict(),
        decoder=transformers.MusicgenDecoderConfig(vocab_size=32, hidden_size=32, num_attention_heads=4, ffn_dim=48,
                                                   num_hidden_layers=2, num_codebooks=4).to_dict())
    model = transformers.MusicgenForConditionalGeneration(config).eval()
    with torch.no_grad():
        for layer in model.audio_encoder.quantizer.layers:
            layer.codebook.embed.copy_(torch.randn_like(layer.codebook.embed))
            layer.codebook.inited.fill_(1.0)
    original = tmp_path / "musicgen"
    model.save_pretrained(original)
    tokenizer.save_pretrained(original)
    summary = export_model(original, tmp_path / "audiocraft", "audiocraft")
    assert "text padding masked by this LM, attended by audiocraft: padded batches differ" in summary
    summary = export_model(tmp_path / "audiocraft", tmp_path / "back", "transformers", text_encoder=original)
    assert "text padding attended by the source, masked by transformers: padded batches differ" in summary
    assert "the source (audiocraft's rule) attends to it" in (tmp_path / "back" / "README.txt").read_text()
    theirs, ours = load_file(original / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[name], value) for name, value in theirs.items())
    written = json.loads((tmp_path / "back" / "config.json").read_text())
    assert codec_config_from_dict(written["audio_encoder"]) == codec_config_from_dict(config.audio_encoder.to_dict())
    assert lm_config_from_dict(written["decoder"]) == lm_config_from_dict(config.decoder.to_dict())
    assert T5Config.from_dict(written["text_encoder"], "back") == T5Config.from_dict(config.text_encoder.to_dict(), "")


def test_configurations_read_back_as_written():
    """The config dictionaries written for transformers, read by mmdgen and by transformers itself; the bandwidth
    that names K codebooks survives a float product that falls just short (7 x 13 frames/s x 11 bits)."""
    cfg = CodecConfig(sample_rate=100, ratios=(4, 2), num_filters=4, dimension=8, lstm_layers=1, causal=True,
                      trim_right_ratio=0.5, quantizer=QuantizerConfig(dim=8, codebook_size=2048, num_codebooks=7,
                                                                       kmeans_init=False))
    written = codec_config_to_dict(cfg)
    assert codec_config_from_dict(written) == cfg
    assert transformers.EncodecConfig(**{k: v for k, v in written.items() if k != "model_type"}).num_quantizers == 7
    lm = LMConfig(num_codebooks=8, codebook_size=64, dim=48, layers=3, heads=6, ffn_dim=80, text_dim=48,
                  audio_channels=2, delays=(0, 0, 1, 1, 2, 2, 3, 3))
    assert lm_config_from_dict(lm_config_to_dict(lm)) == lm
    t5 = T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
                  relative_attention_num_buckets=8, relative_attention_max_distance=20, layer_norm_epsilon=1e-5)
    assert T5Config.from_dict(t5.to_dict(), "t5") == t5
    assert T5Config.from_dict(transformers.T5Config(**t5.to_dict()).to_dict(), "transformers") == t5


def test_exporting_needs_neither_transformers_nor_audiocraft(mono, tmp_path, monkeypatch):
    source, out = mono
    for library in ("transformers", "audiocraft"):
        monkeypatch.setitem(sys.modules, library, None)  # any import of it now fails
    for format in ("transformers", "audiocraft"):
        export_model(source, tmp_path / format, format)
    assert load_file(tmp_path / "transformers" / "model.safetensors").keys() == \
        load_file(out / "model.safetensors").keys()


# -- refusals -------------------------------------------------------------------------------------------------------

def test_bad_destinations_formats_and_sources_are_refused(mono, tmp_path, monkeypatch):
    source, _ = mono
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"file: exists and is not a folder"):
        export_model(source, tmp_path / "file", "transformers")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"occupied: a folder that is not empty; .*\(--overwrite\)"):
        export_model(source, occupied, "transformers")
    with pytest.raises(ValueError, match=r"export format 'onnx': expected one of transformers, audiocraft"):
        export_model(source, tmp_path / "new", "onnx")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty: not a model folder"):
        export_model(tmp_path / "empty", tmp_path / "new", "transformers")
    with pytest.raises(ValueError, match=r"holds the source"):
        export_model(source, source.parent, "transformers", overwrite=True)
    assert not (tmp_path / "new").exists() and source.is_dir()

    import safetensors.torch

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", fail)  # an error half-way through the writing
    with pytest.raises(OSError, match="disk full"):
        export_model(source, occupied, "transformers", overwrite=True)
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"] and not occupied.with_name("occupied.tmp").exists()
    monkeypatch.undo()
    export_model(source, occupied, "transformers", overwrite=True)
    assert (occupied / "model.safetensors").is_file() and not (occupied / "keep.txt").exists()
    shutil.rmtree(occupied)


def test_the_export_command_writes_and_refuses_by_name(tmp_path, t5_folder, capsys):
    from mmdgen import cli

    source = t5_lm_dir(tmp_path / "model", t5_folder)
    out = tmp_path / "hf"
    assert cli.main(["export", str(source), "--format", "transformers", "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out and load_music_model(out).format == "transformers"
    assert cli.main(["export", str(source), "--format", "transformers", "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert cli.main(["export", str(source), "--format", "onnx", "--out", str(tmp_path / "x")]) == 2
    assert "--format" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert cli.main(["export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "y")]) == 2
    assert "nowhere: no such file or folder" in capsys.readouterr().err


def test_the_mmdgen_format_is_self_contained_and_keeps_int8_weights_as_they_are(tmp_path, t5_folder, monkeypatch):
    """A published-style T5 model written as an mmdgen directory (T5 and codec inside), float and int8: it loads
    anywhere (the source folder gone), the int8 one without quantizing again, and both decode as the source."""
    import mmdgen.model.quantize as quantize_module
    from mmdgen import cli

    t5_copy = shutil.copytree(t5_folder, tmp_path / "t5")  # removed below: the exports must not need it
    source = t5_lm_dir(tmp_path / "model", t5_copy)
    original = load_music_model(source)
    sampling = Sampling(guidance_scale=3.0, temperature=0)
    expected = Generator(original.lm, original.text, original.codec).generate_codes(TEXTS, FRAMES / 50, sampling)
    int8_expected = Generator(original.lm, original.text, original.codec, quantize="int8").generate_codes(
        TEXTS, FRAMES / 50, sampling)
    assert cli.main(["export", str(source), "--format", "mmdgen", "--out", str(tmp_path / "float")]) == 0
    assert cli.main(["export", str(source), "--format", "mmdgen", "--quantize", "int8", "--out",
                     str(tmp_path / "int8")]) == 0
    shutil.rmtree(source)
    shutil.rmtree(t5_copy)
    exported = load_music_model(tmp_path / "float")
    codes = Generator(exported.lm, exported.text, exported.codec).generate_codes(TEXTS, FRAMES / 50, sampling)
    assert exported.format == "mmdgen" and torch.equal(codes, expected)
    monkeypatch.setattr(quantize_module, "quantize_weight", lambda weight: pytest.fail("quantized again"))  # any call
    quantized = load_music_model(tmp_path / "int8")
    assert quantized.lm.quantization == "int8" and quantized.lm.heads[0].qweight.dtype == torch.int8
    codes = Generator(quantized.lm, quantized.text, quantized.codec).generate_codes(TEXTS, FRAMES / 50, sampling)
    assert torch.equal(codes, int8_expected)
    with pytest.raises(ValueError, match=r"int8 weights \(int8\) are written in mmdgen's format only"):
        export_model(tmp_path / "float", tmp_path / "hf", "transformers", quantize="int8")


def test_generate_quantizes_on_request_and_refuses_a_second_mode(tmp_path, t5_folder, capsys):
    from mmdgen import cli

    source = t5_lm_dir(tmp_path / "model", t5_folder)
    out = tmp_path / "clip.wav"
    assert cli.main(["generate", TEXTS[0], "--model", str(source), "--duration", str(FRAMES / 50), "--quantize",
                     "int8-dynamic", "--out", str(out)]) == 0
    assert out.exists()
    export_model(source, tmp_path / "int8", "mmdgen", quantize="int8")
    with pytest.raises(ValueError, match=r"already int8; int8-dynamic asked for"):
        Generator.from_pretrained(tmp_path / "int8", quantize="int8-dynamic")
    assert cli.main(["generate", TEXTS[0], "--model", str(source), "--quantize", "int4", "--out", str(out)]) == 2
    assert "--quantize" in capsys.readouterr().err
