"""The fused MMD against a float64 materialising reference, on both backends, over awkward shapes."""

import math

import pytest
import torch

from mmdgen.kernels import mmd
from mmdgen.kernels.backend import resolve_backend, triton_unusable_reason
from mmdgen.kernels.mmd import DEFAULT_BANDWIDTHS, naive_rbf_mmd, rbf_mmd
from mmdgen.losses import independence
from mmdgen.losses.independence import independence_loss
from tests.reference import reference_independence_loss, reference_mmd, reference_terms


def _triton_device():
    for device in (torch.device("cpu"), torch.device("cuda")):
        if device.type == "cuda" and not torch.cuda.is_available():
            continue
        if triton_unusable_reason(device) is None:
            return device
    return None


TRITON_DEVICE = _triton_device()
needs_triton = pytest.mark.skipif(TRITON_DEVICE is None, reason="triton can run neither on CUDA nor through the interpreter here")

BACKEND_DEVICES = [
    pytest.param("torch", torch.device("cpu"), id="torch"),
    pytest.param("triton", TRITON_DEVICE, id="triton", marks=needs_triton),
]

# (N, F): two samples, odd sizes, one feature, sizes that are not multiples of a block, several blocks.
SHAPES = [(2, 1), (3, 512), (17, 7), (70, 33), (257, 130)]


def _samples(n, f, seed, shift=0.3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, f, generator=gen) * 0.6
    y = torch.randn(n, f, generator=gen) * 0.6 + shift
    return x, y


def _scale(x, y, unbiased):
    """Size of the terms that cancel in MMD^2: errors are judged against it, not against the difference."""
    return sum(abs(float(t)) for t in reference_terms(x.detach(), y.detach(), DEFAULT_BANDWIDTHS, unbiased))


def _reference_grads(x, y, unbiased):
    xr, yr = x.double().requires_grad_(), y.double().requires_grad_()
    value = reference_mmd(xr, yr, DEFAULT_BANDWIDTHS, unbiased)
    value.backward()
    return value.detach(), xr.grad, yr.grad


def _ours(x, y, unbiased, backend, device):
    xa = x.to(device).requires_grad_()
    ya = y.to(device).requires_grad_()
    value = rbf_mmd(xa, ya, unbiased=unbiased, backend=backend)
    value.backward()
    return value.detach().cpu(), xa.grad.cpu(), ya.grad.cpu()


def _assert_close_grads(grad, ref, rel):
    err = (grad.double() - ref).abs().max().item()
    assert err <= rel * ref.abs().max().item() + 1e-12, f"gradient error {err:.3g} vs max {ref.abs().max().item():.3g}"


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("n,f", SHAPES)
@pytest.mark.parametrize("unbiased", [True, False], ids=["unbiased", "biased"])
def test_value_and_gradients_match_reference_fp32(backend, device, n, f, unbiased):
    x, y = _samples(n, f, seed=n * 1000 + f)
    ref_value, ref_gx, ref_gy = _reference_grads(x, y, unbiased)
    value, gx, gy = _ours(x, y, unbiased, backend, device)
    assert value.dtype == torch.float32
    assert abs(float(value) - float(ref_value)) <= 2e-6 * _scale(x, y, unbiased)
    _assert_close_grads(gx, ref_gx, 2e-5)
    _assert_close_grads(gy, ref_gy, 2e-5)


def test_torch_path_crosses_many_tiles(monkeypatch):
    """Small tiles force every tile case: diagonal, upper triangle, ragged last row and column."""
    monkeypatch.setattr(mmd, "TORCH_TILE", 16)
    for n, f in [(50, 5), (33, 64)]:
        for unbiased in (True, False):
            x, y = _samples(n, f, seed=n + f)
            ref_value, ref_gx, ref_gy = _reference_grads(x, y, unbiased)
            value, gx, gy = _ours(x, y, unbiased, "torch", "cpu")
            assert abs(float(value) - float(ref_value)) <= 2e-6 * _scale(x, y, unbiased)
            _assert_close_grads(gx, ref_gx, 2e-5)
            _assert_close_grads(gy, ref_gy, 2e-5)


def test_torch_path_past_default_tile():
    x, y = _samples(1100, 24, seed=5)
    ref_value, ref_gx, ref_gy = _reference_grads(x, y, True)
    value, gx, gy = _ours(x, y, True, "torch", "cpu")
    assert abs(float(value) - float(ref_value)) <= 2e-6 * _scale(x, y, True)
    _assert_close_grads(gx, ref_gx, 2e-5)
    _assert_close_grads(gy, ref_gy, 2e-5)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_inputs(backend, device, dtype):
    """Half inputs: distances accumulate in fp32, so the value stays within 1e-4 of the terms' scale;
    the gradient's tile matmul takes W in the input dtype, so gradients are within 2% of their max."""
    x, y = _samples(150, 48, seed=3)
    x, y = x.to(dtype), y.to(dtype)
    ref_value, ref_gx, ref_gy = _reference_grads(x, y, True)  # reference on the rounded inputs
    value, gx, gy = _ours(x, y, True, backend, device)
    assert value.dtype == torch.float32 and gx.dtype == dtype
    assert abs(float(value) - float(ref_value)) <= 1e-4 * _scale(x, y, True)
    _assert_close_grads(gx, ref_gx, 2e-2)
    _assert_close_grads(gy, ref_gy, 2e-2)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_forward_without_grad_matches_forward_with_grad(backend, device):
    """The forward-only kernels (upper triangle) and the value-and-gradient kernels agree."""
    x, y = _samples(200, 40, seed=11)
    x, y = x.to(device), y.to(device)
    with torch.no_grad():
        plain = rbf_mmd(x, y, backend=backend)
    with_grad = rbf_mmd(x.clone().requires_grad_(), y, backend=backend)
    assert abs(float(plain) - float(with_grad.detach())) <= 2e-6 * _scale(x.cpu(), y.cpu(), True)


def test_only_y_requires_grad():
    x, y = _samples(40, 6, seed=2)
    _, _, ref_gy = _reference_grads(x, y, True)
    ya = y.clone().requires_grad_()
    rbf_mmd(x, ya).backward()
    _assert_close_grads(ya.grad, ref_gy, 2e-5)


def test_custom_bandwidths_and_float64():
    x, y = _samples(30, 4, seed=9)
    bandwidths = (0.3, 2.0, 7.5)
    value = rbf_mmd(x.double(), y.double(), bandwidths=bandwidths)
    assert value.dtype == torch.float64
    assert torch.allclose(value, reference_mmd(x, y, bandwidths, True), rtol=0, atol=1e-12)


def test_gradcheck_float64():
    x, y = _samples(6, 3, seed=4)
    x, y = x.double().requires_grad_(), y.double().requires_grad_()
    for unbiased in (True, False):
        assert torch.autograd.gradcheck(lambda a, b: rbf_mmd(a, b, unbiased=unbiased), (x, y))


def test_naive_baseline_matches_reference():
    x, y = _samples(40, 9, seed=8)
    for unbiased in (True, False):
        naive = naive_rbf_mmd(x.double(), y.double(), unbiased=unbiased)
        assert torch.allclose(naive, reference_mmd(x, y, DEFAULT_BANDWIDTHS, unbiased), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# The independence loss
# ----------------------------------------------------------------------------------------------


def _latents(batch, stages, dim, frames, seed):
    return torch.randn(batch, stages, dim, frames, generator=torch.Generator().manual_seed(seed))


def _seeded_perms(num_samples, stages, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randperm(num_samples, generator=gen) for _ in range(stages)]


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("delay", [False, True], ids=["no-delay", "delay"])
@pytest.mark.parametrize("normalize", [True, False], ids=["standardized", "raw"])
@pytest.mark.parametrize("exclude_shared", [True, False], ids=["exclude-shared", "all-pairs"])
def test_independence_loss_matches_reference(backend, device, delay, normalize, exclude_shared):
    stages, frames = 3, 9
    latents = _latents(4, stages, 5, frames, seed=1)
    latents[:, 1] += 0.8 * latents[:, 0]  # some dependence, so the value is not ~0
    num_samples = 4 * (frames - stages + 1 if delay else frames)
    perms = _seeded_perms(num_samples, stages, seed=42)

    ref_in = latents.double().requires_grad_()
    ref = reference_independence_loss(ref_in, perms, DEFAULT_BANDWIDTHS, delay, True, normalize, exclude_shared)
    ref.backward()

    ours_in = latents.to(device).requires_grad_()
    value = independence_loss(ours_in, delay=delay, normalize=normalize, backend=backend,
                              exclude_shared=exclude_shared, generator=torch.Generator().manual_seed(42))
    value.backward()
    assert abs(value.item() - ref.item()) <= 1e-5 * max(abs(ref.item()), 1.0)
    _assert_close_grads(ours_in.grad.cpu(), ref_in.grad, 1e-4)


def test_delay_alignment_groups_the_codes_of_one_step():
    """With delay, sample t holds stage k at frame t - k: a stage copied with a lag of one frame per
    stage is perfectly dependent once aligned and looks independent when not."""
    gen = torch.Generator().manual_seed(0)
    stages, frames = 3, 400
    source = torch.randn(16, 1, 4, frames + stages, generator=gen)
    latents = torch.cat([source[..., k: k + frames] for k in range(stages)], dim=1)
    # stage k at frame t - k is the source at t: once aligned, all stages coincide.
    aligned = independence.joint_samples(latents, delay=True)
    assert torch.equal(aligned[:, 0], aligned[:, 1]) and torch.equal(aligned[:, 0], aligned[:, 2])
    with_delay = independence_loss(latents, delay=True, generator=torch.Generator().manual_seed(1))
    without = independence_loss(latents, delay=False, generator=torch.Generator().manual_seed(1))
    assert float(with_delay) > 20 * abs(float(without))


def _loss_spread(latents_fn, seeds, **kwargs):
    values = torch.tensor([float(independence_loss(latents_fn(s), generator=torch.Generator().manual_seed(s + 99),
                                                   **kwargs)) for s in seeds])
    return values.mean().item(), values.std().item() / math.sqrt(len(values))


def _independent(seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(8, 4, 3, 32, generator=gen) ** 2  # non-Gaussian, independent across stages


def test_independent_codebooks_give_zero_on_average():
    mean, stderr = _loss_spread(_independent, range(24))
    assert abs(mean) <= 3.5 * stderr, f"mean {mean:.3g} is {abs(mean) / stderr:.1f} standard errors from 0"


def test_keeping_shared_pairs_biases_the_estimate_below_zero():
    """The public reference's form keeps pairs that hold one vector twice: a bias of order K/N."""
    mean, stderr = _loss_spread(_independent, range(24), exclude_shared=False)
    assert mean < -10 * stderr


def test_shared_pairs_lists_each_lender_once():
    perms = torch.tensor([[2, 0, 1], [2, 1, 0], [0, 1, 2]])  # perms[k, j]: y_j's codebook k comes from x_i
    rows, cols = independence.shared_pairs(perms)
    # lenders: y_0 <- {2, 2, 0}, y_1 <- {0, 1, 1}, y_2 <- {1, 0, 2}
    assert sorted(zip(rows.tolist(), cols.tolist())) == [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 0), (2, 2)]


def test_dependent_codebooks_give_a_clearly_positive_loss():
    def dependent(seed):
        gen = torch.Generator().manual_seed(seed)
        base = torch.randn(8, 1, 3, 32, generator=gen)
        return base + 0.3 * torch.randn(8, 4, 3, 32, generator=gen)  # every stage shares `base`

    mean, stderr = _loss_spread(dependent, range(8))
    assert mean > 20 * stderr and mean > 1e-2


def test_optimizer_steps_reduce_dependence():
    """Stages mixed by a learnable coupling: a few Adam steps on the loss shrink the coupling."""
    torch.manual_seed(0)
    stages, dim = 3, 2
    coupling = torch.nn.Parameter(torch.full((stages, stages), 0.9))
    mask = torch.tril(torch.ones(stages, stages), diagonal=-1)
    opt = torch.optim.Adam([coupling], lr=0.05)
    gen = torch.Generator().manual_seed(7)
    losses = []
    for _ in range(30):
        sources = torch.rand(8, stages, dim, 24, generator=gen) - 0.5
        latents = sources + torch.einsum("kj,bjdt->bkdt", coupling * mask, sources)
        loss = independence_loss(latents, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < 0.3 * sum(losses[:5])
    assert (coupling.detach() * mask).abs().max() < 0.45


# ----------------------------------------------------------------------------------------------
# Bad input and backend choice
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("x,y,match", [
    (torch.randn(1, 3), torch.randn(1, 3), "at least 2 samples"),
    (torch.randn(4, 3), torch.randn(5, 3), "same shape"),
    (torch.randn(4, 3, 1), torch.randn(4, 3, 1), r"shape \[N, F\]"),
    (torch.tensor([[0.0, math.nan], [1.0, 2.0]]), torch.zeros(2, 2), "non-finite"),
    (torch.zeros(2, 2), torch.tensor([[0.0, math.inf], [1.0, 2.0]]), "non-finite"),
    (torch.zeros(3, 2, dtype=torch.int64), torch.zeros(3, 2, dtype=torch.int64), "floating-point"),
])
def test_bad_samples_are_rejected(x, y, match):
    with pytest.raises(ValueError, match=match):
        rbf_mmd(x, y)


@pytest.mark.parametrize("bandwidths", [(), (1.0, 0.0), (-1.0,), (math.nan,)])
def test_bad_bandwidths_are_rejected(bandwidths):
    with pytest.raises(ValueError, match="bandwidths"):
        rbf_mmd(torch.randn(4, 2), torch.randn(4, 2), bandwidths=bandwidths)


def test_bad_latents_are_rejected():
    with pytest.raises(ValueError, match=r"\[B, K, D, T\]"):
        independence_loss(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="at least 3 frames"):
        independence_loss(torch.randn(2, 3, 4, 2), delay=True)
    with pytest.raises(ValueError, match="at least 2 samples"):
        independence_loss(torch.randn(1, 3, 4, 1))
    with pytest.raises(ValueError, match="non-finite"):
        independence_loss(torch.full((2, 2, 2, 2), math.inf))
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        independence_loss(torch.randn(2, 2, 2, 4), backend="cuda")


def test_backend_choice(monkeypatch):
    monkeypatch.delenv("MMDGEN_BACKEND", raising=False)
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("torch", torch.device("cpu")) == "torch"
    monkeypatch.setenv("MMDGEN_BACKEND", "torch")
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    monkeypatch.setenv("MMDGEN_BACKEND", "fast")
    with pytest.raises(ValueError, match="MMDGEN_BACKEND='fast'"):
        resolve_backend("auto", torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown backend"):
        resolve_backend("gpu", torch.device("cpu"))


def test_forced_triton_fails_clearly_where_it_cannot_run(monkeypatch):
    monkeypatch.setenv("MMDGEN_BACKEND", "triton")
    with pytest.raises(ValueError, match="backend 'triton' was requested but cannot run"):
        resolve_backend("auto", torch.device("meta"))


@needs_triton
def test_env_forces_triton(monkeypatch):
    calls = []
    original = mmd._triton_pass
    monkeypatch.setattr(mmd, "_triton_pass", lambda *a, **k: calls.append(1) or original(*a, **k))
    monkeypatch.setenv("MMDGEN_BACKEND", "triton")
    x, y = _samples(10, 3, seed=0)
    forced = rbf_mmd(x.to(TRITON_DEVICE), y.to(TRITON_DEVICE))
    assert calls and abs(float(forced) - float(reference_mmd(x, y, DEFAULT_BANDWIDTHS, True))) < 1e-5
