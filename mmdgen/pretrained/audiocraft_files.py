"""audiocraft's exported checkpoints, read without audiocraft: ``state_dict.bin`` (the MusicGen LM) and
``compression_state_dict.bin`` (its EnCodec), each a torch pickle of ``{"best_state": tensors, "xp.cfg": the
training configuration as YAML, ...}`` loaded with ``weights_only=True``.

The LM's architecture comes from ``xp.cfg`` (``transformer_lm``, ``codebooks_pattern``, ``conditioners``,
``fuser``, ``dataset.segment_duration``); its text encoder is not in the file (audiocraft fetches T5 by name), so
a T5 folder or cache id must be given or found. A compression file that only names a pretrained codec
(``{"pretrained": "facebook/encodec_32khz"}``) points to that model, resolved like any other source.

Tensor names (facts of audiocraft's modules): ``emb.k``, ``transformer.layers.i.{self_attn, cross_attention}
.{in_proj_weight (q, k, v stacked), out_proj}``, ``norm1``, ``norm_cross``, ``norm2``, ``linear1``, ``linear2``,
``out_norm``, ``linears.k``, ``condition_provider.conditioners.description.output_proj``; the codec's SEANet
``{encoder,decoder}.model.i.{conv.conv, convtr.convtr, block.j.conv.conv, shortcut.conv.conv, lstm}`` with
``weight_g``/``weight_v``, and ``quantizer.vq.layers.k._codebook.*``.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from mmdgen.model.codec import CodecConfig
from mmdgen.model.convert import codec_key_from_transformers
from mmdgen.model.lm import LMConfig
from mmdgen.model.quantizer import QuantizerConfig
from mmdgen.pretrained.tensor_files import TensorFiles, read_pickle

LM_FILE = "state_dict.bin"
CODEC_FILE = "compression_state_dict.bin"


class AudiocraftCheckpoint:
    """One exported file: its tensors, its configuration (a dict), and where it came from."""

    def __init__(self, path: Path):
        payload = read_pickle(path)
        self.path = path
        self.pretrained = payload.get("pretrained")
        if self.pretrained is not None:
            self.config, self.tensors = {}, None
            return
        if "best_state" not in payload or "xp.cfg" not in payload:
            raise ValueError(f"{path}: not an exported audiocraft checkpoint (expected the keys best_state and xp.cfg, "
                             f"found {sorted(map(str, payload))[:6]})")
        state = payload["best_state"]
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]  # a training checkpoint's layout rather than an exported one
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{path}: best_state is not a dictionary of tensors")
        self.config = _parse_config(payload["xp.cfg"], path)
        self.tensors = TensorFiles.from_mapping(state, path)

    def get(self, dotted: str, default=None):
        """``config["a"]["b"]`` for ``"a.b"``; ``default`` when a part is missing."""
        value = self.config
        for part in dotted.split("."):
            if not isinstance(value, dict) or part not in value:
                return default
            value = value[part]
        return value


def _parse_config(raw, path: Path) -> dict:
    if isinstance(raw, dict):
        return raw
    if not isinstance(raw, str):
        raise ValueError(f"{path}: xp.cfg is a {type(raw).__name__}, expected the configuration as YAML text")
    import yaml

    try:
        config = yaml.safe_load(raw)
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: xp.cfg is not valid YAML ({error})") from error
    if not isinstance(config, dict):
        raise ValueError(f"{path}: xp.cfg does not describe a configuration")
    return config


def _require(checkpoint: AudiocraftCheckpoint, dotted: str):
    value = checkpoint.get(dotted)
    if value is None:
        raise ValueError(f"{checkpoint.path}: xp.cfg has no {dotted}")
    return value


# -- the LM ------------------------------------------------------------------------------------------------

_LM_SUPPORTED = {  # xp.cfg key -> the value mmdgen's LM implements (audiocraft's MusicGen settings)
    "transformer_lm.activation": "gelu", "transformer_lm.norm": "layer_norm", "transformer_lm.norm_first": True,
    "transformer_lm.bias_ff": False, "transformer_lm.bias_attn": False, "transformer_lm.positional_embedding": "sin",
    "transformer_lm.layer_scale": None, "transformer_lm.qk_layer_norm": False, "transformer_lm.kv_repeat": 1,
    "transformer_lm.cross_attention": True, "codebooks_pattern.modeling": "delay",
}


def lm_config_from_audiocraft(checkpoint: AudiocraftCheckpoint, text_dim: int) -> LMConfig:
    """LMConfig of an exported MusicGen LM; ValueError naming every setting mmdgen's LM does not implement."""
    problems = [f"{key}={checkpoint.get(key)!r} (mmdgen implements {value!r})"
                for key, value in _LM_SUPPORTED.items()
                if checkpoint.get(key, value) != value and not (value is None and checkpoint.get(key) in (None, 0))]
    conditioners = checkpoint.get("conditioners") or {}
    if set(conditioners) - {"description"} or checkpoint.get("conditioners.description.model") != "t5":
        problems.append(f"conditioners {sorted(conditioners)} (text through T5 only; melody / chroma or other "
                        "conditioners are not supported)")
    if checkpoint.get("fuser.prepend") or checkpoint.get("fuser.sum"):
        problems.append("conditions prepended or summed to the input (melody conditioning)")
    if problems:
        raise ValueError(f"{checkpoint.path}: this MusicGen uses what mmdgen's LM does not implement: "
                         + "; ".join(problems))
    dim = int(_require(checkpoint, "transformer_lm.dim"))
    codebooks = int(_require(checkpoint, "transformer_lm.n_q"))
    channels = int(checkpoint.get("channels", 1))
    stereo = bool(checkpoint.get("interleave_stereo_codebooks.use", False))
    delays = checkpoint.get("codebooks_pattern.delay.delays")
    frame_rate = _frame_rate(checkpoint)
    segment = checkpoint.get("dataset.segment_duration")
    return LMConfig(num_codebooks=codebooks, codebook_size=int(_require(checkpoint, "transformer_lm.card")), dim=dim,
                    layers=int(_require(checkpoint, "transformer_lm.num_layers")),
                    heads=int(_require(checkpoint, "transformer_lm.num_heads")),
                    ffn_dim=int(dim * float(checkpoint.get("transformer_lm.hidden_scale", 4))), text_dim=text_dim,
                    delays=None if delays is None else tuple(int(d) for d in delays),
                    audio_channels=2 if stereo and channels == 2 else 1,
                    context_frames=None if segment is None or frame_rate is None else int(round(segment * frame_rate)))


def _frame_rate(checkpoint: AudiocraftCheckpoint) -> float | None:
    rate, ratios = checkpoint.get("sample_rate"), checkpoint.get("seanet.ratios")
    if rate is None or not ratios:
        return None
    hop = 1
    for ratio in ratios:
        hop *= int(ratio)
    return rate / hop


_LM_NAMES = [(r"^emb\.", "embeddings."), (r"^transformer\.layers\.", "layers."), (r"\.cross_attention\.", ".cross_attn."),
             (r"\.linear1\.", ".fc1."), (r"\.linear2\.", ".fc2."), (r"\.norm1\.", ".self_attn_norm."),
             (r"\.norm_cross\.", ".cross_attn_norm."), (r"\.norm2\.", ".ffn_norm."), (r"^out_norm\.", "norm."),
             (r"^linears\.", "heads."), (r"^condition_provider\.conditioners\.description\.output_proj\.",
                                         "text_projection.")]


def lm_tensors_from_audiocraft(checkpoint: AudiocraftCheckpoint, dim: int) -> TensorFiles:
    """The LM's tensors under our names (the stacked q/k/v projections split)."""
    renamed = {}
    for name in checkpoint.tensors.names():
        ours = name
        for theirs, replacement in _LM_NAMES:
            ours = re.sub(theirs, replacement, ours)
        value = checkpoint.tensors.get(name)
        if ours.endswith(".in_proj_weight"):
            if value.shape[0] != 3 * dim:
                raise ValueError(f"{checkpoint.path}: tensor {name} has shape {tuple(value.shape)}, expected "
                                 f"({3 * dim}, {dim}) stacked q, k, v projections")
            base = ours.removesuffix("in_proj_weight")
            for part, chunk in zip(("q_proj", "k_proj", "v_proj"), value.split(dim)):
                renamed[f"{base}{part}.weight"] = chunk
        else:
            renamed[ours] = value
    return TensorFiles.from_mapping(renamed, checkpoint.path)


# -- the codec ---------------------------------------------------------------------------------------------

def codec_config_from_audiocraft(checkpoint: AudiocraftCheckpoint) -> CodecConfig:
    """CodecConfig of an exported EnCodec (``compression_model: encodec`` with a SEANet and an RVQ)."""
    problems = []
    if checkpoint.get("compression_model", "encodec") != "encodec":
        problems.append(f"compression_model={checkpoint.get('compression_model')!r} (encodec only)")
    if checkpoint.get("seanet.norm", "weight_norm") != "weight_norm":
        problems.append(f"seanet.norm={checkpoint.get('seanet.norm')!r} (weight_norm only)")
    if checkpoint.get("encodec.renormalize", False):
        problems.append("encodec.renormalize=true (input loudness normalisation)")
    if checkpoint.get("seanet.activation", "ELU") != "ELU":
        problems.append(f"seanet.activation={checkpoint.get('seanet.activation')!r} (ELU only)")
    if int(checkpoint.get("seanet.disable_norm_outer_blocks", 0)):
        problems.append("seanet.disable_norm_outer_blocks (every block weight-normalised only)")
    if problems:
        raise ValueError(f"{checkpoint.path}: this EnCodec uses what mmdgen's codec does not implement: "
                         + "; ".join(problems))
    causal = bool(checkpoint.get("seanet.causal", checkpoint.get("encodec.causal", False)))
    return CodecConfig(
        sample_rate=int(_require(checkpoint, "sample_rate")), channels=int(checkpoint.get("channels", 1)),
        num_filters=int(_require(checkpoint, "seanet.n_filters")),
        ratios=tuple(int(r) for r in _require(checkpoint, "seanet.ratios")),
        dimension=int(_require(checkpoint, "seanet.dimension")),
        num_residual_layers=int(checkpoint.get("seanet.n_residual_layers", 1)),
        residual_kernel_size=int(checkpoint.get("seanet.residual_kernel_size", 3)),
        dilation_base=int(checkpoint.get("seanet.dilation_base", 2)),
        kernel_size=int(checkpoint.get("seanet.kernel_size", 7)),
        last_kernel_size=int(checkpoint.get("seanet.last_kernel_size", 7)),
        lstm_layers=int(checkpoint.get("seanet.lstm", 2)), compress=int(checkpoint.get("seanet.compress", 2)),
        causal=causal, pad_mode=str(checkpoint.get("seanet.pad_mode", "reflect")),
        trim_right_ratio=float(checkpoint.get("seanet.decoder.trim_right_ratio", 1.0)),
        conv_shortcut=not bool(checkpoint.get("seanet.true_skip", True)),
        quantizer=QuantizerConfig(dim=int(_require(checkpoint, "seanet.dimension")),
                                  codebook_size=int(_require(checkpoint, "rvq.bins")),
                                  num_codebooks=int(_require(checkpoint, "rvq.n_q")), kmeans_init=False),
    )


_SEANET = re.compile(r"^(encoder|decoder)\.model\.")


def codec_key_from_audiocraft(name: str) -> str:
    """An audiocraft EnCodec tensor name -> ours (through transformers' names, which ours follow)."""
    name = _SEANET.sub(lambda m: f"{m[1]}.layers.", name)
    name = name.replace(".conv.conv.", ".conv.").replace(".convtr.convtr.", ".conv.")
    name = re.sub(r"^quantizer\.vq\.layers\.(\d+)\._codebook\.", r"quantizer.layers.\1.codebook.", name)
    return codec_key_from_transformers(name)
