"""Nearest-codeword search against torch.cdist(...).argmin() and a float64 reference."""

import pytest
import torch

from mmdgen.kernels import vq
from mmdgen.kernels.vq import nearest_codeword
from tests.test_mmd import TRITON_DEVICE, needs_triton

BACKEND_DEVICES = [
    pytest.param("torch", torch.device("cpu"), id="torch"),
    pytest.param("triton", TRITON_DEVICE, id="triton", marks=needs_triton),
]
# (N, Q, D): one row, one codeword, sizes off the block grid, several codebook tiles
SHAPES = [(1, 1, 1), (5, 3, 2), (70, 130, 17), (129, 300, 64), (200, 65, 128)]


def _reference(x, codebook):
    d2 = ((x.double()[:, None, :] - codebook.double()[None, :, :]) ** 2).sum(-1)
    return d2.argmin(dim=1), d2.min(dim=1).values, d2


def _clear_winners(d2, margin):
    """Rows whose best codeword beats the second by more than rounding could move it."""
    if d2.shape[1] < 2:
        return torch.ones(d2.shape[0], dtype=torch.bool)
    two = d2.topk(2, dim=1, largest=False).values
    return (two[:, 1] - two[:, 0]) > margin * (1 + two[:, 0])


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("n,q,d", SHAPES)
def test_matches_cdist_argmin(backend, device, n, q, d):
    gen = torch.Generator().manual_seed(n * 7 + q)
    x, codebook = torch.randn(n, d, generator=gen), torch.randn(q, d, generator=gen)
    index, dist = nearest_codeword(x.to(device), codebook.to(device), backend=backend)
    ref_index, ref_dist, d2 = _reference(x, codebook)
    cdist_index = torch.cdist(x, codebook).argmin(dim=1)
    clear = _clear_winners(d2, 1e-4)
    assert clear.float().mean() > 0.9
    assert torch.equal(index.cpu()[clear], cdist_index[clear]) and torch.equal(index.cpu()[clear], ref_index[clear])
    # where rounding could decide, our pick is still within rounding of the best distance
    assert torch.allclose(d2[torch.arange(n), index.cpu()], ref_dist, rtol=1e-5, atol=1e-5)
    assert torch.allclose(dist.cpu().double(), ref_dist, rtol=1e-4, atol=1e-4)
    assert index.dtype == torch.int64 and dist.dtype == torch.float32


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_ties_go_to_the_lowest_index_as_in_argmin(backend, device):
    gen = torch.Generator().manual_seed(0)
    base = torch.randint(-3, 4, (40, 8), generator=gen).float()  # small integers: exact arithmetic
    codebook = torch.cat([base, base, base[:7]])  # every codeword repeated across codebook tiles
    x = torch.cat([base[torch.randperm(40, generator=gen)[:25]],
                   torch.randint(-3, 4, (30, 8), generator=gen).float()])
    index, _ = nearest_codeword(x.to(device), codebook.to(device), backend=backend)
    expected = torch.cdist(x, codebook, compute_mode="donot_use_mm_for_euclid_dist").argmin(dim=1)
    assert torch.equal(index.cpu(), expected)
    assert (index[:25] < 40).all()


def test_torch_path_tiles(monkeypatch):
    monkeypatch.setattr(vq, "TORCH_ROWS", 7)
    monkeypatch.setattr(vq, "TORCH_CODES", 5)
    gen = torch.Generator().manual_seed(3)
    x, codebook = torch.randn(50, 6, generator=gen), torch.randn(23, 6, generator=gen)
    index, dist = nearest_codeword(x, codebook, backend="torch")
    ref_index, ref_dist, _ = _reference(x, codebook)
    assert torch.equal(index, ref_index) and torch.allclose(dist.double(), ref_dist, atol=1e-5)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_inputs_find_the_best_code_of_the_rounded_values(backend, device, dtype):
    gen = torch.Generator().manual_seed(5)
    x, codebook = torch.randn(90, 32, generator=gen).to(dtype), torch.randn(70, 32, generator=gen).to(dtype)
    index, _ = nearest_codeword(x.to(device), codebook.to(device), backend=backend)
    ref_index, ref_dist, d2 = _reference(x, codebook)
    # fp32 accumulation of exact half products: within fp32 rounding of the float64 best
    assert torch.allclose(d2[torch.arange(90), index.cpu()], ref_dist, rtol=1e-5, atol=1e-4)


def test_bad_inputs():
    with pytest.raises(ValueError, match="features"):
        nearest_codeword(torch.randn(4, 3), torch.randn(5, 2))
    with pytest.raises(ValueError, match="2-D"):
        nearest_codeword(torch.randn(4, 3, 1), torch.randn(5, 3))
    with pytest.raises(ValueError, match="empty"):
        nearest_codeword(torch.randn(4, 3), torch.randn(0, 3))
    with pytest.raises(ValueError, match="share dtype"):
        nearest_codeword(torch.randn(4, 3), torch.randn(5, 3).double())
