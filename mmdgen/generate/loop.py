"""The decode loop: one pattern step at a time over a static KV cache.

``decode(lm, memory, batch, frames, pattern, sampling, ...)`` fills the pattern sequence ``[B, K, S]``
step by step: the step's input is the previous step's K tokens (the special token before the first),
the LM's logits for the K codebooks are guided, filtered and sampled in one op
(``mmdgen.kernels.sampling``), and cells where the pattern holds no code get the special token. With
classifier-free guidance the conditional and the null rows run as one batch of 2B. Cells given by an
audio prompt are forced, and the leading steps that the prompt fixes entirely run as prefill passes of up to
``MAX_QUERIES`` steps (the decode attention's query block).

A prefix LM (MusicGen-melody: ``LMConfig.conditioning == "prefix"``) takes ``lm.prefix``'s states instead of the
text's keys and values: they are prefilled into the caches first (passes of up to ``MAX_QUERIES`` positions,
each state plus its position), and step s then sits at position P + s (``DecodeState.offset``). Every row has the
same P (the text is padded to the longest prompt, the melody repeated or cut to ``melody_frames``), and every
prefix position is attended, padding included, as transformers does.

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

from mmdgen.generate.config import Sampling
from mmdgen.kernels.attention import MAX_QUERIES
from mmdgen.kernels.sampling import gumbel_noise, sample_next
from mmdgen.kernels.step_input import pattern_step_input
from mmdgen.model.lm import KVCache, MusicLM, sinusoidal_positions
from mmdgen.model.patterns import Pattern


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


@dataclass
class DecodeState:
    """Everything a decode step reads or writes, allocated before the first step (no per-step allocation of
    state; a compiled or graphed step sees the same buffers every time)."""

    sequence: torch.Tensor  # [B, K, S]: the pattern sequence, filled step by step
    forced: torch.Tensor  # [B, K, S] bool: cells an audio prompt fixes
    valid: torch.Tensor  # [K, S] bool: cells where the pattern holds a code
    caches: list[KVCache]
    memory: tuple | None  # lm.cross_memory's result: per layer (keys, values), and the text mask; None: a prefix LM
    embeddings: torch.Tensor  # [K, V + 1, dim]: the stacked code embedding tables
    positions: torch.Tensor  # [S, dim]: the position table (of positions offset..offset+S-1)
    rows: int  # 2B with guidance, else B
    offset: int = 0  # cache positions a prefix LM's conditioning takes before step 0


def decode_step(lm: MusicLM, state: DecodeState, step: int | torch.Tensor, noise: torch.Tensor | None,
                sampling: Sampling, backend: str = "auto") -> None:
    """One pattern step: embed the previous step's K codes, run the LM over the caches, sample the K codes of
    ``step`` (greedy when ``noise`` is None) and write them into ``state.sequence``. ``step``: an int, or a 0-d
    int64 tensor (compiled and graphed steps: nothing is read on the host and every step is the same graph)."""
    special = lm.cfg.special_token
    embedded = pattern_step_input(state.sequence, step, state.embeddings, state.positions, special, backend=backend)
    start = step + state.offset if state.offset else step
    hidden = lm.hidden(None, None, None, caches=state.caches, start=start, memory=state.memory, backend=backend,
                       embedded=_repeat(embedded, state.rows))
    chosen = sample_next(lm.logits(hidden)[:, :, 0], guidance_scale=sampling.guidance_scale,
                         temperature=0.0 if noise is None else sampling.temperature,
                         top_k=min(sampling.top_k, lm.cfg.codebook_size),  # 250 means all of a small codebook
                         top_p=sampling.top_p, noise=noise, backend=backend)
    chosen = torch.where(_column(state.valid, step), chosen, special)
    chosen = torch.where(_column(state.forced, step), _column(state.sequence, step), chosen)
    if isinstance(step, torch.Tensor):
        state.sequence.index_copy_(2, step.view(1), chosen[..., None])
    else:
        state.sequence[..., step] = chosen


def _column(t: torch.Tensor, step: int | torch.Tensor) -> torch.Tensor:
    """``t[..., step]``; for a tensor step an index op that reads it on the device (no host sync)."""
    return t.index_select(-1, step.view(1)).squeeze(-1) if isinstance(step, torch.Tensor) else t[..., step]


@torch.no_grad()
def decode(lm: MusicLM, memory, batch: int, frames: int, pattern: Pattern, sampling: Sampling,
           generator: torch.Generator | None = None, prompt: torch.Tensor | None = None, backend: str = "auto",
           on_step: Callable[[int, torch.Tensor], None] | None = None, compile: bool = False,
           cuda_graph: bool = False) -> torch.Tensor:
    """Codes [B, K, frames]. ``memory``: ``lm.cross_memory`` of the text states (for a prefix LM ``lm.prefix``'s
    states [rows, P, dim]), 2B rows (conditional first, then null) with guidance, B without; ``prompt``: codes
    [B, K, T_prompt] to continue. ``compile``: run the
    step through ``torch.compile`` (one graph for every step; the first call of a shape compiles it).
    ``cuda_graph`` (CUDA): capture the whole step once in a CUDA graph and replay it at every step."""
    special = lm.cfg.special_token
    device = lm.heads[0].weight.device
    rows = 2 * batch if sampling.guidance_scale is not None else batch
    steps = pattern.num_steps(frames)
    sequence, forced = forced_cells(pattern, prompt, batch, frames, special, device)
    embeddings = lm.embedding_weights()
    prefix = memory if lm.cfg.conditioning == "prefix" else None
    offset = 0 if prefix is None else prefix.shape[1]
    positions = sinusoidal_positions(torch.arange(offset, offset + steps, device=device), lm.cfg.dim)
    state = DecodeState(sequence, forced, pattern.valid_mask(frames).to(device),
                        lm.new_caches(rows, offset + max(steps, 1)), None if prefix is not None else memory,
                        embeddings, positions.to(embeddings.dtype), rows, offset)
    if prefix is not None:
        _prefill_prefix(lm, state, prefix, backend)
    greedy = sampling.temperature == 0 or sampling.top_k == 1
    start = prefill_steps(pattern, forced, frames)
    known = _repeat(_inputs(sequence, start, special), rows)
    for first in range(0, start, MAX_QUERIES):  # the prompt's fully known steps, in passes of up to MAX_QUERIES
        lm.hidden(known[..., first: first + MAX_QUERIES], None, None, caches=state.caches, start=offset + first,
                  memory=state.memory, backend=backend)  # only the caches are wanted, not the logits
    run_step, step_index = decode_step, None
    if compile or cuda_graph:
        step_index = torch.zeros((), dtype=torch.long, device=device)
    if compile:
        run_step = compiled_decode_step()
    graph = None
    for step in range(start, steps):
        noise = None if greedy else gumbel_noise((batch, lm.cfg.num_codebooks, lm.cfg.codebook_size), generator,
                                                 device)
        if cuda_graph:
            step_index.fill_(step)
            if graph is None:
                graph = GraphedStep(lm, state, step_index, noise, sampling, backend)
            graph.replay(noise)
        elif step_index is None:
            run_step(lm, state, step, noise, sampling, backend)
        else:
            step_index.fill_(step)
            # the first step checks the compiled graph's guards (and compiles it if needed); the others pass the
            # very same objects and shapes, so re-checking every parameter's guards each step is pure overhead
            with torch.compiler.set_stance(skip_guard_eval_unsafe=step > start):
                run_step(lm, state, step_index, noise, sampling, backend)
        if on_step is not None:
            on_step(step, sequence)
    return pattern.revert(sequence)


def _prefill_prefix(lm: MusicLM, state: DecodeState, prefix: torch.Tensor, backend: str) -> None:
    """Write a prefix LM's conditioning states [rows, P, dim] (plus positions 0..P-1) into the caches."""
    if prefix.dim() != 3 or prefix.shape[0] != state.rows or prefix.shape[2] != lm.cfg.dim:
        raise ValueError(f"expected prefix states [{state.rows}, P, {lm.cfg.dim}] (lm.prefix), got "
                         f"{tuple(prefix.shape)}")
    dtype = state.embeddings.dtype
    for first in range(0, prefix.shape[1], MAX_QUERIES):
        part = prefix[:, first: first + MAX_QUERIES].to(dtype)
        positions = sinusoidal_positions(torch.arange(first, first + part.shape[1], device=part.device), lm.cfg.dim)
        lm.hidden(None, None, None, caches=state.caches, start=first, backend=backend,
                  embedded=part + positions.to(dtype))


class GraphedStep:
    """``decode_step`` captured once in a CUDA graph and replayed at every step: one launch for the step's few
    hundred kernels (at batch 1 a step is launch bound). The graph reads the step index, the noise and the
    state from the same device buffers every time; ``replay(noise)`` copies the new noise into its buffer.

    The step is run once eagerly before the capture (on a side stream, as CUDA graphs require: it compiles the
    Triton kernels and settles the allocator); it writes the same cache position and sequence column the first
    replay then writes again with the same inputs, so it changes nothing but the noise it used."""

    def __init__(self, lm: MusicLM, state: DecodeState, step_index: torch.Tensor, noise: torch.Tensor | None,
                 sampling: Sampling, backend: str):
        self.noise = None if noise is None else noise.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            decode_step(lm, state, step_index, self.noise, sampling, backend)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            decode_step(lm, state, step_index, self.noise, sampling, backend)

    def replay(self, noise: torch.Tensor | None) -> None:
        if noise is not None:
            self.noise.copy_(noise)
        self.graph.replay()


_COMPILED_STEP = None


def compiled_decode_step():
    """``decode_step`` through ``torch.compile`` (one graph, shapes static: a new batch size or length compiles
    again; inductor caches the generated code on disk between processes)."""
    global _COMPILED_STEP
    if _COMPILED_STEP is None:
        _COMPILED_STEP = torch.compile(decode_step, fullgraph=True, dynamic=False)
    return _COMPILED_STEP


def _inputs(sequence: torch.Tensor, end: int, special: int) -> torch.Tensor:
    """The inputs of steps 0..end-1: the sequence shifted one step right behind the special token."""
    head = torch.full_like(sequence[..., :1], special)
    return torch.cat([head, sequence[..., : end - 1]], dim=-1)


def _repeat(inputs: torch.Tensor, rows: int) -> torch.Tensor:
    """The same inputs for the conditional and the null rows."""
    return inputs if inputs.shape[0] == rows else inputs.repeat(rows // inputs.shape[0], *[1] * (inputs.dim() - 1))
