"""Published MusicGen checkpoints in every transformers layout, read by mmdgen's own loader (no transformers model
built on our side): greedy codes and audio equal to transformers' ``generate`` at MusicGen-small's widths (decoder
1024 x 16 heads, 4 x 2048 codes; T5-base widths; the 32 kHz EnCodec), fewer layers; mono and stereo; by folder, by
repository id through a Hugging Face cache tree, sharded and pickled weights; clear errors for what is not one."""

import json
import os

import pytest
import soundfile
import torch
import transformers

from mmdgen import cli
from mmdgen.generate import Generator, Sampling
from mmdgen.model.convert import codec_from_transformers, lm_from_transformers
from mmdgen.model.text import T5TextEncoder, word_level_t5_tokenizer
from mmdgen.pretrained import load_codec_model, load_music_model
from tests.transformers_musicgen import PUBLISHED_ENCODEC, PUBLISHED_T5, TINY_ENCODEC, TINY_T5, their_codes_and_audio

TEXTS = ["an upbeat pop song with a catchy melody", "slow piano ballad"]
FRAMES = 8


def _musicgen(channels: int = 1, widths: str = "published", seed: int = 0):
    """A random MusicgenForConditionalGeneration (``published``: MusicGen-small's widths, 2 decoder and 2 T5 layers,
    the 32 kHz EnCodec; ``tiny``: small everything) and its word-level T5 tokenizer."""
    torch.manual_seed(seed)
    tokenizer = word_level_t5_tokenizer(TEXTS)
    if widths == "published":
        text, audio = PUBLISHED_T5, PUBLISHED_ENCODEC
        decoder = dict(vocab_size=2048, hidden_size=1024, num_attention_heads=16, ffn_dim=4096)
    else:
        text, audio = TINY_T5, TINY_ENCODEC
        decoder = dict(vocab_size=32, hidden_size=32, num_attention_heads=4, ffn_dim=48)
    special = decoder["vocab_size"]
    config = transformers.MusicgenConfig(
        text_encoder=transformers.T5Config(vocab_size=len(tokenizer), **text).to_dict(),
        audio_encoder=transformers.EncodecConfig(audio_channels=1, **audio).to_dict(),
        decoder=transformers.MusicgenDecoderConfig(num_hidden_layers=2, num_codebooks=4 * channels,
                                                   audio_channels=channels, pad_token_id=special,
                                                   bos_token_id=special, decoder_start_token_id=special,
                                                   **decoder).to_dict())
    model = transformers.MusicgenForConditionalGeneration(config).eval()
    with torch.no_grad():
        for layer in model.audio_encoder.quantizer.layers:  # transformers initialises codebooks to zero
            layer.codebook.embed.copy_(torch.randn_like(layer.codebook.embed))
        for name, parameter in model.text_encoder.named_parameters():
            if "layer_norm" in name:  # non-trivial norms, so the T5 check means something
                parameter.copy_(1 + 0.2 * torch.randn_like(parameter))
        for head in model.decoder.lm_heads:  # sharper logits: greedy choices far from ties
            head.weight.mul_(20.0)
    model.generation_config.update(decoder_start_token_id=special, pad_token_id=special, bos_token_id=special)
    return model, tokenizer


def _save(model, tokenizer, folder, **kwargs):
    model.save_pretrained(folder, **kwargs)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def mono(module_folder):
    model, tokenizer = _musicgen()
    return model, tokenizer, _save(model, tokenizer, module_folder("musicgen-small"))


@pytest.fixture(scope="module")
def stereo(module_folder):
    model, tokenizer = _musicgen(channels=2, seed=1)
    return model, tokenizer, _save(model, tokenizer, module_folder("musicgen-stereo-small"))


def _their_codes_and_audio(model, tokenizer, guidance, frames=FRAMES):
    per_channel = model.decoder.config.num_codebooks // model.decoder.config.audio_channels
    return their_codes_and_audio(model, tokenizer, TEXTS, guidance_scale=guidance,
                                 max_new_tokens=frames + per_channel - 1)


@pytest.mark.parametrize("guidance", [None, 3.0], ids=["no-guidance", "guidance-3"])
def test_a_musicgen_folder_generates_transformers_greedy_codes_and_audio(mono, guidance):
    model, tokenizer, folder = mono
    their_codes, their_audio = _their_codes_and_audio(model, tokenizer, guidance)
    generator = Generator.from_pretrained(folder)
    sampling = Sampling(guidance_scale=guidance, temperature=0)
    codes = generator.generate_codes(TEXTS, duration=FRAMES / 50, sampling=sampling)
    assert codes.shape == their_codes.shape == (2, 4, FRAMES) and torch.equal(codes, their_codes)
    assert len(set(codes.flatten().tolist())) > 8
    audio = generator.generate(TEXTS, duration=FRAMES / 50, sampling=sampling)
    assert audio.shape == their_audio.shape == (2, 1, FRAMES * 640)
    torch.testing.assert_close(audio, their_audio, atol=1e-5, rtol=1e-4)


def test_the_loaded_parts_hold_transformers_weights_and_the_published_context(mono):
    model, tokenizer, folder = mono
    parts = load_music_model(folder)
    assert parts.format == "transformers" and parts.lm.cfg.context_frames == 1500  # 30 s at 50 frames/s
    reference = lm_from_transformers(model).state_dict()
    assert all(torch.equal(value, parts.lm.state_dict()[name]) for name, value in reference.items())
    codec = codec_from_transformers(model.audio_encoder).state_dict()
    assert all(torch.equal(value, parts.codec.state_dict()[name]) for name, value in codec.items())
    inputs = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        states = model.text_encoder(**inputs).last_hidden_state
    conditioning = parts.text(TEXTS)
    assert torch.equal(conditioning.mask, inputs["attention_mask"].bool())
    torch.testing.assert_close(conditioning.states[conditioning.mask], states[conditioning.mask], atol=1e-5, rtol=1e-5)


def test_the_codec_and_the_text_encoder_alone_come_from_a_musicgen_folder(mono):
    """A MusicGen folder given where a codec or a T5 is expected loads its own EnCodec / T5, never random ones."""
    model, tokenizer, folder = mono
    codec = load_codec_model(folder)
    audio = torch.randn(1, 1, 3200, generator=torch.Generator().manual_seed(0)) * 0.1
    with torch.no_grad():
        theirs = model.audio_encoder.encode(audio, bandwidth=2.2).audio_codes[0]
    assert torch.equal(codec.encode(audio), theirs)
    text = T5TextEncoder.from_folder(folder)
    assert all(torch.equal(parameter, model.text_encoder.state_dict()["shared.weight"])
               for name, parameter in text.encoder.named_parameters() if name == "token_embedding.weight")


def test_a_repository_id_resolves_through_the_local_hugging_face_cache(mono, tmp_path, monkeypatch, capsys):
    _, _, folder = mono
    cache = tmp_path / "hub"
    repo = cache / "models--facebook--musicgen-small"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for file in folder.iterdir():  # the cache's layout: snapshot files link to blobs
        blob = repo / "blobs" / file.name
        blob.parent.mkdir(exist_ok=True)
        os.link(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    parts = load_music_model("facebook/musicgen-small")
    assert parts.lm.cfg.dim == 1024 and parts.format == "transformers"
    with pytest.raises(ValueError, match=r"facebook/musicgen-medium: not in the local Hugging Face cache .*hub\); "
                                         r"nothing is downloaded.*hf download facebook/musicgen-medium"):
        load_music_model("facebook/musicgen-medium")
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # HF_HOME/hub is the cache when HF_HUB_CACHE is unset
    assert load_music_model("facebook/musicgen-small").lm.cfg.layers == 2


def test_stereo_codes_and_audio_equal_transformers(stereo):
    model, tokenizer, folder = stereo
    their_codes, their_audio = _their_codes_and_audio(model, tokenizer, 3.0)
    generator = Generator.from_pretrained(folder)
    assert generator.lm.cfg.delays == (0, 0, 1, 1, 2, 2, 3, 3) and generator.channels == 2
    sampling = Sampling(guidance_scale=3.0, temperature=0)
    codes = generator.generate_codes(TEXTS, duration=FRAMES / 50, sampling=sampling)
    assert codes.shape == their_codes.shape == (2, 8, FRAMES) and torch.equal(codes, their_codes)
    audio = generator.generate(TEXTS, duration=FRAMES / 50, sampling=sampling)
    assert audio.shape == their_audio.shape == (2, 2, FRAMES * 640)
    torch.testing.assert_close(audio, their_audio, atol=1e-5, rtol=1e-4)
    prompt = audio[:1, :, : 3 * 640]  # a stereo prompt continues as its two channels' codes
    continued = generator.generate_codes(TEXTS[:1], duration=FRAMES / 50, sampling=sampling, prompt_audio=prompt)
    assert torch.equal(continued[..., :3], generator.encode(prompt))


def test_the_generate_command_runs_a_musicgen_folder(mono, tmp_path, capsys):
    _, _, folder = mono
    out = tmp_path / "clip.wav"
    assert cli.main(["generate", TEXTS[0], "--model", str(folder), "--duration", str(FRAMES / 50), "--temperature",
                     "0", "--out", str(out)]) == 0
    written, rate = soundfile.read(out, dtype="float32", always_2d=True)
    expected = Generator.from_pretrained(folder).generate(TEXTS[:1], FRAMES / 50, Sampling(temperature=0))[0, 0]
    assert rate == 32000 and written.shape == (FRAMES * 640, 1)
    assert (torch.from_numpy(written[:, 0]) - expected.clamp(-1, 1)).abs().max() < 2 / 32768  # 16-bit PCM


@pytest.mark.parametrize("layout", ["sharded-safetensors", "pytorch_model.bin"])
def test_sharded_and_pickled_weights_load_the_same_model(tmp_path, layout):
    model, tokenizer = _musicgen(widths="tiny")
    if layout == "sharded-safetensors":
        folder = _save(model, tokenizer, tmp_path / "model", max_shard_size="100KB")
        assert len(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]) > 50
    else:  # older checkpoints: one torch pickle (transformers 5 only writes safetensors)
        folder = _save(model, tokenizer, tmp_path / "model")
        (folder / "model.safetensors").unlink()
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    assert not (folder / "model.safetensors").exists()
    parts = load_music_model(folder)
    reference = lm_from_transformers(model).state_dict()
    assert all(torch.equal(value, parts.lm.state_dict()[name]) for name, value in reference.items())
    codec = load_codec_model(folder).state_dict()
    assert all(torch.equal(value, codec[name]) for name, value in codec_from_transformers(
        model.audio_encoder).state_dict().items())


def test_a_lone_encodec_folder_serves_the_codec_commands(mono, tmp_path, capsys):
    model, _, _ = mono
    folder = tmp_path / "encodec_32khz"
    model.audio_encoder.save_pretrained(folder)
    audio = torch.randn(1, 3200, generator=torch.Generator().manual_seed(2)) * 0.1
    soundfile.write(tmp_path / "in.wav", audio[0].numpy(), 32000, subtype="FLOAT")
    assert cli.main(["codec", "encode", str(tmp_path / "in.wav"), str(tmp_path / "codes.pt"), "--model",
                     str(folder)]) == 0
    codes = torch.load(tmp_path / "codes.pt", weights_only=True)["codes"]
    with torch.no_grad():
        theirs = model.audio_encoder.encode(audio[None], bandwidth=2.2).audio_codes[0, 0]
    assert torch.equal(codes, theirs)


def _rewrite_config(folder, change):
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


def test_what_is_not_a_music_model_is_named(tmp_path):
    model, tokenizer = _musicgen(widths="tiny")
    folder = _save(model, tokenizer, tmp_path / "model")
    with pytest.raises(ValueError, match=r"nowhere: no such file or folder"):
        load_music_model(tmp_path / "nowhere")
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    with pytest.raises(ValueError, match=r"gpt2/config.json: model_type 'gpt2', not a music LM"):
        load_music_model(gpt2)
    with pytest.raises(ValueError, match=r"gpt2/config.json: model_type 'gpt2' is not an EnCodec"):
        load_codec_model(gpt2)
    with pytest.raises(ValueError, match=r"empty: not a model folder"):
        (tmp_path / "empty").mkdir()
        load_music_model(tmp_path / "empty")
    _rewrite_config(folder, lambda c: c.update(model_type="musicgen_melody"))  # a melody LM has no cross-attention
    with pytest.raises(ValueError, match=r"model.safetensors: tensor decoder\.model\.decoder\.layers\.\d+\.encoder_attn"
                                         r"\S+ has no place in the model"):
        load_music_model(folder)
    _rewrite_config(folder, lambda c: (c.update(model_type="musicgen"), c["decoder"].update(hidden_size=64)))
    with pytest.raises(ValueError, match=r"model.safetensors: tensor decoder\.\S+ has shape \(\d+, 32\), the model "
                                         r"expects \(\d+, 64\)"):
        load_music_model(folder)


def test_a_missing_tensor_names_the_file_and_the_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    model, tokenizer = _musicgen(widths="tiny")
    folder = _save(model, tokenizer, tmp_path / "model")
    tensors = load_file(folder / "model.safetensors")
    del tensors["decoder.lm_heads.2.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.safetensors: missing 1 tensor\(s\) the model needs, e.g. "
                                         r"heads.2.weight"):
        load_music_model(folder)
    (folder / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match=r"model.safetensors: not a readable safetensors file"):
        load_music_model(folder)
