"""A frozen text encoder's states cached in a token folder: computed once per caption, read at every step.

A frozen conditioner (T5, MiniLM) gives a caption the same states at every step, so the LM trainer encodes each
caption of its token folder once and keeps the states beside the codes, in ``text_states/<key>.safetensors``: one
``[L, dim]`` tensor per caption (its real tokens' states; padding is not stored) named ``states.<i>``, the
captions in order in the file's metadata. ``key`` is the conditioner's identity (``conditioner_key``: a SHA-256 of
its kind, its weights, its tokenizer and its length limit), so states of one encoder are never served for another.
A later run with new captions encodes only those and rewrites the file atomically (readers see the old file or the
new one). ``CachedTextStates`` is a ``TextConditioner`` serving them: the conditioning the encoder itself gives
(zero padding to the batch's longest caption, null captions), without running it.

Memory: the states of every caption stay in host memory (``L x dim`` floats per caption, e.g. 20 x 768 x 4 bytes
= 60 KB for a T5-base caption of 20 tokens); a batch's states are copied to the device when it is used.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import torch

from mmdgen.files import check_finite, write_atomic
from mmdgen.model.text import MiniLMTextEncoder, T5TextEncoder, TextConditioner, TextConditioning, is_null_caption
from mmdgen.pretrained.directory import tensors_sha256

CACHE_FOLDER = "text_states"
ENCODE_BATCH = 32  # captions encoded at once when the cache is filled


def conditioner_key(text: TextConditioner) -> str:
    """The identity of a frozen conditioner: SHA-256 of its kind, length limit, weights and tokenizer."""
    if isinstance(text, T5TextEncoder):
        tokenizer = Path(text.tokenizer.path).read_bytes()
    elif isinstance(text, MiniLMTextEncoder):
        tokenizer = text.tokenizer.to_str().encode()
    else:
        raise ValueError(f"text states are cached for frozen conditioners (t5, minilm), not for "
                         f"{type(text).__name__}, which trains with the LM")
    digest = hashlib.sha256(f"{type(text).__name__}|{text.max_length}|{tensors_sha256(text)}|".encode())
    digest.update(tokenizer)
    return digest.hexdigest()


def cache_path(tokens_folder: str | Path, key: str) -> Path:
    return Path(tokens_folder) / CACHE_FOLDER / f"{key}.safetensors"


def read_text_states(path: Path, dim: int) -> dict[str, torch.Tensor]:
    """Caption -> states [L, dim] from a cache file (empty when there is none); ValueError naming the file when it
    is not one."""
    from safetensors import SafetensorError, safe_open

    if not path.exists():
        return {}
    try:
        with safe_open(str(path), "pt") as f:
            captions = json.loads((f.metadata() or {}).get("captions", "null"))
            if not isinstance(captions, list) or set(f.keys()) != {f"states.{i}" for i in range(len(captions))}:
                raise ValueError("its captions and its tensors do not match")
            states = {caption: f.get_tensor(f"states.{i}") for i, caption in enumerate(captions)}
    except (SafetensorError, OSError, json.JSONDecodeError, ValueError) as error:
        raise ValueError(f"{path}: not a text-state cache ({error}); delete it to compute the states again") from error
    for caption, tensor in states.items():
        if tensor.dim() != 2 or tensor.shape[1] != dim:
            raise ValueError(f"{path}: the states of {caption!r} have shape {tuple(tensor.shape)}, expected [L, {dim}]")
    return states


def _write_text_states(path: Path, states: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    captions = list(states)
    tensors = {f"states.{i}": states[caption].contiguous() for i, caption in enumerate(captions)}
    check_finite(path, tensors, "the text-state cache")
    write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata={"captions": json.dumps(captions)}))


@torch.no_grad()
def fill_text_cache(path: str | Path, text: TextConditioner, captions: Iterable[str],
                    device: str | torch.device = "cpu") -> None:
    """Encode the captions the cache file ``path`` of ``text`` (``cache_path``) does not hold yet (null captions
    need none), on ``device`` (the encoder goes back where it was), and rewrite the file."""
    path = Path(path)
    states = read_text_states(path, text.dim)
    missing = sorted({c for c in captions if not is_null_caption(c)} - set(states))
    if not missing:
        return
    home = next(text.parameters()).device
    text.to(device)
    try:
        for start in range(0, len(missing), ENCODE_BATCH):
            chunk = missing[start: start + ENCODE_BATCH]
            encoded = text(chunk)
            for caption, row, mask in zip(chunk, encoded.states, encoded.mask):
                states[caption] = row[mask].float().cpu().clone()
    finally:
        text.to(home)
    _write_text_states(path, states)


class CachedTextStates(TextConditioner):
    """The states of a frozen conditioner read from its cache (``fill_text_cache``), on ``device``. A caption the
    cache does not hold is a ValueError naming the file."""

    def __init__(self, path: str | Path, dim: int, device: str | torch.device = "cpu"):
        super().__init__()
        self.path, self.dim, self.device = Path(path), dim, torch.device(device)
        self.states = read_text_states(self.path, dim)

    def encode_texts(self, captions: list[str]) -> TextConditioning:
        missing = [c for c in captions if c not in self.states]
        if missing:
            raise ValueError(f"{self.path}: no cached text states for the caption {missing[0]!r}; the cache holds "
                             "the captions of the token folder the run started with")
        rows = [self.states[c] for c in captions]
        length = max(row.shape[0] for row in rows)
        states = torch.zeros(len(rows), length, self.dim, dtype=rows[0].dtype)
        mask = torch.zeros(len(rows), length, dtype=torch.bool)
        for index, row in enumerate(rows):
            states[index, : row.shape[0]] = row
            mask[index, : row.shape[0]] = True
        return TextConditioning(states.to(self.device), mask.to(self.device))

    def _output_dtype_and_device(self) -> tuple[torch.dtype, torch.device]:
        return torch.float32, self.device
