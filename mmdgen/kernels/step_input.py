"""The input of one decode step in one op: the previous step's K tokens, embedded, summed, plus the position.

At decode step ``s`` the LM's input (``MusicLM.hidden``: ``sum_k embedding_k(token_k) + position``) is the pattern
sequence's column ``s - 1``, or the special token ``V`` in every codebook for ``s = 0``
(``mmdgen.generate.loop``). This op builds that ``[B, 1, dim]`` input straight from what the loop holds, in one
launch: no pattern sequence, no token tensor, no K separate embedding lookups.

``step_input(codes, step, delays, embeddings, positions, special, frames)`` -- the delay pattern, from the codes:
    ``codes`` ``[B, K, T_buf]`` integer (int64 or int32), the codes generated so far; only frames
    ``t < frames <= T_buf`` exist, and cells that the step does not read may hold anything (garbage included).
    Sequence column ``c`` holds, for codebook ``k``, frame ``t = c - delays[k]`` if ``0 <= t < frames``, else
    the special token. So ``token[b, k] = codes[b, k, s - 1 - delays[k]]`` when ``s >= 1`` and
    ``0 <= s - 1 - delays[k] < frames``, else ``special`` -- exactly the loop's input under
    ``make_pattern("delay", K, delays)``.
``pattern_step_input(sequence, step, embeddings, positions, special)`` -- any pattern, from the sequence:
    ``sequence`` ``[B, K, S]`` (``Pattern.build``, or the loop's buffer, special in empty cells);
    ``token[b, k] = sequence[b, k, s - 1]`` for ``1 <= s <= S``, else ``special``. Same kernel, same PyTorch
    code: it is the delay rule with every delay 0 and ``frames = S`` (the delays are not even loaded).

Both: ``out[b, 0] = sum_k embeddings[k, token[b, k]] + position``, returned ``[B, 1, dim]`` in the embeddings'
dtype. ``embeddings`` ``[K, V + 1, dim]`` are the K tables stacked (row ``V`` = the special token; e.g.
``torch.stack([e.weight for e in lm.embeddings])``), ``special`` must be ``V``. ``positions`` is either this
step's row ``[dim]`` (``sinusoidal_positions(torch.tensor([s]), dim)[0]``) or a table ``[P, dim]`` whose row
``step`` is read by the op (so that a device-side step needs no indexing op of its own). Any float dtype for
the positions; any strides for every input.

Summation: fp32 (fp64 for fp64 embeddings on the PyTorch path), codebooks added one after the other in order
0..K-1, the position last, one rounding to the output dtype at the end. With fp32 tables this is the very sum
``MusicLM.hidden`` computes (bit-identical); with bf16/fp16 tables ``MusicLM.hidden`` rounds after every add,
this op once (so it is the more accurate of the two, within one ulp of the exact sum).

Step as a tensor (CUDA graphs). ``step`` may be a Python int or a one-element integer tensor (0-d or ``[1]``)
on the inputs' device. The Triton kernel reads a tensor step from device memory and the PyTorch path uses it
through tensor ops only: neither syncs with the host, so a captured graph can be replayed with a device-side
counter. A tensor step is not range-checked (checking needs a sync): out-of-range values are well defined --
any step whose column lies outside the codes reads the special token, and a position table row outside
``[0, P)`` contributes zero. An int step is checked: ``0 <= step <= frames + max(delays)`` (resp. ``<= S``),
``step < P`` for a table, delays ``>= 0``; the delays are then read to the host (one sync if they are a CUDA
tensor; pass them as a tuple, or pass a tensor step, to avoid it).

Codes are not range-checked either (a sync per step). Where a read cell holds a code outside ``[0, V]``, both
paths add a zero row for that codebook instead of reading out of bounds (``MusicLM.hidden`` would raise).

- Triton (CUDA, or CPU through ``TRITON_INTERPRET=1``): one program per (b, block of ``TRITON_BLOCK_D`` features).
  It loads the step (from memory or as an argument), then for each codebook (unrolled, K is a constexpr): the
  delay, the column and its start/end conditions, the token (a masked scalar load, ``special`` where the pattern
  holds no code), the embedding row block; adds them in fp32, adds the position row block, writes once.
  fp32, bf16, fp16 tables.
- PyTorch: the column indices ``[K]`` and their conditions as tensor ops, one ``gather`` for the B x K tokens, one
  advanced-indexing op for the B x K rows ``[B, K, dim]``, then K - 1 adds in order (a loop over the K codebooks,
  never over B) and the position. Any floating dtype.

Work and memory: reads B*K codes (plus K delays), B*K embedding rows of ``dim`` elements and one position row;
writes ``B * dim``. O(B K dim), one launch on the Triton path; nothing allocated but the output (the PyTorch path
holds a ``[B, K, dim]`` temporary). No gradient (inference only: training embeds whole sequences).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

from mmdgen.kernels.backend import TRITON_IMPORT_ERROR, resolve_backend

TRITON_BLOCK_D = 256  # features per program
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_CODE_DTYPES = (torch.int64, torch.int32)


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _as_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{what} must be an int, got {value!r}")
    return int(value)


def _check_common(codes, what, step, embeddings, positions, special) -> tuple[int, int]:
    """Checks shared by both ops; returns (V, dim)."""
    if not isinstance(codes, torch.Tensor) or codes.dim() != 3:
        raise ValueError(f"{what} must have shape [B, K, {'T' if what == 'codes' else 'S'}], got {_shape(codes)}")
    if codes.dtype not in _CODE_DTYPES:
        raise ValueError(f"{what} must be an int64 or int32 tensor, got {codes.dtype}")
    if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 3:
        raise ValueError(f"embeddings must have shape [K, V + 1, dim] (the K tables stacked), got {_shape(embeddings)}")
    if not embeddings.is_floating_point():
        raise ValueError(f"embeddings must be floating point, got {embeddings.dtype}")
    num_codebooks, rows, dim = embeddings.shape
    if codes.shape[1] != num_codebooks:
        raise ValueError(f"{what} {tuple(codes.shape)} has K={codes.shape[1]} codebooks but embeddings "
                         f"{tuple(embeddings.shape)} has K={num_codebooks} tables")
    if rows < 2 or dim < 1:
        raise ValueError(f"embeddings must have V + 1 >= 2 rows and dim >= 1, got {tuple(embeddings.shape)}")
    vocab = rows - 1
    if _as_int(special, "special") != vocab:
        raise ValueError(f"special must be V={vocab}, the last row of the embedding tables "
                         f"{tuple(embeddings.shape)}, got {special}")
    if not isinstance(positions, torch.Tensor) or positions.dim() not in (1, 2) or positions.shape[-1] != dim:
        raise ValueError(f"positions must be this step's row [dim] or a table [P, dim] with dim={dim}, "
                         f"got {_shape(positions)}")
    if not positions.is_floating_point():
        raise ValueError(f"positions must be floating point, got {positions.dtype}")
    if positions.dim() == 2 and positions.shape[0] < 1:
        raise ValueError("the positions table is empty (P=0)")
    for name, t in (("embeddings", embeddings), ("positions", positions)):
        if t.device != codes.device:
            raise ValueError(f"{name} is on {t.device} but {what} on {codes.device}")
    if isinstance(step, torch.Tensor):
        if step.numel() != 1 or step.dim() > 1:
            raise ValueError(f"a tensor step must hold one value (0-d or [1]), got shape {tuple(step.shape)}")
        if step.dtype not in _CODE_DTYPES:
            raise ValueError(f"a tensor step must be an int64 or int32 tensor, got {step.dtype}")
        if step.device != codes.device:
            raise ValueError(f"the step tensor is on {step.device} but {what} on {codes.device}")
    else:
        _as_int(step, "step (an int or a one-element integer tensor)")
    return vocab, dim


def _check_int_step(step: int, last: int, rule: str, positions: torch.Tensor) -> None:
    if not 0 <= step <= last:
        raise ValueError(f"step={step} is out of range: expected 0 <= step <= {rule} = {last}")
    if positions.dim() == 2 and step >= positions.shape[0]:
        raise ValueError(f"step={step} needs row {step} of the positions table, which has P={positions.shape[0]} rows")


def _check_delays(delays, codes: torch.Tensor, step) -> tuple[torch.Tensor, int]:
    """(delays as a [K] integer tensor on the codes' device, max delay or 0 when not read for a tensor step)."""
    num_codebooks = codes.shape[1]
    if isinstance(delays, torch.Tensor):
        if delays.dim() != 1 or delays.shape[0] != num_codebooks:
            raise ValueError(f"delays must have shape [K] = ({num_codebooks},), one per codebook, "
                             f"got {tuple(delays.shape)}")
        if delays.dtype not in _CODE_DTYPES:
            raise ValueError(f"delays must be an int64 or int32 tensor, got {delays.dtype}")
        if delays.device != codes.device:
            raise ValueError(f"delays is on {delays.device} but codes on {codes.device}")
        values = None
    elif isinstance(delays, Sequence) and not isinstance(delays, str):
        values = [_as_int(d, "each delay") for d in delays]
        if len(values) != num_codebooks:
            raise ValueError(f"delays {tuple(values)} has length {len(values)}; expected one per codebook, "
                             f"K={num_codebooks}")
        delays = torch.tensor(values, dtype=torch.int64, device=codes.device)
    else:
        raise ValueError(f"delays must be a [K] integer tensor or a sequence of K ints, got {type(delays).__name__}")
    if isinstance(step, torch.Tensor):
        return delays, 0
    if values is None:
        values = delays.tolist()  # one sync for a CUDA tensor; only for an int step
    if min(values) < 0:
        raise ValueError(f"delays must all be >= 0, got {tuple(values)}")
    return delays, max(values)


def _choose(backend: str, embeddings: torch.Tensor, device: torch.device) -> str:
    chosen = resolve_backend(backend, device)
    if chosen == "triton" and embeddings.dtype not in _TRITON_DTYPES:
        if backend == "auto":
            return "torch"
        raise ValueError(f"the triton step-input kernel takes float32, bfloat16 or float16 embeddings, "
                         f"got {embeddings.dtype}")
    return chosen


# ----------------------------------------------------------------------------------------------
# PyTorch path
# ----------------------------------------------------------------------------------------------


def _torch_step_input(codes, step, delays, embeddings, positions, special, frames) -> torch.Tensor:
    batch, num_codebooks, buffered = codes.shape
    device = codes.device
    if isinstance(step, torch.Tensor):
        step = step.reshape(()).long()
    column = (step - 1) - delays.long() if delays is not None else \
        torch.full((num_codebooks,), -1, dtype=torch.int64, device=device) + step
    present = (column >= 0) & (column < frames) & (step >= 1)  # [K]; column >= 0 alone misses negative delays
    if buffered:
        index = column.clamp(0, buffered - 1).view(1, num_codebooks, 1).expand(batch, num_codebooks, 1)
        tokens = torch.where(present, codes.gather(2, index).squeeze(2).long(), special)  # [B, K]
    else:
        tokens = torch.full((batch, num_codebooks), special, dtype=torch.int64, device=device)
    known = (tokens >= 0) & (tokens <= special)
    rows = embeddings[torch.arange(num_codebooks, device=device), torch.where(known, tokens, special)]  # [B, K, dim]
    accumulate = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
    rows = torch.where(known[..., None], rows.to(accumulate), 0.0)
    out = rows[:, 0]
    for k in range(1, num_codebooks):  # in order, as MusicLM.hidden sums the codebooks
        out = out + rows[:, k]
    if positions.dim() == 2 and not isinstance(step, torch.Tensor):
        position = positions[step].to(accumulate)  # an int step was checked against the table
    elif positions.dim() == 2:
        table_rows = positions.shape[0]
        row = positions.index_select(0, step.clamp(0, table_rows - 1).reshape(1))[0]
        position = torch.where((step >= 0) & (step < table_rows), row.to(accumulate), 0.0)
    else:
        position = positions.to(accumulate)
    return (out + position).to(embeddings.dtype)[:, None]


# ----------------------------------------------------------------------------------------------
# Triton
# ----------------------------------------------------------------------------------------------

if TRITON_IMPORT_ERROR is None:
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["step", "frames"])
    def _step_input_kernel(codes_ptr, delays_ptr, step_ptr, emb_ptr, pos_ptr, out_ptr, step, frames, special, dim,
                           pos_rows, stride_cb, stride_ck, stride_ct, stride_delay, stride_ek, stride_ev, stride_ed,
                           stride_pp, stride_pd, NUM_CODEBOOKS: tl.constexpr, DELAYED: tl.constexpr,
                           STEP_IN_MEMORY: tl.constexpr, POS_TABLE: tl.constexpr, BLOCK_D: tl.constexpr):
        """out[b, block] = sum_k emb[k, token(b, k)][block] + position[block], the sum in fp32 in codebook order.

        token(b, k) = codes[b, k, step - 1 - delay_k] if step >= 1 and 0 <= step - 1 - delay_k < frames, else
        special (delay_k = 0 without DELAYED); a token outside [0, special] adds nothing."""
        b = tl.program_id(0).to(tl.int64)
        feats = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = feats < dim
        if STEP_IN_MEMORY:
            step = tl.load(step_ptr)
        step = step.to(tl.int64)
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for k in tl.static_range(NUM_CODEBOOKS):
            column = step - 1
            if DELAYED:
                column = column - tl.load(delays_ptr + k * stride_delay).to(tl.int64)
            present = (step >= 1) & (column >= 0) & (column < frames)
            token = tl.load(codes_ptr + b * stride_cb + k * stride_ck + tl.where(present, column, 0) * stride_ct,
                            mask=present, other=special).to(tl.int64)
            known = (token >= 0) & (token <= special)
            row = tl.load(emb_ptr + k * stride_ek + tl.where(known, token, 0) * stride_ev + feats * stride_ed,
                          mask=d_ok & known, other=0.0)
            acc += row.to(tl.float32)
        if POS_TABLE:
            row_ok = (step >= 0) & (step < pos_rows)
            position = tl.load(pos_ptr + tl.where(row_ok, step, 0) * stride_pp + feats * stride_pd,
                               mask=d_ok & row_ok, other=0.0)
        else:
            position = tl.load(pos_ptr + feats * stride_pd, mask=d_ok, other=0.0)
        acc += position.to(tl.float32)
        tl.store(out_ptr + b * dim + feats, acc.to(out_ptr.dtype.element_ty), mask=d_ok)


def _triton_step_input(codes, step, delays, embeddings, positions, special, frames) -> torch.Tensor:
    batch, num_codebooks = codes.shape[:2]
    dim = embeddings.shape[2]
    out = torch.empty(batch, 1, dim, dtype=embeddings.dtype, device=codes.device)
    if batch == 0:
        return out
    in_memory = isinstance(step, torch.Tensor)
    table = positions.dim() == 2
    _step_input_kernel[(batch, triton.cdiv(dim, TRITON_BLOCK_D))](
        codes, delays, step.reshape(()) if in_memory else None, embeddings, positions, out,
        0 if in_memory else step, frames, special, dim, positions.shape[0] if table else 1, *codes.stride(),
        delays.stride(0) if delays is not None else 0, *embeddings.stride(),
        positions.stride(0) if table else 0, positions.stride(-1),
        NUM_CODEBOOKS=num_codebooks, DELAYED=delays is not None, STEP_IN_MEMORY=in_memory, POS_TABLE=table,
        BLOCK_D=TRITON_BLOCK_D)
    return out


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def step_input(codes: torch.Tensor, step: int | torch.Tensor, delays: torch.Tensor | Sequence[int],
               embeddings: torch.Tensor, positions: torch.Tensor, special: int, frames: int,
               backend: str = "auto") -> torch.Tensor:
    """The LM input ``[B, 1, dim]`` of decode step ``step`` under the delay pattern (see the module docstring).

    ``codes``: ``[B, K, T_buf]`` int64/int32, the codes so far (cells the step does not read may hold anything).
    ``step``: an int in ``[0, frames + max(delays)]``, or a one-element integer tensor on the codes' device
    (read without a host sync; not range-checked). ``delays``: ``[K]`` integer tensor on the codes' device, or a
    sequence of K ints. ``embeddings``: ``[K, V + 1, dim]`` stacked tables, row V the special token; ``special``:
    V. ``positions``: this step's position row ``[dim]``, or a table ``[P, dim]`` (row ``step`` is read).
    ``frames``: the T frames being generated, ``0 <= frames <= T_buf``. Returns the embeddings' dtype.
    ``backend``: ``"auto"`` (Triton on CUDA, PyTorch otherwise; env ``MMDGEN_BACKEND``), ``"triton"``,
    ``"torch"``; "auto" takes PyTorch for dtypes the kernel does not take (fp64).
    """
    _check_common(codes, "codes", step, embeddings, positions, special)
    frames = _as_int(frames, "frames")
    if not 0 <= frames <= codes.shape[2]:
        raise ValueError(f"frames={frames} is out of range: expected 0 <= frames <= T={codes.shape[2]} "
                         f"(codes {tuple(codes.shape)})")
    delays, max_delay = _check_delays(delays, codes, step)
    if not isinstance(step, torch.Tensor):
        step = int(step)
        _check_int_step(step, frames + max_delay, "frames + max(delays)", positions)
    run = _triton_step_input if _choose(backend, embeddings, codes.device) == "triton" else _torch_step_input
    return run(codes, step, delays, embeddings, positions, int(special), frames)


@torch.no_grad()
def pattern_step_input(sequence: torch.Tensor, step: int | torch.Tensor, embeddings: torch.Tensor,
                       positions: torch.Tensor, special: int, backend: str = "auto") -> torch.Tensor:
    """The LM input ``[B, 1, dim]`` of decode step ``step`` for any pattern: column ``step - 1`` of ``sequence``
    ``[B, K, S]`` (the special token for step 0), embedded, summed, plus the position.

    ``step``: an int in ``[0, S]`` or a one-element integer tensor (not range-checked; steps outside
    ``[1, S]`` read the special token). The other arguments are as in ``step_input``.
    """
    _check_common(sequence, "sequence", step, embeddings, positions, special)
    steps = sequence.shape[2]
    if not isinstance(step, torch.Tensor):
        step = int(step)
        _check_int_step(step, steps, "S", positions)
    run = _triton_step_input if _choose(backend, embeddings, sequence.device) == "triton" else _torch_step_input
    return run(sequence, step, None, embeddings, positions, int(special), steps)
