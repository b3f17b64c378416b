"""Residual VQ: codes, straight-through gradients, stage latents, EMA, k-means, dead codes, dropout."""

import json

import pytest
import torch

from mmdgen.model.quantizer import QuantizerConfig, ResidualVectorQuantizer, kmeans
from tests.gloo_ranks import spawn_gloo_ranks


def _rvq(**overrides):
    cfg = dict(dim=6, codebook_size=16, num_codebooks=3, kmeans_init=False)
    cfg.update(overrides)
    torch.manual_seed(0)
    return ResidualVectorQuantizer(QuantizerConfig(**cfg))


def _brute_force_codes(rvq, x):
    residual = x.transpose(1, 2).reshape(-1, x.shape[1]).double()
    codes = []
    for stage in rvq.stages:
        book = stage.embed.double()
        k = ((residual[:, None] - book[None]) ** 2).sum(-1).argmin(1)
        codes.append(k)
        residual = residual - book[k]
    return torch.stack(codes, 1).reshape(x.shape[0], x.shape[2], -1).transpose(1, 2)


def test_codes_are_the_greedy_residual_nearest_codewords():
    rvq = _rvq().eval()
    x = torch.randn(3, 6, 11)
    out = rvq(x)
    assert out.codes.shape == (3, 3, 11) and out.stage_latents.shape == (3, 3, 6, 11)
    assert torch.equal(out.codes, _brute_force_codes(rvq, x))
    assert torch.equal(rvq.encode(x), out.codes)
    assert torch.allclose(rvq.decode(out.codes), out.quantized, atol=1e-6)
    assert torch.allclose(out.stage_latents.sum(1), out.quantized, atol=1e-5)  # "quantized" latents sum up


def test_straight_through_gradients_reach_the_input_unchanged():
    for mode in ("quantized", "residual_after", "residual_before"):
        rvq = _rvq(stage_latent=mode).eval()
        x = torch.randn(2, 6, 5, requires_grad=True)
        out = rvq(x)
        weights = torch.randn_like(out.stage_latents)
        (out.stage_latents * weights).sum().backward()
        assert torch.allclose(x.grad, weights.sum(1), atol=1e-6), mode
        x.grad = None
        g = torch.randn_like(out.quantized)
        rvq(x).quantized.backward(g)
        assert torch.allclose(x.grad, g)


def test_stage_latent_values():
    x = torch.randn(2, 6, 4)
    outs = {m: _rvq(stage_latent=m).eval()(x) for m in ("quantized", "residual_after", "residual_before")}
    q, after, before = (outs[m].stage_latents for m in ("quantized", "residual_after", "residual_before"))
    assert torch.allclose(before[:, 0], x, atol=1e-6)  # stage 1 sees the encoder output
    assert torch.allclose(before - q, after, atol=1e-5)
    assert torch.allclose(after[:, :-1], before[:, 1:], atol=1e-5)  # what stage k leaves, stage k+1 takes


def test_ema_with_zero_decay_moves_codewords_to_their_cluster_means():
    rvq = _rvq(num_codebooks=1, decay=0.0, dead_code_threshold=0.0, epsilon=1e-9).train()
    x = torch.randn(4, 6, 30)
    codes = rvq.encode(x)[:, 0].reshape(-1)
    rvq(x)
    vectors = x.transpose(1, 2).reshape(-1, 6)
    for code in codes.unique():
        assert torch.allclose(rvq.stages[0].embed[code], vectors[codes == code].mean(0), atol=1e-4)


def test_kmeans_init_finds_separated_clusters():
    gen = torch.Generator().manual_seed(1)
    centres = torch.tensor([[10.0, 0, 0], [0, 10.0, 0], [0, 0, 10.0], [-10.0, -10.0, 0]])
    points = centres.repeat_interleave(50, 0) + 0.1 * torch.randn(200, 3, generator=gen)
    found, sizes = kmeans(points, 4, iters=20, generator=torch.Generator().manual_seed(2))
    assert sorted(sizes.tolist()) == [50, 50, 50, 50]
    assert torch.cdist(centres, found).min(1).values.max() < 0.1

    rvq = _rvq(dim=3, codebook_size=4, num_codebooks=1, kmeans_init=True, kmeans_iters=20).train()
    assert not bool(rvq.stages[0].initialized)
    rvq(points.T[None])
    assert bool(rvq.stages[0].initialized)
    assert torch.cdist(centres, rvq.stages[0].embed).min(1).values.max() < 0.2


def test_dead_codes_are_replaced_by_batch_vectors():
    rvq = _rvq(num_codebooks=1, decay=0.5, dead_code_threshold=1.5).train()
    book = rvq.stages[0].embed
    book[3] = 1e3  # far from every input: never chosen, its cluster size decays below the threshold
    x = torch.randn(2, 6, 20)
    rvq(x)
    vectors = x.transpose(1, 2).reshape(-1, 6)
    assert (rvq.stages[0].embed[3] - vectors).abs().sum(1).min() < 1e-6


def test_dropout_varies_the_number_of_stages_in_training_only():
    rvq = _rvq(dropout=True).train()
    torch.manual_seed(3)
    counts = {rvq(torch.randn(1, 6, 4)).codes.shape[1] for _ in range(30)}
    assert counts == {1, 2, 3}
    assert rvq.eval()(torch.randn(1, 6, 4)).codes.shape[1] == 3


def test_bad_inputs():
    rvq = _rvq()
    with pytest.raises(ValueError, match=r"expected latents \[B, 6, T\]"):
        rvq(torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match="codes must lie in"):
        rvq.decode(torch.full((1, 2, 3), 16))
    with pytest.raises(ValueError, match="stage_latent"):
        QuantizerConfig(stage_latent="codes")


def _ema_worker(rank, world, out_dir):
    torch.manual_seed(0)
    x = torch.randn(4, 6, 10)
    rvq = _rvq(decay=0.5, dead_code_threshold=0.0).train()
    rvq(x[2 * rank: 2 * rank + 2])
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump([s.embed.tolist() for s in rvq.stages], f)


def test_ema_over_two_ranks_equals_one_process_on_the_whole_batch(tmp_path):
    spawn_gloo_ranks(_ema_worker, 2, tmp_path / "init", str(tmp_path))
    torch.manual_seed(0)
    x = torch.randn(4, 6, 10)
    single = _rvq(decay=0.5, dead_code_threshold=0.0).train()
    single(x)
    for rank in range(2):
        books = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for stage, book in zip(single.stages, books):
            assert torch.allclose(stage.embed, torch.tensor(book), atol=1e-5)


def test_stage_latents_match_the_forward_pass_without_touching_the_codebooks():
    torch.manual_seed(0)
    quantizer = ResidualVectorQuantizer(QuantizerConfig(dim=6, codebook_size=16, num_codebooks=3))
    x = torch.randn(3, 6, 11)
    quantizer(x)  # k-means initialisation and one EMA update
    buffers = {k: v.clone() for k, v in quantizer.state_dict().items()}
    x = x.requires_grad_()
    latents = quantizer.stage_latents(x)
    assert all(torch.equal(buffers[k], v) for k, v in quantizer.state_dict().items())
    quantizer.eval()
    assert torch.equal(latents, quantizer(x).stage_latents)
    (latents * torch.arange(3.0).view(1, 3, 1, 1)).sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, 0.0 + 1.0 + 2.0))  # straight through from every stage
