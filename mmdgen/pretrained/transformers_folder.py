"""transformers model folders, read without transformers: ``MusicgenForConditionalGeneration`` (config.json with
``text_encoder`` / ``audio_encoder`` / ``decoder`` parts; the weights as one safetensors file, a sharded set or
``pytorch_model.bin``; the T5 tokenizer beside them), ``MusicgenMelodyForConditionalGeneration`` (the same parts;
a prefix LM whose melody chroma settings are in preprocessor_config.json) and a lone ``EncodecModel``.

Weights go straight from the files into modules built on the meta device (``tensor_files.load_module``), so
the only copy made is the module's own. The published checkpoints were trained on 30-s excerpts (1500 frames at
50 frames/s): the LM records that as its context (or the one generation_config.json's max_length gives, for folders
mmdgen exported), so longer audio is generated in windows.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mmdgen.model.codec import Codec
from mmdgen.model.convert import codec_config_from_dict, codec_key_from_transformers, lm_config_from_dict, \
    lm_key_from_transformers, melody_lm_config
from mmdgen.model.lm import MusicLM
from mmdgen.model.melody import ChromaConfig, ChromaExtractor
from mmdgen.model.text import T5TextEncoder
from mmdgen.tensor_files import TensorFiles, load_module

CONFIG = "config.json"
PREPROCESSOR = "preprocessor_config.json"
PUBLISHED_CONTEXT_SECONDS = 30  # the excerpt length every published MusicGen was trained on
AUDIO_PREFIX = "audio_encoder."


def read_config(folder: Path) -> dict:
    """``folder/config.json`` as a dictionary; ValueError naming the file when it is not one."""
    path = folder / CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise ValueError(f"{path}: missing") from error
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a JSON configuration ({error})") from error
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(config).__name__}")
    return config


def config_kind(config: dict) -> str | None:
    """``"musicgen"``, ``"musicgen_melody"``, ``"encodec"``, ``"t5"`` or None for a transformers config."""
    model_type = config.get("model_type")
    return model_type if model_type in ("musicgen", "musicgen_melody", "encodec", "t5") else None


def _part(config: dict, name: str, folder: Path) -> dict:
    part = config.get(name)
    if not isinstance(part, dict):
        raise ValueError(f"{folder / CONFIG}: a MusicGen configuration without its {name} part")
    return part


def load_musicgen_lm(folder: Path, tensors: TensorFiles | None = None, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32) -> MusicLM:
    """The LM (decoder and text projection; the melody projection too for a melody checkpoint) of a
    ``MusicgenForConditionalGeneration`` or ``MusicgenMelodyForConditionalGeneration`` folder."""
    config = read_config(folder)
    text_dim = _part(config, "text_encoder", folder).get("d_model")
    try:
        cfg = lm_config_from_dict(_part(config, "decoder", folder), text_dim)
        if config_kind(config) == "musicgen_melody":
            cfg = melody_lm_config(cfg, config)
    except ValueError as error:
        raise ValueError(f"{folder / CONFIG}: {error}") from error
    cfg.context_frames = _context_frames(folder, cfg, _frame_rate(_part(config, "audio_encoder", folder)))
    with torch.device("meta"):
        lm = MusicLM(cfg)
    tensors = tensors or TensorFiles.from_folder(folder)
    load_module(lm, tensors, lm_key_from_transformers, dtype)
    return lm.to(device).eval()


def load_musicgen_text(folder: Path, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32) -> T5TextEncoder:
    """The frozen T5 conditioner inside a MusicGen folder (its tokenizer files beside the weights)."""
    return T5TextEncoder.from_folder(folder, dtype=dtype).to(device)


def load_chroma(folder: Path, device: str | torch.device = "cpu") -> ChromaExtractor:
    """The chroma extractor of a ``MusicgenMelodyForConditionalGeneration`` folder: the settings of its
    preprocessor_config.json (transformers' ``MusicgenMelodyFeatureExtractor``), its defaults where absent."""
    path = folder / PREPROCESSOR
    settings = {}
    if path.exists():
        try:
            settings = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path}: not a JSON configuration ({error})") from error
        if not isinstance(settings, dict):
            raise ValueError(f"{path}: expected a JSON object, found {type(settings).__name__}")
    names = dict(sampling_rate="sample_rate", n_fft="n_fft", hop_length="hop_length", feature_size="num_chroma",
                 chunk_length="chunk_length")
    try:
        cfg = ChromaConfig(**{ours: settings[theirs] for theirs, ours in names.items() if theirs in settings})
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: {error}") from error
    return ChromaExtractor(cfg).to(device)


def load_encodec(folder: Path, tensors: TensorFiles | None = None, device: str | torch.device = "cpu") -> Codec:
    """The EnCodec of an ``EncodecModel`` folder, or the audio encoder inside a MusicGen folder."""
    config = read_config(folder)
    prefix = ""
    if config_kind(config) in ("musicgen", "musicgen_melody"):
        config, prefix = _part(config, "audio_encoder", folder), AUDIO_PREFIX
    elif config_kind(config) != "encodec":
        raise ValueError(f"{folder / CONFIG}: model_type {config.get('model_type')!r} is not an EnCodec (expected "
                         "'encodec', or a MusicGen folder holding one)")
    try:
        cfg = codec_config_from_dict(config)
    except ValueError as error:
        raise ValueError(f"{folder / CONFIG}: {error}") from error
    with torch.device("meta"):
        codec = Codec(cfg)
    tensors = tensors or TensorFiles.from_folder(folder)

    def rename(name: str) -> str | None:
        return codec_key_from_transformers(name[len(prefix):]) if name.startswith(prefix) else None

    load_module(codec, tensors, rename)
    return codec.to(device).eval()


def _context_frames(folder: Path, cfg, frame_rate: int) -> int:
    """The frames the LM was trained on: the published checkpoints' 30 s (their generation_config.json says
    max_length 1500, the context itself), else the frames a ``max_length`` in generation_config.json leaves after
    the largest delay (what mmdgen's export writes), else 30 s."""
    published = PUBLISHED_CONTEXT_SECONDS * frame_rate
    path = folder / "generation_config.json"
    try:
        max_length = json.loads(path.read_text(encoding="utf-8")).get("max_length") if path.exists() else None
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as error:
        raise ValueError(f"{path}: not a JSON generation configuration ({error})") from error
    if not isinstance(max_length, int) or max_length == published:
        return published
    frames = max_length - max(cfg.delays or range(cfg.num_codebooks))
    if frames < 1:
        raise ValueError(f"{path}: max_length {max_length} leaves no frame after the delays {cfg.delays}")
    return frames


def _frame_rate(audio_config: dict) -> int:
    cfg = codec_config_from_dict(audio_config)
    return int(round(cfg.frame_rate))
