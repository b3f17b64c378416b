"""The project's files: atomic writes (a reader never sees half a file, and a failed write leaves nothing
behind), JSON lines read with errors naming the file and line, tensors saved (never a NaN or an infinity) and
loaded as safetensors with errors naming the file and the tensor, audio written.

No torch at import time: the command line imports this module before it needs a model.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
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
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_folder(tmp, folder)


def replace_folder(tmp: str | Path, folder: str | Path) -> None:
    """Swap the complete folder ``tmp`` into place as ``folder`` by renames (``folder.old`` holds the previous one
    between the two renames only); what ``write_folder_atomic`` ends with, for writers that fill ``tmp`` from
    several processes."""
    tmp, folder = Path(tmp), Path(folder)
    old = folder.with_name(folder.name + ".old")
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


def read_jsonl_numbered(path: str | Path, required: Sequence[str] = ()) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSON-lines file, numbered from 1.

    ValueError naming the file (and ``FILE:LINE``) for a missing file, a line that is not UTF-8 text or not JSON,
    one that holds something other than a JSON object, or an object without every key in ``required``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file (expected JSON lines)")
    records = []
    with path.open("rb") as lines:  # decoded line by line, so that an error names its line
        for number, raw in enumerate(lines, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"{path}:{number}: not UTF-8 text (byte {error.start + 1} of the line: "
                                 f"{raw[error.start:error.start + 1]!r})") from error
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error})") from error
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            if not set(required) <= set(record):
                keys = " and a ".join(json.dumps(key) for key in required)
                raise ValueError(f"{path}:{number}: expected a JSON object with a {keys}, got keys {sorted(record)}")
            records.append((number, record))
    return records


def read_jsonl(path: str | Path, required: Sequence[str] = ()) -> list[dict]:
    """The objects of a JSON-lines file, blank lines skipped (errors as ``read_jsonl_numbered``)."""
    return [record for _, record in read_jsonl_numbered(path, required)]


def _non_finite(state: Mapping, what: str) -> str | None:
    """"tensor <name> of <what> holds <n> non-finite values ..." for the first float tensor of ``state`` holding
    a NaN or an infinity, or None."""
    for name, tensor in state.items():
        if not (tensor.is_floating_point() or tensor.is_complex()):
            continue
        bad = int(tensor.numel() - tensor.isfinite().sum())
        if bad:
            return f"tensor {name} of {what} holds {bad} non-finite values (NaN or infinity) among {tensor.numel()}"
    return None


def check_finite(path: str | Path, tensors, what: str) -> None:
    """ValueError naming ``path`` (the file that would be written) and the first tensor of ``tensors`` (a name ->
    tensor mapping, or a module's state dict) that holds a NaN or an infinity: no such file is ever saved."""
    found = _non_finite(tensors if isinstance(tensors, Mapping) else tensors.state_dict(), what)
    if found is not None:
        raise ValueError(f"{path}: not written: {found}; expected finite values only")


def save_weights(path: str | Path, tensors, what: str = "the weights") -> None:
    """``tensors`` (a name -> tensor mapping, or a module whose state dict is saved) to a safetensors file,
    atomically; the tensors are detached, made contiguous and moved to the CPU first. ValueError (see
    ``check_finite``), and nothing written, when a tensor is not finite."""
    from safetensors.torch import save_file

    state = tensors if isinstance(tensors, Mapping) else tensors.state_dict()
    check_finite(path, state, what)
    weights = {name: tensor.detach().contiguous().cpu() for name, tensor in state.items()}
    write_atomic(path, lambda tmp: save_file(weights, str(tmp)))


def read_weights(path: str | Path, what: str) -> dict:
    """Every tensor of the safetensors file at ``path`` (the weights of ``what``, for messages), on the CPU;
    ValueError naming the file when it is missing, not a safetensors file or truncated."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: missing; expected the weights of {what} (a safetensors file)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path}: not a safetensors file of {what} ({error})") from error


def check_weights(path: str | Path, tensors: Mapping, expected: Mapping, what: str) -> None:
    """ValueError naming the file and the tensors unless ``tensors`` has exactly the names of ``expected``
    (a state dict, or a name -> shape mapping), each tensor its shape and, against a state dict, its kind of
    dtype (float where a float is expected, else the very dtype: int8 codes stay int8), and every float finite."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: the weights do not fit {what}: missing {_names(missing)}, "
                         f"unexpected {_names(unexpected)}")
    for name, tensor in tensors.items():
        shape = tuple(getattr(expected[name], "shape", expected[name]))
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{path}: tensor {name} has shape {tuple(tensor.shape)}, {what} expects {shape}")
        dtype = getattr(expected[name], "dtype", None)
        if dtype is not None and (tensor.dtype != dtype if not dtype.is_floating_point
                                  else not tensor.dtype.is_floating_point):
            raise ValueError(f"{path}: tensor {name} is {tensor.dtype}, {what} expects {dtype}")
    found = _non_finite(tensors, what)
    if found is not None:
        raise ValueError(f"{path}: {found}; expected finite weights")


def _names(names: list[str], shown: int = 5) -> str:
    listed = ", ".join(names[:shown]) or "none"
    return listed + (f" and {len(names) - shown} more" if len(names) > shown else "")


def load_weights(path: str | Path, target, what: str) -> dict:
    """The tensors of a safetensors file, checked against ``target``: a module (they are loaded into it) or a
    name -> shape mapping. ValueError naming the file for a missing or unreadable file, a missing or
    unexpected tensor, or a wrong shape."""
    tensors = read_weights(path, what)
    expected = target if isinstance(target, Mapping) else target.state_dict()
    check_weights(path, tensors, expected, what)
    if not isinstance(target, Mapping):
        try:
            target.load_state_dict(tensors)
        except RuntimeError as error:  # a module's own check of what it loads (e.g. int8 scales > 0)
            raise ValueError(f"{path}: the weights do not fit {what}: {' '.join(str(error).split())}") from None
    return tensors
