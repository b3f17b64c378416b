"""Generation: greedy codes equal to transformers' MusicGen on the same weights (with and without guidance),
prompts continued, streaming equal to the whole, every pattern's step count, bad input refused."""

import dataclasses

import pytest
import torch
import transformers

from mmdgen.generate import Generator, Sampling
from mmdgen.model.lm import MusicLM, lm_config
from mmdgen.model.text import word_level_t5_tokenizer
from tests.tiny_parts import tiny_parts

TEXTS = ["a calm jig on flute", "a fast reel on fiddle with drums"]


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    """A randomly initialised tiny transformers MusicGen (T5 text encoder, EnCodec, 4 x 32 codes)."""
    torch.manual_seed(0)
    tokenizer = word_level_t5_tokenizer(TEXTS)
    text = transformers.T5Config(vocab_size=len(tokenizer), d_model=24, d_ff=32, num_layers=1, num_heads=2, d_kv=12)
    audio = transformers.EncodecConfig(target_bandwidths=[0.5], sampling_rate=200, audio_channels=1, hidden_size=8,
                                       num_filters=4, upsampling_ratios=[4, 2], num_lstm_layers=1, codebook_size=32)
    decoder = transformers.MusicgenDecoderConfig(vocab_size=32, hidden_size=32, num_hidden_layers=2,
                                                 num_attention_heads=4, ffn_dim=48, num_codebooks=4,
                                                 pad_token_id=32, bos_token_id=32, decoder_start_token_id=32)
    config = transformers.MusicgenConfig(text_encoder=text.to_dict(), audio_encoder=audio.to_dict(),
                                         decoder=decoder.to_dict())
    model = transformers.MusicgenForConditionalGeneration(config).eval()
    with torch.no_grad():
        for layer in model.audio_encoder.quantizer.layers:  # transformers initialises codebooks to zero
            layer.codebook.embed.copy_(torch.randn_like(layer.codebook.embed))
        for head in model.decoder.lm_heads:  # sharper logits: greedy choices far from ties
            head.weight.mul_(20.0)
    model.generation_config.update(decoder_start_token_id=32, pad_token_id=32, bos_token_id=32)
    folder = tmp_path_factory.mktemp("peer")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer, Generator.from_pretrained(folder)


def _their_codes(model, tokenizer, guidance, steps):
    captured = {}
    real_decode = model.audio_encoder.decode

    def capture(codes, *args, **kwargs):
        captured["codes"] = codes
        return real_decode(codes, *args, **kwargs)

    model.audio_encoder.decode = capture
    try:
        inputs = tokenizer(TEXTS, padding=True, return_tensors="pt")
        model.generate(**inputs, do_sample=False, guidance_scale=guidance, max_new_tokens=steps)
    finally:
        model.audio_encoder.decode = real_decode
    return captured["codes"][0]  # [B, K, frames]


@pytest.mark.parametrize("guidance", [None, 3.0], ids=["no-guidance", "guidance-3"])
def test_greedy_codes_equal_transformers_musicgen(peer, guidance):
    model, tokenizer, ours = peer
    frames = 9
    theirs = _their_codes(model, tokenizer, guidance, steps=frames + 3)  # delay: K - 1 steps more than frames
    got = ours.generate_codes(TEXTS, duration=frames / 25, sampling=Sampling(guidance_scale=guidance, temperature=0))
    assert theirs.shape == got.shape == (2, 4, frames)
    assert torch.equal(got, theirs)
    assert len(set(got.flatten().tolist())) > 8  # a real sequence, not one repeated code


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_parts(tmp_path_factory.mktemp("gen"), TEXTS)


def test_streamed_chunks_add_up_to_the_generated_audio(tiny):
    generator = Generator(*tiny)
    sampling = Sampling(guidance_scale=3.0, top_k=20)
    whole = generator.generate(TEXTS, duration=0.6, sampling=sampling, seed=3)
    chunks = list(generator.stream(TEXTS, duration=0.6, sampling=sampling, seed=3, chunk_seconds=0.1))
    assert len(chunks) > 2
    assert torch.allclose(torch.cat(chunks, dim=-1), whole, atol=1e-5)


def test_seeds_reproduce_and_differ(tiny):
    generator = Generator(*tiny)
    sampling = Sampling(top_k=50)
    a = generator.generate_codes(TEXTS, duration=0.2, sampling=sampling, seed=1)
    assert torch.equal(a, generator.generate_codes(TEXTS, duration=0.2, sampling=sampling, seed=1))
    assert not torch.equal(a, generator.generate_codes(TEXTS, duration=0.2, sampling=sampling, seed=2))


@pytest.mark.parametrize("pattern,steps", [("delay", 13), ("flatten", 40), ("parallel", 10), ("valle", 20)])
def test_every_pattern_decodes_its_number_of_steps(tiny, pattern, steps):
    lm, text, codec = tiny
    patterned = MusicLM(lm_config("tiny", text_dim=32, pattern=pattern))
    patterned.load_state_dict(lm.state_dict())
    generator = Generator(patterned, text, codec)
    seen = []
    codes = generator.generate_codes(TEXTS, duration=0.2, sampling=Sampling(top_k=10),
                                     on_step=lambda step, sequence: seen.append(step))
    assert codes.shape == (2, 4, 10) and seen == list(range(steps))
    assert int(codes.max()) < 256  # no special token left in the codes


def test_a_prompt_is_continued(tiny):
    generator = Generator(*tiny)
    prompt = torch.randn(1, 1, 3200) * 0.1  # 5 frames
    prompt_codes = generator.codec.encode(prompt)
    codes = generator.generate_codes(TEXTS, duration=0.3, sampling=Sampling(top_k=10), prompt_audio=prompt)
    assert codes.shape == (2, 4, 15)
    assert torch.equal(codes[..., :5], prompt_codes.expand(2, -1, -1))
    with pytest.raises(ValueError, match="not shorter than the 5 frames"):
        generator.generate_codes(TEXTS, duration=0.1, prompt_audio=prompt)


def test_bad_requests_are_refused(tiny, tmp_path):
    lm, text, codec = tiny
    generator = Generator(lm, text, codec)
    with pytest.raises(ValueError, match="no prompts"):
        generator.generate([], duration=1.0)
    with pytest.raises(ValueError, match=r"duration must be a finite number > 0 and <= 3600, got 0.0"):
        generator.generate(TEXTS, duration=0.0)
    for duration in (float("nan"), float("inf"), 3601.0):
        with pytest.raises(ValueError, match=f"duration must be a finite number > 0 and <= 3600, got {duration}"):
            generator.generate(TEXTS, duration=duration)
    with pytest.raises(ValueError, match=r"duration must hold at least one frame of the codec \(0.02 s\), got 1e-09"):
        generator.generate(TEXTS, duration=1e-9)
    with pytest.raises(ValueError, match="chunk_seconds must be a finite number > 0"):
        next(generator.stream(TEXTS, duration=0.1, chunk_seconds=float("nan")))
    with pytest.raises(ValueError, match="top_k must be an integer >= 0, got -1"):
        Sampling(top_k=-1)
    with pytest.raises(ValueError, match=r"cuda_graph needs the LM on a CUDA device, it is on cpu"):
        Generator(lm, text, codec, cuda_graph=True)  # the constructor reaches its check (it once read an unset field)
    with pytest.raises(ValueError, match=r"the codec makes 4 x 256 codes but the LM predicts 4 x 128"):
        Generator(MusicLM(lm_config("tiny", text_dim=32, codebook_size=128)), text, codec)
    with pytest.raises(ValueError, match="nowhere: no such file or folder"):
        Generator.from_pretrained(tmp_path / "nowhere")
    from mmdgen.pretrained.directory import save_music_lm

    folder = save_music_lm(tmp_path / "model", lm, text, {"kind": "learned", "config": dataclasses.asdict(text.config)},
                           {"weights_sha256": "0"})
    torch.save(lm.state_dict(), folder / "lm.safetensors")  # a torch pickle under the safetensors name
    with pytest.raises(ValueError, match=r"model/lm.safetensors: not a safetensors file of the LM"):
        Generator.from_pretrained(folder)
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(3)}, str(folder / "lm.safetensors"))  # another model's weights
    with pytest.raises(ValueError, match=r"lm.safetensors: the weights do not fit the LM of .*config.json"):
        Generator.from_pretrained(folder)
    (folder / "lm.safetensors").unlink()
    with pytest.raises(ValueError, match=r"lm.safetensors: missing; expected the weights of the LM"):
        Generator.from_pretrained(folder)


def test_triton_and_pytorch_decoding_paths_give_the_same_codes(tiny):
    """The decode attention and sampling kernels (Triton through its interpreter here) against PyTorch."""
    lm, text, codec = tiny
    sampling = Sampling(guidance_scale=3.0, top_k=40, top_p=0.9)
    codes = {backend: Generator(lm, text, codec, backend=backend).generate_codes(TEXTS, duration=0.1,
                                                                                   sampling=sampling, seed=5)
             for backend in ("torch", "triton")}
    assert torch.equal(codes["torch"], codes["triton"])


def test_the_compiled_step_gives_the_eager_codes(tiny):
    """``compile=True``: the decode step through torch.compile, one graph for every step of a length bucket (the
    step and the attention length are tensors; the bucket's positions are attended with the future masked). Same
    codes as the eager loop: sampled with guidance, top-k and top-p while continuing a prompt (prefill and forced
    cells), and greedy without guidance."""
    lm, text, codec = tiny
    prompt = torch.randn(1, 1, 3200) * 0.1  # 5 frames
    cases = [(Sampling(guidance_scale=3.0, top_k=20, top_p=0.9), prompt),
             (Sampling(guidance_scale=None, temperature=0.0), None)]
    for sampling, prompt_audio in cases:
        eager, compiled = (Generator(lm, text, codec, compile=flag).generate_codes(
            TEXTS, duration=0.3, sampling=sampling, seed=4, prompt_audio=prompt_audio) for flag in (False, True))
        assert compiled.shape == (2, 4, 15) and torch.equal(compiled, eager)


def _with_context(tiny, frames):
    lm, text, codec = tiny
    windowed = MusicLM(lm_config("tiny", text_dim=32, context_frames=frames))
    windowed.load_state_dict(lm.state_dict())
    return Generator(windowed, text, codec)


def test_audio_beyond_the_context_is_generated_in_overlapping_windows(tiny):
    """Context 30 frames, 45 asked, stride 6 (0.12 s): windows [0, 30), then 24 frames of overlap as the prompt
    (prefilled in passes of 16 steps) and 6 new ones, twice, then 24 + the 3 left. Composed by hand from the
    decode loop with the same random stream."""
    from mmdgen.generate.loop import decode

    generator = _with_context(tiny, 30)
    sampling = Sampling(guidance_scale=3.0, top_k=20)
    codes = generator.generate_codes(TEXTS, duration=0.9, sampling=sampling, seed=7, extend_stride=0.12)
    assert codes.shape == (2, 4, 45)
    random = torch.Generator().manual_seed(7)
    memory = generator._memory(TEXTS, guided=True)
    expected = decode(generator.lm, memory, 2, 30, generator.pattern, sampling, generator=random)
    for window in (30, 30, 27):
        part = decode(generator.lm, memory, 2, window, generator.pattern, sampling, generator=random,
                      prompt=expected[..., -24:])
        expected = torch.cat([expected, part[..., 24:]], dim=-1)
    assert torch.equal(codes, expected)
    with pytest.raises(ValueError, match="extend_stride must be positive and shorter than the LM's context of 30"):
        generator.generate_codes(TEXTS, duration=0.9, extend_stride=0.6)
    with pytest.raises(ValueError, match="extend_stride must be a finite number > 0 and <= 3600, got nan"):
        generator.generate_codes(TEXTS, duration=0.9, extend_stride=float("nan"))
    hop = generator.codec.cfg.hop_length
    with pytest.raises(ValueError, match="not shorter than the LM's context of 30 frames"):
        generator.generate_codes(TEXTS, duration=0.9, prompt_audio=torch.randn(1, 1, hop * 32) * 0.1)


def test_a_long_prompt_is_prefilled_in_blocks_like_a_full_pass(tiny):
    """A 40-frame prompt: decode prefills its known steps through the cache in passes of 16 queries; the first
    free code (codebook 0 of frame 40, greedy) is the argmax of the uncached full pass over the same steps."""
    from mmdgen.generate.loop import _inputs, decode, forced_cells

    lm, text, codec = tiny
    generator = Generator(lm, text, codec)
    prompt = torch.randint(0, 256, (1, 4, 40), generator=torch.Generator().manual_seed(1))
    greedy = Sampling(guidance_scale=None, temperature=0.0)
    codes = decode(lm, generator._memory(TEXTS[:1], guided=False), 1, 42, generator.pattern, greedy, prompt=prompt)
    assert torch.equal(codes[..., :40], prompt)
    sequence, _ = forced_cells(generator.pattern, prompt, 1, 42, 256, torch.device("cpu"))
    condition = generator.text(TEXTS[:1])
    with torch.no_grad():
        logits = lm(_inputs(sequence, 41, 256), condition.states, condition.mask)  # [1, K, 41, V]
    assert int(codes[0, 0, 40]) == int(logits[0, 0, 40].argmax())


def test_streaming_across_windows_adds_up_to_the_generated_audio(tiny):
    generator = _with_context(tiny, 12)
    sampling = Sampling(guidance_scale=3.0, top_k=20)
    prompt = torch.randn(1, 1, generator.codec.cfg.hop_length * 5) * 0.1  # 5 frames, continued across the windows
    whole = generator.generate(TEXTS, duration=0.7, sampling=sampling, seed=3, prompt_audio=prompt)
    chunks = list(generator.stream(TEXTS, duration=0.7, sampling=sampling, seed=3, chunk_seconds=0.1,
                                   prompt_audio=prompt))
    assert len(chunks) > 3
    assert torch.allclose(torch.cat(chunks, dim=-1), whole, atol=1e-5)
