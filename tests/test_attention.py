"""Decode attention over a static KV cache: both backends against a float64 reference, stale cache data,
the LM's own attention, compilation for sm80/sm90, bad input refused."""

import json

import pytest
import torch

from mmdgen.kernels import attention
from mmdgen.kernels.attention import decode_attention, split_plan
from mmdgen.kernels.backend import TRITON_IMPORT_ERROR
from mmdgen.model.lm import MusicLM, lm_config
from tests.ptx_check import compile_in_subprocess
from tests.test_mmd import TRITON_DEVICE, needs_triton

BACKEND_DEVICES = [
    pytest.param("torch", torch.device("cpu"), id="torch"),
    pytest.param("triton", TRITON_DEVICE, id="triton", marks=needs_triton),
]
LENGTH_KINDS = [pytest.param(False, id="int-length"), pytest.param(True, id="tensor-length")]


def reference_attention(query, keys, values, length, key_mask=None, scale=None, causal=True):
    """float64, one (batch, head, query) at a time: softmax over the visible positions, 0 if there are none."""
    query, keys, values = query.double(), keys.double(), values.double()
    batch, heads, num_queries, head_dim = query.shape
    scale = head_dim ** -0.5 if scale is None else scale
    out = torch.zeros(batch, heads, num_queries, head_dim, dtype=torch.float64)
    for b in range(batch):
        for i in range(num_queries):
            own = length - num_queries + i
            seen = [j for j in range(length) if (not causal or j <= own) and (key_mask is None or bool(key_mask[b, j]))]
            if not seen:
                continue
            for h in range(heads):
                weights = torch.softmax(keys[b, h, seen] @ query[b, h, i] * scale, dim=0)
                out[b, h, i] = weights @ values[b, h, seen]
    return out


def _inputs(batch, heads, num_queries, s_max, head_dim, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=gen).to(dtype)  # noqa: E731
    return make(batch, heads, num_queries, head_dim), make(batch, heads, s_max, head_dim), \
        make(batch, heads, s_max, head_dim)


def _ours(backend, device, query, keys, values, length, as_tensor=False, key_mask=None, **kwargs):
    if as_tensor:
        length = torch.tensor(length, device=device)
    key_mask = None if key_mask is None else key_mask.to(device)
    out = decode_attention(query.to(device), keys.to(device), values.to(device), length, key_mask,
                           backend=backend, **kwargs)
    assert out.dtype == query.dtype and out.shape == query.shape
    return out.cpu()


# (B, H, hd, S_max, length, Q). The Triton chunks here are 64 positions (TRITON_MIN_CHUNK).
SHAPES = [
    (1, 1, 8, 1, 1, 1),  # a one-step cache
    (1, 4, 8, 17, 3, 3),  # length == Q: the first new step sees only position 0
    (3, 4, 8, 17, 17, 1),  # the whole small cache
    (3, 1, 64, 17, 9, 3),
    (1, 4, 64, 300, 64, 1),  # exactly one chunk
    (1, 1, 64, 300, 65, 3),  # one position into the second chunk
    (3, 1, 8, 300, 128, 3),  # exactly two chunks
    (1, 4, 8, 300, 300, 1),  # the full cache, not a multiple of the chunk
    (3, 4, 64, 300, 1, 1),  # one position of a large cache (tensor length: 4 of 5 chunks exit)
    (1, 1, 64, 300, 255, 1),
]


@pytest.mark.parametrize("as_tensor", LENGTH_KINDS)
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("batch,heads,head_dim,s_max,length,num_queries", SHAPES)
def test_matches_the_float64_reference(backend, device, as_tensor, batch, heads, head_dim, s_max, length,
                                       num_queries):
    query, keys, values = _inputs(batch, heads, num_queries, s_max, head_dim, seed=s_max * 31 + length)
    out = _ours(backend, device, query, keys, values, length, as_tensor)
    expected = reference_attention(query, keys, values, length)
    assert torch.allclose(out.double(), expected, rtol=1e-5, atol=1e-5), (out.double() - expected).abs().max()


def _padding_mask(width: int = 70, visible: int = 45):
    """Row 0: ``visible`` positions with holes, then padding; row 1: only position 49; row 2: nothing (a null
    condition)."""
    mask = torch.zeros(3, width, dtype=torch.bool)
    mask[0, :visible] = True
    mask[0, [3, 17, 30]] = False
    mask[1, 49] = True
    return mask


@pytest.mark.parametrize("as_tensor", LENGTH_KINDS)
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("num_queries,causal", [(1, True), (3, True), (3, False)],
                         ids=["decode", "causal-3", "cross-3"])
def test_key_mask_padding_and_rows_that_see_nothing_give_zero(backend, device, as_tensor, num_queries, causal):
    query, keys, values = _inputs(3, 2, num_queries, 70, 16, seed=7)
    mask, length = _padding_mask(), 50
    out = _ours(backend, device, query, keys, values, length, as_tensor, key_mask=mask, causal=causal, scale=0.3)
    expected = reference_attention(query, keys, values, length, mask, scale=0.3, causal=causal)
    assert torch.allclose(out.double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(out).all()
    assert (out[2] == 0).all()  # the fully masked row
    if causal and num_queries == 3:
        assert (out[1, :, :2] == 0).all()  # position 49 lies in their future
    assert torch.allclose(out[1, :, -1], values[1, :, 49], atol=1e-6)  # one visible position: its value


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("num_queries", [1, 3])
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)], ids=["bf16", "fp16"])
def test_half_inputs(backend, device, num_queries, dtype, tol):
    # Reference from the rounded inputs; the error is the output's rounding (half an ulp: 2^-9 bf16, 2^-11 fp16
    # relative; a whole ulp for bf16 under the interpreter, whose fp32 -> bf16 cast truncates) plus,
    # for Q > 1 on Triton, the probabilities rounded to the value dtype before the second product.
    query, keys, values = _inputs(2, 2, num_queries, 100, 64, seed=11, dtype=dtype)
    mask = torch.ones(2, 100, dtype=torch.bool)
    mask[1, 60:] = False
    out = _ours(backend, device, query, keys, values, 90, key_mask=mask)
    expected = reference_attention(query, keys, values, 90, mask)
    assert torch.allclose(out.double(), expected, rtol=tol, atol=tol), (out.double() - expected).abs().max()


@pytest.mark.parametrize("as_tensor", LENGTH_KINDS)
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("num_queries,causal", [(1, True), (3, True), (5, False)])
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float16], ids=["bf16-cache", "fp16-cache"])
def test_a_16_bit_cache_under_an_fp32_query(backend, device, as_tensor, num_queries, causal, cache_dtype):
    """The cache's elements are widened exactly, so the only difference from the fp32 maths over the rounded
    cache is fp32 summation order (and 3xTF32 for Q > 1 on Triton): tolerances at fp32 level, not half."""
    query, keys, values = _inputs(3, 2, num_queries, 150, 24, seed=num_queries * 7 + int(causal))
    keys, values = (keys * 3).to(cache_dtype), values.to(cache_dtype)
    mask = _padding_mask(150, visible=120)  # row 0 visible across two Triton chunks
    length = 131
    out = _ours(backend, device, query, keys, values, length, as_tensor, key_mask=mask, causal=causal)
    assert out.dtype == torch.float32
    expected = reference_attention(query, keys.float(), values.float(), length, mask, causal=causal)
    torch.testing.assert_close(out.double(), expected, rtol=2e-5, atol=2e-5)
    assert (out[2] == 0).all()  # the fully masked row


@pytest.mark.parametrize("as_tensor", LENGTH_KINDS)
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("num_queries", [1, 3])
def test_stale_cache_beyond_length_is_never_read(backend, device, as_tensor, num_queries):
    """Nothing past the length counts; the PyTorch path with a tensor length reads the whole buffer (one graph
    for every step) and so needs it finite: there the stale data is large but finite."""
    query, keys, values = _inputs(1, 2, num_queries, 200, 8, seed=5)
    mask = torch.rand(1, 200, generator=torch.Generator().manual_seed(0)) > 0.2
    mask[0, 70] = True
    clean = _ours(backend, device, query, keys, values, 71, as_tensor, key_mask=mask)
    if backend == "torch" and as_tensor:
        keys[:, :, 71:], values[:, :, 71:] = 1e4, -3e4
    else:
        keys[:, :, 71:], values[:, :, 71:] = float("nan"), float("inf")
        keys[:, :, 150:] = 1e30
    mask[:, 71:] = True  # a mask that lets the stale part through changes nothing either
    stale = _ours(backend, device, query, keys, values, 71, as_tensor, key_mask=mask)
    assert torch.isfinite(stale).all() and torch.equal(stale, clean)


@needs_triton
def test_triton_multi_tile_chunks_and_combine_loop(monkeypatch):
    """Chunks of several tiles, a chunk size above the minimum, more splits than one combine block."""
    monkeypatch.setattr(attention, "TRITON_BLOCK_N", 16)
    monkeypatch.setattr(attention, "TRITON_MIN_CHUNK", 16)
    monkeypatch.setattr(attention, "TRITON_TARGET_PROGRAMS", 12)
    monkeypatch.setattr(attention, "TRITON_BLOCK_SPLITS", 2)
    assert split_plan(250, 2) == (48, 6)  # 3 tiles per chunk, 6 splits merged 2 at a time
    query, keys, values = _inputs(1, 2, 3, 250, 8, seed=2)
    mask = torch.rand(1, 250, generator=torch.Generator().manual_seed(1)) > 0.5
    for length, as_tensor in ((250, False), (97, False), (97, True)):
        out = _ours("triton", TRITON_DEVICE, query, keys, values, length, as_tensor, key_mask=mask)
        assert torch.allclose(out.double(), reference_attention(query, keys, values, length, mask), atol=1e-5)


def test_split_plan_fills_the_gpu_within_the_chunk_bounds():
    for span in (1, 63, 64, 65, 300, 1500, 3000, 100_000):
        for batch_heads in (1, 2, 32, 1024, 100_000):
            chunk, splits = split_plan(span, batch_heads)
            assert chunk % attention.TRITON_BLOCK_N == 0
            assert attention.TRITON_MIN_CHUNK <= chunk <= attention.TRITON_MAX_CHUNK
            assert (splits - 1) * chunk < span <= splits * chunk  # every split holds data
    assert split_plan(1500, 32) == (128, 12)  # MusicGen small, batch 1 with CFG: 384 programs
    assert split_plan(1500, 1024) == (256, 6)  # a large batch: long chunks, few partials


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_tensor_length_is_clamped_not_checked(backend, device):
    """A tensor length is never read on the host (no sync, one graph for every step), so it cannot be
    checked: both paths clamp it to [0, S_max] and give 0 to a query that sees nothing."""
    query, keys, values = _inputs(1, 1, 3, 40, 8, seed=3)
    over = _ours(backend, device, query, keys, values, 45, as_tensor=True)
    assert torch.allclose(over.double(), reference_attention(query, keys, values, 40), atol=1e-5)
    under = _ours(backend, device, query, keys, values, 2, as_tensor=True)  # < Q: query 0 sees nothing
    assert (under[:, :, 0] == 0).all()
    # queries 1 and 2 sit at positions 0 and 1: what the last two of two new steps over 2 positions see
    assert torch.allclose(under[:, :, 1:].double(), reference_attention(query[:, :, 1:], keys, values, 2), atol=1e-5)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("new_steps", [1, 3])
def test_the_lms_cached_steps_through_the_kernel_equal_its_full_pass(backend, device, new_steps):
    """The tiny LM decodes through decode_attention (self-attention on its static cache, cross-attention on the
    text memory with padding and a null condition); its logits equal the uncached full pass (SDPA)."""
    torch.manual_seed(0)
    lm = MusicLM(lm_config("tiny", layers=1)).eval().to(device)
    tokens = torch.randint(0, 257, (3, 4, 5 + new_steps), device=device)
    states = torch.randn(3, 6, 64, device=device)
    text_mask = torch.ones(3, 6, dtype=torch.bool, device=device)
    text_mask[1, 4:] = False
    text_mask[2] = False  # a null condition
    with torch.no_grad():
        full = lm(tokens, states, text_mask)
        caches, memory = lm.new_caches(3, 12), lm.cross_memory(states, text_mask)
        lm.prefill(tokens[..., :5], 0, caches, memory, backend)
        step = lm.step(tokens[..., 5:], 5, caches, memory, backend)
    assert torch.allclose(step, full[:, :, 5:], atol=1e-5), (step - full[:, :, 5:]).abs().max()


def _compile_report():
    """Compile the kernels for sm80 and sm90 (run with TRITON_INTERPRET=0); found instructions per variant."""
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from tests.ptx_check import signature

    split = attention._decode_split_kernel
    qkv = {"q_ptr", "k_ptr", "v_ptr"}
    meta = dict(CAUSAL=True, BLOCK_N=attention.TRITON_BLOCK_N, BLOCK_D=64)
    variants = {  # name -> (kernel, dtypes, pointers of the input dtype, fp32 scalars, constexprs, signature edits)
        # the CUDA-graph decode step: Q = 1, text padding mask, length read from device memory
        "split-q1": (split, ("fp32", "bf16"), qkv, {"qk_scale"},
                     dict(meta, HAS_MASK=True, LENGTH_IN_MEMORY=True, BLOCK_Q=1), {"mask_ptr": "*u8",
                                                                                      "length_ptr": "*i64"}),
        # several new steps, int length, no mask: the tile products on tensor cores
        "split-q16": (split, ("fp32", "bf16", "fp16"), qkv, {"qk_scale"},
                      dict(meta, mask_ptr=None, length_ptr=None, HAS_MASK=False, LENGTH_IN_MEMORY=False,
                           BLOCK_Q=16), {}),
        "combine": (attention._decode_combine_kernel, ("bf16",), {"out_ptr"}, set(),
                    dict(LENGTH_IN_MEMORY=True, BLOCK_SPLITS=attention.TRITON_BLOCK_SPLITS, BLOCK_D=64),
                    {"length_ptr": "*i64"}),
    }
    report = {}
    for arch in (80, 90):
        for name, (kernel, dtypes, typed, floats, constexprs, edits) in variants.items():
            for dtype in dtypes:
                if "PRECISION" in kernel.arg_names:
                    constexprs = dict(constexprs, PRECISION="tf32x3" if dtype == "fp32" else "tf32")
                sig = dict(signature(kernel, dtype, typed, set(), floats, constexprs), **edits)
                compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs),
                                          target=GPUTarget("cuda", arch, 32))
                ptx = compiled.asm["ptx"]
                report[f"sm{arch}-{dtype}-{name}"] = {
                    "instructions": sorted(set(re.findall(r"\b(wgmma\.mma_async|mma\.sync|ex2\.approx)", ptx))),
                    "local_memory": len(re.findall(r"\b(?:ld|st)\.local", ptx)),
                    "cubin_bytes": len(compiled.asm["cubin"])}
    return report


@pytest.mark.skipif(TRITON_IMPORT_ERROR is not None, reason=f"triton does not import: {TRITON_IMPORT_ERROR}")
def test_kernels_compile_for_sm80_and_sm90():
    code = "import json; from tests.test_attention import _compile_report; print(json.dumps(_compile_report()))"
    report = json.loads(compile_in_subprocess(code).strip().splitlines()[-1])
    assert len(report) == 12
    for key, entry in report.items():
        assert entry["cubin_bytes"] > 0 and entry["local_memory"] == 0, key
        assert "ex2.approx" in entry["instructions"], key  # exponentials on the special-function units
        if "-q16" in key:  # the padded query tile goes through tensor cores
            assert {"mma.sync", "wgmma.mma_async"} & set(entry["instructions"]), key


def test_bad_input_is_refused():
    q, k, v = _inputs(2, 2, 3, 17, 8, seed=0)
    with pytest.raises(ValueError, match=r"query must have shape \[B, H, steps, head_dim\], got \(2, 3, 8\)"):
        decode_attention(q[0], k, v, 5)
    with pytest.raises(ValueError, match=r"keys and values must have the same shape.*\(2, 2, 16, 8\)"):
        decode_attention(q, k, v[:, :, :16], 5)
    with pytest.raises(ValueError, match=r"keys \(2, 2, 17, 4\) do not fit query \(2, 2, 3, 8\)"):
        decode_attention(q, k[..., :4], v[..., :4], 5)
    with pytest.raises(ValueError, match="1 to 16 query steps, got Q=17"):
        decode_attention(torch.randn(2, 2, 17, 8), k, v, 17)
    with pytest.raises(ValueError, match=r"length=18 is out of range: expected Q=3 .* <= length <= S_max=17"):
        decode_attention(q, k, v, 18)
    with pytest.raises(ValueError, match=r"length=2 is out of range: expected Q=3"):
        decode_attention(q, k, v, 2)
    with pytest.raises(ValueError, match=r"length=0 is out of range: expected 1 <= length"):
        decode_attention(q, k, v, 0, causal=False)
    with pytest.raises(ValueError, match=r"key_mask must have shape \[B, S_max\] = \(2, 17\), got \(2, 16\)"):
        decode_attention(q, k, v, 5, key_mask=torch.ones(2, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_mask must be a bool tensor.*torch.int64"):
        decode_attention(q, k, v, 5, key_mask=torch.ones(2, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="keys and values must share a dtype, got torch.float64 and torch.float32"):
        decode_attention(q, k.double(), v, 5)
    with pytest.raises(ValueError, match="keys and values must share a dtype, got torch.float32 and torch.float16"):
        decode_attention(q, k, v.half(), 5)
    with pytest.raises(ValueError, match=r"the query's dtype \(torch.float32\), or bfloat16/float16 under a float32 "
                                         r"query, got torch.float64"):
        decode_attention(q, k.double(), v.double(), 5)
    with pytest.raises(ValueError, match=r"the query's dtype \(torch.bfloat16\).*got torch.float16"):
        decode_attention(q.bfloat16(), k.half(), v.half(), 5)
    with pytest.raises(ValueError, match=r"the query's dtype \(torch.float16\).*got torch.float32"):
        decode_attention(q.half(), k, v, 5)
    with pytest.raises(ValueError, match="keys must be floating point, got torch.int64"):
        decode_attention(q, k.long(), v, 5)
    with pytest.raises(ValueError, match=r"one value \(0-d or \[1\]\), got shape \(2,\)"):
        decode_attention(q, k, v, torch.tensor([5, 6]))
    with pytest.raises(ValueError, match="integer tensor, got torch.float32"):
        decode_attention(q, k, v, torch.tensor(5.0))
    with pytest.raises(ValueError, match="length must be an int or a one-element integer tensor, got float"):
        decode_attention(q, k, v, 5.0)
    with pytest.raises(ValueError, match="scale must be a finite number, got inf"):
        decode_attention(q, k, v, 5, scale=float("inf"))
    with pytest.raises(ValueError, match="the cache is empty"):
        decode_attention(q, k[:, :, :0], v[:, :, :0], 3)
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        decode_attention(q, k, v, 5, backend="cuda")


@needs_triton
def test_triton_refuses_float64():
    q, k, v = _inputs(1, 1, 1, 4, 8, seed=0, dtype=torch.float64)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16, got torch.float64"):
        decode_attention(q.to(TRITON_DEVICE), k.to(TRITON_DEVICE), v.to(TRITON_DEVICE), 4, backend="triton")
    assert torch.allclose(decode_attention(q, k, v, 4), reference_attention(q, k, v, 4), atol=1e-12)  # auto: torch
