"""Weights to and from Hugging Face transformers' layouts, so users can start from official checkpoints on disk.

Codec: transformers' ``EncodecModel`` (weight-normalised convolutions, non-chunked, no input
normalisation: the layout of the 32 kHz MusicGen codec). The SEANet layers share their names; only
the quantizer's differ (``quantizer.layers.k.codebook.{embed, embed_avg, cluster_size, inited}`` there,
``quantizer.stages.k.{embed, embed_sum, cluster_size, initialized}`` here), and checkpoints saved by older
transformers name the weight-norm parts ``weight_g`` / ``weight_v``.

Language model: the decoder of ``MusicgenForCausalLM`` or ``MusicgenForConditionalGeneration`` (unscaled
embeddings, GELU; mono, or stereo as 2 x K interleaved codebooks with delays 0, 0, 1, 1, ...); with the latter,
its ``enc_to_dec_proj`` becomes our ``text_projection``. ``MusicgenMelodyForConditionalGeneration`` has the same
names without cross-attention (a prefix LM, ``melody_lm_config``), and ``audio_enc_to_dec_proj`` becomes our
``melody_projection``.

The configurations are read from ``config.json`` dictionaries (``*_config_from_dict``), with transformers'
defaults for the keys a file leaves out, so no transformers object is needed to load a checkpoint; and written
back as such dictionaries (``*_config_to_dict``, with ``*_key_to_transformers`` for the tensor names), so none is
needed to export one either.
"""

from __future__ import annotations

import dataclasses
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


# transformers' defaults for the keys a config.json may leave out (facts of EncodecConfig / MusicgenDecoderConfig)
ENCODEC_DEFAULTS = dict(sampling_rate=24000, audio_channels=1, normalize=False, chunk_length_s=None, hidden_size=128,
                        num_filters=32, num_residual_layers=1, upsampling_ratios=[8, 5, 4, 2], norm_type="weight_norm",
                        kernel_size=7, last_kernel_size=7, residual_kernel_size=3, dilation_growth_rate=2,
                        use_causal_conv=True, pad_mode="reflect", compress=2, num_lstm_layers=2, trim_right_ratio=1.0,
                        codebook_size=1024, codebook_dim=None, use_conv_shortcut=True,
                        target_bandwidths=[1.5, 3.0, 6.0, 12.0, 24.0])
DECODER_DEFAULTS = dict(vocab_size=2048, num_hidden_layers=24, ffn_dim=4096, num_attention_heads=16,
                        activation_function="gelu", hidden_size=1024, scale_embedding=False, num_codebooks=4,
                        audio_channels=1, cross_attention_hidden_size=None)
MELODY_DEFAULTS = dict(num_chroma=12, chroma_length=235)  # MusicgenMelodyConfig's (235 frames: 30 s of chroma)


def _with_defaults(config: dict, defaults: dict) -> dict:
    return {**defaults, **{k: v for k, v in config.items() if k in defaults}}


def encodec_quantizers(config: dict) -> int:
    """Codebooks an EnCodec config uses at its last (highest) target bandwidth (transformers' rule)."""
    c = _with_defaults(config, ENCODEC_DEFAULTS)
    frame_rate = math.ceil(c["sampling_rate"] / math.prod(c["upsampling_ratios"]))
    bits = math.ceil(math.log2(c["codebook_size"]))
    return int(1000 * c["target_bandwidths"][-1] // (frame_rate * bits))


def codec_config_from_dict(config: dict) -> CodecConfig:
    """CodecConfig of a transformers ``EncodecConfig`` dictionary; ValueError for what this codec does not do."""
    c = _with_defaults(config, ENCODEC_DEFAULTS)
    unsupported = []
    if c["norm_type"] != "weight_norm":
        unsupported.append(f"norm_type={c['norm_type']!r} (weight_norm only)")
    if c["normalize"]:
        unsupported.append("normalize=True (input loudness normalisation)")
    if c["chunk_length_s"] is not None:
        unsupported.append(f"chunk_length_s={c['chunk_length_s']} (chunked encoding)")
    if unsupported:
        raise ValueError("this EnCodec configuration uses features mmdgen's codec does not have: "
                         + "; ".join(unsupported))
    return CodecConfig(
        sample_rate=c["sampling_rate"], channels=c["audio_channels"], num_filters=c["num_filters"],
        ratios=tuple(c["upsampling_ratios"]), dimension=c["hidden_size"],
        num_residual_layers=c["num_residual_layers"], residual_kernel_size=c["residual_kernel_size"],
        dilation_base=c["dilation_growth_rate"], kernel_size=c["kernel_size"], last_kernel_size=c["last_kernel_size"],
        lstm_layers=c["num_lstm_layers"], compress=c["compress"], causal=c["use_causal_conv"],
        pad_mode=c["pad_mode"], trim_right_ratio=c["trim_right_ratio"], conv_shortcut=c["use_conv_shortcut"],
        quantizer=QuantizerConfig(dim=c["codebook_dim"] or c["hidden_size"], codebook_size=c["codebook_size"],
                                  num_codebooks=encodec_quantizers(c), kmeans_init=False),
    )


def codec_config_from_transformers(config) -> CodecConfig:
    """CodecConfig of a transformers ``EncodecConfig`` object."""
    return codec_config_from_dict(config.to_dict())


def codec_config_to_dict(cfg: CodecConfig) -> dict:
    """transformers' ``EncodecConfig`` dictionary (a config.json) of a CodecConfig; ``codec_config_from_dict``
    reads it back. The codebooks in use are stated as the one target bandwidth that gives K of them."""
    codebooks = cfg.quantizer.num_codebooks
    frame_rate = math.ceil(cfg.sample_rate / cfg.hop_length)
    bits = math.ceil(math.log2(cfg.quantizer.codebook_size))
    bandwidth = codebooks * frame_rate * bits / 1000
    if 1000 * bandwidth // (frame_rate * bits) < codebooks:  # the float product fell just short of K
        bandwidth = math.nextafter(bandwidth, math.inf)
    return dict(
        model_type="encodec", target_bandwidths=[bandwidth], sampling_rate=cfg.sample_rate,
        audio_channels=cfg.channels, normalize=False, chunk_length_s=None, overlap=None, hidden_size=cfg.dimension,
        num_filters=cfg.num_filters, num_residual_layers=cfg.num_residual_layers, upsampling_ratios=list(cfg.ratios),
        norm_type="weight_norm", kernel_size=cfg.kernel_size, last_kernel_size=cfg.last_kernel_size,
        residual_kernel_size=cfg.residual_kernel_size, dilation_growth_rate=cfg.dilation_base,
        use_causal_conv=cfg.causal, pad_mode=cfg.pad_mode, compress=cfg.compress, num_lstm_layers=cfg.lstm_layers,
        trim_right_ratio=cfg.trim_right_ratio, codebook_size=cfg.quantizer.codebook_size,
        codebook_dim=cfg.quantizer.dim, use_conv_shortcut=cfg.conv_shortcut,
    )


def codec_config_to_transformers(cfg: CodecConfig):
    from transformers import EncodecConfig

    config = codec_config_to_dict(cfg)
    del config["model_type"]
    return EncodecConfig(**config)


_OLD_WEIGHT_NORM = re.compile(r"\.weight_(g|v)$")


def _to_ours(key: str) -> str:
    """A transformers EnCodec tensor name -> ours (older files' ``weight_g``/``weight_v`` included)."""
    key = _OLD_WEIGHT_NORM.sub(lambda m: ".parametrizations.weight.original" + ("0" if m[1] == "g" else "1"), key)
    match = _THEIRS.match(key)
    return f"quantizer.stages.{match[1]}.{_QUANTIZER_NAMES[match[2]]}" if match else key


codec_key_from_transformers = _to_ours


def _to_theirs(key: str) -> str:
    match = _OURS.match(key)
    if not match:
        return key
    theirs = {v: k for k, v in _QUANTIZER_NAMES.items()}[match[2]]
    return f"quantizer.layers.{match[1]}.codebook.{theirs}"


codec_key_to_transformers = _to_theirs


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
    (r"^enc_to_dec_proj\.", "text_projection."), (r"^audio_enc_to_dec_proj\.", "melody_projection."),
    (r"\.encoder_attn_layer_norm\.", ".cross_attn_norm."),
    (r"\.encoder_attn\.", ".cross_attn."), (r"\.self_attn_layer_norm\.", ".self_attn_norm."),
    (r"\.final_layer_norm\.", ".ffn_norm."),
]
_LM_NAMES_TO_THEIRS = [  # (ours, theirs) inside the decoder stack
    (r"^embeddings\.", "embed_tokens."), (r"^norm\.", "layer_norm."),
    (r"\.cross_attn_norm\.", ".encoder_attn_layer_norm."), (r"\.cross_attn\.", ".encoder_attn."),
    (r"\.self_attn_norm\.", ".self_attn_layer_norm."), (r"\.ffn_norm\.", ".final_layer_norm."),
]
_DECODER_PREFIX = re.compile(r"^(decoder\.)?(model\.decoder\.)?")
LAYER_NORM_EPS = 1e-5  # MusicGen's decoder LayerNorms: torch's default, not configurable in transformers


def transformers_delays(num_codebooks: int, channels: int) -> tuple[int, ...]:
    """The delays transformers' MusicGen decodes with: 0..K-1, or 0, 0, 1, 1, ... for stereo's 2K codebooks."""
    return tuple(k for k in range(num_codebooks // channels) for _ in range(channels))


def lm_config_from_dict(decoder: dict, text_dim: int | None = None) -> LMConfig:
    """LMConfig of a transformers ``MusicgenDecoderConfig`` dictionary; ValueError for what this LM does not do.
    Stereo (``audio_channels=2``): 2K codebooks, left and right interleaved, delays 0, 0, 1, 1, ..."""
    d = _with_defaults(decoder, DECODER_DEFAULTS)
    unsupported = []
    if d["activation_function"] != "gelu":
        unsupported.append(f"activation_function={d['activation_function']!r} (gelu only)")
    if d["scale_embedding"]:
        unsupported.append("scale_embedding=True")
    if d["audio_channels"] not in (1, 2):
        unsupported.append(f"audio_channels={d['audio_channels']} (1 or 2)")
    elif d["num_codebooks"] % d["audio_channels"]:
        unsupported.append(f"num_codebooks={d['num_codebooks']} not a multiple of audio_channels")
    if d["cross_attention_hidden_size"] is not None:
        unsupported.append("cross_attention_hidden_size is set (text states projected another way)")
    if unsupported:
        raise ValueError("this MusicGen decoder configuration uses features mmdgen's LM does not have: "
                         + "; ".join(unsupported))
    channels = d["audio_channels"]
    delays = None if channels == 1 else transformers_delays(d["num_codebooks"], channels)
    return LMConfig(num_codebooks=d["num_codebooks"], codebook_size=d["vocab_size"], dim=d["hidden_size"],
                    layers=d["num_hidden_layers"], heads=d["num_attention_heads"], ffn_dim=d["ffn_dim"],
                    text_dim=text_dim or d["hidden_size"], delays=delays, audio_channels=channels)


def melody_lm_config(cfg: LMConfig, config: dict) -> LMConfig:
    """The LM of a transformers ``MusicgenMelodyConfig`` dictionary, ``cfg`` being its decoder's: no
    cross-attention, the projected chroma (``num_chroma`` classes, repeated or cut to ``chroma_length`` frames)
    and text states prepended to the code steps."""
    melody = _with_defaults(config, MELODY_DEFAULTS)
    return dataclasses.replace(cfg, conditioning="prefix", melody_dim=melody["num_chroma"],
                               melody_frames=melody["chroma_length"])


def lm_config_to_dict(cfg: LMConfig) -> dict:
    """transformers' ``MusicgenDecoderConfig`` dictionary of an LMConfig (the decoder's sizes; its pattern, text
    width and context are not part of it). ValueError when the decoder computes what transformers' cannot."""
    if cfg.norm_eps != LAYER_NORM_EPS:
        raise ValueError(f"norm_eps={cfg.norm_eps} (transformers' MusicGen decoder has LayerNorms of eps "
                         f"{LAYER_NORM_EPS})")
    special = cfg.special_token
    return dict(
        model_type="musicgen_decoder", vocab_size=cfg.codebook_size, max_position_embeddings=2048,
        num_hidden_layers=cfg.layers, ffn_dim=cfg.ffn_dim, num_attention_heads=cfg.heads, layerdrop=0.0,
        use_cache=True, activation_function="gelu", hidden_size=cfg.dim, dropout=cfg.dropout, attention_dropout=0.0,
        activation_dropout=0.0, initializer_factor=0.02, scale_embedding=False, num_codebooks=cfg.num_codebooks,
        audio_channels=cfg.audio_channels, pad_token_id=special, bos_token_id=special, decoder_start_token_id=special,
        eos_token_id=None, tie_word_embeddings=False, cross_attention_hidden_size=None,
    )


def lm_config_from_transformers(decoder_config, text_dim: int | None = None) -> LMConfig:
    """LMConfig of a transformers ``MusicgenDecoderConfig`` object."""
    return lm_config_from_dict(decoder_config.to_dict(), text_dim)


def lm_key_from_transformers(key: str) -> str | None:
    """A tensor name of a transformers MusicGen checkpoint -> the LM's, or None for another part (text or audio
    encoder) and for the sinusoidal position table older files store."""
    if key.startswith(("text_encoder.", "audio_encoder.")) or key.endswith("embed_positions.weights"):
        return None
    key = _DECODER_PREFIX.sub("", key)
    for theirs, ours in _LM_NAMES:
        key = re.sub(theirs, ours, key)
    return key


def lm_key_to_transformers(key: str, causal_lm: bool = False) -> str:
    """An LM tensor name -> transformers': in a ``MusicgenForConditionalGeneration`` (``decoder.model.decoder.*``,
    ``decoder.lm_heads.*``, ``enc_to_dec_proj.*``), or with ``causal_lm`` in a ``MusicgenForCausalLM``
    (``model.decoder.*``, ``lm_heads.*``), which has no text projection."""
    prefix = "" if causal_lm else "decoder."
    if key.startswith("text_projection."):
        if causal_lm:
            raise ValueError(f"{key}: a MusicgenForCausalLM holds no text projection")
        return "enc_to_dec_proj." + key.removeprefix("text_projection.")
    if key.startswith("heads."):
        return f"{prefix}lm_heads." + key.removeprefix("heads.")
    for ours, theirs in _LM_NAMES_TO_THEIRS:
        key = re.sub(ours, theirs, key)
    return f"{prefix}model.decoder.{key}"


def lm_from_transformers(model) -> MusicLM:
    """A MusicLM holding the decoder weights of a transformers ``MusicgenForCausalLM`` or
    ``MusicgenForConditionalGeneration`` (the text projection too, for the latter)."""
    conditional = hasattr(model, "text_encoder")
    decoder_config = model.config.decoder if conditional else model.config
    text_dim = model.text_encoder.config.hidden_size if conditional else None
    lm = MusicLM(lm_config_from_transformers(decoder_config, text_dim))
    state = {lm_key_from_transformers(k): v for k, v in model.state_dict().items()}
    state.pop(None, None)
    _load_renamed(lm, state, lambda key: key)
    return lm.eval()
