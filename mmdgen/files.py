"""Atomic file writes: a reader never sees half a file, and a failed write leaves nothing behind."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write`` on a temporary name beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # per process: ranks may race for the same file
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


def write_folder_atomic(folder: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write`` on an empty temporary folder beside ``folder``, then swap it into place by renames
    (a crash leaves the old folder or the new one; ``folder.old`` only between the two renames)."""
    folder = Path(folder)
    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")


def write_audio(path: str | Path, audio, sample_rate: int) -> None:
    """``audio`` [channels, samples] (a tensor) to a .wav, .flac or .ogg file, atomically."""
    import soundfile

    path = Path(path)
    if path.suffix.lower() not in AUDIO_SUFFIXES:
        raise ValueError(f"{path}: write audio as .wav, .flac or .ogg")
    data = audio.detach().clamp(-1, 1).T.cpu().numpy()
    write_atomic(path, lambda tmp: soundfile.write(str(tmp), data, sample_rate, format=path.suffix[1:].upper()))
