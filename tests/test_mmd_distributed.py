"""independence_loss over two gloo processes equals the single-process loss on the concatenated batch."""

import json
import os

import pytest
import torch

from mmdgen.kernels.backend import triton_unusable_reason
from mmdgen.losses.independence import independence_loss
from tests.gloo_ranks import spawn_gloo_ranks

CLIPS_PER_RANK = (3, 5)  # uneven on purpose: the gather pads and trims
CASES = [
    {"backend": "torch", "delay": True, "exclude_shared": True},
    {"backend": "torch", "delay": False, "exclude_shared": False},
    {"backend": "triton", "delay": True, "exclude_shared": True},
]


def _latents():
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(sum(CLIPS_PER_RANK), 3, 4, 40, generator=gen)
    latents[:, 2] += 0.7 * latents[:, 0]
    return latents


def _loss_and_grad(latents, case, generator):
    leaf = latents.clone().requires_grad_()
    loss = independence_loss(leaf, delay=case["delay"], exclude_shared=case["exclude_shared"],
                             backend=case["backend"], generator=generator)
    loss.backward()
    return float(loss), leaf.grad


def _worker(rank, world, out_dir, cases, references):
    torch.manual_seed(1234 + rank)
    latents = _latents()
    start = sum(CLIPS_PER_RANK[:rank])
    local = latents[start: start + CLIPS_PER_RANK[rank]]
    report = []
    for case, (ref_loss, ref_grad) in zip(cases, references):
        # rank 1 seeds differently: only rank 0's permutations, broadcast, reproduce the reference.
        loss, grad = _loss_and_grad(local, case, torch.Generator().manual_seed(7 if rank == 0 else 99))
        ref_local = ref_grad[start: start + CLIPS_PER_RANK[rank]]
        report.append({
            "loss": loss, "ref_loss": ref_loss,
            "grad_err": float((grad - ref_local).abs().max()), "grad_scale": float(ref_local.abs().max()),
        })
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)


def test_two_gloo_ranks_match_the_concatenated_batch(tmp_path):
    cases = [c for c in CASES if c["backend"] != "triton" or triton_unusable_reason(torch.device("cpu")) is None]
    assert len(cases) >= 2
    # the single-process loss and gradient on the concatenated batch, computed here, outside any process group
    references = [_loss_and_grad(_latents(), case, torch.Generator().manual_seed(7)) for case in cases]
    world = len(CLIPS_PER_RANK)
    spawn_gloo_ranks(_worker, world, tmp_path / "init", str(tmp_path), cases, references)
    for rank in range(world):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for case, result in zip(cases, report):
            assert result["loss"] == pytest.approx(result["ref_loss"], rel=1e-5, abs=1e-7), (rank, case)
            assert result["grad_err"] <= 1e-4 * result["grad_scale"], (rank, case, result)
