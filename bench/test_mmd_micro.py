"""Micro-benchmarks (pytest-benchmark, `make bench`): one estimate at a size a training step sees."""

import pytest
import torch

from mmdgen import independence_loss, naive_rbf_mmd, rbf_mmd

N, F = 2048, 128


@pytest.fixture(scope="module")
def samples():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(N, F, generator=gen), torch.randn(N, F, generator=gen)


@pytest.mark.parametrize("fn", [naive_rbf_mmd, rbf_mmd], ids=["naive", "mmdgen"])
def test_forward_backward(benchmark, samples, fn):
    x, y = (t.clone().requires_grad_() for t in samples)

    def step():
        x.grad = y.grad = None
        fn(x, y).backward()

    benchmark(step)
    assert torch.isfinite(x.grad).all()


def test_independence_loss_step(benchmark):
    """One codec batch: 16 clips of 1 s (50 frames), 4 stages of 32 dimensions, delay-aligned."""
    latents = torch.randn(16, 4, 32, 50, generator=torch.Generator().manual_seed(1)).requires_grad_()

    def step():
        latents.grad = None
        independence_loss(latents, delay=True).backward()

    benchmark(step)
    assert torch.isfinite(latents.grad).all()
