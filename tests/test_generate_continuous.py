"""Continuous batching: every clip of a job of mixed durations and texts equals the same prompt generated alone
(same seed and duration): greedy and sampled, with and without guidance, more rows than clips, clips beyond the
LM's context; rows are refilled as they finish."""

import dataclasses

import pytest
import torch

from mmdgen.generate import Generator, Sampling
from mmdgen.generate.continuous import ClipRequest, decode_continuously
from mmdgen.model.codec import Codec, codec_config
from mmdgen.model.lm import MusicLM, lm_config
from mmdgen.model.text import LearnedTextEncoder, train_caption_tokenizer

TEXTS = ["a calm jig on flute", "a fast reel on fiddle with drums and a loud bass line", "piano",
         "slow strings", "a bright march for brass band", "drums"]


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("continuous")
    tokenizer = train_caption_tokenizer(TEXTS * 4, folder / "captions.model", vocab_size=60)
    text = LearnedTextEncoder.from_tokenizer_file(tokenizer.path, dim=32, layers=1, heads=2)
    codec = Codec(codec_config("tiny"))
    codec.train()
    codec(torch.randn(2, 1, 6400))  # k-means initialisation of the codebooks
    lm = MusicLM(lm_config("tiny", text_dim=32))
    with torch.no_grad():
        for head in lm.heads:  # sharper logits, as a trained model has: choices far from ties
            head.weight.mul_(8.0)
    return Generator(lm, text, codec.eval())


def _clips(durations):  # frames at 50 per second: 0.1 s = 5 frames
    return [ClipRequest(TEXTS[i % len(TEXTS)], duration, seed=100 + i) for i, duration in enumerate(durations)]


def _alone(generator, clip, sampling):
    return generator.generate_codes([clip.text], clip.duration, sampling, seed=clip.seed)[0]


SAMPLINGS = {
    "greedy-guided": Sampling(guidance_scale=3.0, temperature=0.0),
    "sampled-guided": Sampling(guidance_scale=3.0, top_k=20),
    "sampled-top-p": Sampling(guidance_scale=3.0, top_k=0, top_p=0.9),
    "greedy-unguided": Sampling(guidance_scale=None, temperature=0.0),
    "sampled-unguided": Sampling(guidance_scale=None, top_k=50),
}


@pytest.mark.parametrize("name", list(SAMPLINGS))
def test_each_clip_equals_its_prompt_generated_alone(generator, name):
    sampling = SAMPLINGS[name]
    clips = _clips([0.3, 0.1, 0.24, 0.06, 0.16, 0.1, 0.2])  # mixed: rows finish and are refilled at odd steps
    finished = list(decode_continuously(generator, clips, sampling, rows=3))
    assert sorted(index for index, _ in finished) == list(range(len(clips)))
    assert [index for index, _ in finished] != list(range(len(clips)))  # short clips overtook long ones
    for index, codes in finished:
        expected = _alone(generator, clips[index], sampling)
        assert codes.shape == expected.shape == (4, round(clips[index].duration * 50))
        assert torch.equal(codes, expected), index
    if sampling.temperature > 0:  # the noise is each clip's own: same text and duration, another seed differs
        other = dataclasses.replace(clips[0], seed=7)
        assert not torch.equal(finished[[i for i, _ in finished].index(0)][1], _alone(generator, other, sampling))


def test_more_rows_than_clips(generator):
    sampling = SAMPLINGS["sampled-guided"]
    clips = _clips([0.12, 0.04])
    finished = dict(decode_continuously(generator, clips, sampling, rows=8))
    for index, clip in enumerate(clips):
        assert torch.equal(finished[index], _alone(generator, clip, sampling))


def test_a_clip_does_not_depend_on_its_neighbours(generator):
    sampling = SAMPLINGS["sampled-guided"]
    clips = _clips([0.2, 0.1, 0.14, 0.08])
    together = dict(decode_continuously(generator, clips, sampling, rows=2))
    reordered = dict(decode_continuously(generator, clips[::-1], sampling, rows=3))
    for index in range(len(clips)):
        assert torch.equal(together[index], reordered[len(clips) - 1 - index])


def test_clips_beyond_the_context_are_generated_in_windows(generator):
    lm = MusicLM(dataclasses.replace(generator.lm.cfg, context_frames=8))
    lm.load_state_dict(generator.lm.state_dict())
    windowed = Generator(lm, generator.text, generator.codec)
    sampling = SAMPLINGS["sampled-guided"]
    clips = _clips([0.3, 0.1, 0.16])  # 15 frames: two windows; 5 and 8 frames: batched
    finished = dict(decode_continuously(windowed, clips, sampling, rows=2))
    for index, clip in enumerate(clips):
        assert torch.equal(finished[index], _alone(windowed, clip, sampling))


def test_bad_requests_are_refused(generator):
    with pytest.raises(ValueError, match="rows must be an integer >= 1, got 0"):
        list(decode_continuously(generator, _clips([0.1]), Sampling(), rows=0))
    with pytest.raises(ValueError, match=r"clip 1: duration must be a finite number > 0 and <= 3600, got -1"):
        list(decode_continuously(generator, _clips([0.1, -1.0]), Sampling()))
