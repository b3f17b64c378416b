"""Encode the corpus once into codes, so that LM training never runs the codec.

    mmdgen data tokenize --codec runs/codec/model --manifest runs/corpus/manifest.jsonl --out runs/tokens
    mmdgen data tokenize --codec facebook/musicgen-small --manifest my_music/manifest.jsonl --out runs/my-tokens

The codec may come in any format the loader reads (``mmdgen.pretrained.load_codec_model``: our codec or LM
directory, a transformers EnCodec or MusicGen folder, audiocraft's files, a cache id). A token folder holds
``tokens.json`` (the codec's identity: its configuration and the SHA-256 of its weights file, or of its tensors
for a published codec, and where it was; K, codebook size, frame rate; one record per clip: id, split, caption,
offset, frames) and
``codes.safetensors`` (one ``[K, frames]`` int16 tensor per split, the clips of that split end to end,
``offset`` locating each). The folder is written under a temporary name and renamed into place, so it is
complete or absent. ``TokenSet`` reads it back, checking that the codes fit the header. A frozen text
encoder's states may be cached beside the codes (``mmdgen.data.text_states``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from mmdgen.data.audio import collate, manifest_entries, read_audio
from mmdgen.files import read_weights, save_weights, write_folder_atomic
from mmdgen.model.codec import Codec
from mmdgen.pretrained.directory import (BUNDLED_CODEC, LM_WEIGHTS, codec_identity, is_codec_directory, load_codec,
                                         loaded_codec_identity)
from mmdgen.pretrained.loader import load_codec_model, locate

HEADER = "tokens.json"
CODES = "codes.safetensors"
FORMAT_VERSION = 1


def codec_with_identity(source: str | Path, device: str | torch.device = "cpu") -> tuple[Codec, dict, Path]:
    """The codec of ``source`` (any format), its identity and where it is: a codec directory of ours (also the one
    bundled in an LM directory) is known by its weights file's hash, what LMs trained on it record; any other codec
    by its tensors' hash."""
    path = locate(source)
    folder = path / BUNDLED_CODEC if path.is_dir() and (path / LM_WEIGHTS).exists() else path
    if path.is_dir() and is_codec_directory(folder):
        return load_codec(folder, device), codec_identity(folder), folder.resolve()
    codec = load_codec_model(path, device)
    return codec, loaded_codec_identity(codec), path.resolve()


def tokenize_corpus(codec_source: str | Path, manifest: str | Path, out: str | Path, batch_size: int = 8,
                    device: str = "cpu", progress: bool = True) -> dict:
    """Encode every clip of ``manifest`` with the codec of ``codec_source`` (any format); returns the header
    written."""
    out = Path(out)
    codec, identity, location = codec_with_identity(codec_source, device)
    cfg = codec.cfg
    if cfg.quantizer.codebook_size > 2**15:
        raise ValueError(f"codebook_size {cfg.quantizer.codebook_size} does not fit the int16 token files")
    entries = manifest_entries(manifest)
    if not entries:
        raise ValueError(f"{manifest}: no clips to tokenize")
    records, codes_by_split = [], {}
    bar = tqdm(total=len(entries), desc="tokenizing", unit="clip", disable=not progress)
    for start in range(0, len(entries), batch_size):
        chunk = entries[start: start + batch_size]
        audio = [read_audio(entry.path, cfg.sample_rate) for entry in chunk]
        lengths = [a.shape[-1] for a in audio]
        batch = collate([{"audio": a, "caption": e.caption, "fields": e.fields} for a, e in zip(audio, chunk)])
        with torch.no_grad():
            codes = codec.encode(batch["audio"].to(device)).cpu()
        for entry, length, clip_codes in zip(chunk, lengths, codes):
            frames = -(-length // cfg.hop_length)  # the clip's own frames, not the batch padding
            split = entry.fields.get("split", "train")
            parts = codes_by_split.setdefault(split, [])
            offset = sum(p.shape[-1] for p in parts)
            parts.append(clip_codes[:, :frames].to(torch.int16))
            records.append({"id": entry.fields.get("id", entry.path.stem), "split": split, "caption": entry.caption,
                            "offset": offset, "frames": frames})
        bar.update(len(chunk))
    bar.close()
    header = {"format": FORMAT_VERSION, "codec": identity, "codec_dir": str(location),
              "num_codebooks": cfg.quantizer.num_codebooks, "codebook_size": cfg.quantizer.codebook_size,
              "frame_rate": cfg.frame_rate, "sample_rate": cfg.sample_rate, "manifest": str(manifest),
              "splits": {s: sum(p.shape[-1] for p in parts) for s, parts in codes_by_split.items()},
              "clips": records}
    write_token_folder(out, header, {split: torch.cat(parts, dim=-1) for split, parts in codes_by_split.items()})
    return header


def write_token_folder(out: Path, header: dict, codes: dict[str, torch.Tensor]) -> None:
    def write(tmp: Path) -> None:
        save_weights(tmp / CODES, {f"codes.{split}": c for split, c in codes.items()})
        (tmp / HEADER).write_text(json.dumps(header, indent=1))

    write_folder_atomic(out, write)


@dataclass
class Clip:
    id: str
    caption: str
    codes: torch.Tensor  # [K, frames] int64


class TokenSet:
    """The clips of one split of a token folder."""

    def __init__(self, folder: str | Path, split: str = "train"):
        self.folder = Path(folder)
        header_path, codes_path = self.folder / HEADER, self.folder / CODES
        for path in (header_path, codes_path):
            if not path.exists():
                raise ValueError(f"{path}: missing; a token folder (mmdgen data tokenize) holds {HEADER} and {CODES}")
        try:
            self.header = json.loads(header_path.read_text())
            k, size = self.header["num_codebooks"], self.header["codebook_size"]
        except (json.JSONDecodeError, KeyError) as error:
            raise ValueError(f"{header_path}: not a token header ({error})") from error
        self.num_codebooks, self.codebook_size, self.split = k, size, split
        self.records = [r for r in self.header["clips"] if r["split"] == split]
        tensors = read_weights(codes_path, "a token folder's codes")
        self.codes = tensors.get(f"codes.{split}", torch.zeros(k, 0, dtype=torch.int16))
        if self.codes.shape != (k, self.header["splits"].get(split, 0)):
            raise ValueError(f"{codes_path}: split {split!r} holds codes {tuple(self.codes.shape)}, the header "
                             f"says [{k}, {self.header['splits'].get(split, 0)}]")
        if self.codes.numel() and (int(self.codes.min()) < 0 or int(self.codes.max()) >= size):
            raise ValueError(f"{codes_path}: split {split!r} has codes in [{int(self.codes.min())}, "
                             f"{int(self.codes.max())}], outside the codebook [0, {size})")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Clip:
        record = self.records[index]
        codes = self.codes[:, record["offset"]: record["offset"] + record["frames"]].long()
        return Clip(record["id"], record["caption"], codes)

    @property
    def codec(self) -> dict:
        return self.header["codec"]


def describe(header: dict) -> str:
    splits = ", ".join(f"{s} {frames / header['frame_rate'] / 3600:.2f} h" for s, frames in header["splits"].items())
    return (f"{len(header['clips'])} clips, {header['num_codebooks']} x {header['codebook_size']} codes at "
            f"{header['frame_rate']:g} frames/s ({splits})")

