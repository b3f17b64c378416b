"""The SEANet codec: shapes, padding, presets, and equality with transformers' EncodecModel."""

import pytest
import torch

from mmdgen.model.codec import Codec, CodecConfig, codec_config
from mmdgen.model.convert import codec_from_transformers, codec_to_transformers
from mmdgen.model.quantizer import QuantizerConfig


def _small(**overrides):
    cfg = dict(num_filters=4, ratios=(4, 2), dimension=8, lstm_layers=1,
               quantizer=QuantizerConfig(dim=8, codebook_size=16, num_codebooks=3, kmeans_init=False))
    cfg.update(overrides)
    return CodecConfig(**cfg)


@pytest.mark.parametrize("causal", [False, True], ids=["non-causal", "causal"])
@pytest.mark.parametrize("length", [1, 7, 8, 64, 101])
def test_shapes_cover_every_sample(causal, length):
    torch.manual_seed(0)
    codec = Codec(_small(causal=causal, pad_mode="constant" if causal else "reflect")).eval()
    audio = torch.randn(2, 1, length)
    out = codec(audio)
    frames = -(-length // codec.cfg.hop_length)
    assert out.latents.shape == (2, 8, frames)
    assert out.quantizer.codes.shape == (2, 3, frames)
    assert out.audio.shape == (2, 1, length)
    assert codec.decode(codec.encode(audio)).shape == (2, 1, frames * codec.cfg.hop_length)


def test_causal_encoder_does_not_look_ahead():
    torch.manual_seed(0)
    codec = Codec(_small(causal=True, pad_mode="constant")).eval()
    audio = torch.randn(1, 1, 64)
    changed = audio.clone()
    changed[..., 40:] += 1.0
    a, b = codec.encoder(audio), codec.encoder(changed)
    hop = codec.cfg.hop_length
    assert torch.allclose(a[..., : 40 // hop], b[..., : 40 // hop], atol=1e-6)
    assert not torch.allclose(a[..., 40 // hop + 1:], b[..., 40 // hop + 1:])


def test_presets():
    tiny, paper = codec_config("tiny"), codec_config("paper")
    assert paper.hop_length == 640 and paper.frame_rate == 50
    assert (paper.quantizer.num_codebooks, paper.quantizer.codebook_size, paper.dimension) == (4, 2048, 128)
    assert tiny.frame_rate == 50
    with pytest.raises(ValueError, match="unknown codec preset"):
        codec_config("huge")
    with pytest.raises(ValueError, match="quantizer.dim"):
        CodecConfig(dimension=16)


def _random_transformers_encodec(**overrides):
    from transformers import EncodecConfig, EncodecModel

    torch.manual_seed(0)
    kwargs = dict(target_bandwidths=[3 * 25 * 4 / 1000], sampling_rate=200, audio_channels=1, hidden_size=8,
                  num_filters=4, upsampling_ratios=[4, 2], num_lstm_layers=1, codebook_size=16,
                  use_causal_conv=False, pad_mode="reflect", use_conv_shortcut=True)
    kwargs.update(overrides)
    model = EncodecModel(EncodecConfig(**kwargs)).eval()
    with torch.no_grad():
        for layer in model.quantizer.layers:  # transformers initialises codebooks to zero
            layer.codebook.embed.copy_(torch.randn_like(layer.codebook.embed))
    return model


@pytest.mark.parametrize("overrides", [{}, {"use_causal_conv": True, "pad_mode": "constant",
                                            "use_conv_shortcut": False}], ids=["non-causal", "causal"])
def test_same_codes_and_audio_as_transformers(overrides):
    theirs = _random_transformers_encodec(**overrides)
    assert theirs.config.num_quantizers == 3
    ours = codec_from_transformers(theirs).eval()
    audio = torch.randn(2, 1, 77)
    with torch.no_grad():
        their_codes = theirs.encode(audio, bandwidth=theirs.config.target_bandwidths[-1]).audio_codes[0]
        their_audio = theirs.decode(their_codes[None], [None]).audio_values
    codes = ours.encode(audio)
    assert torch.equal(codes, their_codes)
    # same operations in the same order: equal up to float32 rounding
    assert torch.allclose(ours.decode(codes), their_audio, atol=1e-5, rtol=1e-4)


def test_round_trip_to_transformers():
    torch.manual_seed(1)
    ours = Codec(_small(conv_shortcut=True)).eval()
    theirs = codec_to_transformers(ours)
    back = codec_from_transformers(theirs)
    for (k, a), (_, b) in zip(sorted(ours.state_dict().items()), sorted(back.state_dict().items())):
        assert torch.equal(a, b), k
    audio = torch.randn(1, 1, 50)
    with torch.no_grad():
        their_codes = theirs.encode(audio, bandwidth=theirs.config.target_bandwidths[-1]).audio_codes[0]
    assert torch.equal(ours.encode(audio), their_codes)


def test_unsupported_transformers_features_are_named():
    model = _random_transformers_encodec(normalize=True)
    with pytest.raises(ValueError, match="normalize=True"):
        codec_from_transformers(model)
