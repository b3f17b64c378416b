"""One loader for every format, detected by content: what ``--model X`` / ``Generator.from_pretrained(X)`` accept.

``X`` may be
- an mmdgen model directory (``lm.safetensors`` + config.json, its codec in ``codec/``) or codec directory;
- a transformers folder: ``MusicgenForConditionalGeneration`` (LM, T5 and EnCodec in one),
  ``MusicgenMelodyForConditionalGeneration`` (the same, the LM conditioned on a melody's chroma too), or a lone
  ``EncodecModel`` (codec commands);
- audiocraft's exported files: ``state_dict.bin`` (the LM; ``compression_state_dict.bin`` beside it is its codec)
  or a folder holding them; the T5 text encoder is not in them: give its folder or cache id, else the one the
  checkpoint names (``t5-base``) is looked up in the local Hugging Face cache;
- a repository id (``facebook/musicgen-small``) found in the local Hugging Face cache (never downloaded).
Anything else is a ValueError naming the path and what was found there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mmdgen.model.codec import Codec
from mmdgen.model.lm import MusicLM
from mmdgen.model.melody import ChromaExtractor
from mmdgen.model.text import T5TextEncoder, TextConditioner
from mmdgen.pretrained import audiocraft_files as audiocraft
from mmdgen.pretrained import transformers_folder as hf
from mmdgen.pretrained.directory import CODEC_WEIGHTS, LM_WEIGHTS, load_codec, load_lm_codec, load_music_lm
from mmdgen.pretrained.hub_cache import looks_like_repo_id, resolve_repo_id
from mmdgen.tensor_files import load_module

# audiocraft names T5 by its old hub id; the cache may hold it under either
_T5_ALIASES = {"t5-base": ("t5-base", "google-t5/t5-base"), "t5-large": ("t5-large", "google-t5/t5-large")}


@dataclass
class MusicModel:
    """What generation needs: the LM, its text conditioner and its codec, and where they came from; for a melody
    LM the chroma extractor of its melodies."""

    lm: MusicLM
    text: TextConditioner
    codec: Codec
    source: str
    format: str  # "mmdgen", "transformers" or "audiocraft"
    chroma: ChromaExtractor | None = None


def locate(source: str | Path) -> Path:
    """A path that exists, or a repository id resolved in the local Hugging Face cache."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    if looks_like_repo_id(str(source)):
        return resolve_repo_id(str(source))
    raise ValueError(f"{source}: no such file or folder (and not a repository id of the form owner/name)")


def load_music_model(source: str | Path, codec: str | Path | None = None, text_encoder: str | Path | None = None,
                     device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> MusicModel:
    """The LM, text conditioner and codec of ``source`` (any format above). ``codec``: the codec to use instead
    of the one that comes with the model (for an mmdgen LM it must be the one its codes came from);
    ``text_encoder``: a T5 folder or cache id for audiocraft checkpoints."""
    path = locate(source)
    if path.is_file():
        return _audiocraft_model(path, codec, text_encoder, device, dtype, str(source))
    if _is_mmdgen_lm(path):
        lm, text, config = load_music_lm(path, device)
        return MusicModel(lm, text, load_lm_codec(path, config, codec, device), str(source), "mmdgen")
    if (path / audiocraft.LM_FILE).exists() and not (path / hf.CONFIG).exists():
        return _audiocraft_model(path / audiocraft.LM_FILE, codec, text_encoder, device, dtype, str(source))
    if not (path / hf.CONFIG).exists():
        raise ValueError(f"{path}: not a model folder: expected {LM_WEIGHTS} (mmdgen), {hf.CONFIG} with the weights "
                         f"(transformers) or {audiocraft.LM_FILE} (audiocraft)")
    config = hf.read_config(path)
    kind = hf.config_kind(config)
    if kind in ("musicgen", "musicgen_melody"):
        codec_model = load_codec_model(codec, device) if codec is not None else hf.load_encodec(path, device=device)
        chroma = hf.load_chroma(path, device) if kind == "musicgen_melody" else None
        return MusicModel(hf.load_musicgen_lm(path, device=device, dtype=dtype),
                          hf.load_musicgen_text(path, device, dtype), codec_model, str(source), "transformers",
                          chroma)
    what = f"model_type {config.get('model_type')!r}" if config.get("model_type") else "no model_type"
    raise ValueError(f"{path / hf.CONFIG}: {what}, not a music LM (expected a MusicGen checkpoint or an mmdgen "
                     "LM directory)")


def _is_mmdgen_lm(path: Path) -> bool:
    """An LM directory of ours: its weights file, or (when that is missing) its configuration's sections."""
    if (path / LM_WEIGHTS).exists():
        return True
    try:
        config = hf.read_config(path)
    except ValueError:
        return False
    return {"lm", "text", "codec"} <= set(config)


def load_codec_model(source: str | Path, device: str | torch.device = "cpu") -> Codec:
    """A codec from any format: an mmdgen codec directory (or the one bundled in an LM directory), a transformers
    ``EncodecModel`` or MusicGen folder, audiocraft's ``compression_state_dict.bin``, or a cache id."""
    path = locate(source)
    if path.is_file():
        return _audiocraft_codec(path, device)
    if (path / CODEC_WEIGHTS).exists():
        return load_codec(path, device)
    if (path / LM_WEIGHTS).exists() and (path / "codec" / CODEC_WEIGHTS).exists():
        return load_codec(path / "codec", device)
    if (path / audiocraft.CODEC_FILE).exists() and not (path / hf.CONFIG).exists():
        return _audiocraft_codec(path / audiocraft.CODEC_FILE, device)
    if not (path / hf.CONFIG).exists():
        raise ValueError(f"{path}: not a codec: expected {CODEC_WEIGHTS} (mmdgen), {hf.CONFIG} with the weights "
                         f"(a transformers EnCodec or MusicGen folder) or {audiocraft.CODEC_FILE} (audiocraft)")
    return hf.load_encodec(path, device=device)


def _audiocraft_codec(path: Path, device) -> Codec:
    checkpoint = audiocraft.AudiocraftCheckpoint(path)
    if checkpoint.pretrained is not None:  # the file only names a published codec
        return load_codec_model(checkpoint.pretrained, device)
    if checkpoint.get("transformer_lm") is not None:
        raise ValueError(f"{path}: an audiocraft LM checkpoint, not a codec (its codec is "
                         f"{audiocraft.CODEC_FILE})")
    with torch.device("meta"):
        codec = Codec(audiocraft.codec_config_from_audiocraft(checkpoint))
    load_module(codec, checkpoint.tensors, audiocraft.codec_key_from_audiocraft)
    return codec.to(device).eval()


def _audiocraft_model(path: Path, codec, text_encoder, device, dtype, source: str) -> MusicModel:
    checkpoint = audiocraft.AudiocraftCheckpoint(path)
    if checkpoint.get("transformer_lm") is None:
        raise ValueError(f"{path}: not an audiocraft MusicGen LM checkpoint (its xp.cfg has no transformer_lm; a "
                         f"codec file is named {audiocraft.CODEC_FILE})")
    codec_model = load_codec_model(codec if codec is not None else path.parent / audiocraft.CODEC_FILE, device)
    text = _audiocraft_text(checkpoint, text_encoder, dtype).to(device)
    cfg = audiocraft.lm_config_from_audiocraft(checkpoint, text.dim, codec_model.cfg.frame_rate)
    with torch.device("meta"):
        lm = MusicLM(cfg)
    load_module(lm, audiocraft.lm_tensors_from_audiocraft(checkpoint, cfg.dim), audiocraft.lm_key_from_audiocraft,
                dtype)
    return MusicModel(lm.to(device).eval(), text, codec_model, source, "audiocraft")


def _audiocraft_text(checkpoint, text_encoder, dtype) -> T5TextEncoder:
    """The T5 the checkpoint was trained with: ``text_encoder`` (a folder or cache id), else its name looked up
    in the local Hugging Face cache."""
    if text_encoder is not None:
        return T5TextEncoder.from_folder(locate(text_encoder), dtype=dtype)
    name = checkpoint.get("conditioners.description.t5.name")
    if name is None:  # audiocraft has no default either; an export of a T5 without a known name leaves it "???"
        raise ValueError(f"{checkpoint.path}: xp.cfg does not name its text encoder (conditioners.description.t5.name "
                         "is unset); give the T5's folder with --text-encoder")
    name = str(name)
    problems = []
    for candidate in _T5_ALIASES.get(name, (name,)):
        try:
            return T5TextEncoder.from_folder(resolve_repo_id(candidate), dtype=dtype)
        except ValueError as error:
            problems.append(str(error))
    raise ValueError(f"{checkpoint.path}: its text encoder {name} is not in the local Hugging Face cache; give its "
                     f"folder with --text-encoder, or fetch it once with `hf download {_T5_ALIASES.get(name, (name,))[-1]}`"
                     f" ({problems[-1]})")
