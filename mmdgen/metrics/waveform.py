"""What the generation metrics share about clips: a clip is ``[samples]`` or ``[channels, samples]``."""

from __future__ import annotations

import torch


def mono(clip: torch.Tensor, name: str) -> torch.Tensor:
    """``[samples]`` float32: the channels of a ``[channels, samples]`` clip averaged; ValueError naming ``name``
    for any other shape."""
    if clip.dim() == 2:
        return clip.float().mean(0)
    if clip.dim() == 1:
        return clip.float()
    raise ValueError(f"{name}: expected [samples] or [channels, samples], got {tuple(clip.shape)}")
