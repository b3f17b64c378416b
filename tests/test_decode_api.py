"""The narrow decode API: ``MusicLM.step`` / ``prefill`` / ``prefill_prefix`` over the caches against the full pass
(``hidden`` + ``logits``), a seeded decode (``DecodeState.allocate`` + ``DecodeRuntime.step``) against sampling the
teacher-forced full pass, and the runtime's and the LM's refusals. float64 (the PyTorch paths) unless named."""

import pytest
import torch

from mmdgen.generate.config import Sampling
from mmdgen.generate.loop import DecodeRuntime, decode
from mmdgen.kernels.sampling import gumbel_noise, sample_next
from mmdgen.model.lm import MusicLM, lm_config
from mmdgen.model.patterns import make_pattern

BATCH, TEXT_STEPS, MELODY_FRAMES = 2, 5, 13  # a prefix of 13 + 5 = 18 positions: two prefill passes of up to 16


def _lm(conditioning: str, dtype: torch.dtype = torch.float64, layers: int = 2, seed: int = 0) -> MusicLM:
    """Odd sizes: 3 codebooks of 37 codes, width 40 (4 heads of 10), text width 24."""
    torch.manual_seed(seed)
    prefix = dict(conditioning="prefix", melody_dim=12, melody_frames=MELODY_FRAMES) if conditioning == "prefix" \
        else {}
    cfg = lm_config("tiny", num_codebooks=3, codebook_size=37, dim=40, heads=4, ffn_dim=72, text_dim=24,
                    layers=layers, **prefix)
    return MusicLM(cfg).to(dtype).eval()


def _conditioning(lm: MusicLM, guided: bool):
    """(states, mask, melody) of ``BATCH`` rows, the last text padded; with guidance the null rows after them."""
    gen = torch.Generator().manual_seed(1)
    dtype = lm.heads[0].weight.dtype
    states = torch.randn(BATCH, TEXT_STEPS, lm.cfg.text_dim, generator=gen, dtype=dtype)
    mask = torch.ones(BATCH, TEXT_STEPS, dtype=torch.bool)
    mask[-1, 3:] = False
    if guided:
        states, mask = torch.cat([states, torch.zeros_like(states)]), torch.cat([mask, torch.zeros_like(mask)])
    melody = None
    if lm.cfg.melody_dim is not None:
        melody = torch.rand(states.shape[0], 7, lm.cfg.melody_dim, generator=gen, dtype=dtype)
    return states, mask, melody


def _memory(lm: MusicLM, states, mask, melody):
    """What the decode takes: the cross-attention memory, or a prefix LM's prefix states."""
    if lm.cfg.conditioning == "prefix":
        return lm.prefix(states, mask, melody)
    return lm.cross_memory(states, mask)


def _cached_logits(lm: MusicLM, tokens, states, mask, melody, known: int, chunk: int, backend: str = "auto",
                   cache_dtype: torch.dtype | None = None):
    """Logits of steps known.. of ``tokens``: the first ``known`` steps prefilled, the rest ``chunk`` at a time."""
    memory = _memory(lm, states, mask, melody)
    offset = memory.shape[1] if lm.cfg.conditioning == "prefix" else 0
    caches = lm.new_caches(tokens.shape[0], offset + tokens.shape[-1] + 3, cache_dtype)  # unused positions past the end
    assert caches[0].keys.dtype == (cache_dtype or lm.dtype)
    if lm.cfg.conditioning == "prefix":
        lm.prefill_prefix(memory, caches, backend)
        memory = None
    lm.prefill(tokens[..., :known], offset, caches, memory, backend)
    steps = [lm.step(tokens[..., s: s + chunk], offset + s, caches, memory, backend)
             for s in range(known, tokens.shape[-1], chunk)]
    return torch.cat(steps, dim=2)


@pytest.mark.parametrize("conditioning", ["cross", "prefix"])
@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("known,chunk", [(0, 1), (1, 3), (19, 2)])
def test_steps_after_a_prefill_equal_the_full_pass(conditioning, guided, known, chunk):
    """Prefill of 0, 1 or 19 steps (two passes), then the other 7 steps one, two or three at a time (the last pass
    shorter): the logits equal ``logits(hidden(...))`` over the whole sequence, behind a prefix of 18 positions
    (two prefill passes) for a prefix LM, with padded text and guidance's null rows."""
    lm = _lm(conditioning)
    states, mask, melody = _conditioning(lm, guided)
    tokens = torch.randint(0, lm.cfg.special_token + 1, (states.shape[0], 3, known + 7),
                           generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = lm.logits(lm.hidden(tokens, states, mask, melody=melody))[:, :, known:]
        got = _cached_logits(lm, tokens, states, mask, melody, known, chunk)
    assert got.shape == expected.shape == (states.shape[0], 3, 7, 37)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("conditioning", ["cross", "prefix"])
def test_triton_steps_equal_the_full_pass(conditioning):
    """fp32 through the Triton decode attention (its interpreter here): 17 steps prefilled, then 2 at a time."""
    lm = _lm(conditioning, torch.float32, layers=1)
    states, mask, melody = _conditioning(lm, guided=True)
    tokens = torch.randint(0, lm.cfg.special_token + 1, (states.shape[0], 3, 20),
                           generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = lm.logits(lm.hidden(tokens, states, mask, melody=melody))[:, :, 17:]
        got = _cached_logits(lm, tokens, states, mask, melody, 17, 2, backend="triton")
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("conditioning", ["cross", "prefix"])
@pytest.mark.parametrize("cache_dtype,tol", [(torch.bfloat16, 2e-3), (torch.float16, 3e-4)], ids=["bf16", "fp16"])
def test_steps_over_a_16_bit_cache_stay_within_its_rounding_of_the_full_pass(conditioning, cache_dtype, tol):
    """A float32 LM over a 16-bit KV cache (``DecodeRuntime(kv_cache=...)``): the prefix, the prefill and the
    steps write rounded keys and values, so the logits move by the rounding (measured over five seeds: at most 4.4e-4
    bf16, 6e-5 fp16, for logits up to 1.9), not more; and they do move, so the cache really holds 16 bits."""
    lm = _lm(conditioning, torch.float32)
    states, mask, melody = _conditioning(lm, guided=True)
    tokens = torch.randint(0, 37, (2 * BATCH, 3, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = lm.logits(lm.hidden(tokens, states, mask, melody=melody))[:, :, 5:]
        exact = _cached_logits(lm, tokens, states, mask, melody, known=5, chunk=2, backend="torch")
        rounded = _cached_logits(lm, tokens, states, mask, melody, known=5, chunk=2, backend="torch",
                                 cache_dtype=cache_dtype)
    torch.testing.assert_close(exact, full, rtol=1e-4, atol=1e-4)
    assert (rounded - full).abs().max() <= tol
    assert (rounded - exact).abs().max() > 1e-6


def test_an_embedded_step_at_a_tensor_position_equals_the_step_of_its_codes():
    """The decode loop's form (embedded input, 0-d tensor position): the same logits and cache as the codes."""
    lm = _lm("cross")
    states, mask, _ = _conditioning(lm, guided=False)
    memory = lm.cross_memory(states, mask)
    tokens = torch.randint(0, 38, (BATCH, 3, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        by_codes, by_embedding = lm.new_caches(BATCH, 8), lm.new_caches(BATCH, 8)
        for caches in (by_codes, by_embedding):
            lm.prefill(tokens[..., :5], 0, caches, memory)
        expected = lm.step(tokens[..., 5:], 5, by_codes, memory)
        got = lm.step(lm.embed(tokens[..., 5:], 5), torch.tensor(5), by_embedding, memory)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(by_embedding[1].keys, by_codes[1].keys, rtol=1e-12, atol=1e-12)


SAMPLINGS = [Sampling(guidance_scale=None, temperature=0.0), Sampling(guidance_scale=3.0, top_k=7, top_p=0.9),
             Sampling(guidance_scale=None, temperature=0.8, top_k=0)]


@pytest.mark.parametrize("conditioning", ["cross", "prefix"])
@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["greedy", "guided-top-k-top-p", "sampled"])
@pytest.mark.parametrize("prompt_frames", [0, 3])
def test_a_seeded_decode_equals_sampling_the_teacher_forced_full_pass(conditioning, sampling, prompt_frames):
    """Every code the decode samples is what the sampling op draws, with the same noise stream, from the full
    uncached pass over the final sequence (the teacher-forced logits of that step); a prompt's frames are kept and
    the steps it fixes draw no noise."""
    lm = _lm(conditioning)
    guided = sampling.guidance_scale is not None
    states, mask, melody = _conditioning(lm, guided)
    frames, special, codebooks = 6, lm.cfg.special_token, lm.cfg.num_codebooks
    pattern = make_pattern("delay", codebooks)
    prompt = torch.randint(0, 37, (BATCH, codebooks, prompt_frames), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        codes = decode(lm, _memory(lm, states, mask, melody), BATCH, frames, pattern, sampling,
                       generator=torch.Generator().manual_seed(6), prompt=prompt if prompt_frames else None)
        sequence = pattern.build(codes, special)  # [B, K, S]
        inputs = torch.cat([torch.full_like(sequence[..., :1], special), sequence[..., :-1]], dim=-1)
        logits = lm.logits(lm.hidden(inputs.repeat(2 if guided else 1, 1, 1), states, mask, melody=melody))
    assert torch.equal(codes[..., :prompt_frames], prompt)
    frame, valid = pattern.frame_index(frames), pattern.valid_mask(frames)  # [K, S]
    sampled = valid & (frame >= prompt_frames)
    random = torch.Generator().manual_seed(6)
    first = int(sampled.any(dim=0).nonzero()[0])
    for step in range(first, sequence.shape[-1]):
        noise = None if sampling.temperature == 0 else gumbel_noise((BATCH, codebooks, 37), random)
        drawn = sample_next(logits[:, :, step], guidance_scale=sampling.guidance_scale,
                            temperature=sampling.temperature, top_k=min(sampling.top_k, 37), top_p=sampling.top_p,
                            noise=noise, backend="torch")
        cells = sampled[:, step]
        assert torch.equal(sequence[:, cells, step], drawn[:, cells]), step


def test_the_runtime_refuses_bad_settings():
    with pytest.raises(ValueError, match=r"backend must be one of auto, triton, torch, got 'cuda'"):
        DecodeRuntime(backend="cuda")
    with pytest.raises(ValueError, match=r"compile must be true or false, got 1"):
        DecodeRuntime(compile=1)
    with pytest.raises(ValueError, match=r"DecodeRuntime: compile and cuda_graph are two ways to run the decode "
                                         r"step, choose one \(got compile=True, cuda_graph=True\)"):
        DecodeRuntime(compile=True, cuda_graph=True)
    with pytest.raises(ValueError, match=r"kv_cache must be one of model, bfloat16, float16, got 'int8'"):
        DecodeRuntime(kv_cache="int8")
    half_lm = _lm("cross", torch.bfloat16)
    with pytest.raises(ValueError, match=r"a float16 KV cache serves a float32 LM; this LM is torch.bfloat16"):
        DecodeRuntime(kv_cache="float16").cache_dtype(half_lm)
    assert DecodeRuntime(kv_cache="bfloat16").cache_dtype(half_lm) == torch.bfloat16
    lm = _lm("cross")
    states, mask, _ = _conditioning(lm, guided=False)
    greedy = Sampling(guidance_scale=None, temperature=0.0)
    with pytest.raises(ValueError, match=r"cuda_graph needs the LM on a CUDA device, it is on cpu"):
        decode(lm, lm.cross_memory(states, mask), BATCH, 3, make_pattern("delay", 3), greedy,
               runtime=DecodeRuntime(cuda_graph=True))


def test_the_lm_refuses_steps_without_their_conditioning():
    cross, prefix = _lm("cross"), _lm("prefix")
    codes = torch.zeros(BATCH, 3, 1, dtype=torch.long)
    with pytest.raises(ValueError, match=r"a cross-conditioned LM's steps need memory=lm.cross_memory"):
        cross.step(codes, 0, cross.new_caches(BATCH, 4))
    states, mask, melody = _conditioning(prefix, guided=False)
    states = prefix.prefix(states, mask, melody)
    with pytest.raises(ValueError, match=r"a prefix LM's steps take no memory"):
        prefix.step(codes, 0, prefix.new_caches(BATCH, 4), memory=states)
    with pytest.raises(ValueError, match=r"expected prefix states \[2, P, 40\] \(lm.prefix\), got \(2, 18, 24\)"):
        prefix.prefill_prefix(states[..., :24], prefix.new_caches(BATCH, 20))
    with pytest.raises(ValueError, match=r"a cross-conditioned LM takes no prefix"):
        cross.prefill_prefix(states, cross.new_caches(BATCH, 20))


def test_the_compiled_step_is_one_graph_for_every_step_and_decode_of_a_shape():
    """``DecodeRuntime(compile=True)``: the whole step is one graph (fullgraph: no break, so no host read), compiled
    once for a shape within one length bucket (7 steps: every span is the whole cache) and reused by a second decode
    of that shape, with the eager loop's codes (several buckets: tests/test_decode_buckets.py)."""
    from torch._dynamo.utils import counters

    lm = _lm("cross", torch.float32, layers=1)
    states, mask, _ = _conditioning(lm, guided=True)
    memory, pattern = lm.cross_memory(states, mask), make_pattern("delay", 3)
    sampling = Sampling(guidance_scale=3.0, top_k=5)

    def run(runtime):
        return decode(lm, memory, BATCH, 5, pattern, sampling, generator=torch.Generator().manual_seed(7),
                      runtime=runtime)

    eager = run(DecodeRuntime())
    before = counters["stats"]["unique_graphs"]
    first, second = run(DecodeRuntime(compile=True)), run(DecodeRuntime(compile=True))
    assert counters["stats"]["unique_graphs"] - before == 1
    assert torch.equal(first, eager) and torch.equal(second, eager)
