"""The learned text encoder: a small bidirectional transformer over the sentencepiece caption tokenizer, trained
together with the LM (the corpus captions are template text with a few hundred distinct words, so a small
encoder learned from scratch is enough there).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mmdgen.model.text.conditioning import TextConditioner, TextConditioning
from mmdgen.model.text.tokenizer import CaptionTokenizer
from mmdgen.validation import check_fields, option


@dataclass
class LearnedTextEncoderConfig:
    vocab_size: int = option(help="the tokenizer's pieces", at_least=1)
    dim: int = option(256, "the encoder's width", at_least=1)
    layers: int = option(4, "transformer layers", at_least=1)
    heads: int = option(4, "attention heads", at_least=1)
    max_length: int = option(64, "captions are truncated to this many pieces", at_least=1)
    dropout: float = option(0.0, "dropout in training", at_least=0, below=1)
    tokenizer_path: str = option("", "sentencepiece model, used when no tokenizer is passed in")

    def __post_init__(self) -> None:
        check_fields(self)
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} must be divisible by heads {self.heads}")


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
