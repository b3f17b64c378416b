"""`mmdgen codec encode|decode|reconstruct`: audio files to codes and back with a trained codec."""

from __future__ import annotations

from pathlib import Path

import torch

from mmdgen.data.audio import read_audio
from mmdgen.files import write_atomic, write_audio
from mmdgen.pretrained.loader import load_codec_model


def encode_file(model: str, audio_path: str, codes_path: str) -> torch.Tensor:
    codec = load_codec_model(model)
    audio = read_audio(Path(audio_path), codec.cfg.sample_rate)  # resampled, mixed to mono
    codes = codec.encode(audio[None])[0]
    payload = {"codes": codes, "length": torch.tensor(audio.shape[-1]), "sample_rate": torch.tensor(codec.cfg.sample_rate)}
    write_atomic(Path(codes_path), lambda tmp: torch.save(payload, tmp))
    return codes


def decode_file(model: str, codes_path: str, audio_path: str) -> None:
    codec = load_codec_model(model)
    try:
        payload = torch.load(codes_path, weights_only=True)
        codes, length = payload["codes"], int(payload["length"])
    except Exception as error:
        raise ValueError(f"{codes_path}: not a codes file written by `mmdgen codec encode` ({error})") from error
    write_audio(Path(audio_path), codec.decode(codes[None], length)[0], codec.cfg.sample_rate)


def reconstruct_file(model: str, audio_path: str, out_path: str) -> None:
    codec = load_codec_model(model)
    audio = read_audio(Path(audio_path), codec.cfg.sample_rate)
    decoded = codec.decode(codec.encode(audio[None]), audio.shape[-1])
    write_audio(Path(out_path), decoded[0], codec.cfg.sample_rate)
