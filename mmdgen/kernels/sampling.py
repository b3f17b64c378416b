"""One decoding step's guidance + sampling, fused: logits ``[R, K, V]`` in, next codes ``[B, K]`` out.

At each step the LM gives logits ``[R, K, V]`` (K codebooks of V entries). Without guidance R = B; with
classifier-free guidance R = 2B, rows ``0..B-1`` conditional and ``B..2B-1`` unconditional. For each
(b, k) row, in this order:

1. guidance (``guidance_scale`` s not None): ``l = u + s * (c - u)``, c = row b, u = row b + B (MusicGen's
   and audiocraft's form). Where ``c == u`` the result is c itself (identical for finite values, and an
   entry masked to -inf in both rows stays -inf instead of becoming NaN);
2. greedy when ``temperature == 0`` or ``top_k == 1``: the code is ``argmax l`` (ties to the lowest index,
   as ``torch.argmax``); nothing below runs and no noise is needed. Otherwise ``l = l * (1/temperature)``;
3. top-k (``0 < top_k < V``): keep the entries ``>=`` the k-th largest value (ties at the boundary are all
   kept, as transformers' ``TopKLogitsWarper`` does), the rest become -inf;
4. top-p (``0 < top_p < 1``), over the softmax of what top-k kept (renormalised): sort the kept entries in
   descending order, ``m`` = 1 + the number of sorted positions whose inclusive cumulative probability is
   still ``< top_p``; keep the entries ``>=`` the m-th largest. Equivalently: an entry is kept iff the
   probability mass of the entries strictly larger than it is ``< top_p`` -- the smallest set of most
   probable entries whose mass reaches ``top_p``, never empty, ties at the boundary all kept. This is
   transformers' ``TopPLogitsWarper`` rule (remove where the ascending cumulative mass ``<= 1 - p``);
5. Gumbel-max sampling: ``code = argmax(l + g)`` over the kept entries, ``g`` the caller's Gumbel noise
   ``[B, K, V]`` (see ``gumbel_noise``), ties to the lowest index.

Order of the filters: temperature, then top-k, then top-p on the renormalised top-k set -- the order of
transformers' generation utilities (``TemperatureLogitsWarper``, ``TopKLogitsWarper``, ``TopPLogitsWarper``
appended in that order). audiocraft's ``LMModel._sample_next_token`` applies the temperature then *either*
top-p (when ``top_p > 0``) *or* top-k, never both; ``top_k=0`` or ``top_p=0`` here reproduces either of its
modes. Its top-p keeps an entry when the mass before it in sorted order is ``<= p`` (here: ``< p``); the
two differ only when that mass equals p exactly.

Why Gumbel-max with caller noise: ``argmax(l + g)`` with ``g = -log(-log(u))``, u uniform, is an exact
sample of ``softmax(l)`` restricted to the kept entries, and it is a pure function of (logits, noise).
Both paths compute the same fp32 values with the same roundings: one fp32 multiply or add at a time
(the Triton kernel is compiled with ``enable_fp_fusion=False``; by default the guidance
``u + s * (c - u)`` would be contracted into an FMA and round differently from eager PyTorch), the
temperature applied as a multiplication by the same fp32 ``1/temperature`` (Triton's fp32 ``/`` is the
approximate ``div.full.f32``), the top-k threshold an element of the row (no arithmetic). So the codes
are bit-identical between the paths and reproducible from a seed. The one exception is the top-p cut:
the softmax and its partial sums are computed in different orders (and ``exp`` is not correctly
rounded), so the paths can keep a different boundary entry when the mass above it lies within fp32
rounding (~1e-6) of ``top_p``.

- Triton (CUDA, or CPU through ``TRITON_INTERPRET=1``): one program per (b, k) row. The row of V logits
  (and with guidance the unconditional row) is loaded once, padded with -inf to ``BLOCK_V`` = the next
  power of two, and stays in registers: guidance, temperature, then the two cuts found by bisection
  rather than by sorting. Each value gets an order-preserving int key (its fp32 bits, the 31 low bits
  flipped for negatives); 32 halvings of the 2^32 key range find exactly (a) the k-th largest value:
  the largest key t with ``#{key >= t} >= k``, and (b) the top-p cut: the smallest key t whose mass
  ``sum(probs[key > t]) < top_p``, probs the softmax of what top-k kept. Both are entries of the row, so
  "keep ``l >= cut``" is the sorted definition above, ties included. Then ``tl.argmax`` of ``l + g`` and
  one int64 store. Why bisection and not ``tl.sort``: each cut costs 32 passes of compare + block sum
  (64 V operations and 32 block reductions) against ``log2 V (log2 V + 1) / 2`` bitonic stages (66 for
  V = 2048) of compare-and-swap with cross-lane exchanges; the cut is exact and tie-independent by
  construction; and Triton's interpreter runs ``tl.sort`` element by element in Python (about 4 s for
  one row of 2048 on CPU), which would keep the kernel untested at real sizes, while bisection runs in
  a few milliseconds there. fp32, bf16 or fp16 logits, computed in fp32; V up to ``TRITON_MAX_V``.
- PyTorch: the same maths vectorised over ``[B, K, V]`` (``torch.topk`` for the k-th value, one ``sort``,
  ``exp``, ``cumsum`` and ``gather`` for the top-p cut), no loop over rows, no host synchronisation
  (CUDA-graph safe given the noise). Any floating dtype, computed in fp32.

Work and memory: O(R K V) reads of the logits plus O(B K V) of the noise. Triton: O(V) work per filter
pass, 32 passes per active cut (top-k, top-p), no sort, nothing allocated but the ``[B, K]`` output.
PyTorch: one top-k selection and one sort per (b, k) row (O(V log V)), a few ``[B, K, V]`` fp32
temporaries.
"""

from __future__ import annotations

import math
import numbers

import torch

from mmdgen.kernels.backend import TRITON_IMPORT_ERROR, choose_backend, describe_shape

TRITON_MAX_V = 16384
# Compile options of the kernel launch: no FMA contraction, so that each fp32 multiply and add rounds as in
# eager PyTorch (the bit-identical codes of the two paths depend on it; tests check the PTX).
TRITON_OPTIONS = {"enable_fp_fusion": False}


# ----------------------------------------------------------------------------------------------
# Noise
# ----------------------------------------------------------------------------------------------


def gumbel_noise(shape, generator: torch.Generator | None = None, device: torch.device | str | None = None
                 ) -> torch.Tensor:
    """Standard Gumbel noise ``g = -log(-log(u))`` of ``shape``, fp32, on ``device``.

    ``u`` is drawn with ``torch.rand`` from ``generator`` on the generator's own device (so one seeded CPU
    generator gives the same noise, hence the same codes, whatever device the logits are on) and then
    moved to ``device`` (default: the generator's device). ``generator=None`` draws from torch's default
    generator of ``device`` (seeded by ``torch.manual_seed``; not reproducible otherwise). ``u`` is
    floored at the smallest normal fp32 so that ``u = 0`` (probability 2^-24 per draw) gives a finite
    ``g`` (about -4.5) rather than -inf.
    """
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    target = torch.device(device) if device is not None else (generator.device if generator is not None
                                                              else torch.device("cpu"))
    draw_on = generator.device if generator is not None else target
    u = torch.rand(tuple(shape), generator=generator, dtype=torch.float32, device=draw_on)
    g = u.clamp_(min=torch.finfo(torch.float32).tiny).log_().neg_().log_().neg_()
    return g.to(target)


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check(logits, guidance_scale, temperature, top_k, top_p, generator, noise) -> tuple[int, int, int]:
    """(B, K, V); ValueError on any bad argument."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise ValueError(f"logits must have shape [R, K, V], got {describe_shape(logits)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    rows, heads, vocab = logits.shape
    if vocab < 1:
        raise ValueError(f"logits must have V >= 1 entries per codebook, got shape {tuple(logits.shape)}")
    if guidance_scale is not None:
        if not _is_real(guidance_scale) or not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number or None, got {guidance_scale!r}")
        if rows % 2:
            raise ValueError(f"classifier-free guidance needs R = 2B rows (B conditional, then B unconditional), "
                             f"got an odd R={rows}")
    if not _is_real(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or not 0 <= top_k <= vocab:
        raise ValueError(f"top_k must be an int with 0 <= top_k <= V={vocab} (0 = off), got {top_k!r}")
    if not _is_real(top_p) or not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be a number in [0, 1] (0 or 1 = off), got {top_p!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    batch = rows // 2 if guidance_scale is not None else rows
    if noise is not None:
        if generator is not None:
            raise ValueError("pass either noise= or generator=, not both")
        if not isinstance(noise, torch.Tensor) or tuple(noise.shape) != (batch, heads, vocab):
            raise ValueError(f"noise must have shape [B, K, V] = {(batch, heads, vocab)} for logits "
                             f"{tuple(logits.shape)} (guidance {'on' if guidance_scale is not None else 'off'}), "
                             f"got {describe_shape(noise)}")
        if not noise.is_floating_point():
            raise ValueError(f"noise must be floating point Gumbel noise, got {noise.dtype}")
        if noise.device != logits.device:
            raise ValueError(f"noise must be on the logits' device {logits.device}, got {noise.device}")
    return batch, heads, vocab


def _fp32(value: float) -> float:
    """``value`` rounded to fp32 (as a Python float): both paths then use the very same scalar."""
    return float(torch.tensor(value, dtype=torch.float32))


# ----------------------------------------------------------------------------------------------
# PyTorch path
# ----------------------------------------------------------------------------------------------


def _torch_sample(logits, batch, scale, greedy, inv_temperature, top_k, top_p, noise) -> torch.Tensor:
    x = logits.float()
    if scale is not None:
        cond, uncond = x[:batch], x[batch:]
        x = torch.where(cond == uncond, cond, uncond + scale * (cond - uncond))
    if greedy:
        return x.argmax(dim=-1)
    x = x * inv_temperature
    if top_k:
        kth = torch.topk(x, top_k, dim=-1).values[..., top_k - 1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p:
        ordered = x.sort(dim=-1, descending=True).values
        weights = (ordered - ordered[..., :1]).exp()
        cumulative = (weights / weights.sum(dim=-1, keepdim=True)).cumsum(dim=-1)
        cut = (cumulative < top_p).sum(dim=-1, keepdim=True)
        finite = (ordered > float("-inf")).sum(dim=-1, keepdim=True)
        cutoff = ordered.gather(-1, torch.minimum(cut, finite - 1).clamp_(min=0))
        x = x.masked_fill(x < cutoff, float("-inf"))
    return (x + noise.float()).argmax(dim=-1)


# ----------------------------------------------------------------------------------------------
# Triton
# ----------------------------------------------------------------------------------------------

if TRITON_IMPORT_ERROR is None:
    import triton
    import triton.language as tl

    # Order-preserving int keys of fp32 values (signed compare): the bits, with the 31 low bits of negative
    # floats flipped. Keys of non-NaN values lie in [key(-inf), key(+inf)] = [-2139095041, 2139095040],
    # inside both bisection ranges below; the padding gets a key below both ranges.
    _KEY_PAD = tl.constexpr(-(2 ** 31) - 2)

    @triton.jit
    def _ordered_key(x, valid):
        bits = x.to(tl.int32, bitcast=True)
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)
        return tl.where(valid, key, _KEY_PAD)

    @triton.jit
    def _sample_kernel(logits_ptr, noise_ptr, out_ptr, num_codebooks, vocab, uncond_offset, stride_r, stride_k,
                       stride_v, scale, inv_temperature, top_k, top_p, GUIDANCE: tl.constexpr,
                       GREEDY: tl.constexpr, TOP_K: tl.constexpr, TOP_P: tl.constexpr, BLOCK_V: tl.constexpr):
        """out[b, k] = the code sampled from row (b, k): guidance, temperature, top-k, top-p, Gumbel argmax."""
        row = tl.program_id(0)
        b = (row // num_codebooks).to(tl.int64)
        k = (row % num_codebooks).to(tl.int64)
        cols = tl.arange(0, BLOCK_V)
        in_row = cols < vocab
        row_ptr = logits_ptr + b * stride_r + k * stride_k + cols.to(tl.int64) * stride_v
        x = tl.load(row_ptr, mask=in_row, other=0.0).to(tl.float32)
        if GUIDANCE:
            u = tl.load(row_ptr + uncond_offset, mask=in_row, other=0.0).to(tl.float32)
            x = tl.where(x == u, x, u + scale * (x - u))
        x = tl.where(in_row, x, float("-inf"))  # padding to the power of two never wins anything
        if GREEDY:
            code = tl.argmax(x, axis=0, tie_break_left=True)
        else:
            x = x * inv_temperature
            if TOP_K:
                # the k-th largest key: the largest t with #{key >= t} >= k (lo keeps it, hi never has it)
                key = _ordered_key(x, in_row)
                lo = tl.full((), -(2 ** 31), tl.int64)
                hi = tl.full((), 2 ** 31, tl.int64)
                for _ in range(32):
                    mid = lo + (hi - lo) // 2
                    enough = tl.sum((key >= mid).to(tl.int32), axis=0) >= top_k
                    lo = tl.where(enough, mid, lo)
                    hi = tl.where(enough, hi, mid)
                kth = tl.min(tl.where(key >= lo, x, float("inf")), axis=0)
                x = tl.where(x >= kth, x, float("-inf"))
            if TOP_P:
                # the smallest key t whose strictly-larger mass is < p (hi has it, lo never has it)
                key = _ordered_key(x, in_row)
                weights = tl.exp(x - tl.max(x, axis=0))
                probs = weights / tl.sum(weights, axis=0)
                lo = tl.full((), -(2 ** 31) - 1, tl.int64)
                hi = tl.full((), 2 ** 31 - 1, tl.int64)
                for _ in range(32):
                    mid = lo + (hi - lo) // 2
                    below = tl.sum(tl.where(key > mid, probs, 0.0), axis=0) < top_p
                    lo = tl.where(below, lo, mid)
                    hi = tl.where(below, mid, hi)
                cutoff = tl.min(tl.where(key >= hi, x, float("inf")), axis=0)
                x = tl.where(x >= cutoff, x, float("-inf"))
            g = tl.load(noise_ptr + row.to(tl.int64) * vocab + cols, mask=in_row, other=0.0)
            code = tl.argmax(tl.where(in_row, x + g, float("-inf")), axis=0, tie_break_left=True)
        tl.store(out_ptr + row, code.to(tl.int64))


def _num_warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


def _triton_sample(logits, batch, scale, greedy, inv_temperature, top_k, top_p, noise) -> torch.Tensor:
    heads, vocab = logits.shape[1], logits.shape[2]
    out = torch.empty(batch, heads, dtype=torch.int64, device=logits.device)
    if batch * heads == 0:
        return out
    block = triton.next_power_of_2(vocab)
    noise = logits if noise is None else noise.float().contiguous()  # unused by the greedy kernel
    _sample_kernel[(batch * heads,)](
        logits, noise, out, heads, vocab, batch * logits.stride(0), logits.stride(0), logits.stride(1),
        logits.stride(2), 1.0 if scale is None else scale, inv_temperature, top_k, top_p,
        GUIDANCE=scale is not None, GREEDY=greedy, TOP_K=top_k > 0, TOP_P=top_p > 0.0, BLOCK_V=block,
        num_warps=_num_warps(block), **TRITON_OPTIONS)
    return out


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_next(logits: torch.Tensor, *, guidance_scale: float | None = None, temperature: float = 1.0,
                top_k: int = 0, top_p: float = 0.0, generator: torch.Generator | None = None,
                noise: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """The next codes ``[B, K]`` (int64) from one decoding step's logits (see the module docstring).

    ``logits``: ``[R, K, V]``, fp32, bf16 or fp16 (any floating dtype on the PyTorch path), any strides;
    computed in fp32. With ``guidance_scale`` s, R = 2B (conditional rows first) and the logits are
    ``u + s * (c - u)``; without, R = B.
    ``temperature``: >= 0; 0 means greedy. ``top_k``: 0 (off) to V; 1 means greedy. ``top_p``: in [0, 1];
    0 and 1 mean off. Greedy decoding returns ``argmax`` of the guided logits (ties to the lowest index),
    ignores ``noise`` and draws nothing from ``generator``. MusicGen's defaults: ``guidance_scale=3.0``,
    ``top_k=250``, ``temperature=1.0``.
    Randomness: ``noise`` ``[B, K, V]`` Gumbel noise (``gumbel_noise``; any floating dtype, used as fp32),
    or ``generator`` to draw it from, not both. With neither, the noise comes from torch's default
    generator for the logits' device (reproducible only through ``torch.manual_seed``); pass a seeded
    generator (or the noise) for reproducible codes. For the same noise both backends return the same
    codes (up to the top-p boundary within fp32 rounding; see the module docstring).
    ``backend``: ``"auto"`` (Triton on CUDA, PyTorch otherwise; env ``MMDGEN_BACKEND``), ``"triton"``,
    ``"torch"``. "auto" falls back to PyTorch for dtypes or V (> ``TRITON_MAX_V``) the kernel does not take.
    """
    batch, heads, vocab = _check(logits, guidance_scale, temperature, top_k, top_p, generator, noise)
    too_large = f"the triton sampling kernel takes V <= {TRITON_MAX_V}, got V={vocab}; use backend='torch'"
    chosen = choose_backend(backend, logits.device, logits.dtype, "sampling kernel", "logits",
                            refusal=too_large if vocab > TRITON_MAX_V else None)
    greedy = temperature == 0 or top_k == 1
    scale = None if guidance_scale is None else _fp32(guidance_scale)
    inv_temperature = 0.0 if greedy else _fp32(1.0 / temperature)
    if math.isinf(inv_temperature):
        raise ValueError(f"temperature {temperature!r} is too small: 1/temperature overflows fp32 "
                         "(use temperature=0 for greedy decoding)")
    top_k = int(top_k) if 0 < top_k < vocab else 0  # top_k = V keeps everything
    top_p = _fp32(top_p) if 0.0 < top_p < 1.0 else 0.0
    if not greedy and noise is None:
        noise = gumbel_noise((batch, heads, vocab), generator, logits.device)
    if greedy:
        noise = None
    run = _triton_sample if chosen == "triton" else _torch_sample
    return run(logits, batch, scale, greedy, inv_temperature, top_k, top_p, noise)
