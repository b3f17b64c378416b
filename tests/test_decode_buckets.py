"""The compiled decode step's length buckets (``mmdgen.generate.loop.attended_span``): a step at a tensor position
attends only the cache positions of its bucket (``MusicLM.step(span=...)``), with the logits of the whole-buffer
step; a compiled decode crossing several buckets gives the eager loop's codes (sampled with guidance and a prompt,
greedy, a prefix LM) with one graph per bucket it touches; continuous batching (eager, every row's filled
positions) still matches a clip generated alone by the compiled loop. Buckets start at 4 positions here
(``BUCKET_MIN_POSITIONS``, 64 in use) so that a short decode crosses several."""

import pytest
import torch
from torch._dynamo.utils import counters

import mmdgen.generate.loop as loop
from mmdgen.generate import Generator
from mmdgen.generate.config import Sampling
from mmdgen.generate.continuous import ClipRequest, decode_continuously
from mmdgen.generate.loop import DecodeRuntime, attended_span, decode
from mmdgen.model.lm import MusicLM, lm_config
from mmdgen.model.patterns import make_pattern
from tests.tiny_parts import tiny_parts

BATCH, TEXT_STEPS, MELODY_FRAMES = 2, 5, 13


def _lm(conditioning: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> MusicLM:
    """One layer, odd sizes: 3 codebooks of 37 codes, width 40 (4 heads of 10), text width 24."""
    torch.manual_seed(seed)
    prefix = dict(conditioning="prefix", melody_dim=12, melody_frames=MELODY_FRAMES) if conditioning == "prefix" \
        else {}
    cfg = lm_config("tiny", num_codebooks=3, codebook_size=37, dim=40, heads=4, ffn_dim=72, text_dim=24, layers=1,
                    **prefix)
    lm = MusicLM(cfg).to(dtype).eval()
    with torch.no_grad():
        for head in lm.heads:  # sharper logits, as a trained model has: choices far from ties
            head.weight.mul_(8.0)
    return lm


def _memory(lm: MusicLM, guided: bool):
    """The decode's conditioning for ``BATCH`` rows (the last text padded; with guidance the null rows after)."""
    gen = torch.Generator().manual_seed(1)
    dtype = lm.heads[0].weight.dtype
    states = torch.randn(BATCH, TEXT_STEPS, lm.cfg.text_dim, generator=gen).to(dtype)  # the same in fp32 and fp64
    mask = torch.ones(BATCH, TEXT_STEPS, dtype=torch.bool)
    mask[-1, 3:] = False
    if guided:
        states, mask = torch.cat([states, torch.zeros_like(states)]), torch.cat([mask, torch.zeros_like(mask)])
    if lm.cfg.conditioning == "prefix":
        melody = torch.rand(states.shape[0], 7, lm.cfg.melody_dim, generator=gen).to(dtype)
        return lm.prefix(states, mask, melody)
    return lm.cross_memory(states, mask)


@pytest.fixture
def small_buckets(monkeypatch):
    monkeypatch.setattr(loop, "BUCKET_MIN_POSITIONS", 4)


def test_buckets_double_from_the_minimum_up_to_the_cache_length():
    assert [attended_span(filled, 503) for filled in (1, 64, 65, 128, 129, 256, 257, 500, 503)] == \
        [64, 64, 128, 128, 256, 256, 503, 503, 503]
    assert attended_span(5, 7) == 7  # a cache shorter than the smallest bucket: its whole length
    # graphs of a whole decode: a 10-s clip (503 steps, delay) and 2000 steps (flattening)
    assert len({attended_span(filled, 503) for filled in range(1, 504)}) == 4
    assert len({attended_span(filled, 2000) for filled in range(1, 2001)}) == 6


@pytest.mark.parametrize("conditioning", ["cross", "prefix"])
def test_a_bucketed_step_gives_the_whole_buffer_logits(conditioning):
    """A step at a tensor position with span 11 (just its filled positions), 16 or None (the whole buffer of 23):
    the same logits in fp32 as the float64 step at an int position (which attends its filled positions only)."""
    lm = _lm(conditioning)
    reference = _lm(conditioning, torch.float64)
    tokens = torch.randint(0, 38, (2 * BATCH, 3, 11), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        memory64 = _memory(reference, guided=True)
        offset = memory64.shape[1] if conditioning == "prefix" else 0

        def filled_caches(model, memory):
            caches = model.new_caches(2 * BATCH, offset + 23)
            if conditioning == "prefix":
                model.prefill_prefix(memory, caches)
                memory = None
            model.prefill(tokens[..., :10], offset, caches, memory)
            return caches, memory

        caches64, step_memory64 = filled_caches(reference, memory64)
        expected = reference.step(tokens[..., 10:], offset + 10, caches64, step_memory64)
        filled = offset + 11
        for span in (filled, filled + 5, None):
            caches, memory = filled_caches(lm, _memory(lm, guided=True))
            embedded = lm.embed(tokens[..., 10:], offset + 10)
            got = lm.step(embedded, torch.tensor(offset + 10), caches, memory, span=span)
            torch.testing.assert_close(got, expected.float(), rtol=1e-4, atol=1e-4)


def test_the_lm_refuses_a_bad_span():
    lm = _lm("cross")
    memory = _memory(lm, guided=False)
    codes = torch.zeros(BATCH, 3, 2, dtype=torch.long)
    caches = lm.new_caches(BATCH, 8)
    for span in (0, 9, True, 4.0):
        with pytest.raises(ValueError, match=rf"lm.py: span must be an int in \[1, 8\] \(the cache's positions\), "
                                             rf"got {span!r}"):
            lm.step(codes, 3, caches, memory, span=span)
    with pytest.raises(ValueError, match=r"lm.py: span=4 does not cover the steps at positions 3..4; expected "
                                         r"span >= 5"):
        lm.step(codes, 3, caches, memory, span=4)


def _decode(lm, memory, frames, sampling, runtime, prompt=None):
    return decode(lm, memory, BATCH, frames, make_pattern("delay", 3), sampling,
                  generator=torch.Generator().manual_seed(7), prompt=prompt, runtime=runtime)


def _graphs_of(run):
    before = counters["stats"]["unique_graphs"]
    result = run()
    return result, counters["stats"]["unique_graphs"] - before


CASES = {  # (conditioning, sampling, prompt frames)
    "cross-guided-sampled-prompt": ("cross", Sampling(guidance_scale=3.0, top_k=7, top_p=0.9), 3),
    "cross-greedy": ("cross", Sampling(guidance_scale=None, temperature=0.0), 0),
    "prefix-guided-sampled": ("prefix", Sampling(guidance_scale=3.0, top_k=7), 0),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_compiled_decode_across_buckets_gives_the_eager_codes_with_a_graph_per_bucket(small_buckets, name):
    """14 frames = 16 steps (behind 18 prefix positions for the prefix LM): spans 4, 8, 16 (cross; from the
    prompt's first sampled step) or 32, 34 (prefix). One graph per span touched, none more for a second decode of
    the shape; the eager loop's codes."""
    conditioning, sampling, prompt_frames = CASES[name]
    lm = _lm(conditioning)
    guided = sampling.guidance_scale is not None
    memory = _memory(lm, guided)
    prompt = None
    if prompt_frames:
        prompt = torch.randint(0, 37, (BATCH, 3, prompt_frames), generator=torch.Generator().manual_seed(5))
    frames = 14
    eager = _decode(lm, memory, frames, sampling, DecodeRuntime(), prompt)
    state = loop.DecodeState.allocate(lm, memory, BATCH, frames, make_pattern("delay", 3), sampling, prompt)
    capacity = state.caches[0].keys.shape[2]
    spans = {attended_span(state.offset + step + 1, capacity) for step in range(state.first_step, 16)}
    assert len(spans) >= 2  # the decode crosses a bucket boundary
    first, graphs = _graphs_of(lambda: _decode(lm, memory, frames, sampling, DecodeRuntime(compile=True), prompt))
    second, more = _graphs_of(lambda: _decode(lm, memory, frames, sampling, DecodeRuntime(compile=True), prompt))
    assert graphs == len(spans) and more == 0
    assert torch.equal(first, eager) and torch.equal(second, eager)


def test_continuous_batching_matches_the_bucketed_compiled_loop(small_buckets, tmp_path):
    """Continuous batching runs its step eagerly over every row's filled positions (the attended length is the
    longest live row's); each clip equals the same clip generated alone by the compiled loop across its buckets
    (0.3 s = 15 frames = 18 steps: spans 4, 8, 16, 18)."""
    texts = ["a calm jig on flute", "piano", "slow strings"]
    lm, text, codec = tiny_parts(tmp_path, texts)
    with torch.no_grad():
        for head in lm.heads:
            head.weight.mul_(8.0)
    sampling = Sampling(guidance_scale=3.0, top_k=20)
    clips = [ClipRequest(texts[0], 0.3, seed=100), ClipRequest(texts[1], 0.1, seed=101),
             ClipRequest(texts[2], 0.12, seed=102)]
    finished = dict(decode_continuously(Generator(lm, text, codec), clips, sampling, rows=2))
    compiled = Generator(lm, text, codec, compile=True)
    alone, graphs = _graphs_of(lambda: compiled.generate_codes([clips[0].text], clips[0].duration, sampling,
                                                               seed=clips[0].seed)[0])
    assert graphs == 4
    assert alone.shape == (4, 15) and torch.equal(finished[0], alone)
