"""The input of one decode step in one op: the previous step's K tokens, embedded, summed, plus the position.

At decode step ``s`` the LM's input (``MusicLM.hidden``: ``sum_k embedding_k(token_k) + position``) is the pattern
sequence's column ``s - 1``, or the special token ``V`` in every codebook for ``s = 0``
(``mmdgen.generate.loop``). This op builds that ``[B, 1, dim]`` input straight from the loop's sequence buffer, in
one launch: no token tensor, no K separate embedding lookups.

``pattern_step_input(sequence, step, embeddings, positions, special)``, any pattern:
    ``sequence`` ``[B, K, S]`` integer (int64 or int32), the pattern sequence (``Pattern.build``, or the loop's
    buffer, special in empty cells); cells of other columns than ``step - 1`` may hold anything (garbage
    included). ``token[b, k] = sequence[b, k, s - 1]`` for ``1 <= s <= S``, else ``special``.
    ``out[b, 0] = sum_k embeddings[k, token[b, k]] + position``, returned ``[B, 1, dim]`` in the embeddings' dtype.
``embeddings`` ``[K, V + 1, dim]`` are the K tables stacked (row ``V`` = the special token; e.g.
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
any step whose column lies outside the sequence reads the special token, and a position table row outside
``[0, P)`` contributes zero. An int step is checked: ``0 <= step <= S``, ``step < P`` for a table.

Tokens are not range-checked either (a sync per step). Where a read cell holds a code outside ``[0, V]``, both
paths add a zero row for that codebook instead of reading out of bounds (``MusicLM.hidden`` would raise).

- Triton (CUDA, or CPU through ``TRITON_INTERPRET=1``): one program per (b, block of ``TRITON_BLOCK_D`` features).
  It loads the step (from memory or as an argument), then for each codebook (unrolled, K is a constexpr): the
  column and its start/end conditions, the token (a masked scalar load, ``special`` outside the sequence), the
  embedding row block; adds them in fp32, adds the position row block, writes once. fp32, bf16, fp16 tables.
- PyTorch: the column's conditions as tensor ops, one ``gather`` for the B x K tokens, one advanced-indexing op
  for the B x K rows ``[B, K, dim]``, then K - 1 adds in order (a loop over the K codebooks, never over B) and
  the position. Any floating dtype.

Work and memory: reads B*K tokens, B*K embedding rows of ``dim`` elements and one position row; writes
``B * dim``. O(B K dim), one launch on the Triton path; nothing allocated but the output (the PyTorch path
holds a ``[B, K, dim]`` temporary). No gradient (inference only: training embeds whole sequences).
"""

from __future__ import annotations

import numbers

import torch

from mmdgen.kernels.backend import TRITON_IMPORT_ERROR, accumulation_dtype, choose_backend, describe_shape

TRITON_BLOCK_D = 256  # features per program
_INDEX_DTYPES = (torch.int64, torch.int32)


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def _as_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{what} must be an int, got {value!r}")
    return int(value)


def _check(sequence, step, embeddings, positions, special) -> None:
    if not isinstance(sequence, torch.Tensor) or sequence.dim() != 3:
        raise ValueError(f"sequence must have shape [B, K, S], got {describe_shape(sequence)}")
    if sequence.dtype not in _INDEX_DTYPES:
        raise ValueError(f"sequence must be an int64 or int32 tensor, got {sequence.dtype}")
    if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 3:
        raise ValueError(f"embeddings must have shape [K, V + 1, dim] (the K tables stacked), "
                         f"got {describe_shape(embeddings)}")
    if not embeddings.is_floating_point():
        raise ValueError(f"embeddings must be floating point, got {embeddings.dtype}")
    num_codebooks, rows, dim = embeddings.shape
    if sequence.shape[1] != num_codebooks:
        raise ValueError(f"sequence {tuple(sequence.shape)} has K={sequence.shape[1]} codebooks but embeddings "
                         f"{tuple(embeddings.shape)} has K={num_codebooks} tables")
    if rows < 2 or dim < 1:
        raise ValueError(f"embeddings must have V + 1 >= 2 rows and dim >= 1, got {tuple(embeddings.shape)}")
    vocab = rows - 1
    if _as_int(special, "special") != vocab:
        raise ValueError(f"special must be V={vocab}, the last row of the embedding tables "
                         f"{tuple(embeddings.shape)}, got {special}")
    if not isinstance(positions, torch.Tensor) or positions.dim() not in (1, 2) or positions.shape[-1] != dim:
        raise ValueError(f"positions must be this step's row [dim] or a table [P, dim] with dim={dim}, "
                         f"got {describe_shape(positions)}")
    if not positions.is_floating_point():
        raise ValueError(f"positions must be floating point, got {positions.dtype}")
    if positions.dim() == 2 and positions.shape[0] < 1:
        raise ValueError("the positions table is empty (P=0)")
    for name, t in (("embeddings", embeddings), ("positions", positions)):
        if t.device != sequence.device:
            raise ValueError(f"{name} is on {t.device} but sequence on {sequence.device}")
    if isinstance(step, torch.Tensor):
        if step.numel() != 1 or step.dim() > 1:
            raise ValueError(f"a tensor step must hold one value (0-d or [1]), got shape {tuple(step.shape)}")
        if step.dtype not in _INDEX_DTYPES:
            raise ValueError(f"a tensor step must be an int64 or int32 tensor, got {step.dtype}")
        if step.device != sequence.device:
            raise ValueError(f"the step tensor is on {step.device} but sequence on {sequence.device}")
        return
    step = _as_int(step, "step (an int or a one-element integer tensor)")
    if not 0 <= step <= sequence.shape[2]:
        raise ValueError(f"step={step} is out of range: expected 0 <= step <= S = {sequence.shape[2]}")
    if positions.dim() == 2 and step >= positions.shape[0]:
        raise ValueError(f"step={step} needs row {step} of the positions table, which has P={positions.shape[0]} rows")


# ----------------------------------------------------------------------------------------------
# PyTorch path
# ----------------------------------------------------------------------------------------------


def _torch_step_input(sequence, step, embeddings, positions, special) -> torch.Tensor:
    batch, num_codebooks, steps = sequence.shape
    device = sequence.device
    if isinstance(step, torch.Tensor):
        step = step.reshape(()).long()
    column = torch.full((num_codebooks,), -1, dtype=torch.int64, device=device) + step
    present = (column >= 0) & (column < steps)  # [K]
    if steps:
        index = column.clamp(0, steps - 1).view(1, num_codebooks, 1).expand(batch, num_codebooks, 1)
        tokens = torch.where(present, sequence.gather(2, index).squeeze(2).long(), special)  # [B, K]
    else:
        tokens = torch.full((batch, num_codebooks), special, dtype=torch.int64, device=device)
    known = (tokens >= 0) & (tokens <= special)
    rows = embeddings[torch.arange(num_codebooks, device=device), torch.where(known, tokens, special)]  # [B, K, dim]
    accumulate = accumulation_dtype(embeddings.dtype)
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

    @triton.jit(do_not_specialize=["step", "steps"])
    def _step_input_kernel(seq_ptr, step_ptr, emb_ptr, pos_ptr, out_ptr, step, steps, special, dim, pos_rows,
                           stride_sb, stride_sk, stride_ss, stride_ek, stride_ev, stride_ed, stride_pp, stride_pd,
                           NUM_CODEBOOKS: tl.constexpr, STEP_IN_MEMORY: tl.constexpr, POS_TABLE: tl.constexpr,
                           BLOCK_D: tl.constexpr):
        """out[b, block] = sum_k emb[k, token(b, k)][block] + position[block], the sum in fp32 in codebook order.

        token(b, k) = sequence[b, k, step - 1] if 1 <= step <= steps, else special; a token outside
        [0, special] adds nothing."""
        b = tl.program_id(0).to(tl.int64)
        feats = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = feats < dim
        if STEP_IN_MEMORY:
            step = tl.load(step_ptr)
        step = step.to(tl.int64)
        column = step - 1
        present = (column >= 0) & (column < steps)
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for k in tl.static_range(NUM_CODEBOOKS):
            token = tl.load(seq_ptr + b * stride_sb + k * stride_sk + tl.where(present, column, 0) * stride_ss,
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


def _triton_step_input(sequence, step, embeddings, positions, special) -> torch.Tensor:
    batch, num_codebooks, steps = sequence.shape
    dim = embeddings.shape[2]
    out = torch.empty(batch, 1, dim, dtype=embeddings.dtype, device=sequence.device)
    if batch == 0:
        return out
    in_memory = isinstance(step, torch.Tensor)
    table = positions.dim() == 2
    _step_input_kernel[(batch, triton.cdiv(dim, TRITON_BLOCK_D))](
        sequence, step.reshape(()) if in_memory else None, embeddings, positions, out, 0 if in_memory else step,
        steps, special, dim, positions.shape[0] if table else 1, *sequence.stride(), *embeddings.stride(),
        positions.stride(0) if table else 0, positions.stride(-1),
        NUM_CODEBOOKS=num_codebooks, STEP_IN_MEMORY=in_memory, POS_TABLE=table, BLOCK_D=TRITON_BLOCK_D)
    return out


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def pattern_step_input(sequence: torch.Tensor, step: int | torch.Tensor, embeddings: torch.Tensor,
                       positions: torch.Tensor, special: int, backend: str = "auto") -> torch.Tensor:
    """The LM input ``[B, 1, dim]`` of decode step ``step`` for any pattern: column ``step - 1`` of ``sequence``
    ``[B, K, S]`` (the special token for step 0), embedded, summed, plus the position (see the module docstring).

    ``sequence``: int64/int32, the pattern sequence so far (cells of other columns may hold anything).
    ``step``: an int in ``[0, S]`` or a one-element integer tensor on the sequence's device (read without a host
    sync; not range-checked: steps outside ``[1, S]`` read the special token). ``embeddings``: ``[K, V + 1, dim]``
    stacked tables, row V the special token; ``special``: V. ``positions``: this step's position row ``[dim]``,
    or a table ``[P, dim]`` (row ``step`` is read). Returns the embeddings' dtype.
    ``backend``: ``"auto"`` (Triton on CUDA, PyTorch otherwise; env ``MMDGEN_BACKEND``), ``"triton"``,
    ``"torch"``; "auto" takes PyTorch for dtypes the kernel does not take (fp64).
    """
    _check(sequence, step, embeddings, positions, special)
    if not isinstance(step, torch.Tensor):
        step = int(step)
    chosen = choose_backend(backend, sequence.device, embeddings.dtype, "step-input kernel", "embeddings")
    run = _triton_step_input if chosen == "triton" else _torch_step_input
    return run(sequence, step, embeddings, positions, int(special))
