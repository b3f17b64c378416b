"""audiocraft's exported files read by mmdgen (mmdgen.pretrained.audiocraft_files), checked against what
audiocraft 1.3.0 itself computed with them: tests/fixtures/audiocraft/, written once by
tests/audiocraft_reference.py (audiocraft's builders, exporters and loaders; see its docstring for what ran).

Measured (float32, this machine): logits within 1.3e-6 of audiocraft's (values up to 3.9), decoded audio within
0 (identical ops) and, from float64 modules, within 7.2e-7; the tolerances below leave ~10x. Codes are compared
exactly: the closest call in the fixture is a squared-distance gap of 4.3e-5 over distances ~0.6 (~750 float32
ulps), and the float64 modules give the very same codes.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mmdgen.model.codec import Codec
from mmdgen.model.lm import MusicLM
from mmdgen.pretrained.audiocraft_files import (AudiocraftCheckpoint, codec_config_from_audiocraft,
                                                codec_key_from_audiocraft, lm_config_from_audiocraft,
                                                lm_key_from_audiocraft, lm_tensors_from_audiocraft)
from mmdgen.tensor_files import load_module

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "audiocraft"
LM_PATH = FIXTURES / "state_dict.bin"
CODECS = ["compression_state_dict", "compression_state_dict_causal"]
T5_WIDTH = 768
FRAME_RATE = 50.0  # the 32 kHz codec's; the LM's file does not record it
LOGITS_TOLERANCE = dict(rtol=1e-5, atol=1e-5)
AUDIO_TOLERANCE = dict(rtol=1e-5, atol=1e-5)
_DELETE = object()


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / "reference.safetensors")


def build_lm(path: Path, dtype: torch.dtype = torch.float32) -> MusicLM:
    checkpoint = AudiocraftCheckpoint(path)
    cfg = lm_config_from_audiocraft(checkpoint, T5_WIDTH, FRAME_RATE)
    with torch.device("meta"):
        lm = MusicLM(cfg)
    return load_module(lm, lm_tensors_from_audiocraft(checkpoint, cfg.dim), lm_key_from_audiocraft, dtype).eval()


def build_codec(path: Path, dtype: torch.dtype = torch.float32) -> Codec:
    checkpoint = AudiocraftCheckpoint(path)
    with torch.device("meta"):
        codec = Codec(codec_config_from_audiocraft(checkpoint))
    return load_module(codec, checkpoint.tensors, codec_key_from_audiocraft, dtype).eval()


def rewritten(source: Path, target: Path, settings: dict | None = None, tensors: dict | None = None) -> Path:
    """A copy of an exported file with ``settings`` (dotted key -> value, or _DELETE) changed in its xp.cfg and
    ``tensors`` (name -> tensor, or _DELETE) in its best_state."""
    payload = torch.load(source, weights_only=True)
    config = yaml.safe_load(payload["xp.cfg"])
    for dotted, value in (settings or {}).items():
        *parents, last = dotted.split(".")
        node = config
        for part in parents:
            node = node.setdefault(part, {})
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value
    payload["xp.cfg"] = yaml.safe_dump(config)
    for name, value in (tensors or {}).items():
        if value is _DELETE:
            del payload["best_state"][name]
        else:
            payload["best_state"][name] = value
    torch.save(payload, target)
    return target


# -- the LM --------------------------------------------------------------------------------------------------

def test_lm_configuration_comes_from_xp_cfg():
    cfg = lm_config_from_audiocraft(AudiocraftCheckpoint(LM_PATH), T5_WIDTH, FRAME_RATE)
    assert (cfg.num_codebooks, cfg.codebook_size, cfg.dim, cfg.layers, cfg.heads) == (4, 32, 32, 2, 4)
    assert cfg.ffn_dim == 4 * 32 and cfg.text_dim == T5_WIDTH and cfg.delays == (0, 1, 2, 3)
    assert cfg.context_frames == 30 * 50  # dataset.segment_duration at the codec's frame rate
    assert lm_config_from_audiocraft(AudiocraftCheckpoint(LM_PATH), T5_WIDTH).context_frames is None


def test_lm_logits_match_audiocraft_for_whole_padded_and_null_texts(reference):
    """audiocraft's cross-attention has no mask: the zeroed padding positions stay in the softmax; the reader sets
    ``attend_text_padding`` so every row agrees (row 0 unpadded, row 1 padded, row 2 a null condition)."""
    lm = build_lm(LM_PATH)
    assert lm.cfg.attend_text_padding
    mask = reference["lm.text_mask"].bool()
    with torch.no_grad():
        logits = lm(reference["lm.tokens"], reference["lm.text_states"], mask)
    torch.testing.assert_close(logits, reference["lm.logits"], **LOGITS_TOLERANCE)
    lm.cfg.attend_text_padding = False  # transformers' rule: the padded row differs, the others do not
    with torch.no_grad():
        masked = lm(reference["lm.tokens"], reference["lm.text_states"], mask)
    torch.testing.assert_close(masked[[0, 2]], reference["lm.logits"][[0, 2]], **LOGITS_TOLERANCE)
    assert (masked[1] - reference["lm.logits"][1]).abs().max() > 0.1


def test_lm_reads_the_names_of_torch_multihead_attention(reference, tmp_path):
    """An LM built with ``memory_efficient`` and ``custom`` false holds nn.MultiheadAttention under ``.mha.``."""
    payload = torch.load(LM_PATH, weights_only=True)
    renamed = {name.replace("_attn.", "_attn.mha.").replace("cross_attention.", "cross_attention.mha."): value
               for name, value in payload["best_state"].items()}
    assert "transformer.layers.0.cross_attention.mha.in_proj_weight" in renamed
    payload["best_state"] = renamed
    torch.save(payload, tmp_path / "state_dict.bin")
    lm = build_lm(tmp_path / "state_dict.bin")
    mask = reference["lm.text_mask"].bool()
    with torch.no_grad():
        logits = lm(reference["lm.tokens"], reference["lm.text_states"], mask)
    torch.testing.assert_close(logits[[0]], reference["lm.logits"][[0]], **LOGITS_TOLERANCE)


# -- the codec -----------------------------------------------------------------------------------------------

def test_codec_configuration_resolves_xp_cfg_interpolations():
    base = codec_config_from_audiocraft(AudiocraftCheckpoint(FIXTURES / "compression_state_dict.bin"))
    # seanet.causal is "${encodec.causal}" (false) in the file, seanet.channels "${channels}"
    assert (base.causal, base.pad_mode, base.conv_shortcut, base.trim_right_ratio) == (False, "constant", False, 1.0)
    assert (base.sample_rate, base.channels, base.num_filters, base.ratios, base.dimension) == (32000, 1, 4, (4, 2), 8)
    assert (base.lstm_layers, base.num_residual_layers, base.quantizer.num_codebooks,
            base.quantizer.codebook_size) == (2, 1, 4, 32)
    variant = codec_config_from_audiocraft(AudiocraftCheckpoint(FIXTURES / "compression_state_dict_causal.bin"))
    assert (variant.causal, variant.pad_mode, variant.conv_shortcut, variant.trim_right_ratio) == (True, "reflect",
                                                                                                  True, 0.5)
    assert (variant.lstm_layers, variant.num_residual_layers) == (1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", CODECS)
def test_codec_codes_and_audio_match_audiocraft(reference, name, dtype):
    codec = build_codec(FIXTURES / f"{name}.bin", dtype)
    codes = codec.encode(reference["codec.input"].to(dtype))
    assert torch.equal(codes, reference[f"{name}.codes"])  # float64 too: no code sits on a near-tie
    audio = codec.decode(reference[f"{name}.codes"])
    torch.testing.assert_close(audio.float(), reference[f"{name}.audio"], **AUDIO_TOLERANCE)


def test_a_reference_only_compression_file_names_its_pretrained_codec():
    checkpoint = AudiocraftCheckpoint(FIXTURES / "compression_state_dict_pretrained.bin")
    assert checkpoint.pretrained == "facebook/encodec_32khz" and checkpoint.tensors is None


# -- refusals --------------------------------------------------------------------------------------------------

class _RunsCode:
    """Unpickling this calls os.mkdir(marker): code that weights_only=True must never run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path):
    path = tmp_path / "state_dict.bin"
    torch.save({"best_state": {}, "xp.cfg": _RunsCode(tmp_path / "ran"), "exported": True}, path)
    with pytest.raises(ValueError, match="weights_only=True") as error:
        AudiocraftCheckpoint(path)
    assert str(path) in str(error.value)
    assert not (tmp_path / "ran").exists()
    torch.load(path, weights_only=False)  # the object is live: a plain unpickling runs it
    assert (tmp_path / "ran").is_dir()


def test_a_file_without_xp_cfg_is_refused(tmp_path):
    payload = torch.load(LM_PATH, weights_only=True)
    del payload["xp.cfg"]
    torch.save(payload, tmp_path / "state_dict.bin")
    with pytest.raises(ValueError, match="xp.cfg") as error:
        AudiocraftCheckpoint(tmp_path / "state_dict.bin")
    assert str(tmp_path / "state_dict.bin") in str(error.value)


@pytest.mark.parametrize("settings, named", [
    ({"transformer_lm.bias_attn": True}, "transformer_lm.bias_attn=True"),
    ({"fuser.prepend": ["self_wav"], "conditioners.self_wav": {"model": "chroma_stem"}}, "fuser.prepend"),
    ({"transformer_lm.positional_embedding": "rope"}, "transformer_lm.positional_embedding='rope'"),
    ({"transformer_lm.norm_first": _DELETE}, "transformer_lm.norm_first not set, so audiocraft's default False"),
    ({"transformer_lm.kv_repeat": 2}, "transformer_lm.kv_repeat=2"),
])
def test_lm_settings_mmdgen_does_not_implement_are_named(tmp_path, settings, named):
    path = rewritten(LM_PATH, tmp_path / "state_dict.bin", settings)
    with pytest.raises(ValueError) as error:
        lm_config_from_audiocraft(AudiocraftCheckpoint(path), T5_WIDTH)
    assert str(path) in str(error.value) and named in str(error.value)


def test_melody_conditioning_names_the_extra_conditioner(tmp_path):
    path = rewritten(LM_PATH, tmp_path / "state_dict.bin", {"conditioners.self_wav": {"model": "chroma_stem"}})
    with pytest.raises(ValueError, match=r"conditioners \['description', 'self_wav'\]"):
        lm_config_from_audiocraft(AudiocraftCheckpoint(path), T5_WIDTH)


def test_an_lm_as_wide_as_its_text_encoder_is_refused():
    with pytest.raises(ValueError, match="transformer_lm.dim=32 equals the text width"):
        lm_config_from_audiocraft(AudiocraftCheckpoint(LM_PATH), text_dim=32)


@pytest.mark.parametrize("settings, named", [
    ({"seanet.norm": "time_group_norm"}, "seanet.norm='time_group_norm'"),
    ({"encodec.renormalize": True}, "encodec.renormalize=True"),
    ({"seanet.lstm": 0}, "seanet.lstm=0"),
    ({"seanet.decoder.n_filters": 8}, "seanet.decoder.n_filters=8"),
    ({"seanet.activation_params": {"alpha": 0.5}}, "seanet.activation_params={'alpha': 0.5}"),
])
def test_codec_settings_mmdgen_does_not_implement_are_named(tmp_path, settings, named):
    path = rewritten(FIXTURES / "compression_state_dict.bin", tmp_path / "compression_state_dict.bin", settings)
    with pytest.raises(ValueError) as error:
        codec_config_from_audiocraft(AudiocraftCheckpoint(path))
    assert str(path) in str(error.value) and named in str(error.value)


def test_a_wrong_shape_names_the_file_and_the_tensor(tmp_path):
    lm_path = rewritten(LM_PATH, tmp_path / "state_dict.bin", tensors={"linears.2.weight": torch.zeros(31, 32)})
    with pytest.raises(ValueError, match=r"tensor linears\.2\.weight has shape \(31, 32\)") as error:
        build_lm(lm_path)
    assert str(lm_path) in str(error.value)
    stacked = "transformer.layers.1.cross_attention.in_proj_weight"
    lm_path = rewritten(LM_PATH, tmp_path / "state_dict.bin", tensors={stacked: torch.zeros(95, 32)})
    with pytest.raises(ValueError, match=rf"{stacked} has shape \(95, 32\)"):
        build_lm(lm_path)
    codec_path = rewritten(FIXTURES / "compression_state_dict.bin", tmp_path / "compression_state_dict.bin",
                           tensors={"decoder.model.3.convtr.convtr.weight_v": torch.zeros(16, 8, 3)})
    with pytest.raises(ValueError, match=r"tensor decoder\.model\.3\.convtr\.convtr\.weight_v has shape") as error:
        build_codec(codec_path)
    assert str(codec_path) in str(error.value)


def test_a_missing_tensor_is_named(tmp_path):
    path = rewritten(LM_PATH, tmp_path / "state_dict.bin", tensors={"out_norm.bias": _DELETE})
    with pytest.raises(ValueError, match=r"missing 1 tensor\(s\) the model needs, e\.g\. norm\.bias"):
        build_lm(path)


# -- xp.cfg interpolations -------------------------------------------------------------------------------------

def checkpoint_with_config(tmp_path: Path, config: dict) -> AudiocraftCheckpoint:
    path = tmp_path / "compression_state_dict.bin"
    torch.save({"best_state": {"x": torch.zeros(1)}, "xp.cfg": yaml.safe_dump(config)}, path)
    return AudiocraftCheckpoint(path)


def test_interpolations_resolve_as_omegaconf_does(tmp_path):
    checkpoint = checkpoint_with_config(tmp_path, {
        "rate": 32000, "top": {"causal": True, "copy": "${top.causal}", "beside": "${.causal}", "up": "${..rate}",
                               "chain": "${top.copy}", "text": "rate=${rate}/s", "unset": "???"},
        "listed": ["${rate}", 2]})
    assert checkpoint.get("top.copy") is True and checkpoint.get("top.beside") is True
    assert checkpoint.get("top.up") == 32000 and checkpoint.get("top.chain") is True
    assert checkpoint.get("top.text") == "rate=32000/s" and checkpoint.get("listed") == [32000, 2]
    assert checkpoint.get("top")["copy"] is True
    assert checkpoint.get("top.unset", "default") == "default" and checkpoint.get("nowhere", 7) == 7


@pytest.mark.parametrize("value, named", [
    ("${oc.env:HOME}", "calls an OmegaConf resolver"),
    ("${no.such.key}", "refers to no.such.key, which xp.cfg does not set"),
    ("${loop.b}", "is circular"),
])
def test_interpolations_mmdgen_cannot_resolve_are_named(tmp_path, value, named):
    checkpoint = checkpoint_with_config(tmp_path, {"loop": {"a": value, "b": "${loop.a}"}})
    with pytest.raises(ValueError, match=named) as error:
        checkpoint.get("loop.a")
    assert str(checkpoint.path) in str(error.value) and "loop.a" in str(error.value)


# -- through the one loader -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def t5_base_wide(tmp_path_factory):
    """A random T5 encoder at t5-base's width (the LM's text projection reads 768-wide states), saved as a
    transformers T5 folder with a word-level tokenizer."""
    import transformers

    from mmdgen.model.text import word_level_t5_tokenizer

    folder = tmp_path_factory.mktemp("t5-base")
    tokenizer = word_level_t5_tokenizer(["a calm jig on flute", "epic orchestral score"])
    torch.manual_seed(0)
    transformers.T5EncoderModel(transformers.T5Config(vocab_size=len(tokenizer), d_model=T5_WIDTH, d_kv=64, d_ff=256,
                                                      num_layers=1, num_heads=12)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_the_loader_reads_an_audiocraft_folder_with_a_t5_folder(tmp_path, reference, t5_base_wide, monkeypatch):
    from mmdgen.generate import Generator, Sampling
    from mmdgen.pretrained import load_music_model

    folder = tmp_path / "musicgen-audiocraft"
    folder.mkdir()
    for name in ("state_dict.bin", "compression_state_dict.bin"):
        os.link(FIXTURES / name, folder / name)
    parts = load_music_model(folder, text_encoder=t5_base_wide)
    assert parts.format == "audiocraft" and parts.lm.cfg.attend_text_padding
    assert parts.lm.cfg.context_frames == 30 * parts.codec.cfg.frame_rate  # dataset.segment_duration
    with torch.no_grad():
        logits = parts.lm(reference["lm.tokens"], reference["lm.text_states"], reference["lm.text_mask"].bool())
    torch.testing.assert_close(logits, reference["lm.logits"], **LOGITS_TOLERANCE)
    codec = build_codec(FIXTURES / "compression_state_dict.bin")
    assert all(torch.equal(value, parts.codec.state_dict()[name]) for name, value in codec.state_dict().items())
    generator = Generator(parts.lm, parts.text, parts.codec)
    audio = generator.generate(["a calm jig on flute"], duration=0.2, sampling=Sampling(top_k=5))
    assert audio.shape == (1, 1, int(0.2 * parts.codec.cfg.sample_rate)) and torch.isfinite(audio).all()
    same = load_music_model(folder / "state_dict.bin", text_encoder=t5_base_wide)  # the file itself works too
    assert torch.equal(same.lm.heads[0].weight, parts.lm.heads[0].weight)

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ValueError, match=r"state_dict.bin: its text encoder t5-base is not in the local Hugging Face "
                                         r"cache; give its folder with --text-encoder.*hf download google-t5/t5-base"):
        load_music_model(folder)
    with pytest.raises(ValueError, match=r"facebook/encodec_32khz: not in the local Hugging Face cache"):
        load_music_model(folder / "state_dict.bin", codec=FIXTURES / "compression_state_dict_pretrained.bin",
                         text_encoder=t5_base_wide)
    with pytest.raises(ValueError, match=r"compression_state_dict.bin: not an audiocraft MusicGen LM checkpoint"):
        load_music_model(FIXTURES / "compression_state_dict.bin")
