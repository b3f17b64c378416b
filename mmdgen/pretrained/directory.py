"""Model directories: what the trainers export and every command loads.

A codec directory holds ``config.json`` (the ``CodecConfig``) and ``codec.safetensors``. An LM directory holds
``config.json`` (the ``LMConfig``, what rebuilds the text conditioner, and the identity of the codec whose codes
the LM learned: its configuration and the SHA-256 of its weights file, or for a codec read from a published
checkpoint, which has no such file, the SHA-256 of its tensors), ``lm.safetensors``, for a learned text
encoder ``text.safetensors`` and its ``text_tokenizer.model``, and usually the codec itself in ``codec/``. Each
file is written atomically, and no weights file is written with a NaN or an infinity in it (ValueError naming the
file and the tensor); loading checks every tensor's name and shape and never unpickles anything.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import torch

from mmdgen.files import check_finite, load_weights, save_weights, write_atomic, write_text_atomic
from mmdgen.model.codec import Codec, CodecConfig
from mmdgen.model.lm import LMConfig, MusicLM
from mmdgen.model.quantize import quantize_lm
from mmdgen.model.text import LearnedTextEncoder, LearnedTextEncoderConfig, TextConditioner, text_conditioner

CONFIG = "config.json"
CODEC_WEIGHTS = "codec.safetensors"
LM_WEIGHTS = "lm.safetensors"
TEXT_WEIGHTS = "text.safetensors"
TEXT_TOKENIZER = "text_tokenizer.model"
BUNDLED_CODEC = "codec"  # the codec's directory inside an LM directory


# -- codec directories -----------------------------------------------------------------------------------------

def save_codec(codec: Codec, folder: str | Path) -> Path:
    """A codec directory: config.json + codec.safetensors, each written atomically; ValueError and nothing written
    when a weight is not finite."""
    folder = Path(folder)
    save_weights(folder / CODEC_WEIGHTS, codec, "the codec")
    write_text_atomic(folder / CONFIG, json.dumps(dataclasses.asdict(codec.cfg), indent=1))
    return folder


def load_codec(folder: str | Path, device: str | torch.device = "cpu") -> Codec:
    """The codec saved by ``save_codec`` (or exported by the trainer), in eval mode."""
    folder = Path(folder)
    config_path, weights_path = folder / CONFIG, folder / CODEC_WEIGHTS
    for path in (config_path, weights_path):
        if not path.exists():
            raise ValueError(f"{path}: missing; a codec directory holds {CONFIG} and {CODEC_WEIGHTS}")
    try:
        cfg = CodecConfig(**json.loads(config_path.read_text()))
    except (TypeError, ValueError) as error:  # not JSON, an unknown field, a bad value
        raise ValueError(f"{config_path}: not a codec configuration ({error})") from error
    codec = Codec(cfg)
    load_weights(weights_path, codec, f"the codec of {config_path}")
    return codec.to(device).eval()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tensors_sha256(tensors) -> str:
    """SHA-256 of a module's state dict (or a name -> tensor mapping): every tensor's name, dtype, shape and bytes,
    in name order. The same tensors give the same digest whatever file they were read from."""
    state = tensors.state_dict() if isinstance(tensors, torch.nn.Module) else tensors
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def codec_identity(codec_dir: str | Path) -> dict:
    """What a token set and an LM record about the codec directory that made their codes."""
    codec_dir = Path(codec_dir)
    return {"config": json.loads((codec_dir / CONFIG).read_text()),
            "weights_sha256": file_sha256(codec_dir / CODEC_WEIGHTS)}


def loaded_codec_identity(codec: Codec) -> dict:
    """The identity of a codec read from a published checkpoint (no codec.safetensors of ours to hash): its
    configuration and the SHA-256 of its tensors (``tensors_sha256``)."""
    return json.loads(json.dumps({"config": dataclasses.asdict(codec.cfg), "tensors_sha256": tensors_sha256(codec)}))


def is_codec(identity: dict, codec: Codec | None = None, codec_dir: str | Path | None = None) -> bool:
    """Whether the codec (loaded, or its directory) is the one ``identity`` records: its weights file's hash for an
    identity of a codec directory, its tensors' hash for one of a published codec."""
    if "tensors_sha256" in identity:
        codec = codec if codec is not None else load_codec(codec_dir)
        return tensors_sha256(codec) == identity["tensors_sha256"]
    return codec_dir is not None and is_codec_directory(codec_dir) and \
        file_sha256(Path(codec_dir) / CODEC_WEIGHTS) == identity.get("weights_sha256")


def is_codec_directory(folder: str | Path) -> bool:
    return (Path(folder) / CODEC_WEIGHTS).exists()


def copy_codec(source: str | Path, target: str | Path) -> None:
    """The codec directory ``source`` copied to ``target``, file by file, each atomically."""
    source, target = Path(source), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG, CODEC_WEIGHTS):
        write_atomic(target / name, lambda tmp, name=name: shutil.copyfile(source / name, tmp))


# -- LM directories --------------------------------------------------------------------------------------------

def save_music_lm(folder: str | Path, lm: MusicLM, text: TextConditioner, text_record: dict, codec: dict) -> Path:
    """An LM directory: config.json (LM, text conditioner, the codec the codes came from), lm.safetensors,
    and for a learned text encoder text.safetensors and its tokenizer. ValueError, and nothing written, when a
    weight is not finite."""
    folder = Path(folder)
    record = dict(text_record)
    learned = record["kind"] == "learned"
    check_finite(folder / LM_WEIGHTS, lm, "the LM")  # both before any file: an old directory is kept whole
    if learned:
        check_finite(folder / TEXT_WEIGHTS, text, "the text encoder")
        write_atomic(folder / TEXT_TOKENIZER, lambda tmp: shutil.copyfile(text.tokenizer.path, tmp))
        record["config"] = {**record["config"], "tokenizer_path": TEXT_TOKENIZER}
        save_weights(folder / TEXT_WEIGHTS, text, "the text encoder")
    save_weights(folder / LM_WEIGHTS, lm, "the LM")
    config = {"lm": dataclasses.asdict(lm.cfg), "text": record, "codec": codec}
    if getattr(lm, "quantization", None) is not None:  # int8 codes and scales: loaded as they are
        config["quantization"] = lm.quantization
    write_text_atomic(folder / CONFIG, json.dumps(config, indent=1))
    return folder


def load_music_lm(folder: str | Path, device: str | torch.device = "cpu") -> tuple[MusicLM, TextConditioner, dict]:
    """(LM, text conditioner, config) from ``save_music_lm``'s directory, in eval mode."""
    folder = Path(folder)
    config_path = folder / CONFIG
    if not config_path.exists():
        raise ValueError(f"{config_path}: missing; an LM directory holds {CONFIG} and {LM_WEIGHTS}")
    try:
        config = json.loads(config_path.read_text())
        lm = _new_lm(LMConfig(**config["lm"]), config.get("quantization"))
    except (KeyError, TypeError, ValueError) as error:  # not JSON, a missing or unknown field, a bad value
        raise ValueError(f"{config_path}: not an LM configuration ({error})") from error
    load_weights(folder / LM_WEIGHTS, lm, f"the LM of {config_path}")
    record = dict(config["text"])
    if record.get("path") and not Path(record["path"]).is_absolute() and (folder / record["path"]).exists():
        record["path"] = str(folder / record["path"])  # a text encoder saved inside the directory
    if record["kind"] == "learned":
        text_cfg = LearnedTextEncoderConfig(**{**record["config"],
                                               "tokenizer_path": str(folder / record["config"]["tokenizer_path"])})
        text = LearnedTextEncoder(text_cfg)
        load_weights(folder / TEXT_WEIGHTS, text, f"the text encoder of {config_path}")
    else:
        text = text_conditioner(record["kind"], **({"path": record["path"]} if record.get("path") else {}))
    return lm.to(device).eval(), text.to(device).eval(), config


def _new_lm(cfg: LMConfig, quantization: str | None) -> MusicLM:
    """An LM to load weights into: float, or with the int8 layers its file holds (built without quantizing)."""
    if quantization is None:
        return MusicLM(cfg)
    with torch.device("meta"):
        lm = quantize_lm(MusicLM(cfg), quantization)
    return lm.to_empty(device="cpu")


def load_lm_codec(model_dir: str | Path, config: dict, codec_dir: str | Path | None = None,
                  device: str | torch.device = "cpu") -> Codec:
    """The codec whose codes the LM of ``model_dir`` (its ``config``) learned: ``codec_dir``, or the one bundled
    in ``model_dir/codec``; ValueError unless its weights (or, for a published codec's identity, its tensors) hash
    to what the LM recorded."""
    model_dir = Path(model_dir)
    codec_dir = Path(codec_dir) if codec_dir is not None else model_dir / BUNDLED_CODEC
    if not is_codec_directory(codec_dir):
        raise ValueError(f"{codec_dir}: no codec here; pass codec_dir, the codec the LM's tokens came from")
    codec = load_codec(codec_dir, device)
    if not is_codec(config["codec"], codec, codec_dir):
        what = "tensors" if "tensors_sha256" in config["codec"] else "weights"
        raise ValueError(f"{codec_dir / CODEC_WEIGHTS} is not the codec {model_dir} was trained on "
                         f"(its {what} hash differs)")
    return codec
