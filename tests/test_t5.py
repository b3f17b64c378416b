"""Our T5 encoder, weight loading and tokenizer against transformers (random weights, built offline)."""

from __future__ import annotations

import io
import json
import random
import shutil
import sys
from collections.abc import Mapping

import pytest
import safetensors.torch
import sentencepiece
import torch
import transformers

from mmdgen.model.text.t5 import (
    T5Config,
    T5Encoder,
    T5Tokenizer,
    load_t5_weights,
    relative_position_buckets,
)

# t5-base widths (MusicGen's text encoder), 2 layers and a small vocabulary to stay fast
BASE_WIDTHS = dict(d_model=768, d_kv=64, num_heads=12, d_ff=3072, num_layers=2, vocab_size=320)
SMALL_WIDTHS = dict(d_model=32, d_kv=8, num_heads=3, d_ff=48, num_layers=2, vocab_size=50)
# fp32: the output is RMS-normalised (unit scale times weights near 1), so an absolute 1e-5 is 1e-5 relative to
# the output's scale; element-wise relative error is meaningless for entries near zero. Found: <= 2.2e-6 abs
# against transformers' eager attention (ours runs SDPA, so the float reductions differ).
FP32_TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def hf_t5_encoder(feed_forward_proj: str, seed: int, **widths):
    """transformers' T5EncoderModel (eager attention: the plain maths as reference), weights made to matter.

    transformers initialises every layer norm to exactly 1 and the relative position bias small; those are
    redrawn so that a wrong norm weight or bias lookup would show.
    """
    config = transformers.T5Config(feed_forward_proj=feed_forward_proj, attn_implementation="eager", **widths)
    torch.manual_seed(seed)
    model = transformers.T5EncoderModel(config).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "layer_norm" in name:
                parameter.copy_(1 + 0.2 * torch.randn(parameter.shape, generator=generator))
            elif "relative_attention_bias" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return model


def padded_batch(lengths: list[int], vocab_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids ending in </s> (1), padded with 0, as the tokenizer gives them."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.int64)
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.bool)
    for row, length in enumerate(lengths):
        ids[row, : length - 1] = torch.randint(3, vocab_size, (length - 1,), generator=generator)
        ids[row, length - 1] = 1
        mask[row, :length] = True
    return ids, mask


def reference_states(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask.long()).last_hidden_state


def ours_from(model) -> T5Encoder:
    encoder = T5Encoder(T5Config.from_dict(model.config.to_dict(), "test model")).eval()
    load_t5_weights(encoder, model.state_dict(), "test state dict")
    return encoder


class SafetensorsMapping(Mapping):
    """A lazy name -> tensor view of an open safetensors file that counts the reads of each tensor."""

    def __init__(self, handle):
        self.handle = handle
        self.reads: dict[str, int] = {}

    def __getitem__(self, key: str) -> torch.Tensor:
        self.reads[key] = self.reads.get(key, 0) + 1
        return self.handle.get_tensor(key)

    def __iter__(self):
        return iter(self.handle.keys())

    def __len__(self) -> int:
        return len(self.handle.keys())


def load_from_file(encoder: T5Encoder, path, prefix: str = "") -> SafetensorsMapping:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        tensors = SafetensorsMapping(handle)
        load_t5_weights(encoder, tensors, str(path), prefix)
    return tensors


@pytest.fixture(scope="module", params=["relu", "gated-gelu"])
def base_model(request):
    return hf_t5_encoder(request.param, seed=0, **BASE_WIDTHS)


@pytest.fixture(scope="module")
def small_model():
    return hf_t5_encoder("relu", seed=3, **SMALL_WIDTHS)


# ------------------------------------------------------------------ encoder vs transformers


@pytest.mark.parametrize(("buckets", "max_distance"), [(32, 128), (16, 40), (4, 3)])
def test_relative_position_buckets_match_transformers(buckets, max_distance):
    from transformers.models.t5.modeling_t5 import T5Attention

    length = 300  # offsets past max_distance on both sides
    positions = torch.arange(length)
    expected = T5Attention._relative_position_bucket(
        positions[None, :] - positions[:, None], bidirectional=True, num_buckets=buckets, max_distance=max_distance
    )
    ours = relative_position_buckets(length, buckets, max_distance)
    assert torch.equal(ours, expected)
    assert int(ours.min()) == 0 and int(ours.max()) == buckets - 1


def test_encoder_matches_transformers_fp32(base_model):
    ids, mask = padded_batch([45, 17, 2], BASE_WIDTHS["vocab_size"], seed=5)
    expected = reference_states(base_model, ids, mask)
    with torch.no_grad():
        states = ours_from(base_model)(ids, mask)
    assert states.shape == (3, 45, 768) and states.dtype == torch.float32
    # every position, padded ones included: both compute those rows the same way
    torch.testing.assert_close(states, expected, **FP32_TOLERANCE)


def test_encoder_bf16_close_to_fp32_reference(base_model):
    """bf16 weights and activations (RMS statistics in fp32): about 1% mean error after two layers, as
    transformers' own bf16 run; found 0.011 max and 0.0055-0.0065 mean absolute error per unit of the
    reference's largest and mean magnitude, within 1.0x-1.05x of transformers' bf16 errors."""
    ids, mask = padded_batch([45, 17, 2], BASE_WIDTHS["vocab_size"], seed=5)
    expected = reference_states(base_model, ids, mask)
    encoder = ours_from(base_model).to(torch.bfloat16)
    with torch.no_grad():
        states = encoder(ids, mask)
    assert states.dtype == torch.bfloat16
    error = (states.float() - expected).abs()
    assert float(error.max()) <= 0.04 * float(expected.abs().max())
    assert float(error.mean()) <= 0.02 * float(expected.abs().mean())

    theirs = hf_t5_encoder(base_model.config.feed_forward_proj, seed=0, **BASE_WIDTHS).to(torch.bfloat16)
    their_error = (reference_states(theirs, ids, mask).float() - expected).abs()
    assert float(error.mean()) <= 1.25 * float(their_error.mean())


def test_rms_norm_in_bf16_takes_its_statistics_in_fp32():
    """With fp32 statistics a bf16 output is two bf16 roundings (the normalised value, its product with the
    weight) off the exact result: at most 2 * 2^-8 relative. Statistics or the scaling in bf16 add a third
    (found: 0.0070 here, 0.012 with statistics and scaling in bf16)."""
    from mmdgen.model.text.t5 import T5RMSNorm

    generator = torch.Generator().manual_seed(0)
    x = (300 * torch.randn(4, 7, 768, generator=generator)).to(torch.bfloat16)
    norm = T5RMSNorm(768, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.2 * torch.randn(768, generator=generator))
    norm = norm.to(torch.bfloat16)
    with torch.no_grad():
        out = norm(x)
    x64 = x.double()
    exact = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight.detach().double()
    assert out.dtype == torch.bfloat16
    assert float(((out.double() - exact).abs() / exact.abs()).max()) <= 2 * 2**-8


def test_forward_rejects_bad_inputs(small_model):
    encoder = ours_from(small_model)
    ids, mask = padded_batch([4, 2], SMALL_WIDTHS["vocab_size"], seed=0)
    with pytest.raises(ValueError, match=r"ids has shape \(2, 4\) and dtype torch.int32, expected \[B, L\] int64"):
        encoder(ids.int(), mask)
    with pytest.raises(ValueError, match=r"mask has shape \(2, 3\) .* expected \(2, 4\) bool"):
        encoder(ids, mask[:, :3])
    with pytest.raises(ValueError, match=r"mask .* dtype torch.int64"):
        encoder(ids, mask.long())
    ids[1, 0] = SMALL_WIDTHS["vocab_size"]
    with pytest.raises(ValueError, match=r"ids hold values in \[0, 50\], expected \[0, 50\)"):
        encoder(ids, mask)


# ------------------------------------------------------------------ loading from files


def test_loads_a_save_pretrained_folder(base_model, tmp_path):
    base_model.save_pretrained(tmp_path)
    config = T5Config.from_dict(json.loads((tmp_path / "config.json").read_text()), str(tmp_path / "config.json"))
    encoder = T5Encoder(config).eval()
    reads = load_from_file(encoder, tmp_path / "model.safetensors").reads
    assert set(reads.values()) == {1}  # each tensor read once, straight into the module

    ids, mask = padded_batch([30, 9, 1], BASE_WIDTHS["vocab_size"], seed=6)
    with torch.no_grad():
        states = encoder(ids, mask)
    torch.testing.assert_close(states, reference_states(base_model, ids, mask), **FP32_TOLERANCE)


def test_loads_a_musicgen_checkpoint_below_its_prefix(small_model, tmp_path):
    """A MusicGen model.safetensors holds the T5 encoder under text_encoder. beside the LM and codec."""
    path = tmp_path / "model.safetensors"
    # clone: transformers' state dict holds the tied embedding twice, which save_file refuses as shared memory
    tensors = {f"text_encoder.{name}": tensor.clone() for name, tensor in small_model.state_dict().items()}
    tensors["decoder.model.decoder.layers.0.self_attn.q_proj.weight"] = torch.ones(4, 4)
    tensors["audio_encoder.quantizer.layers.0.codebook.embed"] = torch.ones(8, 4)
    tensors["enc_to_dec_proj.weight"] = torch.ones(4, SMALL_WIDTHS["d_model"])
    safetensors.torch.save_file(tensors, str(path))
    musicgen_config = {"model_type": "musicgen", "text_encoder": small_model.config.to_dict(),
                       "decoder": {"model_type": "musicgen_decoder"}}
    encoder = T5Encoder(T5Config.from_dict(musicgen_config, "musicgen config.json")).eval()
    load_from_file(encoder, path, prefix="text_encoder.")

    # long enough for the offsets past max_distance (128), which share the last buckets
    ids, mask = padded_batch([150, 40], SMALL_WIDTHS["vocab_size"], seed=7)
    with torch.no_grad():
        states = encoder(ids, mask)
        direct = ours_from(small_model)(ids, mask)
    assert torch.equal(states, direct)  # same weights, same ops
    torch.testing.assert_close(states, reference_states(small_model, ids, mask), **FP32_TOLERANCE)


def test_full_t5_file_skips_the_decoder(tmp_path):
    config = transformers.T5Config(attn_implementation="eager", num_decoder_layers=1, **SMALL_WIDTHS)
    torch.manual_seed(4)
    model = transformers.T5ForConditionalGeneration(config).eval()
    model.save_pretrained(tmp_path)
    encoder = T5Encoder(T5Config.from_dict(json.loads((tmp_path / "config.json").read_text()), "t5 config"))
    load_from_file(encoder, tmp_path / "model.safetensors")

    ids, mask = padded_batch([6, 3], SMALL_WIDTHS["vocab_size"], seed=8)
    with torch.no_grad():
        states = encoder(ids, mask)
    torch.testing.assert_close(states, reference_states(model.get_encoder(), ids, mask), **FP32_TOLERANCE)


def test_embedding_from_its_tied_copy(small_model):
    tensors = dict(small_model.state_dict())
    del tensors["shared.weight"]
    encoder = T5Encoder(T5Config.from_dict(small_model.config.to_dict(), "config"))
    load_t5_weights(encoder, tensors, "tied.safetensors")
    assert torch.equal(encoder.token_embedding.weight, tensors["encoder.embed_tokens.weight"])


def test_loads_into_bf16(small_model):
    encoder = T5Encoder(T5Config.from_dict(small_model.config.to_dict(), "config")).to(torch.bfloat16)
    load_t5_weights(encoder, small_model.state_dict(), "fp32 file")
    query = small_model.state_dict()["encoder.block.1.layer.0.SelfAttention.q.weight"]
    assert encoder.layers[1].query.weight.dtype == torch.bfloat16
    assert torch.equal(encoder.layers[1].query.weight, query.to(torch.bfloat16))


@pytest.fixture
def small_tensors(small_model):
    return {f"text_encoder.{name}": tensor for name, tensor in small_model.state_dict().items()}


def small_encoder(small_model) -> T5Encoder:
    return T5Encoder(T5Config.from_dict(small_model.config.to_dict(), "config"))


def test_load_error_missing_tensor(small_model, small_tensors):
    del small_tensors["text_encoder.encoder.block.1.layer.1.DenseReluDense.wo.weight"]
    with pytest.raises(ValueError, match=r"ckpt\.safetensors: tensor 'text_encoder\.encoder\.block\.1\.layer\.1\."
                                         r"DenseReluDense\.wo\.weight' is missing"):
        load_t5_weights(small_encoder(small_model), small_tensors, "ckpt.safetensors", "text_encoder.")


def test_load_error_missing_embedding_names_both(small_model, small_tensors):
    del small_tensors["text_encoder.shared.weight"], small_tensors["text_encoder.encoder.embed_tokens.weight"]
    with pytest.raises(ValueError, match=r"ckpt\.safetensors: tensor 'text_encoder\.shared\.weight' or "
                                         r"'text_encoder\.encoder\.embed_tokens\.weight' is missing"):
        load_t5_weights(small_encoder(small_model), small_tensors, "ckpt.safetensors", "text_encoder.")


def test_load_error_wrong_shape(small_model, small_tensors):
    small_tensors["text_encoder.encoder.block.0.layer.0.SelfAttention.k.weight"] = torch.zeros(24, 30)
    with pytest.raises(ValueError, match=r"ckpt\.safetensors: tensor 'text_encoder\.encoder\.block\.0\.layer\.0\."
                                         r"SelfAttention\.k\.weight' has shape \(24, 30\), expected \(24, 32\)"):
        load_t5_weights(small_encoder(small_model), small_tensors, "ckpt.safetensors", "text_encoder.")


def test_load_error_unexpected_tensor(small_model, small_tensors):
    # a per-layer relative bias (as umT5 has): a T5 encoder only has block 0's, so it would be ignored
    small_tensors["text_encoder.encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"] = (
        torch.zeros(32, 3))
    with pytest.raises(ValueError, match=r"ckpt\.safetensors: unexpected tensor 'text_encoder\.encoder\.block\.1\."
                                         r"layer\.0\.SelfAttention\.relative_attention_bias\.weight'"):
        load_t5_weights(small_encoder(small_model), small_tensors, "ckpt.safetensors", "text_encoder.")


def test_load_error_gated_weights_into_relu_encoder(small_model, small_tensors):
    small_tensors["text_encoder.encoder.block.0.layer.1.DenseReluDense.wi_0.weight"] = torch.zeros(48, 32)
    with pytest.raises(ValueError, match=r"unexpected tensor .*wi_0\.weight'.* relu FFN"):
        load_t5_weights(small_encoder(small_model), small_tensors, "ckpt.safetensors", "text_encoder.")


def test_load_error_wrong_prefix(small_model, small_tensors):
    with pytest.raises(ValueError, match=r"ckpt\.safetensors: no tensor name starts with 'text_model\.'"):
        load_t5_weights(small_encoder(small_model), small_tensors, "ckpt.safetensors", "text_model.")


# ------------------------------------------------------------------ config


def test_config_from_a_published_style_t5_base_config():
    # the fields of the published t5-base config.json: no feed_forward_proj, no relative_attention_max_distance
    raw = {"architectures": ["T5ForConditionalGeneration"], "d_ff": 3072, "d_kv": 64, "d_model": 768,
           "decoder_start_token_id": 0, "dropout_rate": 0.1, "eos_token_id": 1, "initializer_factor": 1.0,
           "is_encoder_decoder": True, "layer_norm_epsilon": 1e-06, "model_type": "t5", "n_positions": 512,
           "num_heads": 12, "num_layers": 12, "output_past": True, "pad_token_id": 0,
           "relative_attention_num_buckets": 32, "vocab_size": 32128}
    assert T5Config.from_dict(raw, "t5-base/config.json") == T5Config()


def test_config_reads_transformers_gated_gelu():
    raw = transformers.T5Config(feed_forward_proj="gated-gelu", **SMALL_WIDTHS).to_dict()
    config = T5Config.from_dict(raw, "flan config.json")
    assert config.gated and config.d_ff == 48 and config.num_heads == 3


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"d_model": None}, r"t5\.json: field\(s\) d_model missing"),
        ({"is_decoder": True}, r"t5\.json: is_decoder is true"),
        ({"model_type": "bert"}, r"t5\.json: model_type is 'bert', expected 't5'"),
        ({"feed_forward_proj": "gated-silu"}, r"t5\.json: feed_forward_proj is 'gated-silu', expected one of relu"),
        ({"is_gated_act": True}, r"t5\.json: is_gated_act is True but feed_forward_proj is 'relu'"),
        ({"dense_act_fn": "gelu"}, r"t5\.json: dense_act_fn is 'gelu' with feed_forward_proj 'relu'"),
        ({"num_heads": 0}, r"t5\.json: T5Config\.num_heads is 0, expected an integer >= 1"),
        ({"relative_attention_num_buckets": 33}, r"t5\.json: .*num_buckets is 33, expected an even integer"),
    ],
)
def test_config_errors_name_the_source_and_field(change, message):
    raw = transformers.T5Config(**SMALL_WIDTHS).to_dict()
    for key, value in change.items():
        if value is None:
            del raw[key]
        else:
            raw[key] = value
    with pytest.raises(ValueError, match=message):
        T5Config.from_dict(raw, "t5.json")


# ------------------------------------------------------------------ tokenizer

WORDS = ["calm", "piano", "ballad", "upbeat", "electronic", "dance", "track", "with", "drums", "bass", "guitar",
         "violin", "in", "the", "style", "of", "Dvořák", "jazz", "café", "120", "bpm", "minor", "major", "key",
         "slow", "fast", "strings", "orchestral", "lo-fi", "hip-hop", "Chopin", "nocturne", "Beethoven"]
CAPTIONS = [
    "calm piano ballad",
    "  Upbeat   electronic DANCE track, 128 bpm!  ",
    "a café tune in the style of Dvořák",
    "Jazz trio: piano, bass & drums (slow swing), 96 BPM.",
    "",
    "x",
    "Ωmega strings ☃",  # characters the model never saw: unknown pieces
    "lo-fi hip-hop beat with\ttabs and\nnewlines",
]


@pytest.fixture(scope="module")
def spiece_model(tmp_path_factory):
    """A small unigram sentencepiece model with T5's special ids (pad 0, </s> 1, unk 2, no <s>)."""
    rng = random.Random(0)
    captions = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) + rng.choice([".", "!", ",", ""])
                for _ in range(60)]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(captions), model_writer=model, vocab_size=200, hard_vocab_limit=False,
        model_type="unigram", character_coverage=1.0, num_threads=1, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        minloglevel=2)
    path = tmp_path_factory.mktemp("spiece") / "spiece.model"
    path.write_bytes(model.getvalue())
    return path


@pytest.fixture(scope="module")
def hf_tokenizers(spiece_model, tmp_path_factory):
    """transformers' T5Tokenizer and T5TokenizerFast built from the sentencepiece model (the two are one class
    from transformers 5 on; reading the .model needs protobuf), and a save_pretrained folder of the first
    (tokenizer.json only)."""
    source = spiece_model.parent
    slow = transformers.T5Tokenizer.from_pretrained(source)
    fast = transformers.T5TokenizerFast.from_pretrained(source)
    saved = tmp_path_factory.mktemp("hf_tokenizer")
    slow.save_pretrained(saved)
    assert (saved / "tokenizer.json").is_file() and not (saved / "spiece.model").exists()
    return slow, fast, saved


def expected_ids(tokenizer, captions, max_length=512):
    batch = tokenizer(captions, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"].bool()


def assert_same_encoding(ours: T5Tokenizer, hf_tokenizers, captions, max_length=512):
    ids, mask = ours.encode(captions, max_length=max_length)
    assert ids.dtype == torch.int64 and mask.dtype == torch.bool
    for reference in hf_tokenizers[:2]:
        expected, expected_mask = expected_ids(reference, captions, max_length)
        assert torch.equal(ids, expected)
        assert torch.equal(mask, expected_mask)


def test_tokenizer_json_matches_transformers(hf_tokenizers):
    ours = T5Tokenizer.from_folder(hf_tokenizers[2])
    assert ours.path.name == "tokenizer.json"
    assert_same_encoding(ours, hf_tokenizers, CAPTIONS)
    assert_same_encoding(ours, hf_tokenizers, CAPTIONS, max_length=4)
    # the reference really splits words into several pieces and pads (not a degenerate tokenizer)
    ids, mask = ours.encode(["café tune", "calm"])
    assert ids.shape[1] > 3 and not mask[1].all() and set(ids[0].tolist()).isdisjoint({0, 2})


def test_spiece_model_matches_transformers(hf_tokenizers, spiece_model, tmp_path):
    shutil.copy(spiece_model, tmp_path / "spiece.model")
    ours = T5Tokenizer.from_folder(tmp_path)
    assert ours.path.name == "spiece.model"
    assert_same_encoding(ours, hf_tokenizers, CAPTIONS)
    assert_same_encoding(ours, hf_tokenizers, CAPTIONS, max_length=1)


def test_prefers_tokenizer_json_and_falls_back_without_tokenizers(hf_tokenizers, spiece_model, tmp_path, monkeypatch):
    shutil.copy(hf_tokenizers[2] / "tokenizer.json", tmp_path / "tokenizer.json")
    shutil.copy(spiece_model, tmp_path / "spiece.model")
    assert T5Tokenizer.from_folder(tmp_path).path.name == "tokenizer.json"
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` fail
    fallback = T5Tokenizer.from_folder(tmp_path)
    assert fallback.path.name == "spiece.model"
    assert_same_encoding(fallback, hf_tokenizers, CAPTIONS)


def test_tokenizer_errors(spiece_model, tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        T5Tokenizer.from_folder(tmp_path / "no_such_folder")
    with pytest.raises(FileNotFoundError, match="holds neither tokenizer.json nor spiece.model"):
        T5Tokenizer.from_folder(tmp_path)
    (tmp_path / "spiece.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match=r"spiece\.model is not a sentencepiece model file"):
        T5Tokenizer.from_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer\.json is not a tokenizers JSON file"):
        T5Tokenizer.from_folder(tmp_path)
    tokenizer = T5Tokenizer.from_folder(spiece_model.parent)
    with pytest.raises(ValueError, match=r"captions\[1\] is NoneType, expected str"):
        tokenizer.encode(["calm", None])
    with pytest.raises(ValueError, match="max_length is 0, expected >= 1"):
        tokenizer.encode(["calm"], max_length=0)


def test_rejects_a_sentencepiece_model_without_t5_ids(tmp_path):
    model = io.BytesIO()
    # the project's caption tokenizer convention: pad 0, unk 1, no </s>
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(WORDS * 3), model_writer=model, vocab_size=60, hard_vocab_limit=False,
        num_threads=1, pad_id=0, unk_id=1, bos_id=-1, eos_id=-1, minloglevel=2)
    (tmp_path / "spiece.model").write_bytes(model.getvalue())
    with pytest.raises(ValueError, match=r"spiece\.model: pad id 0 and </s> id -1, expected 0 and 1"):
        T5Tokenizer.from_folder(tmp_path)
