"""The T5 text conditioner of published MusicGen checkpoints, run by our own modules: no transformers needed.

Every published MusicGen size conditions on a frozen t5-base encoder (d_model 768, 12 heads of 64, d_ff 3072,
12 layers, relu FFN, vocabulary 32128, 32 relative-position buckets up to distance 128). This module holds
the pieces needed to run one from the files users already have:

``T5Config``          the encoder's fields, read from a transformers T5 ``config.json`` (or the
                      ``text_encoder`` part of a MusicGen one);
``T5Encoder``         the encoder stack; ``load_t5_weights`` fills it from transformers' tensor names
                      (a T5 ``model.safetensors``, or a MusicGen one under the prefix ``text_encoder.``);
``T5Tokenizer``       T5's sentencepiece tokenizer from ``tokenizer.json`` (``tokenizers`` package) or
                      ``spiece.model`` (``sentencepiece`` package);
``T5TextEncoder``     the frozen conditioner the LM sees: captions -> states + mask, read from a T5 folder
                      or from the text encoder inside a MusicGen folder (``from_folder``).

The maths, as T5 defines it (facts of the model, checked against transformers in tests/test_t5.py):
pre-norm layers ``x + attention(norm(x))`` then ``x + ffn(norm(x))``; the norm is an RMS norm (no mean, no
bias) whose statistics are taken in fp32 whatever the weights' dtype; attention logits are ``q . k`` with no
``1/sqrt(d_kv)`` scale (T5 folds it into its initialisation) plus a learned bias per head and relative-position
bucket, computed once from the first layer's table and shared by all layers; the FFN is
``wo(relu(wi x))`` or, for T5 v1.1 / flan-t5 ("gated-gelu"), ``wo(gelu_tanh(wi_0 x) * wi_1 x)``; a final RMS
norm; no positional embedding, no embedding scale, no biases anywhere.

Shapes and dtypes. ``T5Encoder.forward(ids [B, L] int64, mask [B, L] bool) -> [B, L, d_model]`` in the
weights' dtype (fp32, or bf16 after ``.to(torch.bfloat16)``), on the weights' device (CPU or CUDA). Padded
positions (mask False) are never attended to; their own output rows are computed like any other and carry
no meaning (callers zero them). Memory: the attention bias with the padding folded in is ``[B, H, L, L]``
in the weights' dtype, built once per call and shared by the layers; attention itself goes through
``F.scaled_dot_product_attention`` with that additive mask and ``scale=1.0`` (exact: SDPA computes
``softmax(q k^T * scale + mask) v``), so its extra memory is whatever the chosen SDPA kernel needs (the math
kernel holds ``[B, H, L, L]`` scores); the FFN holds ``[B, L, d_ff]``. Inference only: no dropout.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mmdgen.model.text.conditioning import FrozenConditioner, TextConditioning
from mmdgen.model.text.tokenizer import pad_rows
from mmdgen.tensor_files import TensorFiles

FEED_FORWARD_KINDS = ("relu", "gated-gelu")
# transformers' names for the activation of each kind (its config.json stores them as dense_act_fn)
_ACTIVATION_NAMES = {"relu": "relu", "gated-gelu": "gelu_new"}
_REQUIRED_FIELDS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")


# --------------------------------------------------------------------------------------------
# Config


@dataclass
class T5Config:
    """The T5 encoder's architecture; the defaults are t5-base, MusicGen's text encoder."""

    vocab_size: int = 32128
    d_model: int = 768
    d_kv: int = 64
    d_ff: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward_proj: str = "relu"
    layer_norm_epsilon: float = 1e-6

    def __post_init__(self) -> None:
        for name in _REQUIRED_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"T5Config.{name} is {value!r}, expected an integer >= 1")
        buckets = self.relative_attention_num_buckets
        # Bidirectional bucketing halves the buckets (keys before / after the query) and spends half of each
        # half on exact offsets, so it needs an even count of at least 4.
        if isinstance(buckets, bool) or not isinstance(buckets, int) or buckets < 4 or buckets % 2:
            raise ValueError(
                f"T5Config.relative_attention_num_buckets is {buckets!r}, expected an even integer >= 4"
            )
        distance = self.relative_attention_max_distance
        if isinstance(distance, bool) or not isinstance(distance, int) or distance <= buckets // 4:
            raise ValueError(
                f"T5Config.relative_attention_max_distance is {distance!r}, expected an integer above the "
                f"{buckets // 4} exactly-bucketed offsets"
            )
        if self.feed_forward_proj not in FEED_FORWARD_KINDS:
            raise ValueError(
                f"T5Config.feed_forward_proj is {self.feed_forward_proj!r}, expected one of "
                f"{', '.join(FEED_FORWARD_KINDS)}"
            )
        if not isinstance(self.layer_norm_epsilon, (int, float)) or not self.layer_norm_epsilon > 0:
            raise ValueError(f"T5Config.layer_norm_epsilon is {self.layer_norm_epsilon!r}, expected a number > 0")

    @property
    def gated(self) -> bool:
        return self.feed_forward_proj == "gated-gelu"

    @classmethod
    def from_dict(cls, config: Mapping, source: str) -> T5Config:
        """Read a transformers T5 ``config.json`` dict, or a MusicGen one (its ``text_encoder`` part is used).

        The widths are required; the fields that old published configs leave out (t5-base's has no
        ``feed_forward_proj`` nor ``relative_attention_max_distance``) take transformers' defaults, which those
        checkpoints were trained with. Raises ValueError naming ``source`` and the field for a missing width,
        a decoder config, another model type, or an activation we do not implement.
        """
        if isinstance(config.get("text_encoder"), Mapping):
            config, source = config["text_encoder"], f"{source} (text_encoder)"
        model_type = config.get("model_type", "t5")
        if model_type not in ("t5", "mt5"):
            raise ValueError(f"{source}: model_type is {model_type!r}, expected 't5' or 'mt5' (a T5 encoder config)")
        if config.get("is_decoder", False):
            raise ValueError(f"{source}: is_decoder is true: a T5 decoder config, expected an encoder one")
        missing = [name for name in _REQUIRED_FIELDS if name not in config]
        if missing:
            raise ValueError(f"{source}: field(s) {', '.join(missing)} missing; a T5 config.json has them all")
        kind = config.get("feed_forward_proj", "relu")
        _check_activation_fields(config, kind, source)
        values = {name: config[name] for name in _REQUIRED_FIELDS}
        for name in ("relative_attention_num_buckets", "relative_attention_max_distance", "layer_norm_epsilon"):
            if name in config:
                values[name] = config[name]
        try:
            return cls(feed_forward_proj=kind, **values)
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from error

    def to_dict(self) -> dict:
        """transformers' T5 ``config.json`` dictionary of this encoder (``from_dict`` reads it back): the fields
        transformers derives from ``feed_forward_proj`` written out, T5's special ids (pad 0, ``</s>`` 1)."""
        fields = {name: getattr(self, name) for name in (*_REQUIRED_FIELDS, "relative_attention_num_buckets",
                                                          "relative_attention_max_distance", "feed_forward_proj",
                                                          "layer_norm_epsilon")}
        return {"model_type": "t5", **fields, "num_decoder_layers": self.num_layers, "is_gated_act": self.gated,
                "dense_act_fn": _ACTIVATION_NAMES[self.feed_forward_proj], "is_decoder": False,
                "is_encoder_decoder": False, "use_cache": False, "tie_word_embeddings": True,
                "pad_token_id": T5Tokenizer.pad_id, "eos_token_id": T5Tokenizer.eos_id}


def _check_activation_fields(config: Mapping, kind: str, source: str) -> None:
    # transformers derives is_gated_act and dense_act_fn from feed_forward_proj and writes all three; a file
    # where they disagree describes a model we would run wrongly.
    if kind not in FEED_FORWARD_KINDS:
        raise ValueError(
            f"{source}: feed_forward_proj is {kind!r}, expected one of {', '.join(FEED_FORWARD_KINDS)}"
        )
    gated = kind == "gated-gelu"
    if "is_gated_act" in config and bool(config["is_gated_act"]) != gated:
        raise ValueError(
            f"{source}: is_gated_act is {config['is_gated_act']!r} but feed_forward_proj is {kind!r}; "
            f"expected is_gated_act {gated}"
        )
    activation = config.get("dense_act_fn", _ACTIVATION_NAMES[kind])
    if activation != _ACTIVATION_NAMES[kind]:
        raise ValueError(
            f"{source}: dense_act_fn is {activation!r} with feed_forward_proj {kind!r}; "
            f"expected {_ACTIVATION_NAMES[kind]!r}"
        )


# --------------------------------------------------------------------------------------------
# Encoder


def relative_position_buckets(
    length: int, num_buckets: int, max_distance: int, device: torch.device | None = None
) -> torch.Tensor:
    """T5's bidirectional bucket ``[L, L]`` (int64) of each (query i, key j) offset ``j - i``.

    Keys after the query use the upper half of the buckets. Within a half, offsets below a quarter of the
    buckets get one bucket each; larger ones share log-spaced buckets up to ``max_distance``, past which all
    fall in the last. The float steps are T5's own (fp32 log, truncation), so a checkpoint sees the buckets
    it was trained with.
    """
    positions = torch.arange(length, device=device)
    offset = positions[None, :] - positions[:, None]
    half = num_buckets // 2
    exact = half // 2
    distance = offset.abs()
    # clamp: the log branch is only used for distances >= exact, and log(0) would be -inf
    log_scaled = exact + (
        torch.log(distance.clamp(min=exact).float() / exact) / math.log(max_distance / exact) * (half - exact)
    ).to(torch.int64)
    within_half = torch.where(distance < exact, distance, log_scaled.clamp(max=half - 1))
    return (offset > 0).to(torch.int64) * half + within_half


class T5RMSNorm(nn.Module):
    """T5's layer norm: divide by the root mean square (fp32 statistics), scale; no mean, no bias."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(self.weight.dtype)


class T5EncoderLayer(nn.Module):
    """Pre-norm: x + attention(norm(x)), then x + ffn(norm(x)); bias-free linears."""

    def __init__(self, config: T5Config):
        super().__init__()
        inner = config.num_heads * config.d_kv  # need not equal d_model (e.g. t5-11b)
        self.heads, self.head_dim = config.num_heads, config.d_kv
        self.attention_norm = T5RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.query = nn.Linear(config.d_model, inner, bias=False)
        self.key = nn.Linear(config.d_model, inner, bias=False)
        self.value = nn.Linear(config.d_model, inner, bias=False)
        self.attention_out = nn.Linear(inner, config.d_model, bias=False)
        self.ffn_norm = T5RMSNorm(config.d_model, config.layer_norm_epsilon)
        # gated-gelu: ffn_out(gelu(ffn_gate x) * ffn_in x); relu: ffn_out(relu(ffn_in x))
        self.ffn_gate = nn.Linear(config.d_model, config.d_ff, bias=False) if config.gated else None
        self.ffn_in = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.ffn_out = nn.Linear(config.d_ff, config.d_model, bias=False)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.heads, self.head_dim).transpose(1, 2)

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ffn_gate is None:
            return self.ffn_out(F.relu(self.ffn_in(x)))
        return self.ffn_out(F.gelu(self.ffn_gate(x), approximate="tanh") * self.ffn_in(x))

    def forward(self, x: torch.Tensor, attention_bias: torch.Tensor) -> torch.Tensor:
        normed = self.attention_norm(x)
        q, k, v = (self._split_heads(projection(normed)) for projection in (self.query, self.key, self.value))
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_bias, scale=1.0)
        x = x + self.attention_out(attended.transpose(1, 2).flatten(2))
        return x + self._feed_forward(self.ffn_norm(x))


class T5Encoder(nn.Module):
    """T5's encoder stack: token embedding, relative-position-biased pre-norm layers, final RMS norm.

    ``forward(ids [B, L] int64, mask [B, L] bool) -> [B, L, d_model]``; see the module docstring for the
    maths, dtypes and memory. Fill it with ``load_t5_weights``.
    """

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        # one bias per (bucket, head), owned by the first layer in T5 and shared by every layer
        self.relative_position_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_heads)
        self.layers = nn.ModuleList(T5EncoderLayer(config) for _ in range(config.num_layers))
        self.final_norm = T5RMSNorm(config.d_model, config.layer_norm_epsilon)

    def _check_inputs(self, ids: torch.Tensor, mask: torch.Tensor) -> None:
        if ids.dim() != 2 or ids.dtype != torch.int64:
            raise ValueError(
                f"T5Encoder: ids has shape {tuple(ids.shape)} and dtype {ids.dtype}, expected [B, L] int64"
            )
        if mask.shape != ids.shape or mask.dtype != torch.bool:
            raise ValueError(
                f"T5Encoder: mask has shape {tuple(mask.shape)} and dtype {mask.dtype}, expected "
                f"{tuple(ids.shape)} bool like ids"
            )
        # An out-of-range id would otherwise fail inside the embedding (a device assert on CUDA).
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise ValueError(
                f"T5Encoder: ids hold values in [{int(ids.min())}, {int(ids.max())}], expected "
                f"[0, {self.config.vocab_size}) (the model's vocab_size)"
            )

    def _attention_bias(self, mask: torch.Tensor) -> torch.Tensor:
        """Additive attention mask ``[B, H, L, L]``: the relative position bias; the dtype's minimum at padded keys."""
        config = self.config
        buckets = relative_position_buckets(
            mask.shape[1], config.relative_attention_num_buckets, config.relative_attention_max_distance, mask.device
        )
        bias = self.relative_position_bias(buckets).permute(2, 0, 1).unsqueeze(0)  # [1, H, L, L]
        # The dtype's minimum rather than -inf: a row with no real key then averages instead of giving NaN.
        return torch.where(mask[:, None, None, :], bias, torch.finfo(bias.dtype).min)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self._check_inputs(ids, mask)
        bias = self._attention_bias(mask)
        x = self.token_embedding(ids)
        for layer in self.layers:
            x = layer(x, bias)
        return self.final_norm(x)


# --------------------------------------------------------------------------------------------
# Weights (transformers' names)

# The decoder half of a T5ForConditionalGeneration (and its output head): present in full T5 files, not ours.
_NOT_ENCODER = ("decoder.", "lm_head.")


def t5_weight_names(config: T5Config) -> dict[str, str]:
    """transformers' tensor name (below the checkpoint's prefix) -> our parameter name, in preference order.

    Two names fill the token embedding: ``shared.weight`` and its tied copy ``encoder.embed_tokens.weight``
    (either may be absent from a file).
    """
    names = {
        "shared.weight": "token_embedding.weight",
        "encoder.embed_tokens.weight": "token_embedding.weight",
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": "relative_position_bias.weight",
        "encoder.final_layer_norm.weight": "final_norm.weight",
    }
    attention = {"q": "query", "k": "key", "v": "value", "o": "attention_out"}
    ffn = {"wi": "ffn_in", "wo": "ffn_out"}
    if config.gated:  # T5 v1.1: wi_0 feeds the gelu, wi_1 the linear branch
        ffn = {"wi_0": "ffn_gate", "wi_1": "ffn_in", "wo": "ffn_out"}
    for i in range(config.num_layers):
        block, ours = f"encoder.block.{i}.layer.", f"layers.{i}."
        names[f"{block}0.layer_norm.weight"] = f"{ours}attention_norm.weight"
        names.update({f"{block}0.SelfAttention.{t}.weight": f"{ours}{o}.weight" for t, o in attention.items()})
        names[f"{block}1.layer_norm.weight"] = f"{ours}ffn_norm.weight"
        names.update({f"{block}1.DenseReluDense.{t}.weight": f"{ours}{o}.weight" for t, o in ffn.items()})
    return names


def t5_transformers_names(config: T5Config) -> dict[str, str]:
    """Our parameter name -> the transformers name it is saved under (``shared.weight`` for the embedding, as
    transformers itself saves it; the inverse of ``t5_weight_names``)."""
    names: dict[str, str] = {}
    for theirs, ours in t5_weight_names(config).items():
        names.setdefault(ours, theirs)
    return names


def load_t5_weights(
    encoder: T5Encoder, tensors: Mapping[str, torch.Tensor], source: str, prefix: str = ""
) -> None:
    """Copy transformers-named T5 tensors into ``encoder`` (cast to its dtype, moved to its device).

    ``tensors`` maps names to tensors (a dict, or a lazy mapping over a safetensors file: each tensor is read
    once when copied, and no second copy of the model is kept). Names below ``prefix`` are read (``""`` for a
    T5 file, ``"text_encoder."`` for a MusicGen one); other names, and the ``decoder.*`` / ``lm_head.*`` of a
    full T5, are skipped. Raises ValueError naming ``source`` and the tensor for a missing tensor, a wrong
    shape and any other name below the prefix (a weight we would silently ignore). Names are checked before
    anything is copied; a shape error stops the copy part-way, leaving the encoder part-loaded.
    """
    names = t5_weight_names(encoder.config)
    present = {key for key in tensors.keys() if key.startswith(prefix)}
    if not present:
        raise ValueError(f"{source}: no tensor name starts with {prefix!r}; expected T5 encoder weights there")
    for key in sorted(present):
        name = key[len(prefix):]
        if name not in names and not name.startswith(_NOT_ENCODER):
            raise ValueError(
                f"{source}: unexpected tensor {key!r} under the prefix {prefix!r}: not a weight of a T5 encoder "
                f"with {encoder.config.num_layers} layers and a {encoder.config.feed_forward_proj} FFN"
            )
    sources: dict[str, list[str]] = {}
    for name, ours in names.items():
        if prefix + name in present:
            sources.setdefault(ours, []).append(prefix + name)
    parameters = dict(encoder.named_parameters())
    for ours in parameters:
        if ours not in sources:
            expected = " or ".join(repr(prefix + name) for name, o in names.items() if o == ours)
            raise ValueError(f"{source}: tensor {expected} is missing (the encoder's {ours})")
    with torch.no_grad():
        for ours, keys in sources.items():
            parameter = parameters[ours]
            # the tied copy of the embedding is checked too (a wrong one means a wrong file) but not copied
            for index, key in enumerate(keys):
                tensor = tensors[key]
                if tuple(tensor.shape) != tuple(parameter.shape):
                    raise ValueError(
                        f"{source}: tensor {key!r} has shape {tuple(tensor.shape)}, expected "
                        f"{tuple(parameter.shape)} (the encoder's {ours})"
                    )
                if index == 0:
                    parameter.copy_(tensor)


# --------------------------------------------------------------------------------------------
# Tokenizer


class T5Tokenizer:
    """T5's tokenizer without transformers: captions -> ``</s>``-terminated ids, padded with 0.

    Built from a folder holding ``tokenizer.json`` (read with the ``tokenizers`` package) or ``spiece.model``
    (read with ``sentencepiece``); both give transformers' T5 tokenizer ids for ordinary text. One difference:
    through ``tokenizer.json`` a literal special token in the text (``"</s>"``, ``"<extra_id_0>"``) becomes
    that token, as in transformers, while ``spiece.model`` spells it out in ordinary pieces.
    """

    pad_id = 0
    eos_id = 1
    FILES = ("tokenizer.json", "spiece.model")

    def __init__(self, encode_pieces: Callable[[list[str]], list[list[int]]], path: Path):
        self._encode_pieces = encode_pieces
        self.path = path  # the file it was read from

    @classmethod
    def from_folder(cls, path: str | Path) -> T5Tokenizer:
        """Read ``tokenizer.json`` when the ``tokenizers`` package is installed, else ``spiece.model``."""
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"T5 tokenizer folder {folder} not found (expected {' or '.join(cls.FILES)})")
        json_file, spm_file = folder / cls.FILES[0], folder / cls.FILES[1]
        if json_file.is_file() and _has_module("tokenizers"):
            return cls(_tokenizers_encoder(json_file), json_file)
        if spm_file.is_file():
            return cls(_sentencepiece_encoder(spm_file), spm_file)
        if json_file.is_file():
            raise ModuleNotFoundError(
                f"{json_file} needs the 'tokenizers' package (pip install tokenizers), and there is no "
                f"{spm_file.name} to read with sentencepiece instead"
            )
        raise FileNotFoundError(
            f"{folder} holds neither {json_file.name} nor {spm_file.name}: not a T5 tokenizer folder"
        )

    def encode(self, captions: Iterable[str], max_length: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids ``[B, L]`` int64 and mask ``[B, L]`` bool (True = real token), as transformers' T5 tokenizer
        with ``padding=True, truncation=True, max_length=max_length``: each row ends in ``</s>`` (id 1), the
        whole row, ``</s>`` included, holds at most ``max_length`` ids, and rows are padded with id 0 to the
        longest. An empty caption gives the row ``[</s>]``.
        """
        captions = list(captions)
        if not captions:
            raise ValueError("T5Tokenizer.encode: captions is empty, expected at least one caption")
        for index, caption in enumerate(captions):
            if not isinstance(caption, str):
                raise ValueError(f"T5Tokenizer.encode: captions[{index}] is {type(caption).__name__}, expected str")
        if max_length < 1:
            raise ValueError(f"T5Tokenizer.encode: max_length is {max_length}, expected >= 1 (room for </s>)")
        return pad_rows([pieces[: max_length - 1] + [self.eos_id] for pieces in self._encode_pieces(captions)],
                        self.pad_id)


def _has_module(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def _check_special_ids(file: Path, pad_id: int | None, eos_id: int | None) -> None:
    if (pad_id, eos_id) != (T5Tokenizer.pad_id, T5Tokenizer.eos_id):
        raise ValueError(
            f"{file}: pad id {pad_id} and </s> id {eos_id}, expected {T5Tokenizer.pad_id} and "
            f"{T5Tokenizer.eos_id} (T5's conventions): not a T5 tokenizer"
        )


def _tokenizers_encoder(file: Path) -> Callable[[list[str]], list[list[int]]]:
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as error:  # tokenizers raises a bare Exception for a file it cannot parse
        raise ValueError(f"{file} is not a tokenizers JSON file: {error}") from error
    _check_special_ids(file, tokenizer.token_to_id("<pad>"), tokenizer.token_to_id("</s>"))
    # Padding, truncation and </s> are ours (encode), identical for both file kinds.
    tokenizer.no_padding()
    tokenizer.no_truncation()

    def encode_pieces(captions: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in tokenizer.encode_batch(captions, add_special_tokens=False)]

    return encode_pieces


def _sentencepiece_encoder(file: Path) -> Callable[[list[str]], list[list[int]]]:
    try:
        import sentencepiece
    except ImportError as error:
        raise ModuleNotFoundError(f"{file} needs the 'sentencepiece' package: pip install sentencepiece") from error
    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(file.read_bytes())
    except Exception as error:  # sentencepiece raises RuntimeError or OSError for a bad proto
        raise ValueError(f"{file} is not a sentencepiece model file: {error}") from error
    _check_special_ids(file, processor.pad_id(), processor.eos_id())
    return processor.encode  # a list of captions in, a list of id lists out (no </s>: encode adds it)


# --------------------------------------------------------------------------------------------
# The conditioner


class T5TextEncoder(FrozenConditioner):
    """Frozen T5 encoder token states; dim = d_model (768 for t5-base)."""

    def __init__(self, encoder: T5Encoder, tokenizer: T5Tokenizer, max_length: int = 512):
        super().__init__()
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.dim = encoder.config.d_model
        self.max_length = max_length
        self.folder: Path | None = None  # the folder it was read from (from_folder)
        self.freeze()

    @classmethod
    def from_folder(cls, path: str | Path, max_length: int = 512, dtype: torch.dtype = torch.float32,
                    tokenizer_path: str | Path | None = None) -> T5TextEncoder:
        """A T5 folder (``config.json``, the weights, ``tokenizer.json`` or ``spiece.model``) or a transformers
        MusicGen folder (its ``text_encoder`` part, the tokenizer beside it); ``tokenizer_path``: the tokenizer's
        folder when it lies elsewhere. The weights are read one tensor at a time into the module: no second
        copy of the model is made, and nothing is downloaded."""
        import json

        folder = Path(path)
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} not found: {folder} is not a T5 or MusicGen model folder "
                                    "(expected config.json, the weights and a tokenizer); nothing is downloaded")
        try:
            config = json.loads(config_path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{config_path}: not a JSON configuration ({error})") from error
        prefix = "text_encoder." if isinstance(config, dict) and "text_encoder" in config else ""
        t5_config = T5Config.from_dict(config, str(config_path))
        with torch.device("meta"):
            encoder = T5Encoder(t5_config)
        encoder = encoder.to_empty(device="cpu").to(dtype)
        tensors = TensorFiles.from_folder(folder)
        load_t5_weights(encoder, tensors, tensors.description, prefix)
        text = cls(encoder, T5Tokenizer.from_folder(tokenizer_path or folder), max_length)
        text.folder = folder  # what a model directory records to load it again
        return text

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokenizer.encode(captions, self.max_length)

    @torch.no_grad()
    def encode_texts(self, captions: list[str]) -> TextConditioning:
        ids, mask = self.tokenize(captions)
        device = self.encoder.token_embedding.weight.device
        ids, mask = ids.to(device), mask.to(device)
        return TextConditioning(states=self.encoder(ids, mask), mask=mask)
