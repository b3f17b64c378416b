"""The decode loop: one pattern step at a time over a static KV cache.

``decode(lm, memory, batch, frames, pattern, sampling, ...)`` fills the pattern sequence ``[B, K, S]``
step by step: the step's input is the previous step's K tokens (the special token before the first),
the LM's logits for the K codebooks are guided, filtered and sampled in one op
(``mmdgen.kernels.sampling``), and cells where the pattern holds no code get the special token. With
classifier-free guidance the conditional and the null rows run as one batch of 2B. Cells given by an
audio prompt are forced, and the leading steps that the prompt fixes entirely run as one prefill pass.

Everything the loop needs is allocated before the first step: the caches (``lm.new_caches``), the text's
keys and values (computed once), the sequence, the prompt's forced cells, the stacked embedding tables and
the position table; each step's input (the previous step's K codes embedded and summed, plus the position)
is one fused op (``mmdgen.kernels.step_input``). ``on_step`` is called after each
step with the step index and the sequence so far (streaming decodes the frames that became final).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from mmdgen.kernels.sampling import sample_next
from mmdgen.kernels.step_input import pattern_step_input
from mmdgen.model.lm import MusicLM, sinusoidal_positions
from mmdgen.model.patterns import Pattern


@dataclass
class Sampling:
    """MusicGen's defaults: guidance 3, top-k 250, temperature 1 (``temperature=0``: greedy)."""

    guidance_scale: float | None = 3.0
    temperature: float = 1.0
    top_k: int = 250
    top_p: float = 0.0

    def __post_init__(self):
        if self.guidance_scale is not None and self.guidance_scale <= 0:
            raise ValueError(f"guidance_scale must be positive (or None for no guidance), got {self.guidance_scale}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: off), got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1] (0: off), got {self.top_p}")


def forced_cells(pattern: Pattern, prompt: torch.Tensor | None, batch: int, frames: int, special: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence [B, K, S] holding the prompt's codes, bool [B, K, S] where they are forced)."""
    k, steps = pattern.num_codebooks, pattern.num_steps(frames)
    if prompt is None or prompt.shape[-1] == 0:
        return (torch.full((batch, k, steps), special, dtype=torch.long, device=device),
                torch.zeros(batch, k, steps, dtype=torch.bool, device=device))
    given = prompt.shape[-1]
    padded = torch.full((batch, k, frames), special, dtype=torch.long, device=device)
    padded[..., :given] = prompt.to(device)
    sequence = pattern.build(padded, special)
    frame = pattern.frame_index(frames).to(device)
    forced = ((frame >= 0) & (frame < given)).expand(batch, k, steps).clone()
    return sequence, forced


def prefill_steps(pattern: Pattern, forced: torch.Tensor, frames: int) -> int:
    """How many leading steps the prompt fixes entirely (every real cell forced)."""
    valid = pattern.valid_mask(frames).to(forced.device)
    settled = (forced | ~valid).all(dim=(0, 1))  # [S]
    unsettled = (~settled).nonzero()
    return int(unsettled[0]) if len(unsettled) else settled.numel()


@torch.no_grad()
def decode(lm: MusicLM, memory, batch: int, frames: int, pattern: Pattern, sampling: Sampling,
           generator: torch.Generator | None = None, prompt: torch.Tensor | None = None, backend: str = "auto",
           on_step: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Codes [B, K, frames]. ``memory``: ``lm.cross_memory`` of the text states, 2B rows (conditional first,
    then null) with guidance, B without; ``prompt``: codes [B, K, T_prompt] to continue."""
    special = lm.cfg.special_token
    device = lm.heads[0].weight.device
    guided = sampling.guidance_scale is not None
    rows = 2 * batch if guided else batch
    steps = pattern.num_steps(frames)
    sequence, forced = forced_cells(pattern, prompt, batch, frames, special, device)
    valid = pattern.valid_mask(frames).to(device)  # [K, S]
    caches = lm.new_caches(rows, max(steps, 1))
    greedy = sampling.temperature == 0 or sampling.top_k == 1
    start = prefill_steps(pattern, forced, frames)
    if start > 0:  # the prompt's fully known steps in one pass; their logits are not needed
        lm.hidden(_repeat(_inputs(sequence, start, special), rows), None, None, caches=caches, start=0,
                  memory=memory, backend=backend)
    embeddings = lm.embedding_weights()
    positions = sinusoidal_positions(torch.arange(steps, device=device), lm.cfg.dim).to(embeddings.dtype)
    for step in range(start, steps):
        embedded = pattern_step_input(sequence, step, embeddings, positions, special, backend=backend)
        hidden = lm.hidden(None, None, None, caches=caches, start=step, memory=memory, backend=backend,
                           embedded=_repeat(embedded, rows))
        logits = lm.logits(hidden)[:, :, 0]
        chosen = sample_next(logits, guidance_scale=sampling.guidance_scale if guided else None,
                             temperature=0.0 if greedy else sampling.temperature,
                             top_k=min(sampling.top_k, lm.cfg.codebook_size),  # 250 means all of a small codebook
                             top_p=sampling.top_p, generator=None if greedy else generator, backend=backend)
        chosen = torch.where(valid[:, step], chosen, special)
        sequence[..., step] = torch.where(forced[..., step], sequence[..., step], chosen)
        if on_step is not None:
            on_step(step, sequence)
    return pattern.revert(sequence)


def _inputs(sequence: torch.Tensor, end: int, special: int) -> torch.Tensor:
    """The inputs of steps 0..end-1: the sequence shifted one step right behind the special token."""
    head = torch.full_like(sequence[..., :1], special)
    return torch.cat([head, sequence[..., : end - 1]], dim=-1)


def _repeat(inputs: torch.Tensor, rows: int) -> torch.Tensor:
    """The same inputs for the conditional and the null rows."""
    return inputs if inputs.shape[0] == rows else inputs.repeat(rows // inputs.shape[0], *[1] * (inputs.dim() - 1))
