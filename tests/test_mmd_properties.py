"""Property tests: random awkward shapes and tile sizes against the float64 reference."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmdgen.kernels import mmd
from mmdgen.kernels.mmd import DEFAULT_BANDWIDTHS, rbf_mmd
from tests.reference import reference_mmd, reference_terms
from tests.test_mmd import TRITON_DEVICE, needs_triton

shapes = st.tuples(st.integers(2, 90), st.integers(1, 40), st.integers(0, 2**31 - 1), st.booleans())


def _check(n, f, seed, unbiased, backend, device):
    gen = torch.Generator().manual_seed(seed)
    scale = torch.rand((), generator=gen).item() * 2 + 0.1  # spread from tight to far apart
    x = torch.randn(n, f, generator=gen) * scale
    y = torch.randn(n, f, generator=gen) * scale + 0.2
    xr, yr = x.double().requires_grad_(), y.double().requires_grad_()
    ref = reference_mmd(xr, yr, DEFAULT_BANDWIDTHS, unbiased)
    ref.backward()
    xa, ya = x.to(device).requires_grad_(), y.to(device).requires_grad_()
    value = rbf_mmd(xa, ya, unbiased=unbiased, backend=backend)
    value.backward()
    terms = sum(abs(t.item()) for t in reference_terms(x, y, DEFAULT_BANDWIDTHS, unbiased))
    assert abs(value.item() - ref.item()) <= 2e-6 * terms
    for ours, theirs in ((xa.grad.cpu(), xr.grad), (ya.grad.cpu(), yr.grad)):
        assert (ours.double() - theirs).abs().max() <= 3e-5 * theirs.abs().max() + 1e-12


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=shapes, tile=st.integers(1, 70))
def test_torch_path_any_shape_any_tile(shape, tile, monkeypatch):
    monkeypatch.setattr(mmd, "TORCH_TILE", tile)
    _check(*shape, "torch", "cpu")


@needs_triton
@settings(max_examples=15, deadline=None, derandomize=True)
@given(shape=shapes)
def test_triton_path_any_shape(shape):
    _check(*shape, "triton", TRITON_DEVICE)
