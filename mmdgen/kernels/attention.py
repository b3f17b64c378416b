"""Decode attention over a static KV cache: a few new query steps against the first ``length`` cached steps.

Shapes. ``query`` ``[B, H, Q, hd]`` (Q = 1 for a decode step, at most ``MAX_QUERIES``), ``keys`` and
``values`` ``[B, H, S_max, hd]`` (the whole static cache buffer, e.g. ``mmdgen.model.lm.KVCache``, or the
projected text memory for cross-attention), ``key_mask`` ``[B, S_max]`` bool (False = padding). Output
``[B, H, Q, hd]`` in the query's dtype.

Maths. Query ``i`` sits at position ``length - Q + i``. With ``causal=True`` (self-attention) it sees the
cache positions ``j <= length - Q + i``; with ``causal=False`` (cross-attention) every ``j < length``. Positions
whose ``key_mask`` is False are left out. ``out_i = softmax_j(scale q_i . k_j) @ V`` over the visible ``j``;
a query that sees no position at all (e.g. a fully padded text row) gets 0.

- Triton (CUDA, or CPU through ``TRITON_INTERPRET=1``), split-K ("flash-decoding"): the positions
  ``[0, length)`` are cut into chunks of ``chunk`` positions (a multiple of ``TRITON_BLOCK_N``, between
  ``TRITON_MIN_CHUNK`` and ``TRITON_MAX_CHUNK``, chosen so that ``B * H * splits`` reaches about
  ``TRITON_TARGET_PROGRAMS`` programs: a decode step at batch 1 still fills the GPU). Program
  ``(b * H + h, split)`` walks its chunk in tiles of ``TRITON_BLOCK_N`` positions and keeps, for each of the
  Q queries, the running max of the (base-2) scores, the sum of exponentials and the weighted sum of values,
  all fp32; it writes them as partials ``[B*H, splits, Q, hd]``, ``[B*H, splits, Q]`` x2. A second kernel,
  one program per (b, h, query), merges the partials with the log-sum-exp rescaling and writes the output.
  Tile products: Q = 1 multiplies and reduces in fp32 (a one-row query would fill 1/16 of a tensor-core tile
  and the op is memory bound, so tensor cores buy nothing; the products are exact fp32); Q > 1 pads the
  queries to a 16-row tile and uses ``backend.dot`` (3xTF32 for fp32, native half products for bf16/fp16,
  with the probabilities rounded to the value dtype for the second product, as flash attention does).
- PyTorch: ``F.scaled_dot_product_attention`` on the views ``keys[:, :, :length]`` /
  ``values[:, :, :length]`` with a boolean mask (causal offset within the Q new steps, ``key_mask``); rows
  that see nothing are zeroed. A tensor ``length`` is not read on the host: the whole buffer is attended with
  the positions past the length masked, so that one traced graph (``torch.compile``) serves every step; the
  buffer past the length must then hold finite values (the LM's static cache starts as zeros). Callers bound
  that read by passing a view ``keys[:, :, :span]`` (the compiled decode step's length buckets). Inside a
  ``torch.compile`` graph on CPU the same maths is written as products and sums (scores, masked softmax,
  weighted values) that inductor fuses into C++ loops: SDPA's CPU kernel costs about 50 us a call in fixed
  overhead, and a MusicGen-small step makes 48 calls (1.1 ms a step saved at batch 1, int8).

Why the combine is a kernel and not torch ops: it is one launch instead of about eight (at batch 1 a step's
many small attention calls are launch bound), it reads only the splits that hold data, so the partial buffers
need no initialisation even when programs past a tensor length exit without writing, and it stays capturable
in a CUDA graph.

Length as a tensor (CUDA graphs). ``length`` may be a Python int or a one-element integer tensor on the
inputs' device. A tensor is read by the kernels from device memory, with no host sync: the grid is then sized
by ``S_max`` (the chunk is chosen from ``S_max``), programs whose chunk starts at or past the length exit at
once, and the combine reads ``cdiv(length, chunk)`` splits. A captured graph can be replayed at every step
after writing the new length into the same tensor. The value is not checked on the Triton path (checking
needs a sync): it is clamped to ``[0, S_max]``, and queries that then see nothing (``length < Q``) return 0.

Dtypes: fp32, bf16, fp16 (fp64 on the PyTorch path); keys and values share dtype and device with the query,
or, under an fp32 query, a 16-bit cache (bf16 or fp16: half the bytes a step reads, the bound of a decode step
at batch 8): the Triton kernel and the traced loops widen each element as they read it, the PyTorch path copies
the attended part of the cache to fp32 first. Accumulation fp32 on the Triton path.

Memory and work: reads the visible cache, ``O(B H length hd)`` elements of keys and values, once; positions
``>= length`` are never read (stale or NaN data there does not matter), except on the PyTorch path with a
tensor length, which reads the whole buffer and needs it finite. Masked positions below ``length`` are not
read on the Triton path; the PyTorch path reads them and, as SDPA does, needs them finite. Extra memory: the
partials, ``O(B H splits Q hd)`` fp32 with ``splits <= ceil(S_max / TRITON_MIN_CHUNK)``; the PyTorch path
builds a ``[B, 1, Q, length]`` boolean mask (``S_max`` wide for a tensor length) when a mask is needed and
never copies the cache. No gradient (inference only).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mmdgen.kernels.backend import (TRITON_IMPORT_ERROR, choose_backend, describe_shape, dot_precision, stored,
                                    traced_on_cpu)

MAX_QUERIES = 16
HALF_CACHE_DTYPES = (torch.bfloat16, torch.float16)  # a cache under an fp32 query may hold these
TRITON_BLOCK_N = 64  # cache positions per tile
TRITON_MIN_CHUNK = 64  # positions per split: multiples of TRITON_BLOCK_N in [MIN, MAX]
TRITON_MAX_CHUNK = 256
TRITON_TARGET_PROGRAMS = 512  # B * H * splits to aim for: a few waves over 108-132 SMs
TRITON_BLOCK_SPLITS = 16  # partials merged per iteration of the combine kernel
_LOG2E = 1.0 / math.log(2.0)


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def _check(query, keys, values, length, key_mask, scale, causal) -> float:
    """Raise ValueError on bad input; return the softmax scale."""
    for name, t in (("query", query), ("keys", keys), ("values", values)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must have shape [B, H, steps, head_dim], got {describe_shape(t)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {t.dtype}")
    if keys.shape != values.shape:
        raise ValueError(f"keys and values must have the same shape, got {tuple(keys.shape)} and "
                         f"{tuple(values.shape)}")
    batch, heads, num_queries, head_dim = query.shape
    s_max = keys.shape[2]
    if (keys.shape[0], keys.shape[1], keys.shape[3]) != (batch, heads, head_dim):
        raise ValueError(f"keys {tuple(keys.shape)} do not fit query {tuple(query.shape)}: expected "
                         f"[{batch}, {heads}, S_max, {head_dim}]")
    if not 1 <= num_queries <= MAX_QUERIES:
        raise ValueError(f"decode attention takes 1 to {MAX_QUERIES} query steps, got Q={num_queries}")
    if head_dim < 1:
        raise ValueError(f"head_dim must be at least 1, got {head_dim}")
    if s_max < 1:
        raise ValueError("the cache is empty (S_max=0); expected keys [B, H, S_max >= 1, head_dim]")
    for name, t in (("keys", keys), ("values", values)):
        if t.device != query.device:
            raise ValueError(f"query and {name} must share a device, got {query.device} and {t.device}")
    if keys.dtype != values.dtype:
        raise ValueError(f"keys and values must share a dtype, got {keys.dtype} and {values.dtype}")
    if keys.dtype != query.dtype and not (query.dtype == torch.float32 and keys.dtype in HALF_CACHE_DTYPES):
        raise ValueError(f"keys and values must have the query's dtype ({query.dtype}), or bfloat16/float16 under a "
                         f"float32 query, got {keys.dtype}")
    if key_mask is not None:
        if not isinstance(key_mask, torch.Tensor) or key_mask.shape != (batch, s_max):
            raise ValueError(f"key_mask must have shape [B, S_max] = {(batch, s_max)}, got {describe_shape(key_mask)}")
        if key_mask.dtype != torch.bool:
            raise ValueError(f"key_mask must be a bool tensor (False = masked), got {key_mask.dtype}")
        if key_mask.device != query.device:
            raise ValueError(f"key_mask is on {key_mask.device} but query on {query.device}")
    if isinstance(length, torch.Tensor):
        if length.numel() != 1 or length.dim() > 1:
            raise ValueError(f"a tensor length must hold one value (0-d or [1]), got shape {tuple(length.shape)}")
        if length.is_floating_point() or length.is_complex() or length.dtype == torch.bool:
            raise ValueError(f"a tensor length must be an integer tensor, got {length.dtype}")
        if length.device != query.device:
            raise ValueError(f"the length tensor is on {length.device} but query on {query.device}")
    elif isinstance(length, bool) or not isinstance(length, int):
        raise ValueError(f"length must be an int or a one-element integer tensor, got {type(length).__name__}")
    else:
        _check_length_value(length, num_queries, s_max, causal)
    if scale is None:
        return head_dim ** -0.5
    try:
        scale = float(scale)
    except (TypeError, ValueError) as error:
        raise ValueError(f"scale must be a finite number, got {scale!r}") from error
    if not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale}")
    return scale


def _check_length_value(length: int, num_queries: int, s_max: int, causal: bool) -> None:
    least = num_queries if causal else 1
    if not least <= length <= s_max:
        what = f"Q={num_queries} (the new steps are the last Q cached ones)" if causal else "1"
        raise ValueError(f"length={length} is out of range: expected {what} <= length <= S_max={s_max}")


# ----------------------------------------------------------------------------------------------
# PyTorch path
# ----------------------------------------------------------------------------------------------


def _torch_attention(query, keys, values, length, key_mask, scale, causal):
    num_queries = query.shape[2]
    if isinstance(length, torch.Tensor):
        return _torch_attention_whole_buffer(query, keys, values, length, key_mask, scale, causal)
    k, v = keys[:, :, :length], values[:, :, :length]  # views: the cache is not copied
    visible = None
    if causal and num_queries > 1:
        positions = torch.arange(length, device=query.device)
        own = length - num_queries + torch.arange(num_queries, device=query.device)
        visible = (positions[None, :] <= own[:, None])[None, None]  # [1, 1, Q, length]
    return _masked_sdpa(query, k, v, visible, None if key_mask is None else key_mask[:, :length], scale)


def _torch_attention_whole_buffer(query, keys, values, length, key_mask, scale, causal):
    """A tensor length, never read on the host: the whole buffer is attended with the positions past the
    length (and, causal, past each query's own) masked, so one traced graph serves every step."""
    num_queries, s_max = query.shape[2], keys.shape[2]
    length = length.reshape(()).clamp(0, s_max)
    positions = torch.arange(s_max, device=query.device)
    own = length - num_queries + torch.arange(num_queries, device=query.device)  # [Q]
    last = own if causal else (length - 1).expand(num_queries)
    visible = (positions[None, :] <= last[:, None])[None, None]  # [1, 1, Q, S_max]
    seen_anything = (last >= 0)[None, None, :, None]  # a query with nothing to see (length < Q) gives 0
    return _masked_sdpa(query, keys, values, visible, key_mask, scale).masked_fill(~seen_anything, 0.0)


def _masked_sdpa(query, keys, values, visible, key_mask, scale):
    """SDPA with a [*, *, Q, S] visibility mask and a [B, S] key mask; rows that see nothing give 0."""
    seen = None
    if key_mask is not None:
        keep = key_mask[:, None, None, :]  # [B, 1, 1, S]
        visible = keep if visible is None else visible & keep
        seen = visible.any(dim=-1, keepdim=True)  # [B, 1, Q, 1]; SDPA kernels give the others NaN or 0
    if traced_on_cpu(query):  # a 16-bit cache is widened inside the fused loops
        out = _traced_attention(query, keys, values, visible, scale)
    else:
        out = F.scaled_dot_product_attention(query, keys.to(query.dtype), values.to(query.dtype), attn_mask=visible,
                                             scale=scale)
    if seen is not None:
        out = out.masked_fill(~seen, 0.0)
    return out


def _traced_attention(query, keys, values, visible, scale):
    """SDPA as products and sums inside a ``torch.compile`` graph on CPU: a few fused C++ loops instead of a
    library call (about 50 us of fixed cost each at a decode step's size, 48 of them a step at MusicGen-small
    size). Rows that see nothing give NaN here; ``_masked_sdpa`` zeroes them."""
    scores = (query[..., :, None, :] * keys[..., None, :, :]).sum(-1) * scale  # [B, H, Q, S]
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    probs = stored(torch.softmax(scores, dim=-1))
    return (probs[..., None] * values[..., None, :, :]).sum(-2)  # [B, H, Q, hd]


# ----------------------------------------------------------------------------------------------
# Triton path
# ----------------------------------------------------------------------------------------------


def split_plan(span: int, batch_heads: int) -> tuple[int, int]:
    """(chunk, splits) for ``span`` cache positions (the length, or S_max for a tensor length)."""
    wanted = max(1, TRITON_TARGET_PROGRAMS // max(batch_heads, 1))
    chunk = -(-max(span, 1) // wanted)
    chunk = -(-chunk // TRITON_BLOCK_N) * TRITON_BLOCK_N
    chunk = min(max(chunk, TRITON_MIN_CHUNK), TRITON_MAX_CHUNK)
    return chunk, -(-max(span, 1) // chunk)


if TRITON_IMPORT_ERROR is None:
    import triton
    import triton.language as tl

    from mmdgen.kernels.backend import dot

    @triton.jit(do_not_specialize=["length"])
    def _decode_split_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, length_ptr, acc_ptr, max_ptr, sum_ptr, length, s_max,
                             heads, num_queries, head_dim, chunk, num_splits, qk_scale, stride_qb, stride_qh,
                             stride_qq, stride_qd, stride_kb, stride_kh, stride_ks, stride_kd, stride_vb, stride_vh,
                             stride_vs, stride_vd, stride_mb, HAS_MASK: tl.constexpr, LENGTH_IN_MEMORY: tl.constexpr,
                             CAUSAL: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
        """Partials of one (b, h) over one chunk of cache positions: per query the running max of the base-2
        scores, the sum of 2^(score - max) and the weighted sum of values. Chunks at or past the length exit."""
        bh = tl.program_id(0)
        split = tl.program_id(1)
        if LENGTH_IN_MEMORY:
            length = tl.load(length_ptr).to(tl.int32)
        length = tl.maximum(tl.minimum(length, s_max), 0)
        start = split * chunk
        if start < length:
            end = tl.minimum(start + chunk, length)
            b = (bh // heads).to(tl.int64)
            h = (bh % heads).to(tl.int64)
            q_rows = tl.arange(0, BLOCK_Q)
            feats = tl.arange(0, BLOCK_D)
            q_ok = q_rows < num_queries
            d_ok = feats < head_dim
            q = tl.load(q_ptr + b * stride_qb + h * stride_qh + q_rows[:, None] * stride_qq
                        + feats[None, :] * stride_qd, mask=q_ok[:, None] & d_ok[None, :], other=0.0)
            k_base = k_ptr + b * stride_kb + h * stride_kh
            v_base = v_ptr + b * stride_vb + h * stride_vh
            last_seen = length - num_queries + q_rows  # causal: query i sees positions <= its own
            run_max = tl.full((BLOCK_Q,), float("-inf"), dtype=tl.float32)
            run_sum = tl.zeros((BLOCK_Q,), dtype=tl.float32)
            acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
            for tile in range(start, end, BLOCK_N):
                pos = tile + tl.arange(0, BLOCK_N)
                live = pos < end
                if HAS_MASK:
                    live = live & (tl.load(mask_ptr + b * stride_mb + pos, mask=live, other=0) != 0)
                kv_mask = live[:, None] & d_ok[None, :]
                # widened to the query's dtype as read (a no-op unless a 16-bit cache serves an fp32 query)
                k = tl.load(k_base + pos[:, None] * stride_ks + feats[None, :] * stride_kd, mask=kv_mask,
                            other=0.0).to(q.dtype)
                v = tl.load(v_base + pos[:, None] * stride_vs + feats[None, :] * stride_vd, mask=kv_mask,
                            other=0.0).to(q.dtype)
                if BLOCK_Q == 1:
                    scores = tl.sum(q.to(tl.float32)[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
                else:
                    scores = dot(q, tl.trans(k), tl.zeros((BLOCK_Q, BLOCK_N), dtype=tl.float32), PRECISION)
                visible = q_ok[:, None] & live[None, :]
                if CAUSAL:
                    visible = visible & (pos[None, :] <= last_seen[:, None])
                scores = tl.where(visible, scores * qk_scale, float("-inf"))
                new_max = tl.maximum(run_max, tl.max(scores, axis=1))
                safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # nothing seen yet: no NaN
                alpha = tl.exp2(run_max - safe_max)
                p = tl.exp2(scores - safe_max[:, None])
                run_sum = run_sum * alpha + tl.sum(p, axis=1)
                if BLOCK_Q == 1:
                    acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
                else:
                    acc = dot(p.to(v.dtype), v, acc * alpha[:, None], PRECISION)
                run_max = new_max
            row = (bh * num_splits + split) * num_queries + q_rows
            tl.store(acc_ptr + row[:, None] * head_dim + feats[None, :], acc, mask=q_ok[:, None] & d_ok[None, :])
            tl.store(max_ptr + row, run_max, mask=q_ok)
            tl.store(sum_ptr + row, run_sum, mask=q_ok)

    @triton.jit(do_not_specialize=["length"])
    def _decode_combine_kernel(acc_ptr, max_ptr, sum_ptr, length_ptr, out_ptr, length, s_max, num_queries, head_dim,
                               chunk, num_splits, LENGTH_IN_MEMORY: tl.constexpr, BLOCK_SPLITS: tl.constexpr,
                               BLOCK_D: tl.constexpr):
        """out[b, h, i] = sum_s 2^(m_s - m) acc_s / sum_s 2^(m_s - m) l_s over the splits holding data; 0 when the
        query saw no position (every l_s = 0)."""
        bh = tl.program_id(0)
        qi = tl.program_id(1)
        if LENGTH_IN_MEMORY:
            length = tl.load(length_ptr).to(tl.int32)
        length = tl.maximum(tl.minimum(length, s_max), 0)
        live_splits = tl.minimum((length + chunk - 1) // chunk, num_splits)
        feats = tl.arange(0, BLOCK_D)
        d_ok = feats < head_dim
        run_max = tl.full((1,), float("-inf"), dtype=tl.float32)
        run_sum = tl.zeros((1,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for s0 in range(0, live_splits, BLOCK_SPLITS):
            splits = s0 + tl.arange(0, BLOCK_SPLITS)
            ok = splits < live_splits
            row = (bh * num_splits + splits) * num_queries + qi
            m = tl.load(max_ptr + row, mask=ok, other=float("-inf"))
            l = tl.load(sum_ptr + row, mask=ok, other=0.0)
            a = tl.load(acc_ptr + row[:, None] * head_dim + feats[None, :], mask=ok[:, None] & d_ok[None, :],
                        other=0.0)
            new_max = tl.maximum(run_max, tl.max(m, axis=0))
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
            alpha = tl.exp2(run_max - safe_max)
            w = tl.exp2(m - safe_max)
            run_sum = run_sum * alpha + tl.sum(w * l, axis=0)
            acc = acc * alpha + tl.sum(w[:, None] * a, axis=0)
            run_max = new_max
        out = tl.where(run_sum > 0.0, acc / tl.where(run_sum > 0.0, run_sum, 1.0), 0.0)
        tl.store(out_ptr + (bh * num_queries + qi) * head_dim + feats, out.to(out_ptr.dtype.element_ty), mask=d_ok)


def _triton_attention(query, keys, values, length, key_mask, scale, causal):
    batch, heads, num_queries, head_dim = query.shape
    s_max = keys.shape[2]
    out = torch.empty(batch, heads, num_queries, head_dim, dtype=query.dtype, device=query.device)
    if batch * heads == 0:
        return out
    in_memory = isinstance(length, torch.Tensor)
    length_ptr = length.reshape(()) if in_memory else None  # a view: nothing runs on the host or device
    length_value = 0 if in_memory else length
    chunk, num_splits = split_plan(s_max if in_memory else length, batch * heads)
    acc = torch.empty(batch * heads, num_splits, num_queries, head_dim, dtype=torch.float32, device=query.device)
    run_max = torch.empty(batch * heads, num_splits, num_queries, dtype=torch.float32, device=query.device)
    run_sum = torch.empty_like(run_max)
    mask = key_mask.view(torch.uint8) if key_mask is not None else None  # same bytes, no copy
    block_d = max(16, triton.next_power_of_2(head_dim))
    _decode_split_kernel[(batch * heads, num_splits)](
        query, keys, values, mask, length_ptr, acc, run_max, run_sum, length_value, s_max, heads, num_queries,
        head_dim, chunk, num_splits, scale * _LOG2E, *query.stride(), *keys.stride(), *values.stride(),
        mask.stride(0) if mask is not None else 0,
        HAS_MASK=mask is not None, LENGTH_IN_MEMORY=in_memory, CAUSAL=causal,
        BLOCK_Q=1 if num_queries == 1 else 16, BLOCK_N=TRITON_BLOCK_N, BLOCK_D=block_d,
        PRECISION=dot_precision(query.dtype))
    _decode_combine_kernel[(batch * heads, num_queries)](
        acc, run_max, run_sum, length_ptr, out, length_value, s_max, num_queries, head_dim, chunk, num_splits,
        LENGTH_IN_MEMORY=in_memory, BLOCK_SPLITS=TRITON_BLOCK_SPLITS, BLOCK_D=block_d)
    return out


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def decode_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, length: int | torch.Tensor,
                     key_mask: torch.Tensor | None = None, scale: float | None = None, backend: str = "auto", *,
                     causal: bool = True) -> torch.Tensor:
    """Attention of ``query`` ``[B, H, Q, hd]`` over the first ``length`` steps of a static cache.

    ``keys``/``values``: ``[B, H, S_max, hd]`` (only ``[0, length)`` is read). ``length``: an int, or a
    one-element integer tensor on the same device (read on the device by the Triton path: no host sync,
    CUDA-graph friendly). Query ``i`` sits at position ``length - Q + i``; with ``causal=True`` (the default,
    self-attention) it sees positions up to its own, with ``causal=False`` (cross-attention with Q > 1) all of
    ``[0, length)``. ``key_mask``: ``[B, S_max]`` bool, False = masked; a query that sees no position returns
    0. ``scale`` defaults to ``hd ** -0.5``. Returns ``[B, H, Q, hd]`` in the query's dtype; no gradient.
    ``backend``: ``"auto"`` (Triton on CUDA, PyTorch otherwise; env ``MMDGEN_BACKEND``), ``"triton"``,
    ``"torch"``.
    """
    scale = _check(query, keys, values, length, key_mask, scale, bool(causal))
    chosen = choose_backend(backend, query.device, query.dtype, "decode attention")
    run = _triton_attention if chosen == "triton" else _torch_attention
    return run(query, keys, values, length, key_mask, scale, bool(causal))
