"""The decode loop: one pattern step at a time over a static KV cache.

``decode(lm, memory, batch, frames, pattern, sampling, *, generator, prompt, on_step, runtime)`` fills the
pattern sequence ``[B, K, S]`` step by step: the step's input is the previous step's K tokens (the special token
before the first), the LM's logits for the K codebooks (``MusicLM.step``) are guided, filtered and sampled in one
op (``mmdgen.kernels.sampling``), and cells where the pattern holds no code get the special token. With
classifier-free guidance the conditional and the null rows run as one batch of 2B. Cells given by an audio prompt
are forced, and the leading steps that the prompt fixes entirely are written into the caches first
(``MusicLM.prefill``: passes of up to ``MAX_QUERIES`` steps, the decode attention's query block).

A prefix LM (MusicGen-melody: ``LMConfig.conditioning == "prefix"``) takes ``lm.prefix``'s states instead of the
text's keys and values: they are prefilled into the caches first (``MusicLM.prefill_prefix``), and step s then
sits at position P + s (``DecodeState.offset``). Every row has the same P (the text is padded to the longest
prompt, the melody repeated or cut to ``melody_frames``), and every prefix position is attended, padding
included, as transformers does.

Everything the loop needs is allocated before the first step (``DecodeState.allocate``): the caches
(``lm.new_caches``), the sequence, the prompt's forced cells, the stacked embedding tables and the position table;
the text's keys and values are computed once by the caller (``lm.cross_memory``). Each step's input (the previous
step's K codes embedded and summed, plus the position) is one fused op (``mmdgen.kernels.step_input``).
``DecodeRuntime`` runs each step eagerly, through ``torch.compile`` or as a CUDA graph. ``on_step`` is called
after each step with the step index and the sequence so far (streaming decodes the frames that became final).

What a step's self-attention reads. The eager step knows its position on the host and attends exactly the filled
cache positions. The compiled step reads its position from a device tensor (one graph for many steps), so its
attention span is static: it attends the length bucket covering the filled positions (``attended_span``), the
positions past the filled ones masked. Buckets double from ``BUCKET_MIN_POSITIONS`` up to the cache's length:
a step reads less than twice the filled positions (about 1.35 times over a whole clip, against 2 times for the
whole buffer), and a decode of S positions compiles ``ceil(log2(S / BUCKET_MIN_POSITIONS)) + 1`` graphs at most
(4 for a 10-s clip of 503 steps, 6 for 2000), each once per process and shape. Fixed chunks would waste less but
compile S / chunk graphs; a graph with a symbolic length would need dynamic shapes in the whole step. The CUDA
graph keeps the whole buffer (one capture): its Triton attention reads only the positions below the length
tensor anyway.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from mmdgen.choices import Backend, KVCacheDtype
from mmdgen.generate.config import Sampling
from mmdgen.kernels.backend import resolve_backend
from mmdgen.kernels.sampling import gumbel_noise, sample_next
from mmdgen.kernels.step_input import pattern_step_input
from mmdgen.model.lm import KVCache, MusicLM, sinusoidal_positions
from mmdgen.model.patterns import Pattern
from mmdgen.validation import check_fields, option


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
    state; a compiled or graphed step sees the same buffers every time). ``allocate`` builds it."""

    sequence: torch.Tensor  # [B, K, S]: the pattern sequence, filled step by step
    forced: torch.Tensor  # [B, K, S] bool: cells an audio prompt fixes
    valid: torch.Tensor  # [K, S] bool: cells where the pattern holds a code
    caches: list[KVCache]
    memory: tuple | None  # lm.cross_memory's result: per layer (keys, values), and the text mask; None: a prefix LM
    embeddings: torch.Tensor  # [K, V + 1, dim]: the stacked code embedding tables
    positions: torch.Tensor  # [S, dim]: the position table (of positions offset..offset+S-1)
    rows: int  # 2B with guidance, else B
    offset: int = 0  # cache positions a prefix LM's conditioning takes before step 0
    first_step: int = 0  # the first step to sample: the ones before it the prompt fixed and prefilled
    step_index: torch.Tensor | None = None  # 0-d int64 on the device: the step a compiled or graphed step reads
    graph: GraphedStep | None = None  # the step captured over these buffers (DecodeRuntime(cuda_graph=True))

    @classmethod
    def allocate(cls, lm: MusicLM, memory, batch: int, frames: int, pattern: Pattern, sampling: Sampling,
                 prompt: torch.Tensor | None = None, backend: str = "auto",
                 cache_dtype: torch.dtype | None = None) -> DecodeState:
        """The state of a decode of ``frames`` frames (``decode``'s arguments), with a prefix LM's conditioning
        and the steps ``prompt`` fixes entirely already written into the caches (``lm.new_caches``, in
        ``cache_dtype``: ``DecodeRuntime.cache_dtype``; None, the LM's)."""
        special, device = lm.cfg.special_token, lm.device
        rows = 2 * batch if sampling.guidance_scale is not None else batch
        steps = pattern.num_steps(frames)
        sequence, forced = forced_cells(pattern, prompt, batch, frames, special, device)
        embeddings = lm.embedding_weights()
        prefix = memory if lm.cfg.conditioning == "prefix" else None
        offset = 0 if prefix is None else prefix.shape[1]
        positions = sinusoidal_positions(torch.arange(offset, offset + steps, device=device), lm.cfg.dim)
        state = cls(sequence, forced, pattern.valid_mask(frames).to(device),
                    lm.new_caches(rows, offset + max(steps, 1), cache_dtype), None if prefix is not None else memory,
                    embeddings, positions.to(embeddings.dtype), rows, offset,
                    prefill_steps(pattern, forced, frames), torch.zeros((), dtype=torch.long, device=device))
        if prefix is not None:
            lm.prefill_prefix(prefix, state.caches, backend)
        known = _repeat(_inputs(sequence, state.first_step, special), rows)
        lm.prefill(known, offset, state.caches, state.memory, backend)  # only the caches are wanted, not logits
        return state


BUCKET_MIN_POSITIONS = 64  # the compiled step's smallest attention span; then 128, 256, ... (tests lower it)
MAX_COMPILED_GRAPHS = 64  # the compiled step's graphs per process (shapes x buckets) before torch.compile refuses


def attended_span(filled: int, capacity: int) -> int:
    """The length bucket of a compiled step: the cache positions it attends when ``filled`` of them hold keys
    (its own included), the smallest of ``BUCKET_MIN_POSITIONS * 2^i`` covering them, at most ``capacity`` (the
    cache's length)."""
    span = BUCKET_MIN_POSITIONS
    while span < filled:
        span *= 2
    return min(span, capacity)


def decode_step(lm: MusicLM, state: DecodeState, step: int | torch.Tensor, noise: torch.Tensor | None,
                sampling: Sampling, backend: str = "auto", span: int | None = None) -> None:
    """One pattern step: embed the previous step's K codes, run the LM over the caches, sample the K codes of
    ``step`` (greedy when ``noise`` is None) and write them into ``state.sequence``. ``step``: an int, or a 0-d
    int64 tensor (compiled and graphed steps: nothing is read on the host and every step is the same graph).
    ``span``: the self-attention reads cache positions [0, span) only (``attended_span``); None: the whole
    buffer for a tensor ``step``, the filled positions for an int one."""
    special = lm.cfg.special_token
    embedded = pattern_step_input(state.sequence, step, state.embeddings, state.positions, special, backend=backend)
    position = step + state.offset if state.offset else step
    logits = lm.step(_repeat(embedded, state.rows), position, state.caches, state.memory, backend, span)
    chosen = sample_next(logits[:, :, 0], guidance_scale=sampling.guidance_scale,
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


@dataclass(frozen=True)
class DecodeRuntime:
    """How the decode step runs: the fused ops' ``backend``, eagerly, through ``torch.compile`` (``compile``: one
    graph per shape and length bucket, ``attended_span``; the first step in a bucket compiles it) or captured once
    in a CUDA graph and replayed at every step (``cuda_graph``, CUDA), over a KV cache in the LM's dtype or, under
    a float32 LM, in 16 bits (``kv_cache``: half the bytes each step reads; the attention widens them as it reads).
    ``step`` runs one step of a ``DecodeState``."""

    backend: Backend = option("auto", "the fused ops' implementation")
    compile: bool = option(False, "run the decode step through torch.compile")
    cuda_graph: bool = option(False, "(CUDA) capture the decode step in a CUDA graph once and replay it")
    kv_cache: KVCacheDtype = option("model", "the KV cache's dtype: the LM's, or bfloat16/float16 under a float32 LM")

    def __post_init__(self):
        check_fields(self)
        if self.compile and self.cuda_graph:
            raise ValueError("DecodeRuntime: compile and cuda_graph are two ways to run the decode step, choose one "
                             "(got compile=True, cuda_graph=True)")

    def check(self, device: torch.device) -> None:
        """ValueError unless the step can run this way for an LM on ``device``."""
        if self.cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph needs the LM on a CUDA device, it is on {device}")
        resolve_backend(self.backend, device)

    def cache_dtype(self, lm: MusicLM) -> torch.dtype:
        """The dtype of ``lm``'s KV caches under this runtime; ValueError for a 16-bit cache under a 16-bit LM of
        another kind (it would round the LM's own keys)."""
        if self.kv_cache == "model":
            return lm.dtype
        dtype = getattr(torch, self.kv_cache)
        if lm.dtype not in (torch.float32, dtype):
            raise ValueError(f"a {self.kv_cache} KV cache serves a float32 LM; this LM is {lm.dtype} (kv_cache "
                             f"'model' keeps the LM's dtype)")
        return dtype

    def step(self, lm: MusicLM, state: DecodeState, step: int, noise: torch.Tensor | None,
             sampling: Sampling) -> None:
        """``decode_step`` of ``step`` (``noise``: its Gumbel noise, None when greedy), run this runtime's way."""
        if not (self.compile or self.cuda_graph):
            decode_step(lm, state, step, noise, sampling, self.backend)
            return
        state.step_index.fill_(step)
        if self.cuda_graph:
            if state.graph is None:
                state.graph = GraphedStep(lm, state, state.step_index, noise, sampling, self.backend)
            state.graph.replay(noise)
            return
        capacity = state.caches[0].keys.shape[2]
        filled = state.offset + step + 1
        span = attended_span(filled, capacity)
        # every call checks dynamo's guards (about 1.2 ms a step over MusicGen-small's ~640 tensors); skipping them
        # between the steps of a bucket (set_stance(skip_guard_eval_unsafe=True)) measured no faster in torch 2.14
        compiled_decode_step()(lm, state, state.step_index, noise, sampling, self.backend, span)


@torch.no_grad()
def decode(lm: MusicLM, memory, batch: int, frames: int, pattern: Pattern, sampling: Sampling, *,
           generator: torch.Generator | None = None, prompt: torch.Tensor | None = None,
           on_step: Callable[[int, torch.Tensor], None] | None = None,
           runtime: DecodeRuntime = DecodeRuntime()) -> torch.Tensor:
    """Codes [B, K, frames]. ``memory``: ``lm.cross_memory`` of the text states (for a prefix LM ``lm.prefix``'s
    states [rows, P, dim]), 2B rows (conditional first, then null) with guidance, B without; ``prompt``: codes
    [B, K, T_prompt] to continue; ``generator``: the sampling noise's random stream; ``runtime``: how each step
    runs (eager, compiled or CUDA-graphed, and the backend)."""
    device = lm.device
    runtime.check(device)
    state = DecodeState.allocate(lm, memory, batch, frames, pattern, sampling, prompt, runtime.backend,
                                 runtime.cache_dtype(lm))
    greedy = sampling.temperature == 0 or sampling.top_k == 1
    for step in range(state.first_step, state.sequence.shape[-1]):
        noise = None if greedy else gumbel_noise((batch, lm.cfg.num_codebooks, lm.cfg.codebook_size), generator,
                                                 device)
        runtime.step(lm, state, step, noise, sampling)
        if on_step is not None:
            on_step(step, state.sequence)
    return pattern.revert(state.sequence)


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
# The generated code checks every input's size and stride and every op's output at each call: a few
# microseconds each, hundreds per step. The step's inputs are the same tensors at every step (its guards
# are checked at the first), so these re-checks only cost time (1.5-2 ms a step at MusicGen-small size on
# CPU, about 10% of an int8 step).
COMPILE_OPTIONS = {"size_asserts": False, "alignment_asserts": False, "scalar_asserts": False}


def compiled_decode_step():
    """``decode_step`` through ``torch.compile`` (shapes static: one graph per batch size, length and span, each
    compiled on its first call; inductor caches the generated code on disk between processes). Past
    ``MAX_COMPILED_GRAPHS`` graphs in a process torch.compile raises (fullgraph) rather than run eagerly."""
    global _COMPILED_STEP
    if _COMPILED_STEP is None:
        _COMPILED_STEP = torch.compile(decode_step, fullgraph=True, dynamic=False, options=COMPILE_OPTIONS,
                                       recompile_limit=MAX_COMPILED_GRAPHS)
    return _COMPILED_STEP


def _inputs(sequence: torch.Tensor, end: int, special: int) -> torch.Tensor:
    """The inputs of steps 0..end-1: the sequence shifted one step right behind the special token."""
    head = torch.full_like(sequence[..., :1], special)
    return torch.cat([head, sequence[..., :-1]], dim=-1)[..., :end]


def _repeat(inputs: torch.Tensor, rows: int) -> torch.Tensor:
    """The same inputs for the conditional and the null rows."""
    return inputs if inputs.shape[0] == rows else inputs.repeat(rows // inputs.shape[0], *[1] * (inputs.dim() - 1))
