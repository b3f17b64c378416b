"""The PyTorch path's CPU choices against the float64 reference: oneDNN or addmm for the tile products,
kernels of doubled gammas squared rather than exponentiated, over tiles with 1 to 3 rows, odd F."""

import pytest
import torch

from mmdgen.kernels import mmd
from mmdgen.kernels.mmd import DEFAULT_BANDWIDTHS, exponential_plan, onednn_matmul_usable, rbf_mmd
from tests.reference import reference_mmd, reference_terms

# (N, F, tile): last tiles of 1, 2 and 3 rows, a single tile of 2 or 3 rows, odd F on both sides of 512.
SHAPES = [(2, 1, 16), (3, 513, 16), (17, 7, 16), (34, 33, 16), (35, 130, 8), (70, 511, 32)]


def _samples(n, f, seed, spread=0.6):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, f, generator=gen) * spread
    y = torch.randn(n, f, generator=gen) * spread + 0.3
    return x, y


def _value_and_grads(x, y, bandwidths, unbiased):
    xa, ya = x.clone().requires_grad_(), y.clone().requires_grad_()
    value = rbf_mmd(xa, ya, bandwidths=bandwidths, unbiased=unbiased, backend="torch")
    value.backward()
    return value.detach(), xa.grad, ya.grad


def _assert_matches_reference(x, y, bandwidths, unbiased, grad_rel=2e-5):
    xr, yr = x.double().requires_grad_(), y.double().requires_grad_()
    ref = reference_mmd(xr, yr, bandwidths, unbiased)
    ref.backward()
    value, gx, gy = _value_and_grads(x, y, bandwidths, unbiased)
    terms = sum(abs(float(t)) for t in reference_terms(x, y, bandwidths, unbiased))
    ref = float(ref.detach())
    assert abs(float(value) - ref) <= 2e-6 * terms, f"value {float(value)} vs {ref}"
    for ours, theirs in ((gx, xr.grad), (gy, yr.grad)):
        err = (ours.double() - theirs).abs().max().item()
        assert err <= grad_rel * theirs.abs().max().item() + 1e-12, f"gradient error {err:.3g}"


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "addmm"])
@pytest.mark.parametrize("n,f,tile", SHAPES)
@pytest.mark.parametrize("unbiased", [True, False], ids=["unbiased", "biased"])
def test_both_tile_products_match_reference(onednn, n, f, tile, unbiased, monkeypatch):
    if onednn and not onednn_matmul_usable(torch.float32, torch.device("cpu")):
        pytest.fail("this torch build has no oneDNN linear: the fast CPU path would be off")
    monkeypatch.setattr(mmd, "ONEDNN_MATMUL", onednn)
    monkeypatch.setattr(mmd, "TORCH_TILE", tile)
    x, y = _samples(n, f, seed=n * 100 + f)
    _assert_matches_reference(x, y, DEFAULT_BANDWIDTHS, unbiased)


def test_fp32_cpu_products_go_through_onednn_and_others_through_addmm(monkeypatch):
    seen = []
    product = mmd._product_nt

    def recording(a, b, bias, onednn):
        seen.append((a.dtype, onednn))
        return product(a, b, bias, onednn)

    monkeypatch.setattr(mmd, "_product_nt", recording)
    x, y = _samples(20, 5, seed=1)
    _value_and_grads(x, y, DEFAULT_BANDWIDTHS, True)
    _value_and_grads(x.double(), y.double(), DEFAULT_BANDWIDTHS, True)
    fp32 = {onednn for dtype, onednn in seen if dtype == torch.float32}
    fp64 = {onednn for dtype, onednn in seen if dtype == torch.float64}
    assert fp32 == {torch.backends.mkldnn.is_available()}
    assert fp64 == {False}
    assert not onednn_matmul_usable(torch.float64, torch.device("cpu"))
    assert not onednn_matmul_usable(torch.float32, torch.device("cuda"))


def test_plan_squares_only_exact_doublings():
    gammas = mmd._gammas(DEFAULT_BANDWIDTHS)  # bandwidths 50, 20, 10, 5, 1, 0.1 in ascending gamma
    assert exponential_plan(gammas) == [(0.01, False), (0.025, False), (0.05, True), (0.1, True), (0.5, False),
                                        (5.0, False)]
    assert [squared for _, squared in exponential_plan(mmd._gammas((3.0, 1.5, 0.75)))] == [False, True, True]
    assert not any(squared for _, squared in exponential_plan(mmd._gammas((3.0, 1.6, 1.0, 1.0))))


@pytest.mark.parametrize("spread", [0.05, 0.6, 3.0], ids=["tight", "medium", "far"])
def test_squared_chain_matches_reference_and_all_exponentials(spread, monkeypatch):
    """A chain of four doublings (each kernel the previous one's square), from pairs so close that the
    kernels are near 1 to pairs so far that they sit at the e^-80 floor."""
    bandwidths = (8.0, 4.0, 2.0, 1.0, 0.5)
    monkeypatch.setattr(mmd, "TORCH_TILE", 16)
    x, y = _samples(37, 9, seed=7, spread=spread)
    assert sum(squared for _, squared in exponential_plan(mmd._gammas(bandwidths))) == 4
    _assert_matches_reference(x, y, bandwidths, True)
    chained = _value_and_grads(x, y, bandwidths, True)
    monkeypatch.setattr(mmd, "exponential_plan", lambda gammas: [(g, False) for g in sorted(gammas)])
    direct = _value_and_grads(x, y, bandwidths, True)
    terms = sum(abs(float(t)) for t in reference_terms(x, y, bandwidths, True))
    assert abs(float(chained[0]) - float(direct[0])) <= 2e-6 * terms
    for ours, theirs in zip(chained[1:], direct[1:]):
        assert (ours - theirs).abs().max() <= 2e-5 * theirs.abs().max() + 1e-30

