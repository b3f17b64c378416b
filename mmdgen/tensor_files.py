"""The tensors of a checkpoint, read lazily by name: one safetensors file (memory-mapped), a sharded
set behind ``model.safetensors.index.json``, or a torch pickle (``pytorch_model.bin``, audiocraft's ``.bin``
files) opened with ``weights_only=True`` and memory-mapped where the file allows it. No framework is needed.

``load_module(module, tensors, rename)`` fills a module built on the meta device with those tensors, one at a
time: the module's own storage is the only copy made. Every mismatch is a ValueError naming the file and the
tensor: a tensor the module needs that the file lacks, a wrong shape, a tensor in the file the module would
ignore.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_FILE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"


class TensorFiles:
    """Name -> tensor over one or more checkpoint files; ``source(name)`` is the file a tensor comes from."""

    def __init__(self, files: dict[str, Path], readers: dict[Path, object], description: str):
        self._file_of = files
        self._readers = readers
        self.description = description  # what to name in errors: the file, or the index and its shards

    @classmethod
    def from_folder(cls, folder: Path) -> TensorFiles:
        """The weights of a transformers folder: safetensors first (single or sharded), else the torch pickle."""
        for name, opener in ((SAFETENSORS_INDEX, cls._sharded), (SAFETENSORS_FILE, cls.from_file),
                             (PICKLE_INDEX, cls._sharded), (PICKLE_FILE, cls.from_file)):
            if (folder / name).is_file():
                return opener(folder / name)
        raise ValueError(f"{folder}: no weights found (expected {SAFETENSORS_FILE}, {SAFETENSORS_INDEX}, "
                         f"{PICKLE_FILE} or {PICKLE_INDEX})")

    @classmethod
    def from_file(cls, path: Path) -> TensorFiles:
        reader = _open(path)
        return cls({name: path for name in reader.keys()}, {path: reader}, str(path))

    @classmethod
    def from_mapping(cls, tensors: dict[str, torch.Tensor], path: Path) -> TensorFiles:
        """Tensors already read (a pickle holding more than weights, as audiocraft's files do)."""
        return cls({name: path for name in tensors}, {path: _MappingReader(tensors)}, str(path))

    @classmethod
    def _sharded(cls, index: Path) -> TensorFiles:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{index}: not a sharded-checkpoint index ({error})") from error
        readers, files = {}, {}
        for name, shard in weight_map.items():
            path = index.parent / shard
            if Path(shard).name != shard:
                raise ValueError(f"{index}: shard {shard!r} of {name} is not a file beside the index")
            if path not in readers:
                if not path.is_file():
                    raise ValueError(f"{index}: lists {name} in {shard}, which is missing")
                readers[path] = _open(path)
            if name not in readers[path].keys():
                raise ValueError(f"{index}: lists {name} in {path}, which does not hold it")
            files[name] = path
        return cls(files, readers, f"{index} and its shards")

    def names(self) -> list[str]:
        return list(self._file_of)

    def keys(self) -> list[str]:  # with __getitem__: a read-only mapping, each tensor read when asked for
        return self.names()

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.get(name)

    def source(self, name: str) -> Path:
        return self._file_of[name]

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def get(self, name: str) -> torch.Tensor:
        return self._readers[self._file_of[name]].get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._readers[self._file_of[name]].get_shape(name))


class _MappingReader:
    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def keys(self):
        return self.tensors.keys()

    def get_tensor(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def get_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)


class _SafetensorsReader:
    def __init__(self, path: Path):
        from safetensors import safe_open

        self.handle = safe_open(str(path), framework="pt")

    def keys(self):
        return self.handle.keys()

    def get_tensor(self, name: str) -> torch.Tensor:
        return self.handle.get_tensor(name)

    def get_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.handle.get_slice(name).get_shape())


def _open(path: Path):
    if path.suffix == ".safetensors":
        try:
            return _SafetensorsReader(path)
        except Exception as error:  # SafetensorError (truncated, a pickle under the name), OSError
            raise ValueError(f"{path}: not a readable safetensors file ({error})") from error
    return _MappingReader(read_pickle(path))


def read_pickle(path: Path) -> dict:
    """A torch pickle with ``weights_only=True`` (memory-mapped when it is a zip archive): tensors, numbers,
    strings and containers only; anything else (code to run) is refused."""
    try:
        mmap = zipfile.is_zipfile(path)
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path}: not a torch checkpoint that loads with weights_only=True ({first})") from error
    if not isinstance(payload, dict):
        raise ValueError(f"{path}: expected a dictionary of tensors, found a {type(payload).__name__}")
    return payload


def load_module(module: nn.Module, tensors: TensorFiles, rename: Callable[[str], str | None],
                dtype: torch.dtype = torch.float32, ignore: Iterable[str] = ()) -> nn.Module:
    """Fill ``module``'s parameters and persistent buffers from ``tensors``: ``rename(file name)`` gives the
    module's name for a file tensor, or None for a tensor of another part of the checkpoint. Floating tensors
    become ``dtype``; the module may live on the meta device (it is materialised by assignment). ``ignore``: file
    names of tensors the module recomputes (skipped silently)."""
    expected = module.state_dict(keep_vars=True)
    found: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    skipped = set(ignore)
    for name in tensors.names():
        if name in skipped:
            continue
        ours = rename(name)
        if ours is None:
            continue
        if ours not in expected:
            raise ValueError(f"{tensors.source(name)}: tensor {name} has no place in the model (as {ours}); "
                             f"is this the checkpoint of another architecture?")
        if ours in found:
            raise ValueError(f"{tensors.source(name)}: tensors {origin[ours]} and {name} both load into {ours}")
        shape = tensors.shape(name)
        if shape != tuple(expected[ours].shape):
            raise ValueError(f"{tensors.source(name)}: tensor {name} has shape {shape}, the model expects "
                             f"{tuple(expected[ours].shape)} for {ours} (does the configuration match these weights?)")
        value = tensors.get(name)
        target = expected[ours].dtype
        found[ours] = value.to(dtype if value.is_floating_point() else target)
        origin[ours] = name
    missing = sorted(set(expected) - set(found))
    if missing:
        raise ValueError(f"{tensors.description}: missing {len(missing)} tensor(s) the model needs, e.g. "
                         f"{', '.join(missing[:3])}")
    module.load_state_dict(found, assign=True)
    return module
