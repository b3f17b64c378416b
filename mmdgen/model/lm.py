"""MusicGen's language model over K codebooks: summed code embeddings, sinusoidal positions, pre-norm layers
of causal self-attention, cross-attention to the text states and a GELU feed-forward block, K output heads.

Prefix conditioning (``LMConfig.conditioning = "prefix"``, MusicGen-melody): the layers have no cross-attention;
the conditioning states (``prefix``: the projected melody chroma, repeated or cut to ``melody_frames``, then the
projected text states) are positions before the first code step, read by the causal self-attention. Positions
count from the first conditioning state, so code step s sits at position P + s; every conditioning position is
attended, text padding included (zero states plus their positions), as transformers and audiocraft do.

Input: a pattern sequence ``[B, K, S]`` (``mmdgen.model.patterns``) whose empty cells and start step hold the
special token ``codebook_size``; each step's K tokens are embedded and summed. Output: hidden states
``[B, S, dim]`` (what the fused cross-entropy takes) or logits ``[B, K, S, codebook_size]``.

``hidden`` runs the whole sequence at once (training). Decoding runs over static KV caches the model allocates
(``new_caches``): ``step`` takes a few steps' codes or embedded input at a cache position and returns their
logits, ``prefill`` writes known steps (an audio prompt) and ``prefill_prefix`` a prefix LM's conditioning into
the caches; the text's keys and values are projected once per generation (``cross_memory``).

Weight names map one to one onto transformers' ``MusicgenForCausalLM`` (``mmdgen.model.convert``), and the maths
matches it: no biases in attention or the feed-forward block, LayerNorm with bias, exact GELU, positions
``[cos | sin]`` as in tensor2tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmdgen.choices import Conditioning, PatternName
from mmdgen.kernels.attention import MAX_QUERIES, decode_attention
from mmdgen.model.melody import null_chroma
from mmdgen.validation import check_fields, option


@dataclass
class LMConfig:
    num_codebooks: int = option(4, "codebooks (K)", at_least=1)
    codebook_size: int = option(2048, "codes per codebook; the special token (start step, empty pattern cells) is "
                                      "this id", at_least=1)
    dim: int = option(1024, "the model's width", at_least=1)
    layers: int = option(24, "decoder layers", at_least=1)
    heads: int = option(16, "attention heads", at_least=1)
    ffn_dim: int = option(4096, "the feed-forward block's width", at_least=1)
    text_dim: int = option(768, "width of the conditioning states; projected to dim when it differs", at_least=1)
    dropout: float = option(0.0, "dropout in training", at_least=0, below=1)
    norm_eps: float = option(1e-5, "the layer norms' epsilon", above=0)
    pattern: PatternName = option("delay", "the codebook pattern")
    delays: tuple[int, ...] | None = option(None, "per-codebook delays of the delay pattern (None: 0..K-1)",
                                            at_least=0)
    context_frames: int | None = option(None, "frames of the longest sequences the model was trained on (its "
                                              "crops); longer audio is generated in overlapping windows of this "
                                              "length (mmdgen.generate); None: no limit recorded", at_least=1)
    audio_channels: int = option(1, "2: stereo, the codebooks interleave the channels (left k, right k, left k+1, "
                                    "...), each channel decoded by the mono codec (transformers' stereo MusicGen "
                                    "layout)", at_least=1, at_most=2)
    attend_text_padding: bool = option(False, "audiocraft's cross-attention has no mask: its zeroed text padding "
                                              "stays in the softmax (transformers' port leaves it out, as we do by "
                                              "default); True reproduces audiocraft's numbers for padded texts")
    conditioning: Conditioning = option("cross", "how the conditioning reaches the layers: cross (cross-attention to "
                                                 "the text states) or prefix (MusicGen-melody: no cross-attention; "
                                                 "the conditioning states go before the first code step)")
    melody_dim: int | None = option(None, "prefix LMs that take a melody: chroma classes per frame (projected to "
                                          "dim)", at_least=1)
    melody_frames: int | None = option(None, "the melody's positions in the prefix (its chroma repeated or cut to "
                                             "this many frames: transformers' chroma_length)", at_least=1)

    def __post_init__(self):
        if isinstance(self.delays, list):
            self.delays = tuple(self.delays)
        check_fields(self)
        if self.num_codebooks % self.audio_channels:
            raise ValueError(f"audio_channels ({self.audio_channels}) must divide num_codebooks "
                             f"({self.num_codebooks})")
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be a multiple of heads ({self.heads})")
        if (self.melody_dim is None) != (self.melody_frames is None):
            raise ValueError(f"melody_dim ({self.melody_dim}) and melody_frames ({self.melody_frames}) are set "
                             "together or not at all")
        if self.melody_dim is not None and self.conditioning != "prefix":
            raise ValueError(f"a melody (melody_dim={self.melody_dim}) needs conditioning='prefix', got "
                             f"{self.conditioning!r}")

    @property
    def special_token(self) -> int:
        return self.codebook_size


PRESETS = {
    # CPU tests and experiments, over the tiny codec's 4 x 256 codes.
    "tiny": lambda: LMConfig(codebook_size=256, dim=64, layers=2, heads=4, ffn_dim=256, text_dim=64),
    # CPU experiments: big enough for the patterns to differ, a few minutes per thousand steps.
    "mini": lambda: LMConfig(codebook_size=256, dim=128, layers=4, heads=4, ffn_dim=512, text_dim=128),
    # MusicGen small: 24 layers of width 1024 (T5-base text states, 768 wide).
    "small": lambda: LMConfig(),
}


def lm_config(preset: str, **overrides) -> LMConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown LM preset {preset!r}; expected one of {sorted(PRESETS)}")
    cfg = PRESETS[preset]()
    for key, value in overrides.items():
        setattr(cfg, key, value)
    cfg.__post_init__()
    return cfg


def sinusoidal_positions(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """[S] integer positions -> [S, dim] embeddings: cos then sin of position * 10000^(-i / (dim/2 - 1))."""
    half = dim // 2
    rates = torch.exp(torch.arange(half, device=positions.device, dtype=torch.float32)
                      * -(math.log(10000.0) / max(half - 1, 1)))
    angles = positions.float()[:, None] * rates[None]
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
    return F.pad(embedding, (0, dim - 2 * half))


def _check_span(span, position: int | torch.Tensor, steps: int, capacity: int) -> None:
    """ValueError unless ``span`` (``MusicLM.step``) is an int in [1, capacity] covering an int position's steps."""
    if isinstance(span, bool) or not isinstance(span, int) or not 1 <= span <= capacity:
        raise ValueError(f"mmdgen/model/lm.py: span must be an int in [1, {capacity}] (the cache's positions), "
                         f"got {span!r}")
    if not isinstance(position, torch.Tensor) and span < position + steps:
        raise ValueError(f"mmdgen/model/lm.py: span={span} does not cover the steps at positions "
                         f"{position}..{position + steps - 1}; expected span >= {position + steps}")


class KVCache(nn.Module):
    """Static self-attention cache of one layer: keys and values [B, heads, max_steps, head_dim]."""

    def __init__(self, batch: int, heads: int, max_steps: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str | None = None):
        super().__init__()
        shape = (batch, heads, max_steps, head_dim)
        self.register_buffer("keys", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("values", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor):
        """Write the new steps' keys/values at ``positions`` [S_new]; return the whole buffers."""
        self.keys.index_copy_(2, positions, keys.to(self.keys.dtype))
        self.values.index_copy_(2, positions, values.to(self.values.dtype))
        return self.keys, self.values


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.head_dim, self.dropout = heads, dim // heads, dropout
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.out_proj = nn.Linear(dim, dim, bias=False)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)  # [B, H, S, hd]

    def memory(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention keys and values of the text states (computed once per generation)."""
        return self.split_heads(self.k_proj(states)), self.split_heads(self.v_proj(states))

    def forward(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        query = self.split_heads(self.q_proj(x))
        out = F.scaled_dot_product_attention(query, keys.to(query.dtype), values.to(query.dtype), attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0, is_causal=causal)
        return self.out_proj(out.transpose(1, 2).flatten(2))

    def decode(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, length: int,
               key_mask: torch.Tensor | None = None, causal: bool = True, backend: str = "auto") -> torch.Tensor:
        """The few new steps ``x`` against the first ``length`` cached steps (the decode kernel on CUDA)."""
        query = self.split_heads(self.q_proj(x))
        out = decode_attention(query, keys, values, length, key_mask=key_mask, causal=causal, backend=backend)
        return self.out_proj(out.transpose(1, 2).flatten(2))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.self_attn = Attention(cfg.dim, cfg.heads, cfg.dropout)
        self.self_attn_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.cross_attn = self.cross_attn_norm = None  # a prefix LM's layers read the conditioning as positions
        if cfg.conditioning == "cross":
            self.cross_attn = Attention(cfg.dim, cfg.heads, cfg.dropout)
            self.cross_attn_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.fc1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, memory: tuple[torch.Tensor, torch.Tensor] | torch.Tensor | None,
                memory_mask: torch.Tensor | None, cache: KVCache | None = None, positions: torch.Tensor | None = None,
                start: int | torch.Tensor = 0, backend: str = "auto", span: int | None = None) -> torch.Tensor:
        """``memory`` / ``memory_mask``: the text's cross-attention keys, values and mask, or the projected text
        states (this layer's keys and values made here: sharded training); None without cross-attention.
        ``span``: decoding attends the cache positions [0, span) only (``MusicLM.step``); None: all of them."""
        if isinstance(memory, torch.Tensor):
            memory = self.cross_attn.memory(memory)
        h = self.self_attn_norm(x)
        keys, values = self.self_attn.split_heads(self.self_attn.k_proj(h)), self.self_attn.split_heads(
            self.self_attn.v_proj(h))
        if cache is None:
            attended = self.self_attn(h, keys, values, causal=True)
        else:  # decoding: the new steps see every cached step up to their own position
            length = start + x.shape[1]  # a tensor for a tensor start: no host read (compiled, graphed steps)
            keys, values = cache.update(positions, keys, values)
            if span is not None:  # views: the positions past the span are never read
                keys, values = keys[:, :, :span], values[:, :, :span]
            attended = self.self_attn.decode(h, keys, values, length, backend=backend)
        if self.cross_attn is not None:
            h = self.cross_attn_norm(x + attended)
            if cache is None:
                crossed = self.cross_attn(h, *memory, mask=memory_mask)
            else:
                text_keys, text_values = memory
                crossed = self.cross_attn.decode(h, text_keys, text_values, text_keys.shape[2],
                                                 key_mask=memory_mask[:, 0, 0], causal=False, backend=backend)
        x = x + F.dropout(attended, self.dropout, self.training)
        if self.cross_attn is not None:
            x = x + F.dropout(crossed, self.dropout, self.training)
        return x + F.dropout(self.fc2(F.gelu(self.fc1(self.ffn_norm(x)))), self.dropout, self.training)


class MusicLM(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = nn.ModuleList(nn.Embedding(cfg.codebook_size + 1, cfg.dim) for _ in range(cfg.num_codebooks))
        self.text_projection = nn.Linear(cfg.text_dim, cfg.dim) if cfg.text_dim != cfg.dim else nn.Identity()
        self.melody_projection = None
        if cfg.melody_dim is not None:
            self.melody_projection = (nn.Linear(cfg.melody_dim, cfg.dim) if cfg.melody_dim != cfg.dim
                                      else nn.Identity())
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.heads = nn.ModuleList(nn.Linear(cfg.dim, cfg.codebook_size, bias=False)
                                   for _ in range(cfg.num_codebooks))
        # training: keep each layer's input only and recompute its activations in the backward pass
        self.activation_checkpointing = False

    def _check_tokens(self, tokens: torch.Tensor) -> None:
        k = self.cfg.num_codebooks
        if tokens.dim() != 3 or tokens.shape[1] != k:
            raise ValueError(f"expected tokens [B, {k}, S], got {tuple(tokens.shape)}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) > self.cfg.special_token):
            raise ValueError(f"tokens must lie in [0, {self.cfg.special_token}] (the last is the special token), "
                             f"got values in [{int(tokens.min())}, {int(tokens.max())}]")

    def _check_text(self, states: torch.Tensor, mask: torch.Tensor) -> None:
        if states.dim() != 3 or states.shape[-1] != self.cfg.text_dim:
            raise ValueError(f"expected text states [B, L, {self.cfg.text_dim}], got {tuple(states.shape)}")
        if mask.shape != states.shape[:2]:
            raise ValueError(f"expected a text mask {tuple(states.shape[:2])}, got {tuple(mask.shape)}")

    def cross_memory(self, states: torch.Tensor, mask: torch.Tensor):
        """Per layer (keys, values) of the projected text states, and the [B, 1, 1, L] attention mask."""
        projected, attend = self.project_text(states, mask)
        return [layer.cross_attn.memory(projected) for layer in self.layers], attend

    def project_text(self, states: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The text states projected to the model's width [B, L, dim], and the [B, 1, 1, L] attention mask.

        The projected memory is zero where ``mask`` is False (transformers' MusicGen does the same), so a null
        condition (an all-False row) adds exactly nothing; such a row attends to its first, zero position only
        to keep the softmax defined."""
        if self.cfg.conditioning != "cross":
            raise ValueError(f"a {self.cfg.conditioning}-conditioned LM has no cross-attention memory; use prefix()")
        self._check_text(states, mask)
        mask = mask.bool()
        projected = self.text_projection(states) * mask[..., None].to(states.dtype)
        if self.cfg.attend_text_padding:
            attend = torch.ones_like(mask)
        else:
            attend = mask.clone()
            attend[:, 0] |= ~mask.any(dim=1)
        return projected, attend[:, None, None, :]

    def prefix(self, states: torch.Tensor, mask: torch.Tensor, melody: torch.Tensor | None = None) -> torch.Tensor:
        """A prefix LM's conditioning positions [B, P, dim] (before positions are added): the projected ``melody``
        chroma [B, T, melody_dim] (None: the null melody) repeated or cut to ``melody_frames``, then the projected
        text states, zero where ``mask`` is False (padding, null rows) as in transformers."""
        if self.cfg.conditioning != "prefix":
            raise ValueError(f"a {self.cfg.conditioning}-conditioned LM takes no prefix; use cross_memory()")
        self._check_text(states, mask)
        text = self.text_projection(states) * mask[..., None].to(states.dtype)
        if self.melody_projection is None:
            if melody is not None:
                raise ValueError("this LM takes no melody (LMConfig.melody_dim is None)")
            return text
        batch, frames, bins = states.shape[0], self.cfg.melody_frames, self.cfg.melody_dim
        if melody is None:
            melody = null_chroma(batch, 1, bins, states.dtype, states.device)
        if melody.dim() != 3 or melody.shape[0] != batch or melody.shape[1] < 1 or melody.shape[2] != bins:
            raise ValueError(f"expected melody chroma [{batch}, frames >= 1, {bins}], got {tuple(melody.shape)}")
        projected = self.melody_projection(melody.to(text.dtype))
        projected = projected.repeat(1, math.ceil(frames / projected.shape[1]), 1)[:, :frames]
        return torch.cat([projected, text], dim=1)

    def embed(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Tokens [B, K, S] (steps start..start+S-1) -> the summed code embeddings plus positions [B, S, dim]."""
        self._check_tokens(tokens)
        x = sum(embedding(tokens[:, k]) for k, embedding in enumerate(self.embeddings))
        positions = torch.arange(start, start + tokens.shape[-1], device=tokens.device)
        return x + sinusoidal_positions(positions, self.cfg.dim).to(x.dtype)

    def hidden(self, tokens: torch.Tensor, states: torch.Tensor | None, mask: torch.Tensor | None, memory=None,
               melody: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens [B, K, S] -> final-norm hidden states [B, S, dim], the whole sequence at once (training, full
        passes; decoding steps through the caches with ``step``). ``memory``: ``cross_memory``'s result (a prefix
        LM: ``prefix``'s), else made from ``states`` and ``mask`` (and ``melody``).

        A prefix LM's conditioning goes in front of the steps, which sit at positions P + s."""
        if self.cfg.conditioning == "prefix":
            return self._hidden_after(memory if memory is not None else self.prefix(states, mask, melody), tokens)
        if memory is None:  # each layer projects the text inside its forward (sharded training)
            projected, memory_mask = self.project_text(states, mask)
            memories = [projected] * len(self.layers)
        else:
            memories, memory_mask = memory
        x = F.dropout(self.embed(tokens), self.cfg.dropout, self.training)
        for index, layer in enumerate(self.layers):
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, memories[index], memory_mask, use_reentrant=False)
            else:
                x = layer(x, memories[index], memory_mask)
        return self.norm(x)

    def step(self, inputs: torch.Tensor, position: int | torch.Tensor, caches: list[KVCache], memory=None,
             backend: str = "auto", span: int | None = None) -> torch.Tensor:
        """Logits [rows, K, S, V] of S decode steps (1 to ``MAX_QUERIES``) at cache positions position..position +
        S - 1; their keys and values are written into ``caches`` (``new_caches``) and they attend to every cached
        position up to their own through the decode kernels (``backend``).

        ``inputs``: the steps' codes [rows, K, S], or their embedded input [rows, S, dim] with positions added
        (the decode loop's fused step input). ``position``: an int, or (with embedded inputs) a 0-d int64 tensor,
        so that nothing is read on the host (compiled and graphed steps). ``memory``: ``cross_memory``'s result;
        None for a prefix LM, whose conditioning ``prefill_prefix`` wrote first (step s sits at P + s).

        ``span``: attend the cache positions [0, span) only, a static bound on a tensor ``position`` (the compiled
        decode step's length bucket: one graph per span; the attention reads span positions, not the whole
        buffer). It must cover the steps' own positions; that is checked for an int ``position`` only (a tensor
        one is not read on the host). None: the whole buffer (an int ``position`` attends exactly its filled
        positions either way)."""
        if span is not None:
            steps = inputs.shape[1] if inputs.is_floating_point() else inputs.shape[-1]  # embedded or codes
            _check_span(span, position, steps, caches[0].keys.shape[2])
        return self.logits(self.norm(self._through_caches(inputs, position, caches, memory, backend, span)))

    def prefill(self, codes: torch.Tensor, position: int, caches: list[KVCache], memory=None,
                backend: str = "auto") -> None:
        """Write the keys and values of known steps (codes [rows, K, S], any S: passes of up to ``MAX_QUERIES``)
        at positions position..position + S - 1 into ``caches``, as ``step`` would, without their logits."""
        for first in range(0, codes.shape[-1], MAX_QUERIES):
            self._through_caches(codes[..., first: first + MAX_QUERIES], position + first, caches, memory, backend)

    def prefill_prefix(self, prefix: torch.Tensor, caches: list[KVCache], backend: str = "auto") -> None:
        """Write a prefix LM's conditioning ``prefix`` [rows, P, dim] (``prefix``'s result) plus positions 0..P-1
        into ``caches`` (passes of up to ``MAX_QUERIES`` positions); code step s then sits at position P + s."""
        if self.cfg.conditioning != "prefix":
            raise ValueError(f"a {self.cfg.conditioning}-conditioned LM takes no prefix; its steps read "
                             "cross_memory()")
        rows = caches[0].keys.shape[0]
        if prefix.dim() != 3 or prefix.shape[0] != rows or prefix.shape[2] != self.cfg.dim:
            raise ValueError(f"expected prefix states [{rows}, P, {self.cfg.dim}] (lm.prefix), got "
                             f"{tuple(prefix.shape)}")
        dtype = self.dtype
        for first in range(0, prefix.shape[1], MAX_QUERIES):
            part = prefix[:, first: first + MAX_QUERIES].to(dtype)
            positions = sinusoidal_positions(torch.arange(first, first + part.shape[1], device=part.device),
                                             self.cfg.dim)
            self._through_caches(part + positions.to(dtype), first, caches, None, backend)

    def _through_caches(self, inputs: torch.Tensor, position: int | torch.Tensor, caches: list[KVCache], memory,
                        backend: str, span: int | None = None) -> torch.Tensor:
        """The layers over ``caches`` (``step``'s arguments): the last layer's output [rows, S, dim], before the
        final norm."""
        if self.cfg.conditioning == "prefix":
            if memory is not None:
                raise ValueError("a prefix LM's steps take no memory: its conditioning is in the caches "
                                 "(prefill_prefix)")
            memories, memory_mask = [None] * len(self.layers), None
        elif memory is None:
            raise ValueError("a cross-conditioned LM's steps need memory=lm.cross_memory(states, mask)")
        else:
            memories, memory_mask = memory
        x = inputs if inputs.is_floating_point() else self.embed(inputs, position)
        x = F.dropout(x, self.cfg.dropout, self.training)
        positions = torch.arange(x.shape[1], device=x.device) + position
        for index, layer in enumerate(self.layers):
            x = layer(x, memories[index], memory_mask, caches[index], positions, position, backend, span)
        return x

    def _hidden_after(self, prefix: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The steps' hidden states [B, S, dim] behind the conditioning positions ``prefix`` [B, P, dim]."""
        length = prefix.shape[1]
        positions = sinusoidal_positions(torch.arange(length, device=prefix.device), self.cfg.dim)
        x = torch.cat([prefix + positions.to(prefix.dtype), self.embed(tokens, length)], dim=1)
        x = F.dropout(x, self.cfg.dropout, self.training)
        for layer in self.layers:
            x = layer(x, None, None)
        return self.norm(x[:, length:])

    @property
    def device(self) -> torch.device:
        """Where the LM's weights are. Read from the code embeddings, which stay plain tensors: the decoder's and
        heads' linear layers may be packed (``mmdgen.model.packing``) or int8 (``mmdgen.model.quantize``), whose
        ``weight`` is rebuilt in full at each access."""
        return self.embeddings[0].weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The LM's float dtype (its embeddings'; see ``device``)."""
        return self.embeddings[0].weight.dtype

    def embedding_weights(self) -> torch.Tensor:
        """[K, V + 1, dim]: the K embedding tables stacked, as the fused step input takes them."""
        return torch.stack([embedding.weight for embedding in self.embeddings])

    def head_weights(self) -> torch.Tensor:
        """[K, V, dim]: the K output heads stacked, as the fused cross-entropy takes them."""
        return torch.stack([head.weight for head in self.heads])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, S, dim] -> [B, K, S, V]."""
        return torch.stack([head(hidden) for head in self.heads], dim=1)

    def forward(self, tokens: torch.Tensor, states: torch.Tensor, mask: torch.Tensor,
                melody: torch.Tensor | None = None) -> torch.Tensor:
        return self.logits(self.hidden(tokens, states, mask, melody=melody))

    def new_caches(self, batch: int, max_steps: int, dtype: torch.dtype | None = None) -> list[KVCache]:
        return [KVCache(batch, self.cfg.heads, max_steps, self.cfg.dim // self.cfg.heads, dtype or self.dtype,
                        self.device) for _ in self.layers]
