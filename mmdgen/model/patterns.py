"""Codebook interleaving patterns: how K parallel code streams become one decoding sequence.

The codec gives codes ``[B, K, T]`` (K codebooks, T frames). The language model decodes a sequence
of S steps and predicts, at each step, every codebook row that holds a real code there. A pattern
decides which (frame, codebook) cells share a step, and so what the model can express:

``parallel``  step t holds all K codebooks of frame t.  S = T.
              The K codes of a frame are sampled at once from the product of their per-codebook
              marginals given the past: exact only if they are independent given the past.
``delay``     step s holds codebook k of frame s - delay_k (default delays 0..K-1).
              S = T + max(delays), so T + K - 1 by default.
              Still a product of marginals per step, but with increasing delays codebook k of
              frame t comes after the coarser codebooks of that frame and conditions on them; only
              the finer ones stay factorised (MusicGen's default; the independence loss aims here).
``flatten``   one codebook per step, frame-major: step t*K + k holds codebook k of frame t.
              S = K*T. Every code conditions on everything before it: the exact joint, at K
              times the steps.
``valle``     codebook 0 flattened over time first, then the other K-1 codebooks in parallel:
              steps 0..T-1 hold codebook 0 of frame s, steps T..2T-1 hold codebooks 1..K-1 of frame
              s - T. S = 2T (also for K=1, where the second half is empty, to keep one formula).
              In between: codebook 0 is autoregressive on its own; the finer codebooks of a frame
              are a product of marginals given all of codebook 0 and the earlier frames.

Layout: a sequence is ``[B, K, S]``; row k, column s holds the code of codebook k scheduled at step
s, or ``special_token`` where codebook k has nothing at that step. ``Pattern.valid_mask`` is the
``[K, S]`` boolean map of real cells; it has exactly K*T True entries for every pattern.

Unlike AudioCraft's providers, sequences here carry no leading all-special step: a start token is
the language model's business, and leaving it out keeps S equal to the decoding-step count (503 for
10 s at 50 frames/s with K=4 under ``delay``, 2000 under ``flatten``).

``build`` and ``revert`` are single advanced-indexing ops on index maps computed once per
(pattern, T, device) and cached, so the decode loop pays no Python work per batch item or frame.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import get_args

import torch

from mmdgen.choices import PatternName

PATTERNS = get_args(PatternName)

_CACHE_SIZE = 256


def _as_int(value: object, what: str) -> int:
    # operator.index accepts Python, NumPy and 0-d tensor integers but rejects floats; bools are
    # ints to Python yet almost always a mistake here.
    if isinstance(value, bool):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be an integer, got {value!r}") from None


def _check_frames(frames: int) -> int:
    frames = _as_int(frames, "frames")
    if frames < 0:
        raise ValueError(f"frames must be >= 0, got {frames}")
    return frames


@dataclass(frozen=True)
class Pattern:
    """One interleaving pattern for ``num_codebooks`` codebooks; see the module docstring.

    ``delays`` is only for ``delay``; left out it becomes ``(0, 1, ..., K-1)``, so equal patterns
    compare (and cache) equal however they were spelled.
    """

    name: str
    num_codebooks: int
    delays: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.name not in PATTERNS:
            valid = ", ".join(PATTERNS)
            raise ValueError(f"unknown pattern {self.name!r}; expected one of {valid}")
        k = _as_int(self.num_codebooks, "num_codebooks")
        if k < 1:
            raise ValueError(f"num_codebooks must be >= 1, got {k}")
        object.__setattr__(self, "num_codebooks", k)
        object.__setattr__(self, "delays", _normalise_delays(self.name, k, self.delays))

    # -- sizes ------------------------------------------------------------------------------------

    def num_steps(self, frames: int) -> int:
        """Sequence length S (= decoding steps) for ``frames`` frames."""
        frames = _check_frames(frames)
        k = self.num_codebooks
        if self.name == "parallel":
            return frames
        if self.name == "delay":
            return frames + max(self.delays)
        if self.name == "flatten":
            return k * frames
        return 2 * frames  # valle

    def frames_for_steps(self, steps: int) -> int:
        """Inverse of ``num_steps``: how many whole frames a sequence of ``steps`` steps holds."""
        steps = _as_int(steps, "steps")
        k = self.num_codebooks
        if self.name == "parallel":
            frames, expected = steps, "S >= 0"
        elif self.name == "delay":
            max_delay = max(self.delays)
            frames, expected = steps - max_delay, f"S >= max(delays) = {max_delay}"
        elif self.name == "flatten":
            frames = steps // k if steps % k == 0 else -1
            expected = f"a multiple of K={k}"
        else:  # valle
            frames = steps // 2 if steps % 2 == 0 else -1
            expected = "an even number"
        if frames < 0:
            raise ValueError(
                f"S={steps} steps is not a whole number of frames for pattern {self.name!r} "
                f"with K={k}; expected {expected}"
            )
        return frames

    # -- index maps -------------------------------------------------------------------------------

    def frame_index(self, frames: int) -> torch.Tensor:
        """``[K, S]`` int64: the frame whose code sits at (codebook k, step s); -1 where empty."""
        return _frame_index(self, _check_frames(frames), torch.device("cpu")).clone()

    def step_index(self, frames: int) -> torch.Tensor:
        """``[K, T]`` int64: the step at which codebook k of frame t is scheduled."""
        return _step_index(self, _check_frames(frames), torch.device("cpu")).clone()

    def valid_mask(self, frames: int) -> torch.Tensor:
        """``[K, S]`` bool: True where a real code sits, False where the special token goes."""
        return _frame_index(self, _check_frames(frames), torch.device("cpu")) >= 0

    # -- conversions ------------------------------------------------------------------------------

    def build(self, codes: torch.Tensor, special_token: int) -> torch.Tensor:
        """Codes ``[B, K, T]`` -> sequence ``[B, K, S]`` with ``special_token`` in empty cells."""
        special_token = _as_int(special_token, "special_token")
        if special_token < 0:
            raise ValueError(f"special_token must be >= 0, got {special_token}")
        self._check_codebook_dim(codes, "codes", exact_dims=True)
        frames = codes.shape[-1]
        # One extra column of special tokens lets empty cells (index -1 -> column T) be gathered
        # by the same indexing op as real ones, instead of a gather followed by a masked fill.
        special = codes.new_full((*codes.shape[:-1], 1), special_token)
        padded = torch.cat([codes, special], dim=-1)
        index = _frame_index(self, frames, codes.device)
        index = torch.where(index >= 0, index, frames)
        return padded[:, self._rows(codes.device), index]

    def revert(self, sequence: torch.Tensor) -> torch.Tensor:
        """Sequence ``[B, K, S, ...]`` -> ``[B, K, T, ...]``; trailing dims (logits) ride along."""
        self._check_codebook_dim(sequence, "sequence", exact_dims=False)
        frames = self.frames_for_steps(sequence.shape[2])
        index = _step_index(self, frames, sequence.device)
        return sequence[:, self._rows(sequence.device), index]

    # -- helpers ----------------------------------------------------------------------------------

    def _rows(self, device: torch.device) -> torch.Tensor:
        # Broadcasts against a [K, X] index map so row k reads only from codebook k.
        return torch.arange(self.num_codebooks, device=device)[:, None]

    def _check_codebook_dim(self, tensor: torch.Tensor, what: str, exact_dims: bool) -> None:
        k = self.num_codebooks
        shape = "[B, K, T]" if what == "codes" else "[B, K, S, ...]"
        bad_dims = tensor.dim() != 3 if exact_dims else tensor.dim() < 3
        if bad_dims or tensor.shape[1] != k:
            raise ValueError(
                f"{what} must have shape {shape} with K={k} for pattern {self.name!r}, "
                f"got shape {tuple(tensor.shape)}"
            )


def _normalise_delays(
    name: str, num_codebooks: int, delays: Sequence[int] | None
) -> tuple[int, ...] | None:
    if name != "delay":
        if delays is not None:
            raise ValueError(f"pattern {name!r} takes no delays, got delays={tuple(delays)!r}")
        return None
    if delays is None:
        return tuple(range(num_codebooks))
    delays = tuple(_as_int(d, "each delay") for d in delays)
    if len(delays) != num_codebooks:
        raise ValueError(
            f"delays={delays!r} has length {len(delays)}; its length must equal "
            f"num_codebooks K={num_codebooks}"
        )
    if min(delays) < 0:
        raise ValueError(f"delays={delays!r} must all be >= 0")
    # Neither sorted order nor a leading 0 is required: any non-negative delays give a valid,
    # invertible schedule (a positive minimum only adds leading empty steps).
    return delays


@lru_cache(maxsize=_CACHE_SIZE)
def _step_index(pattern: Pattern, frames: int, device: torch.device) -> torch.Tensor:
    # The per-pattern schedules are affine in t, so each is a broadcast over arange(T): no loops.
    k = pattern.num_codebooks
    t = torch.arange(frames, dtype=torch.int64)[None, :]
    rows = torch.arange(k, dtype=torch.int64)[:, None]
    if pattern.name == "parallel":
        steps = t.expand(k, frames)
    elif pattern.name == "delay":
        steps = t + torch.tensor(pattern.delays, dtype=torch.int64)[:, None]
    elif pattern.name == "flatten":
        steps = t * k + rows
    else:  # valle: codebook 0 over steps 0..T-1, the rest over T..2T-1
        steps = t + torch.where(rows == 0, 0, frames)
    return steps.contiguous().to(device)


@lru_cache(maxsize=_CACHE_SIZE)
def _frame_index(pattern: Pattern, frames: int, device: torch.device) -> torch.Tensor:
    # Derived from the step map so build and revert cannot disagree about the schedule.
    k = pattern.num_codebooks
    steps = _step_index(pattern, frames, torch.device("cpu"))
    index = torch.full((k, pattern.num_steps(frames)), -1, dtype=torch.int64)
    index.scatter_(1, steps, torch.arange(frames, dtype=torch.int64).expand(k, frames))
    return index.to(device)


def make_pattern(name: str, num_codebooks: int, delays: Sequence[int] | None = None) -> Pattern:
    """The pattern ``name`` (one of ``PATTERNS``) for ``num_codebooks`` codebooks."""
    return Pattern(name, num_codebooks, None if delays is None else tuple(delays))


def decoding_steps(name: str, num_codebooks: int, frames: int) -> int:
    """Decoding steps that ``frames`` frames need under pattern ``name`` with default delays."""
    return make_pattern(name, num_codebooks).num_steps(frames)
