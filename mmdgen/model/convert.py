"""Weights to and from Hugging Face transformers, so users can start from official checkpoints on disk.

Codec: transformers' ``EncodecModel`` (weight-normalised convolutions, non-chunked, no input
normalisation: the layout of the 32 kHz MusicGen codec). The SEANet layers share their names; only
the quantizer's differ (``quantizer.layers.k.codebook.{embed, embed_avg, cluster_size, inited}`` there,
``quantizer.stages.k.{embed, embed_sum, cluster_size, initialized}`` here).

Language model: the decoder of ``MusicgenForCausalLM`` or ``MusicgenForConditionalGeneration`` (mono,
unscaled embeddings, GELU); with the latter, its ``enc_to_dec_proj`` becomes our ``text_projection``. The
text and audio encoders stay in transformers.
"""

from __future__ import annotations

import math
import re

import torch

from mmdgen.model.codec import Codec, CodecConfig
from mmdgen.model.lm import LMConfig, MusicLM
from mmdgen.model.quantizer import QuantizerConfig

_QUANTIZER_NAMES = {"embed": "embed", "embed_avg": "embed_sum", "cluster_size": "cluster_size",
                    "inited": "initialized"}
_THEIRS = re.compile(r"^quantizer\.layers\.(\d+)\.codebook\.(\w+)$")
_OURS = re.compile(r"^quantizer\.stages\.(\d+)\.(\w+)$")


def codec_config_from_transformers(config) -> CodecConfig:
    """CodecConfig of a transformers ``EncodecConfig``; ValueError for what this codec does not do."""
    unsupported = []
    if config.norm_type != "weight_norm":
        unsupported.append(f"norm_type={config.norm_type!r} (weight_norm only)")
    if config.normalize:
        unsupported.append("normalize=True (input loudness normalisation)")
    if config.chunk_length_s is not None:
        unsupported.append(f"chunk_length_s={config.chunk_length_s} (chunked encoding)")
    if unsupported:
        raise ValueError("this EncodecConfig uses features mmdgen's codec does not have: " + "; ".join(unsupported))
    dim = config.codebook_dim or config.hidden_size
    return CodecConfig(
        sample_rate=config.sampling_rate, channels=config.audio_channels, num_filters=config.num_filters,
        ratios=tuple(config.upsampling_ratios), dimension=config.hidden_size,
        num_residual_layers=config.num_residual_layers, residual_kernel_size=config.residual_kernel_size,
        dilation_base=config.dilation_growth_rate, kernel_size=config.kernel_size,
        last_kernel_size=config.last_kernel_size, lstm_layers=config.num_lstm_layers, compress=config.compress,
        causal=config.use_causal_conv, pad_mode=config.pad_mode, trim_right_ratio=config.trim_right_ratio,
        conv_shortcut=config.use_conv_shortcut,
        quantizer=QuantizerConfig(dim=dim, codebook_size=config.codebook_size, num_codebooks=config.num_quantizers,
                                  kmeans_init=False),
    )


def codec_config_to_transformers(cfg: CodecConfig):
    from transformers import EncodecConfig

    frame_rate = math.ceil(cfg.sample_rate / cfg.hop_length)
    bits = math.ceil(math.log2(cfg.quantizer.codebook_size))
    bandwidth = cfg.quantizer.num_codebooks * frame_rate * bits / 1000  # what gives num_quantizers = K
    return EncodecConfig(
        target_bandwidths=[bandwidth], sampling_rate=cfg.sample_rate, audio_channels=cfg.channels, normalize=False,
        chunk_length_s=None, hidden_size=cfg.dimension, num_filters=cfg.num_filters,
        num_residual_layers=cfg.num_residual_layers, upsampling_ratios=list(cfg.ratios), norm_type="weight_norm",
        kernel_size=cfg.kernel_size, last_kernel_size=cfg.last_kernel_size,
        residual_kernel_size=cfg.residual_kernel_size, dilation_growth_rate=cfg.dilation_base,
        use_causal_conv=cfg.causal, pad_mode=cfg.pad_mode, compress=cfg.compress, num_lstm_layers=cfg.lstm_layers,
        trim_right_ratio=cfg.trim_right_ratio, codebook_size=cfg.quantizer.codebook_size,
        codebook_dim=cfg.quantizer.dim, use_conv_shortcut=cfg.conv_shortcut,
    )


def _to_ours(key: str) -> str:
    match = _THEIRS.match(key)
    return f"quantizer.stages.{match[1]}.{_QUANTIZER_NAMES[match[2]]}" if match else key


def _to_theirs(key: str) -> str:
    match = _OURS.match(key)
    if not match:
        return key
    theirs = {v: k for k, v in _QUANTIZER_NAMES.items()}[match[2]]
    return f"quantizer.layers.{match[1]}.codebook.{theirs}"


def _load_renamed(target: torch.nn.Module, state: dict, rename) -> None:
    renamed = {rename(k): v for k, v in state.items()}
    expected = target.state_dict()
    missing = sorted(set(expected) - set(renamed))
    unexpected = sorted(set(renamed) - set(expected))
    if missing or unexpected:
        raise ValueError(f"weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, value in renamed.items():
        if value.shape != expected[key].shape:
            raise ValueError(f"{key}: shape {tuple(value.shape)} where the model has {tuple(expected[key].shape)}")
    target.load_state_dict({k: v.to(expected[k].dtype) for k, v in renamed.items()})


def codec_from_transformers(model) -> Codec:
    """A Codec holding the weights of a transformers ``EncodecModel``."""
    codec = Codec(codec_config_from_transformers(model.config))
    _load_renamed(codec, model.state_dict(), _to_ours)
    return codec


def codec_to_transformers(codec: Codec):
    """A transformers ``EncodecModel`` holding this codec's weights."""
    from transformers import EncodecModel

    model = EncodecModel(codec_config_to_transformers(codec.cfg))
    _load_renamed(model, codec.state_dict(), _to_theirs)
    return model.eval()


_LM_NAMES = [  # (theirs, ours), after the decoder prefix is stripped
    (r"^embed_tokens\.", "embeddings."), (r"^layer_norm\.", "norm."), (r"^lm_heads\.", "heads."),
    (r"^enc_to_dec_proj\.", "text_projection."), (r"\.encoder_attn_layer_norm\.", ".cross_attn_norm."),
    (r"\.encoder_attn\.", ".cross_attn."), (r"\.self_attn_layer_norm\.", ".self_attn_norm."),
    (r"\.final_layer_norm\.", ".ffn_norm."),
]
_DECODER_PREFIX = re.compile(r"^(decoder\.)?(model\.decoder\.)?")


def lm_config_from_transformers(decoder_config, text_dim: int | None = None) -> LMConfig:
    """LMConfig of a transformers ``MusicgenDecoderConfig``; ValueError for what this LM does not do."""
    unsupported = []
    if decoder_config.activation_function != "gelu":
        unsupported.append(f"activation_function={decoder_config.activation_function!r} (gelu only)")
    if decoder_config.scale_embedding:
        unsupported.append("scale_embedding=True")
    if getattr(decoder_config, "audio_channels", 1) != 1:
        unsupported.append(f"audio_channels={decoder_config.audio_channels} (mono only)")
    if unsupported:
        raise ValueError("this MusicgenDecoderConfig uses features mmdgen's LM does not have: " + "; ".join(unsupported))
    return LMConfig(num_codebooks=decoder_config.num_codebooks, codebook_size=decoder_config.vocab_size,
                    dim=decoder_config.hidden_size, layers=decoder_config.num_hidden_layers,
                    heads=decoder_config.num_attention_heads, ffn_dim=decoder_config.ffn_dim,
                    text_dim=text_dim or decoder_config.hidden_size)


def _lm_key(key: str) -> str:
    key = _DECODER_PREFIX.sub("", key)
    for theirs, ours in _LM_NAMES:
        key = re.sub(theirs, ours, key)
    return key


def lm_from_transformers(model) -> MusicLM:
    """A MusicLM holding the decoder weights of a transformers ``MusicgenForCausalLM`` or
    ``MusicgenForConditionalGeneration`` (the text projection too, for the latter)."""
    conditional = hasattr(model, "text_encoder")
    decoder_config = model.config.decoder if conditional else model.config
    text_dim = model.text_encoder.config.hidden_size if conditional else None
    if conditional and getattr(decoder_config, "cross_attention_hidden_size", None) is not None:
        raise ValueError("cross_attention_hidden_size is set: the text states are not projected the usual way")
    lm = MusicLM(lm_config_from_transformers(decoder_config, text_dim))
    state = {k: v for k, v in model.state_dict().items()
             if not k.startswith(("text_encoder.", "audio_encoder.")) and not k.endswith("embed_positions.weights")}
    _load_renamed(lm, state, _lm_key)
    return lm.eval()
