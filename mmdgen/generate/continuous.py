"""Continuous batching: ``rows`` clips decode together, each at its own pattern step, and a row that finishes its
clip is refilled from the queue at once (a job of mixed durations keeps every row busy).

``decode_continuously(generator, clips, sampling, rows)`` yields ``(index, codes [K, frames])`` as each clip of
``clips`` (``ClipRequest``: text, duration, seed) finishes, in the order they finish.

Each row has its own text memory, its own length (its clip's number of pattern steps) and its own step counter.
The self-attention caches hold ``2 * rows`` rows with guidance (row r's conditional row is r, its null row
rows + r, as the decode loop orders them); row r's step s writes its keys and values at cache position s, and
attends to positions ``<= s`` of its own cache rows only (a per-row key mask over the cache: the decode attention's
``key_mask``; the attended length is the longest live row's). A refilled row restarts at position 0, so what an
earlier clip left in its cache rows is never attended: nothing needs clearing. Its text memory rows are replaced
(the memory buffer is as long as the longest text so far; a shorter text's padding is masked out).

The noise rule: a clip's sampling noise is drawn from its own ``torch.Generator`` seeded with the clip's seed, one
``[1, K, V]`` Gumbel draw per step, exactly what ``Generator.generate_codes([text], duration, sampling, seed)``
draws for a batch of one. So a clip depends only on its text, seed and duration, never on its row, its
neighbours or when it started, and generating it alone reproduces it (up to floating-point rounding of the
batched products, which can flip a choice between near-equal logits).

Not batched here (each generated alone through ``Generator.generate_codes``, same noise rule): clips longer than
the LM's context (``context_frames``: they need windows). Prefix-conditioned LMs (MusicGen-melody) are refused:
their conditioning positions sit in the self-attention cache, with a length of each row's own. The step runs
eagerly (``Generator.compile`` and ``cuda_graph`` apply to ``decode``'s fixed-batch loop, not here).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmdgen.generate.config import Sampling
from mmdgen.generate.generator import Generator
from mmdgen.kernels.sampling import gumbel_noise, sample_next
from mmdgen.model.lm import DecoderLayer, sinusoidal_positions


@dataclass
class ClipRequest:
    text: str
    duration: float
    seed: int


@dataclass
class _Row:
    index: int  # the clip's place in the request list
    steps: int  # pattern steps of its clip
    frames: int
    noise: torch.Generator | None  # None: greedy
    step: int = 0


@torch.no_grad()
def decode_continuously(generator: Generator, clips: Sequence[ClipRequest], sampling: Sampling,
                        rows: int = 8) -> Iterator[tuple[int, torch.Tensor]]:
    """(index into ``clips``, codes [K, frames]) for every clip, as each finishes (see the module docstring)."""
    if generator.lm.cfg.conditioning != "cross":
        raise ValueError(f"continuous batching needs a cross-attention LM; this one is "
                         f"{generator.lm.cfg.conditioning}-conditioned (MusicGen-melody): use bucketed batches")
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ValueError(f"rows must be an integer >= 1, got {rows!r}")
    frames = [generator.frames(clip.duration, f"clip {index}: duration") for index, clip in enumerate(clips)]
    context = generator.context_frames
    windowed = [i for i, f in enumerate(frames) if context is not None and f > context]
    batched = sorted(set(range(len(clips))) - set(windowed))
    if batched:
        yield from _Scheduler(generator, clips, frames, batched, sampling, min(rows, len(batched))).run()
    for index in windowed:
        clip = clips[index]
        yield index, generator.generate_codes([clip.text], clip.duration, sampling, seed=clip.seed)[0]


class _Scheduler:
    """The buffers of one continuous job, allocated once for its longest clip and longest text."""

    def __init__(self, generator: Generator, clips: Sequence[ClipRequest], frames: list[int], order: list[int],
                 sampling: Sampling, rows: int):
        lm = generator.lm
        self.generator, self.lm, self.clips, self.frames, self.sampling = generator, lm, clips, frames, sampling
        self.queue = deque(order)
        self.rows, self.guided = rows, sampling.guidance_scale is not None
        self.cache_rows = 2 * rows if self.guided else rows
        self.greedy = sampling.temperature == 0 or sampling.top_k == 1
        self.pattern, self.special = generator.pattern, lm.cfg.special_token
        device, cfg = generator.device, lm.cfg
        max_steps = max(self.pattern.num_steps(frames[i]) for i in order)
        self.caches = lm.new_caches(self.cache_rows, max_steps, generator.runtime.cache_dtype(lm))
        self.embeddings = lm.embedding_weights()
        self.positions = sinusoidal_positions(torch.arange(max_steps, device=device), cfg.dim).to(
            self.embeddings.dtype)
        self.sequence = torch.full((rows, cfg.num_codebooks, max_steps), self.special, dtype=torch.long,
                                   device=device)
        self.valid = torch.zeros(rows, cfg.num_codebooks, max_steps, dtype=torch.bool, device=device)
        self.text_keys: list[torch.Tensor] | None = None  # per layer [cache_rows, H, L, hd], grown to the longest
        self.text_values: list[torch.Tensor] | None = None
        self.text_mask: torch.Tensor | None = None  # [cache_rows, L] bool
        self.slots: list[_Row | None] = [None] * rows
        self.cache_index = torch.arange(self.cache_rows, device=device)

    def run(self) -> Iterator[tuple[int, torch.Tensor]]:
        for row in range(self.rows):
            self._fill(row)
        while any(slot is not None for slot in self.slots):
            self._step()
            for row, slot in enumerate(self.slots):
                if slot is not None and slot.step == slot.steps:
                    codes = self.pattern.revert(self.sequence[row: row + 1, :, : slot.steps])[0]
                    self.slots[row] = None
                    self._fill(row)
                    yield slot.index, codes

    def _fill(self, row: int) -> None:
        """Give ``row`` the next clip of the queue: its text memory, an empty sequence, step 0."""
        if not self.queue:
            return
        index = self.queue.popleft()
        clip, frames = self.clips[index], self.frames[index]
        steps = self.pattern.num_steps(frames)
        noise = None if self.greedy else torch.Generator(self.generator.device).manual_seed(clip.seed)
        self.slots[row] = _Row(index, steps, frames, noise)
        self.sequence[row].fill_(self.special)
        self.valid[row].zero_()
        self.valid[row, :, :steps] = self.pattern.valid_mask(frames).to(self.valid.device)
        memories, mask = self.generator._memory([clip.text], self.guided)
        self._place_text(row, [keys for keys, _ in memories], [values for _, values in memories], mask[:, 0, 0])

    def _place_text(self, row: int, keys: list[torch.Tensor], values: list[torch.Tensor],
                    mask: torch.Tensor) -> None:
        """Write one clip's text memory (its conditional row, then its null row) into the buffers' rows."""
        length = mask.shape[-1]
        if self.text_mask is None or self.text_mask.shape[1] < length:
            self._grow_text(length, keys[0])
        targets = [row, self.rows + row] if self.guided else [row]
        for layer in range(len(keys)):
            self.text_keys[layer][targets] = 0.0
            self.text_values[layer][targets] = 0.0
            self.text_keys[layer][targets, :, :length] = keys[layer]
            self.text_values[layer][targets, :, :length] = values[layer]
        self.text_mask[targets] = False
        self.text_mask[targets, :length] = mask

    def _grow_text(self, length: int, like: torch.Tensor) -> None:
        """Widen the text memory buffers to ``length`` positions (the new ones zero and masked out)."""
        shape = (self.cache_rows, like.shape[1], length, like.shape[3])
        old = self.text_mask.shape[1] if self.text_mask is not None else 0
        keys = [like.new_zeros(shape) for _ in self.lm.layers]
        values = [like.new_zeros(shape) for _ in self.lm.layers]
        mask = torch.zeros(self.cache_rows, length, dtype=torch.bool, device=like.device)
        if old:
            for layer in range(len(keys)):
                keys[layer][:, :, :old] = self.text_keys[layer]
                values[layer][:, :, :old] = self.text_values[layer]
            mask[:, :old] = self.text_mask
        self.text_keys, self.text_values, self.text_mask = keys, values, mask

    def _step(self) -> None:
        """One pattern step of every row, each at its own step (idle rows run at step 0 and are ignored)."""
        host_steps = [slot.step if slot is not None else 0 for slot in self.slots]
        steps = torch.tensor(host_steps, device=self.sequence.device)
        x = self._step_input(steps)
        cache_steps = steps.repeat(self.cache_rows // self.rows)
        length = max(host_steps) + 1  # the cache positions any row attends (known on the host: no sync)
        visible = torch.arange(self.caches[0].keys.shape[2], device=steps.device)[None] <= cache_steps[:, None]
        for layer, cache, text_keys, text_values in zip(self.lm.layers, self.caches, self.text_keys,
                                                        self.text_values):
            x = self._layer_step(layer, x, cache, cache_steps, length, visible, text_keys, text_values)
        logits = self.lm.logits(self.lm.norm(x))[:, :, 0]
        chosen = sample_next(logits, guidance_scale=self.sampling.guidance_scale,
                             temperature=0.0 if self.greedy else self.sampling.temperature,
                             top_k=min(self.sampling.top_k, self.lm.cfg.codebook_size), top_p=self.sampling.top_p,
                             noise=self._noise(logits.device), backend=self.generator.backend)
        column = steps.view(-1, 1, 1).expand(-1, self.sequence.shape[1], 1)
        chosen = torch.where(self.valid.gather(2, column)[..., 0], chosen, self.special)
        self.sequence.scatter_(2, column, chosen[..., None])
        for slot in self.slots:
            if slot is not None:
                slot.step += 1

    def _step_input(self, steps: torch.Tensor) -> torch.Tensor:
        """[cache_rows, 1, dim]: each row's previous step's K codes embedded and summed (in codebook order, as
        ``mmdgen.kernels.step_input``), plus its own position; the null rows take their row's input."""
        k = self.sequence.shape[1]
        column = (steps - 1).clamp(min=0).view(-1, 1, 1).expand(-1, k, 1)
        tokens = torch.where((steps > 0)[:, None], self.sequence.gather(2, column)[..., 0], self.special)  # [B, K]
        rows = self.embeddings[torch.arange(k, device=tokens.device), tokens].float()  # [B, K, dim]
        out = rows[:, 0]
        for codebook in range(1, k):
            out = out + rows[:, codebook]
        out = (out + self.positions[steps].float()).to(self.embeddings.dtype)[:, None]
        return out.repeat(self.cache_rows // self.rows, 1, 1)

    def _layer_step(self, layer: DecoderLayer, x: torch.Tensor, cache, cache_steps: torch.Tensor, length: int,
                    visible: torch.Tensor, text_keys: torch.Tensor, text_values: torch.Tensor) -> torch.Tensor:
        """``DecoderLayer.forward`` for one step at per-row positions: keys and values written at each row's own
        position, self-attention masked to each row's positions up to its own."""
        backend = self.generator.backend
        h = layer.self_attn_norm(x)
        attention = layer.self_attn
        keys, values = attention.split_heads(attention.k_proj(h)), attention.split_heads(attention.v_proj(h))
        cache.keys[self.cache_index, :, cache_steps] = keys[:, :, 0].to(cache.keys.dtype)
        cache.values[self.cache_index, :, cache_steps] = values[:, :, 0].to(cache.values.dtype)
        attended = attention.decode(h, cache.keys, cache.values, length, key_mask=visible, backend=backend)
        crossed = layer.cross_attn.decode(layer.cross_attn_norm(x + attended), text_keys, text_values,
                                          text_keys.shape[2], key_mask=self.text_mask, causal=False,
                                          backend=backend)
        x = x + attended + crossed
        return x + layer.fc2(F.gelu(layer.fc1(layer.ffn_norm(x))))

    def _noise(self, device: torch.device) -> torch.Tensor | None:
        """[rows, K, V]: each live row's next draw from its own clip's generator (idle rows: zeros)."""
        if self.greedy:
            return None
        shape = (1, self.lm.cfg.num_codebooks, self.lm.cfg.codebook_size)
        return torch.cat([gumbel_noise(shape, slot.noise, device) if slot is not None
                          else torch.zeros(shape, device=device) for slot in self.slots])
