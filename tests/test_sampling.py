"""Guidance + temperature + top-k/top-p + Gumbel-max sampling against a plain float64 per-row reference,
on both backends, plus distribution, reproducibility, argument and compilation checks."""

import functools

import pytest
import torch

from mmdgen.kernels import sampling
from mmdgen.kernels.backend import TRITON_IMPORT_ERROR
from mmdgen.kernels.sampling import gumbel_noise, sample_next
from tests.ptx_check import compile_in_subprocess
from tests.test_mmd import TRITON_DEVICE, needs_triton

BACKEND_DEVICES = [
    pytest.param("torch", torch.device("cpu"), id="torch"),
    pytest.param("triton", TRITON_DEVICE, id="triton", marks=needs_triton),
]
# Relative margin under which fp32 rounding (the paths) and float64 (the reference) may decide differently.
TOL = 1e-5


# ----------------------------------------------------------------------------------------------
# The reference: one row at a time, float64, each step written as its definition
# ----------------------------------------------------------------------------------------------


def first_argmax(values):
    """Index of the largest value, the lowest index among equals (a plain scan)."""
    best = 0
    for i in range(1, len(values)):
        if values[i] > values[best]:
            best = i
    return best


def near(a, b):
    return abs(a - b) < TOL * (1.0 + abs(a))


def reference_filter(l, top_k, top_p):
    """(kept mask, near_k, near_p) for one row of (temperature-scaled) float64 logits ``l``:
    top-k keeps values >= the k-th largest; top-p then keeps entries whose renormalised probability mass
    of strictly larger kept entries is < p. near_k / near_p: a cut that fp32 rounding could move."""
    v = l.shape[0]
    keep = torch.ones(v, dtype=torch.bool)
    near_k = near_p = False
    if 0 < top_k < v:
        ordered = sorted(l.tolist(), reverse=True)
        keep &= l >= ordered[top_k - 1]
        near_k = near(ordered[top_k - 1], ordered[top_k])
    if 0.0 < top_p < 1.0:
        weights = torch.where(keep, torch.exp(l - l[keep].max()), 0.0)
        probs = weights / weights.sum()
        larger = (l[None, :] > l[:, None]).double()  # larger[i, j]: l_j > l_i
        mass_above = larger @ probs
        near_p = bool(((mass_above - top_p).abs() < TOL)[keep].any())
        keep &= mass_above < top_p
    return keep, near_k, near_p


def reference_row(cond, uncond, scale, temperature, top_k, top_p, g):
    """(code, ambiguous, near_p) for one (b, k) row."""
    l = cond.double() if uncond is None else uncond.double() + scale * (cond.double() - uncond.double())
    if temperature == 0 or top_k == 1:
        code = first_argmax(l.tolist())
        runner_up = max((x for i, x in enumerate(l.tolist()) if i != code), default=float("-inf"))
        return code, near(float(l[code]), runner_up), False
    keep, near_k, near_p = reference_filter(l / temperature, top_k, top_p)
    scores = torch.where(keep, l / temperature + g.double(), float("-inf")).tolist()
    code = first_argmax(scores)
    runner_up = max((x for i, x in enumerate(scores) if i != code), default=float("-inf"))
    return code, near_k or near_p or near(scores[code], runner_up), near_p


def reference(logits, noise, guidance_scale=None, temperature=1.0, top_k=0, top_p=0.0):
    """(codes [B, K], ambiguous [B, K], near_p [B, K]) by a Python loop over rows."""
    rows, heads, v = logits.shape
    batch = rows // 2 if guidance_scale is not None else rows
    codes = torch.zeros(batch, heads, dtype=torch.int64)
    ambiguous = torch.zeros(batch, heads, dtype=torch.bool)
    near_p = torch.zeros(batch, heads, dtype=torch.bool)
    for b in range(batch):
        for k in range(heads):
            uncond = None if guidance_scale is None else logits[b + batch, k]
            g = noise[b, k] if noise is not None else torch.zeros(v)
            codes[b, k], ambiguous[b, k], near_p[b, k] = reference_row(
                logits[b, k], uncond, guidance_scale, temperature, top_k, top_p, g)
    return codes, ambiguous, near_p


def make_logits(rows, heads, v, seed, scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, heads, v, generator=gen) * scale


def noise_for(batch, heads, v, seed):
    return gumbel_noise((batch, heads, v), torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# Both paths against the reference, and against each other
# ----------------------------------------------------------------------------------------------

# (B, K, V): one entry, one codebook, sizes off any power of two, a row just past 2048
SHAPES = [(1, 1, 1), (3, 4, 7), (1, 4, 300), (3, 1, 2049)]
TEMPERATURES = [1.0, 0.7, 1.6]


def _settings(v, backend):
    """(guidance, top_k, top_p): every combination on the PyTorch path. Triton (slow under the interpreter)
    skips top_k = V and top_p = 1, which the shared front end turns into "off" before choosing a path, and
    alternates guidance on and off, which only changes how the row is loaded."""
    combos = [(top_k, top_p) for top_k in sorted({0, 1, min(5, v), v}) for top_p in (0.0, 0.5, 0.95, 1.0)]
    if backend == "torch":
        return [(guidance, top_k, top_p) for guidance in (None, 3.0) for top_k, top_p in combos]
    combos = [(top_k, top_p) for top_k, top_p in combos if not ((top_k == v and v > 1) or top_p == 1.0)]
    return [(3.0 if i % 2 else None, top_k, top_p) for i, (top_k, top_p) in enumerate(combos)]


@functools.lru_cache(maxsize=None)
def _case(b, k, v, guidance, top_k, top_p):
    """Inputs and the reference's answer for one setting (shared by both backends' tests)."""
    seed = 1000 * v + 100 * k + 10 * b + 7 * top_k + int(100 * top_p) + (guidance is not None)
    kwargs = dict(guidance_scale=guidance, temperature=TEMPERATURES[seed % 3], top_k=top_k, top_p=top_p)
    logits = make_logits(2 * b if guidance else b, k, v, seed)
    noise = noise_for(b, k, v, seed + 1)
    return logits, noise, kwargs, reference(logits, noise, **kwargs)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("b,k,v", SHAPES)
def test_matches_the_reference_over_all_settings(backend, device, b, k, v):
    checked = ambiguous_rows = 0
    for setting in _settings(v, backend):
        logits, noise, kwargs, (expected, ambiguous, near_p) = _case(b, k, v, *setting)
        codes = sample_next(logits.to(device), noise=noise.to(device), backend=backend, **kwargs).cpu()
        assert codes.dtype == torch.int64 and codes.shape == (b, k)
        assert torch.equal(codes[~ambiguous], expected[~ambiguous]), (kwargs, codes, expected)
        if backend == "triton":  # bit-identical to the PyTorch path, except where a top-p cut is in doubt
            torch_codes = sample_next(logits, noise=noise, backend="torch", **kwargs)
            assert torch.equal(codes[~near_p], torch_codes[~near_p]), kwargs
        checked += codes.numel()
        ambiguous_rows += int(ambiguous.sum())
    assert ambiguous_rows <= max(1, checked // 50)


@needs_triton
def test_backends_agree_bit_for_bit_over_many_seeds():
    b, k, v = 2, 4, 64
    for seed in range(4):
        logits = make_logits(2 * b, k, v, seed, scale=1.0).to(torch.bfloat16 if seed % 2 else torch.float32)
        noise = noise_for(b, k, v, 100 + seed)
        kwargs = dict(guidance_scale=3.0, temperature=0.9, top_k=20, top_p=0.8)
        ours = sample_next(logits.to(TRITON_DEVICE), noise=noise.to(TRITON_DEVICE), backend="triton", **kwargs)
        expected = sample_next(logits, noise=noise, backend="torch", **kwargs)
        _, _, near_p = reference(logits.float(), noise, **kwargs)
        assert torch.equal(ours.cpu()[~near_p], expected[~near_p])


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_bf16_logits(backend, device):
    b, k, v = 2, 4, 300
    logits = make_logits(2 * b, k, v, seed=21).to(torch.bfloat16)
    noise = noise_for(b, k, v, 22)
    for kwargs in (dict(guidance_scale=3.0, top_k=5, top_p=0.9), dict(top_k=250, temperature=0.8),
                   dict(guidance_scale=3.0, temperature=0.0)):
        rows = logits if "guidance_scale" in kwargs else logits[:b]
        codes = sample_next(rows.to(device), noise=noise.to(device), backend=backend, **kwargs).cpu()
        # the reference sees the bf16 values exactly (upcast); the paths compute in fp32 from the same values
        expected, ambiguous, _ = reference(rows.float(), noise, **kwargs)
        assert torch.equal(codes[~ambiguous], expected[~ambiguous]), kwargs
        assert torch.equal(codes, sample_next(rows.float(), noise=noise, backend="torch", **kwargs))


# ----------------------------------------------------------------------------------------------
# Greedy decoding
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_greedy_is_the_argmax_of_the_guided_logits_ties_to_the_lowest_index(backend, device):
    gen = torch.Generator().manual_seed(4)
    b, k, v = 3, 4, 37
    cond = torch.randint(-2, 3, (b, k, v), generator=gen).float()  # small integers: exact, many ties
    uncond = torch.randint(-2, 3, (b, k, v), generator=gen).float()
    logits = torch.cat([cond, uncond])
    guided = uncond + 3.0 * (cond - uncond)
    expected = torch.tensor([[first_argmax(guided[i, j].tolist()) for j in range(k)] for i in range(b)])
    assert torch.equal(expected, guided.argmax(dim=-1))
    noise = noise_for(b, k, v, 5)
    for kwargs in (dict(temperature=0.0), dict(top_k=1), dict(top_k=1, top_p=0.3, temperature=2.0)):
        codes = sample_next(logits.to(device), guidance_scale=3.0, noise=noise.to(device), backend=backend, **kwargs)
        assert torch.equal(codes.cpu(), expected), kwargs  # the noise plays no part
    ties = torch.zeros(1, 2, 9)
    ties[0, 0, [2, 5, 8]] = 1.0
    ties[0, 1, :] = -1.5
    codes = sample_next(ties.to(device), temperature=0.0, backend=backend)  # no noise, no generator needed
    assert codes.tolist() == [[2, 0]]


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_ties_at_a_cut_are_all_kept(backend, device):
    """Cuts are thresholds on values: entries equal to the k-th largest, or to the last one top-p needs,
    stay in (the noise points at such an entry, so it is returned exactly when it is kept)."""
    row = torch.tensor([0.0, 2.0, 1.0, 2.0, 1.0, 2.0, -1.0, 1.0])
    logits = row[None, None, :].repeat(4, 1, 1)
    noise = torch.zeros(4, 1, 8)
    noise[0, 0, 5] = noise[1, 0, 7] = noise[2, 0, 5] = noise[3, 0, 0] = 50.0
    cases = [dict(top_k=2), dict(top_k=4), dict(top_p=0.3), dict(top_k=6)]
    # top-k 2 keeps the three 2.0s; top-k 4 the three 1.0s too; top-p 0.3: each 2.0 has probability 0.233, so
    # two sorted entries reach 0.3 and all three 2.0s stay; top-k 6 keeps the 1.0s but not the 0.0 at index 0
    expected = [5, 7, 5, 1]
    for i, kwargs in enumerate(cases):
        code = sample_next(logits[i:i + 1].to(device), noise=noise[i:i + 1].to(device), backend=backend, **kwargs)
        assert code.item() == expected[i], kwargs


# ----------------------------------------------------------------------------------------------
# Distributions
# ----------------------------------------------------------------------------------------------


def _check_frequencies(codes, probs):
    """Every code has positive probability; each frequency within 5 standard errors of its probability."""
    n = codes.numel()
    counts = torch.bincount(codes.flatten(), minlength=probs.numel()).double()
    assert (counts[probs == 0] == 0).all(), counts
    se = (probs * (1 - probs) / n).sqrt()
    assert ((counts / n - probs).abs() <= 5 * se + 1e-12).all(), (counts / n, probs)


def _target(row, temperature, top_k, top_p):
    keep, _, _ = reference_filter(row / temperature, top_k, top_p)
    weights = torch.where(keep, torch.exp(row / temperature - (row / temperature).max()), 0.0)
    return weights / weights.sum()


ROW = torch.tensor([0.5, 2.0, -1.0, 1.5, 0.0, 1.0, -0.5])


@pytest.mark.parametrize("top_k,top_p", [(3, 0.0), (0, 0.7), (0, 0.0), (4, 0.9)])
def test_sampling_distribution_torch(top_k, top_p):
    n = 20000
    cond = ROW.double()
    uncond = torch.linspace(-1.0, 1.0, 7, dtype=torch.float64)
    guided = uncond + 3.0 * (cond - uncond)
    logits = torch.cat([cond.float().expand(n, 1, 7), uncond.float().expand(n, 1, 7)])  # n cond, n uncond rows
    gen = torch.Generator().manual_seed(7)
    codes = sample_next(logits, guidance_scale=3.0, temperature=1.3, top_k=top_k, top_p=top_p, generator=gen,
                        backend="torch")
    probs = _target(guided, 1.3, top_k, top_p)
    if top_k and not top_p:
        assert int((probs > 0).sum()) == top_k
    _check_frequencies(codes, probs)


def test_top_k_comes_before_top_p_renormalised():
    """probs 0.4, 0.25, 0.15, 0.1, 0.06, 0.04: top-k 2 renormalises to 0.615, 0.385, so top-p 0.5 keeps one.
    (Top-p first over the full distribution would keep two.)"""
    probs = torch.tensor([0.06, 0.25, 0.04, 0.4, 0.15, 0.1])
    logits = probs.log()[None, None, :].expand(500, 1, 6)
    codes = sample_next(logits, top_k=2, top_p=0.5, generator=torch.Generator().manual_seed(0), backend="torch")
    assert (codes == 3).all()
    codes = sample_next(logits, top_p=0.5, generator=torch.Generator().manual_seed(0), backend="torch")
    assert set(codes.unique().tolist()) == {1, 3}
    codes = sample_next(logits, top_p=0.7, generator=torch.Generator().manual_seed(0), backend="torch")
    assert set(codes.unique().tolist()) == {1, 3, 4}  # 0.4 + 0.25 < 0.7: the third is needed to reach p


@needs_triton
def test_sampling_distribution_triton_small():
    n = 200
    logits = ROW[None, None, :].expand(n, 1, 7).contiguous()
    gen = torch.Generator().manual_seed(11)
    codes = sample_next(logits.to(TRITON_DEVICE), temperature=0.9, top_k=3, generator=gen, backend="triton").cpu()
    _check_frequencies(codes, _target(ROW.double(), 0.9, 3, 0.0))


def test_reference_filter_matches_transformers_warpers():
    """The reference's filters are transformers' Temperature -> TopK -> TopP warpers, in that order."""
    import transformers.generation.logits_process as warpers
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(40, 300, generator=gen, dtype=torch.float64) * 2
    for top_k, top_p in ((0, 0.9), (50, 0.0), (50, 0.8), (7, 0.3), (300, 0.95)):
        processed = warpers.TemperatureLogitsWarper(0.8)(None, scores.clone())
        if top_k:
            processed = warpers.TopKLogitsWarper(top_k)(None, processed)
        if top_p:
            processed = warpers.TopPLogitsWarper(top_p)(None, processed)
        for row in range(scores.shape[0]):
            keep, near_k, near_p = reference_filter(scores[row] / 0.8, top_k, top_p)
            if not (near_k or near_p):
                assert torch.equal(keep, processed[row] > float("-inf")), (top_k, top_p, row)


# ----------------------------------------------------------------------------------------------
# Noise, generators, reproducibility
# ----------------------------------------------------------------------------------------------


def test_gumbel_noise():
    g = gumbel_noise((4, 5000), torch.Generator().manual_seed(0))
    assert g.dtype == torch.float32 and g.shape == (4, 5000) and torch.isfinite(g).all()
    assert abs(float(g.double().mean()) - 0.5772156649) < 0.02  # Euler-Mascheroni: the Gumbel mean
    assert abs(float(g.double().var()) - 1.6449340668) < 0.06  # pi^2 / 6
    assert torch.equal(g, gumbel_noise((4, 5000), torch.Generator().manual_seed(0)))
    torch.manual_seed(123)
    first = gumbel_noise((3, 3))
    torch.manual_seed(123)
    assert torch.equal(first, gumbel_noise((3, 3)))
    assert gumbel_noise((2,), torch.Generator().manual_seed(0), device="meta").device.type == "meta"


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_generator_reproducibility(backend, device):
    flat = torch.zeros(1, 4, 2048, device=device)

    def draw(seed, **kwargs):
        return sample_next(flat, generator=torch.Generator().manual_seed(seed), backend=backend, **kwargs)

    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))  # 2048^-4 chance of a false alarm
    assert torch.equal(draw(1, top_k=300), draw(1, top_k=300))
    noise = gumbel_noise((1, 4, 2048), torch.Generator().manual_seed(1), device=device)
    assert torch.equal(draw(1), sample_next(flat, noise=noise, backend=backend))
    torch.manual_seed(5)
    first = sample_next(flat, backend=backend)  # neither noise nor generator: torch's default generator
    torch.manual_seed(5)
    assert torch.equal(first, sample_next(flat, backend=backend))


# the interpreter evaluates both sides of the kernel's where(): -inf - -inf warns there, the result is discarded
@pytest.mark.filterwarnings("ignore:invalid value encountered in subtract:RuntimeWarning")
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_masked_tokens_strided_logits_and_empty_batch(backend, device):
    b, k, v = 2, 3, 50
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(2 * b, v, k, generator=gen).transpose(1, 2)  # [R, K, V] with stride 3 along V
    logits[:, :, -1] = float("-inf")  # e.g. a special token masked in both rows: never sampled, no NaN
    noise = noise_for(b, k, v, 9)
    kwargs = dict(guidance_scale=3.0, temperature=1.0, top_k=10, top_p=0.9)
    codes = sample_next(logits.to(device), noise=noise.to(device), backend=backend, **kwargs).cpu()
    assert torch.equal(codes, sample_next(logits.contiguous(), noise=noise, backend="torch", **kwargs))
    flat = torch.zeros(2 * b, k, v)
    flat[:, :, -1] = float("-inf")
    for seed in range(3):
        codes = sample_next(flat.to(device), guidance_scale=3.0, noise=noise_for(b, k, v, seed).to(device),
                            backend=backend)
        assert (codes < v - 1).all()
    codes = sample_next(flat.to(device), guidance_scale=3.0, temperature=0.0, backend=backend)
    assert (codes == 0).all()
    empty = sample_next(torch.zeros(0, 4, 16, device=device), generator=torch.Generator(), backend=backend)
    assert empty.shape == (0, 4) and empty.dtype == torch.int64


def test_float64_runs_on_the_torch_path():
    logits = make_logits(2, 2, 9, seed=1).double()
    noise = noise_for(2, 2, 9, 2)
    codes = sample_next(logits, noise=noise, top_k=4)  # auto: the PyTorch path
    assert torch.equal(codes, sample_next(logits.float(), noise=noise, top_k=4, backend="torch"))
    if TRITON_DEVICE is not None:
        with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
            sample_next(logits.to(TRITON_DEVICE), noise=noise.to(TRITON_DEVICE), backend="triton")


# ----------------------------------------------------------------------------------------------
# Bad arguments
# ----------------------------------------------------------------------------------------------


def test_bad_arguments(monkeypatch):
    logits = make_logits(4, 2, 7, seed=0)
    noise = noise_for(2, 2, 7, 1)
    gen = torch.Generator()

    def call(x=logits, **kwargs):
        return sample_next(x, backend="torch", **kwargs)

    with pytest.raises(ValueError, match=r"logits must have shape \[R, K, V\]"):
        call(logits[0])
    with pytest.raises(ValueError, match=r"logits must have shape \[R, K, V\]"):
        call(logits.tolist())
    with pytest.raises(ValueError, match="floating point"):
        call(logits.long())
    with pytest.raises(ValueError, match="V >= 1"):
        call(torch.zeros(2, 2, 0))
    with pytest.raises(ValueError, match="odd R=3"):
        call(logits[:3], guidance_scale=3.0, generator=gen)
    with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
        call(guidance_scale=float("nan"), generator=gen)
    with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
        call(guidance_scale="3", generator=gen)
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        call(temperature=-0.5, generator=gen)
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        call(temperature=float("inf"), generator=gen)
    with pytest.raises(ValueError, match="1/temperature overflows fp32"):
        call(temperature=1e-40, generator=gen)
    with pytest.raises(ValueError, match=r"top_k must be an int with 0 <= top_k <= V=7"):
        call(top_k=-1, generator=gen)
    with pytest.raises(ValueError, match=r"top_k must be an int with 0 <= top_k <= V=7"):
        call(top_k=8, generator=gen)
    with pytest.raises(ValueError, match="top_k must be an int"):
        call(top_k=2.0, generator=gen)
    with pytest.raises(ValueError, match="top_k must be an int"):
        call(top_k=True, generator=gen)
    with pytest.raises(ValueError, match=r"top_p must be a number in \[0, 1\]"):
        call(top_p=-0.1, generator=gen)
    with pytest.raises(ValueError, match=r"top_p must be a number in \[0, 1\]"):
        call(top_p=1.5, generator=gen)
    with pytest.raises(ValueError, match=r"noise must have shape \[B, K, V\] = \(2, 2, 7\)"):
        call(guidance_scale=3.0, noise=noise_for(4, 2, 7, 0))  # [R, K, V] instead of [B, K, V]
    with pytest.raises(ValueError, match=r"noise must have shape \[B, K, V\] = \(4, 2, 7\)"):
        call(noise=noise)
    with pytest.raises(ValueError, match="noise must be floating point"):
        call(guidance_scale=3.0, noise=noise.long())
    with pytest.raises(ValueError, match="noise must be on the logits' device"):
        call(guidance_scale=3.0, noise=noise.to("meta"))
    with pytest.raises(ValueError, match="either noise= or generator=, not both"):
        call(guidance_scale=3.0, noise=noise, generator=gen)
    with pytest.raises(ValueError, match="generator must be a torch.Generator"):
        call(generator=0)
    with pytest.raises(ValueError, match="generator must be a torch.Generator"):
        gumbel_noise((2,), generator=0)
    with pytest.raises(ValueError, match="unknown backend"):
        sample_next(logits, generator=gen, backend="cuda")
    if TRITON_DEVICE is not None:
        monkeypatch.setattr(sampling, "TRITON_MAX_V", 4)
        with pytest.raises(ValueError, match="V <= 4, got V=7"):
            sample_next(logits.to(TRITON_DEVICE), generator=gen, backend="triton")


# ----------------------------------------------------------------------------------------------
# Compilation for Ampere and Hopper, without a GPU
# ----------------------------------------------------------------------------------------------


@pytest.mark.skipif(TRITON_IMPORT_ERROR is not None, reason=f"triton does not import: {TRITON_IMPORT_ERROR}")
def test_kernel_compiles_for_ampere_and_hopper():
    """The kernel compiles with the launch's options (no GPU needed); its PTX holds no fused multiply-add
    (each fp32 multiply and add rounds as in eager PyTorch), and top-p's exponentials use ex2.approx."""
    script = """
import re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mmdgen.kernels.sampling import TRITON_OPTIONS, _num_warps, _sample_kernel as kernel
flags = ("GUIDANCE", "GREEDY", "TOP_K", "TOP_P")
configs = [(True, False, True, True), (True, True, False, False), (False, False, False, False)]
for arch in (80, 90):
    for dtype in ("fp32", "bf16", "fp16"):
        for config in configs if dtype == "bf16" else configs[:1]:
            sig = {name: "i32" for name in kernel.arg_names}
            sig.update(logits_ptr="*" + dtype, noise_ptr="*fp32", out_ptr="*i64", scale="fp32",
                       inv_temperature="fp32", top_p="fp32", BLOCK_V="constexpr", **{f: "constexpr" for f in flags})
            constexprs = dict(zip(flags, config), BLOCK_V=2048)
            compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs),
                                      target=GPUTarget("cuda", arch, 32),
                                      options=dict(TRITON_OPTIONS, num_warps=_num_warps(2048)))
            ptx = compiled.asm["ptx"]
            assert compiled.asm["cubin"], (arch, dtype, config)
            assert not re.search(r"\\bfma\\.", ptx), (arch, dtype, config)
            assert ("ex2.approx" in ptx) == config[3], (arch, dtype, config)
print("ok")
"""
    assert compile_in_subprocess(script).strip() == "ok"
