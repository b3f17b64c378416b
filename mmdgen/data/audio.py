"""Audio in: reading a file (``read_audio``), the clips of a corpus manifest or of a plain folder of audio files
(``Entry``), and the dataset of crops the codec trains on (``AudioDataset``, batched by ``collate``).

Every item is a waveform crop resampled to the model's rate and mixed to mono, with its caption and
the structured fields. Files that cannot serve (unreadable, silent, shorter than the crop) are
reported by name and skipped when the dataset is created, never in the middle of training.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mmdgen.files import read_jsonl

log = logging.getLogger(__name__)

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")
SILENCE_RMS = 1e-4


class NonFiniteAudioError(ValueError):
    """An audio file holding NaN or infinite samples (a float WAV can); the message names the file."""


@dataclass
class Entry:
    path: Path
    caption: str
    fields: dict = field(default_factory=dict)


# formats whose frames libsndfile reads from any offset exactly (MP3 and Ogg seeking are not relied on)
SEEKABLE = (".wav", ".flac")


def _read_samples(path: Path, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, int]:
    """[samples, channels] float32 (frames ``start`` to ``stop``, all by default) and the sample rate; ValueError
    naming the file when it cannot be read or holds a NaN or infinite sample (a float WAV can: encoded, every such
    frame would become code 0)."""
    import soundfile

    try:
        data, rate = soundfile.read(str(path), start=start, stop=stop, dtype="float32", always_2d=True)
    except Exception as error:  # soundfile raises LibsndfileError / RuntimeError / TypeError
        raise ValueError(f"{path}: cannot read audio ({error})") from error
    finite = np.isfinite(data)
    if not finite.all():
        first = int(np.argwhere(~finite)[0][0])
        raise NonFiniteAudioError(f"{path}: non-finite samples ({int((~finite).sum())} NaN or infinite values, the "
                                  f"first at {first / rate:.3f} s); expected audio")
    return data, rate


def read_audio(path: Path, sample_rate: int) -> torch.Tensor:
    """[1, T] float32 mono at ``sample_rate``; ValueError naming the file when it cannot be read or holds a NaN or
    infinite sample."""
    import torchaudio.functional as AF

    data, rate = _read_samples(path)
    audio = torch.from_numpy(data.mean(axis=1))[None]
    if rate != sample_rate:
        audio = AF.resample(audio, rate, sample_rate)
    return audio


def _audio_info(path: Path) -> tuple[int, int]:
    """(frames, sample rate) from the file's header; ValueError naming the file when it is not audio."""
    import soundfile

    try:
        info = soundfile.info(str(path))
    except Exception as error:  # soundfile raises LibsndfileError / RuntimeError / TypeError
        raise ValueError(f"{path}: cannot read audio ({error})") from error
    return info.frames, info.samplerate


def read_melody(path: Path) -> tuple[torch.Tensor, int]:
    """A melody LM's reference recording as it is: ([1, channels, samples] float32, sample rate); the chroma
    extractor resamples and mixes it as transformers does. ValueError naming the file when it is not audio, holds
    no samples or holds non-finite ones."""
    data, rate = _read_samples(path)
    if data.size == 0:
        raise ValueError(f"{path}: the melody holds no audio samples (expected at least one)")
    return torch.from_numpy(np.ascontiguousarray(data.T))[None], rate


def _problem(audio: torch.Tensor, min_samples: int) -> str | None:
    if audio.shape[-1] < min_samples:
        return f"too short: {audio.shape[-1]} samples, need {min_samples}"
    if audio.square().mean().sqrt() < SILENCE_RMS:
        return "silent"
    return None


class AudioDataset(torch.utils.data.Dataset):
    """Crops of ``crop_seconds`` (the whole file when None) from a list of entries.

    ``random_crop`` draws the offset from (seed, epoch, index) so runs are reproducible; otherwise the
    crop starts at 0. Call ``set_epoch`` each epoch for new random crops.
    """

    def __init__(self, entries: list[Entry], sample_rate: int = 32000, crop_seconds: float | None = None,
                 random_crop: bool = True, seed: int = 0, check: bool = True):
        self.sample_rate = sample_rate
        self.crop = None if crop_seconds is None else int(round(crop_seconds * sample_rate))
        self.random_crop = random_crop
        self.seed = seed
        self.epoch = 0
        self.skipped: list[tuple[str, str]] = []
        self.entries = self._usable(entries) if check else list(entries)
        if not self.entries:
            raise ValueError(f"no usable audio among {len(entries)} files ({len(self.skipped)} skipped)")

    def _usable(self, entries: list[Entry]) -> list[Entry]:
        keep = []
        for entry in tqdm(entries, desc="checking audio", unit="file", disable=len(entries) < 200):
            try:
                problem = _problem(read_audio(entry.path, self.sample_rate), self.crop or 1)
            except ValueError as error:
                problem = str(error).removeprefix(f"{entry.path}: ")
            if problem:
                self.skipped.append((str(entry.path), problem))
                log.warning("skipping %s: %s", entry.path, problem)
            else:
                keep.append(entry)
        if self.skipped:
            log.warning("skipped %d of %d audio files", len(self.skipped), len(entries))
        return keep

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        entry = self.entries[index]
        audio = read_audio(entry.path, self.sample_rate) if self.crop is None else self._read_crop(entry.path, index)
        return {"audio": audio, "caption": entry.caption, "fields": entry.fields}

    def _read_crop(self, path: Path, index: int) -> torch.Tensor:
        """The crop of the file as read whole: a WAV or FLAC at the target rate decodes only the crop's frames
        (a 1 s crop of a 10 s clip: a tenth of the decoding), any other file is read whole and cut."""
        whole = None
        length, rate = _audio_info(path) if path.suffix.lower() in SEEKABLE else (0, None)
        if rate != self.sample_rate:
            whole = read_audio(path, self.sample_rate)
            length = whole.shape[-1]
        spare = length - self.crop
        start = 0
        if self.random_crop and spare > 0:
            start = int(np.random.default_rng([self.seed, self.epoch, index]).integers(spare + 1))
        if whole is not None:
            return whole[:, start: start + self.crop]
        data, _ = _read_samples(path, start, min(start + self.crop, length))
        return torch.from_numpy(data.mean(axis=1))[None]


def manifest_entries(manifest: str | Path, split: str | None = None) -> list[Entry]:
    """Entries of a corpus manifest (paths relative to its folder), optionally one split."""
    manifest = Path(manifest)
    if not manifest.exists():
        raise ValueError(f"{manifest}: no such manifest")
    entries = []
    for record in read_jsonl(manifest, required=("path", "caption")):
        if split is None or record.get("split") == split:
            fields = {k: v for k, v in record.items() if k not in ("path", "caption")}
            entries.append(Entry(manifest.parent / record["path"], record["caption"], fields))
    return entries


def folder_entries(folder: str | Path, captions: str | Path | None = None) -> list[Entry]:
    """Audio files under ``folder``; captions from a JSONL file of {"path", "caption"} (paths relative
    to that file's folder, as in a manifest), else the file name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder")
    known = {}
    if captions is not None:
        known = {entry.path.resolve(): entry.caption for entry in manifest_entries(captions)}
    entries = []
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in AUDIO_EXTENSIONS and path.is_file():
            entries.append(Entry(path, known.get(path.resolve(), path.stem.replace("_", " "))))
    if not entries:
        raise ValueError(f"{folder}: no audio files ({', '.join(AUDIO_EXTENSIONS)})")
    return entries


def collate(batch: list[dict]) -> dict:
    """Stack equal-length crops into [B, 1, T]; captions and fields as lists."""
    lengths = {item["audio"].shape[-1] for item in batch}
    if len(lengths) != 1:
        raise ValueError(f"crops of different lengths {sorted(lengths)} cannot be batched; set crop_seconds")
    return {"audio": torch.stack([item["audio"] for item in batch]), "captions": [item["caption"] for item in batch],
            "fields": [item["fields"] for item in batch]}
