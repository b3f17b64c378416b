"""The music LM: equal to transformers' MusicGen decoder after conversion, causal, cached decoding equal to
the full pass, bad input refused."""

import pytest
import transformers
import torch

from mmdgen.model.convert import lm_from_transformers
from mmdgen.model.lm import LMConfig, MusicLM, lm_config, sinusoidal_positions




def _decoder_config(**overrides):
    base = dict(vocab_size=30, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=48,
                num_codebooks=3, max_position_embeddings=64, pad_token_id=30, bos_token_id=30)
    return transformers.MusicgenDecoderConfig(**{**base, **overrides})


def _inputs(batch=2, steps=9, text=5, width=32, vocab=30, codebooks=3):
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab + 1, (batch, codebooks, steps), generator=generator)  # special token included
    states = torch.randn(batch, text, width, generator=generator)
    mask = torch.ones(batch, text, dtype=torch.bool)
    mask[1, 3:] = False
    return tokens, states * mask[..., None], mask


def test_converted_causal_lm_gives_transformers_logits():
    torch.manual_seed(0)
    theirs = transformers.MusicgenForCausalLM(_decoder_config()).eval()
    ours = lm_from_transformers(theirs)
    tokens, states, mask = _inputs()
    with torch.no_grad():
        expected = theirs(input_ids=tokens.reshape(-1, tokens.shape[-1]), encoder_hidden_states=states,
                          encoder_attention_mask=mask.long()).logits.reshape(2, 3, 9, 30)
        got = ours(tokens, states, mask)
    assert got.shape == (2, 3, 9, 30)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)  # same maths, fp32 rounding only


def test_converted_conditional_generation_projects_the_text_states():
    torch.manual_seed(0)
    text = transformers.T5Config(vocab_size=40, d_model=24, d_ff=32, num_layers=1, num_heads=2, d_kv=12)
    audio = transformers.EncodecConfig(target_bandwidths=[1.5], num_filters=4, upsampling_ratios=[4, 2],
                                       codebook_size=32, hidden_size=8)
    config = transformers.MusicgenConfig(text_encoder=text.to_dict(), audio_encoder=audio.to_dict(),
                                         decoder=_decoder_config().to_dict())
    theirs = transformers.MusicgenForConditionalGeneration(config).eval()
    ours = lm_from_transformers(theirs)
    assert ours.cfg.text_dim == 24 and ours.cfg.dim == 32
    tokens, states, mask = _inputs(width=24)
    with torch.no_grad():
        projected = theirs.enc_to_dec_proj(states) * mask[..., None]
        expected = theirs.decoder(input_ids=tokens.reshape(-1, 9), encoder_hidden_states=projected,
                                  encoder_attention_mask=mask.long()).logits.reshape(2, 3, 9, 30)
        got = ours(tokens, states, mask)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_unsupported_transformers_configs_are_refused():
    with pytest.raises(ValueError, match="scale_embedding"):
        lm_from_transformers(transformers.MusicgenForCausalLM(_decoder_config(scale_embedding=True)))


def test_steps_do_not_see_the_future():
    torch.manual_seed(0)
    lm = MusicLM(lm_config("tiny", layers=2)).eval()
    tokens = torch.randint(0, 257, (1, 4, 12))
    states, mask = torch.randn(1, 3, 64), torch.ones(1, 3, dtype=torch.bool)
    changed = tokens.clone()
    changed[..., 7:] = torch.randint(0, 257, (1, 4, 5))
    with torch.no_grad():
        a, b = lm(tokens, states, mask), lm(changed, states, mask)
    assert torch.allclose(a[..., :7, :], b[..., :7, :], atol=1e-6)
    assert not torch.allclose(a[..., 7:, :], b[..., 7:, :], atol=1e-3)


def test_cached_step_by_step_decoding_equals_the_full_pass():
    torch.manual_seed(0)
    lm = MusicLM(lm_config("tiny")).eval()
    tokens = torch.randint(0, 257, (2, 4, 10))
    states, mask = torch.randn(2, 5, 64), torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        full = lm(tokens, states, mask)
        caches, memory = lm.new_caches(2, 16), lm.cross_memory(states, mask)
        prefix = lm.step(tokens[..., :4], 0, caches, memory)
        steps = [lm.step(tokens[..., s:s + 1], s, caches, memory) for s in range(4, 10)]
    assert torch.allclose(torch.cat([prefix, *steps], dim=2), full, atol=1e-5)


def test_a_fully_padded_text_position_changes_nothing():
    torch.manual_seed(0)
    lm = MusicLM(lm_config("tiny")).eval()
    tokens = torch.randint(0, 257, (1, 4, 6))
    states = torch.randn(1, 3, 64)
    padded_states = torch.cat([states, torch.randn(1, 2, 64)], dim=1)
    padded_mask = torch.tensor([[1, 1, 1, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        assert torch.allclose(lm(tokens, states, torch.ones(1, 3, dtype=torch.bool)),
                              lm(tokens, padded_states, padded_mask), atol=1e-6)


def test_positions_follow_tensor2tensor_cos_then_sin():
    table = sinusoidal_positions(torch.arange(5), 8)
    rates = torch.exp(-torch.arange(4.0) * torch.log(torch.tensor(10000.0)) / 3)
    assert torch.allclose(table[3], torch.cat([torch.cos(3 * rates), torch.sin(3 * rates)]), atol=1e-6)
    assert sinusoidal_positions(torch.arange(2), 7).shape == (2, 7)


def test_bad_input_is_refused():
    lm = MusicLM(lm_config("tiny"))
    states, mask = torch.randn(1, 3, 64), torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"expected tokens \[B, 4, S\]"):
        lm(torch.zeros(1, 3, 5, dtype=torch.long), states, mask)
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, 256\].*257"):
        lm(torch.full((1, 4, 5), 257), states, mask)
    with pytest.raises(ValueError, match=r"text states \[B, L, 64\]"):
        lm(torch.zeros(1, 4, 5, dtype=torch.long), torch.randn(1, 3, 32), mask)
    with pytest.raises(ValueError, match="multiple of heads"):
        LMConfig(dim=30, heads=4)
    with pytest.raises(ValueError, match="pattern must be one of parallel, delay, flatten, valle, got 'zigzag'"):
        LMConfig(pattern="zigzag")
    with pytest.raises(ValueError, match="unknown LM preset"):
        lm_config("huge")


def test_a_null_condition_adds_nothing_even_through_the_biased_text_projection():
    """An all-False mask means "no text": the output equals a model whose cross-attention is removed."""
    torch.manual_seed(0)
    lm = MusicLM(lm_config("tiny", text_dim=24)).eval()  # 24 != 64: a Linear with bias projects the text
    tokens = torch.randint(0, 257, (2, 4, 6))
    null_states, null_mask = torch.zeros(2, 3, 24), torch.zeros(2, 3, dtype=torch.bool)
    with torch.no_grad():
        got = lm(tokens, null_states, null_mask)
        for layer in lm.layers:
            layer.cross_attn.out_proj.weight.zero_()
        assert torch.isfinite(got).all()
        assert torch.allclose(got, lm(tokens, torch.randn(2, 3, 24), torch.ones(2, 3, dtype=torch.bool)), atol=1e-6)
