"""The LM's loss (audiocraft's): the cross-entropy of each codebook over the cells where the pattern holds a real
code (targets ``IGNORE`` elsewhere), averaged over codebooks; fused with the output heads by default
(``mmdgen.kernels.cross_entropy``: no ``[B, K, S, V]`` logits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmdgen.kernels.cross_entropy import linear_cross_entropy
from mmdgen.model.lm import MusicLM

IGNORE = -100  # the target of a cell where the pattern holds no code


def codebook_losses(lm: MusicLM, hidden: torch.Tensor, targets: torch.Tensor, fused: bool = True,
                    backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, per-codebook mean NLL [K]) of hidden [B, S, dim] against targets [B, K, S]."""
    k = targets.shape[1]
    if fused:
        flat_targets = targets.permute(0, 2, 1).reshape(-1, k)
        return linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), lm.head_weights().to(hidden.dtype),
                                    flat_targets, ignore_index=IGNORE, backend=backend)
    logits = lm.logits(hidden).float()  # [B, K, S, V]: what the fused path never materialises
    per_codebook = []
    for index in range(k):
        valid = targets[:, index] != IGNORE
        value = F.cross_entropy(logits[:, index].flatten(0, 1), targets[:, index].flatten(), ignore_index=IGNORE,
                                reduction="sum") / valid.sum().clamp_min(1)
        per_codebook.append(value)
    per_codebook = torch.stack(per_codebook)
    return per_codebook.mean(), per_codebook.detach()
