"""audiocraft's exported checkpoints, read without audiocraft: ``state_dict.bin`` (the MusicGen LM) and
``compression_state_dict.bin`` (its EnCodec), each a torch pickle of ``{"best_state": tensors, "xp.cfg": the
training configuration as YAML, "version", "exported"}`` loaded with ``weights_only=True``.

``xp.cfg`` is hydra's configuration as ``OmegaConf.to_yaml`` writes it: interpolations are kept, not resolved
(``seanet.causal: ${encodec.causal}``, ``encodec.sample_rate: ${sample_rate}``), so every value read here is
resolved first. A setting the file leaves out takes the value audiocraft's builders would then use (the
defaults of its classes' signatures); sizes must be in the file.

The LM's architecture comes from ``transformer_lm``, ``codebooks_pattern``, ``conditioners`` and ``fuser``.
Its text encoder is not in the file (audiocraft fetches ``conditioners.description.t5.name`` by name), and
neither is the codec's frame rate, which ``context_frames`` needs (``dataset.segment_duration`` seconds): the
caller gives both. A compression file that only names a pretrained codec (``{"pretrained":
"facebook/encodec_32khz"}``) points to that model, resolved like any other source.

Tensor names (checked against audiocraft 1.3.0, tests/audiocraft_reference.py): ``emb.k``,
``transformer.layers.i.{self_attn, cross_attention}.{in_proj_weight (q, k, v stacked by rows), out_proj}``
(``.mha.`` inside both when the LM was built with ``memory_efficient`` and ``custom`` false), ``norm1``,
``norm_cross``, ``norm2``, ``linear1``, ``linear2``, ``out_norm``, ``linears.k``,
``condition_provider.conditioners.description.output_proj`` (always a Linear, even where the widths agree); the
codec's SEANet ``{encoder,decoder}.model.i.{conv.conv, convtr.convtr, block.j.conv.conv, shortcut.conv.conv,
lstm}`` with ``weight_g``/``weight_v``, and ``quantizer.vq.layers.k._codebook.{inited, cluster_size, embed,
embed_avg}``.

The writers (``*_to_audiocraft``) invert all of this for ``mmdgen.pretrained.export``: an ``xp.cfg`` of
audiocraft's MusicGen defaults (the settings above at the values mmdgen implements) with the model's sizes, and
the tensors under audiocraft's names.

One difference in the maths: audiocraft's cross-attention takes no mask. Its text conditioner zeroes the
projected states at padded positions, and those zero keys stay in the softmax (score 0, value 0); mmdgen's LM
leaves them out. The two agree for a text without padding and for a null condition (no text at all), not for
the shorter texts of a padded batch.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from mmdgen.model.codec import Codec, CodecConfig
from mmdgen.model.convert import codec_key_from_transformers, codec_key_to_transformers
from mmdgen.model.lm import LMConfig
from mmdgen.model.quantizer import QuantizerConfig
from mmdgen.tensor_files import TensorFiles, read_pickle

LM_FILE = "state_dict.bin"
CODEC_FILE = "compression_state_dict.bin"
# the names audiocraft's T5Conditioner fetches from the hub (any other fails its assertion) and their widths
T5_WIDTHS = {"t5-small": 512, "t5-base": 768, "t5-large": 1024, "t5-3b": 1024, "t5-11b": 1024,
             "google/flan-t5-small": 512, "google/flan-t5-base": 768, "google/flan-t5-large": 1024,
             "google/flan-t5-xl": 2048, "google/flan-t5-xxl": 4096}

_ABSENT = object()
_MISSING_VALUE = "???"  # OmegaConf's mandatory value never set
_INTERPOLATION = re.compile(r"\$\{([^${}]*)\}")


class AudiocraftCheckpoint:
    """One exported file: its tensors, its configuration (a dict, read through ``get``), and where it came
    from."""

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
        """``config["a"]["b"]`` for ``"a.b"`` with its interpolations resolved; ``default`` when a part is
        missing (or holds OmegaConf's unset ``???``)."""
        parts = dotted.split(".")
        value = self._lookup(parts)
        return default if value is _ABSENT else self._resolve(value, parts, ())

    def _lookup(self, parts: list[str]):
        value = self.config
        for part in parts:
            if not isinstance(value, dict) or part not in value:
                return _ABSENT
            value = value[part]
        return _ABSENT if value == _MISSING_VALUE else value

    def _resolve(self, value, parts: list[str], seen: tuple[str, ...]):
        if isinstance(value, dict):
            return {key: self._resolve(item, [*parts, str(key)], seen) for key, item in value.items()}
        if isinstance(value, list):
            return [self._resolve(item, [*parts, str(index)], seen) for index, item in enumerate(value)]
        if not isinstance(value, str) or "${" not in value:
            return value
        whole = _INTERPOLATION.fullmatch(value)
        if whole:  # "${a.b}" alone takes the referenced value with its type
            return self._follow(whole[1], parts, seen)
        return _INTERPOLATION.sub(lambda match: str(self._follow(match[1], parts, seen)), value)

    def _follow(self, reference: str, parts: list[str], seen: tuple[str, ...]):
        setting = f"{self.path}: xp.cfg's {'.'.join(parts)} = ${{{reference}}}"
        if ":" in reference:
            raise ValueError(f"{setting} calls an OmegaConf resolver, which mmdgen does not evaluate")
        ups = len(reference) - len(reference.lstrip("."))  # ${.x}: beside the key; ${..x}: one level up
        target = parts[: len(parts) - ups] + reference[ups:].split(".") if ups else reference.split(".")
        name = ".".join(target)
        if name in seen:
            raise ValueError(f"{setting} is circular (through {' -> '.join(seen)})")
        value = self._lookup(target)
        if value is _ABSENT:
            raise ValueError(f"{setting} refers to {name}, which xp.cfg does not set")
        return self._resolve(value, target, (*seen, name))


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


def _unsupported(checkpoint: AudiocraftCheckpoint, settings: dict) -> list[str]:
    """``settings``: key -> (audiocraft's value when xp.cfg leaves the key out, the value mmdgen implements)."""
    problems = []
    for key, (absent, implemented) in settings.items():
        value = checkpoint.get(key, _ABSENT)
        if value is _ABSENT and absent != implemented:
            problems.append(f"{key} not set, so audiocraft's default {absent!r} (mmdgen implements {implemented!r})")
        elif value is not _ABSENT and value != implemented:
            problems.append(f"{key}={value!r} (mmdgen implements {implemented!r})")
    return problems


# -- the LM ------------------------------------------------------------------------------------------------

_LM_SETTINGS = {  # LMModel's / StreamingTransformer(Layer)'s / the pattern's / ConditionFuser's defaults
    "transformer_lm.activation": ("relu", "gelu"), "transformer_lm.norm": ("layer_norm", "layer_norm"),
    "transformer_lm.norm_first": (False, True), "transformer_lm.bias_ff": (True, False),
    "transformer_lm.bias_attn": (True, False), "transformer_lm.bias_proj": (True, False),
    "transformer_lm.causal": (False, True), "transformer_lm.past_context": (None, None),
    "transformer_lm.positional_embedding": ("sin", "sin"), "transformer_lm.max_period": (10000, 10000),
    "transformer_lm.positional_scale": (1.0, 1.0), "transformer_lm.layer_scale": (None, None),
    "transformer_lm.qk_layer_norm": (False, False), "transformer_lm.qk_layer_norm_cross": (False, False),
    "transformer_lm.kv_repeat": (1, 1), "codebooks_pattern.modeling": (None, "delay"),
    "codebooks_pattern.delay.flatten_first": (0, 0), "codebooks_pattern.delay.empty_initial": (0, 0),
    "fuser.cross": ([], ["description"]), "fuser.prepend": ([], []), "fuser.sum": ([], []),
    "fuser.input_interpolate": ([], []), "fuser.cross_attention_pos_emb": (False, False),
}


def lm_config_from_audiocraft(checkpoint: AudiocraftCheckpoint, text_dim: int,
                              frame_rate: float | None = None) -> LMConfig:
    """LMConfig of an exported MusicGen LM; ValueError naming every setting mmdgen's LM does not implement.
    ``text_dim``: the width of the text encoder's states; ``frame_rate``: the codec's frames per second (for
    ``context_frames``; None leaves it unset). ``transformer_lm.cross_attention`` is not read: audiocraft's
    builder turns cross-attention on whenever ``fuser.cross`` names a condition."""
    problems = _unsupported(checkpoint, _LM_SETTINGS)
    conditioners = {name for name in (checkpoint.get("conditioners") or {}) if name != "args"}  # args: options
    if conditioners != {"description"} or checkpoint.get("conditioners.description.model") != "t5":
        problems.append(f"conditioners {sorted(conditioners)} (a T5 description only; melody / chroma, CLAP or "
                        "other conditioners are not supported)")
    dim = int(_require(checkpoint, "transformer_lm.dim"))
    if text_dim == dim:
        problems.append(f"transformer_lm.dim={dim} equals the text width: audiocraft still projects the text "
                        "states (output_proj), mmdgen's LM has no projection at equal widths")
    if problems:
        raise ValueError(f"{checkpoint.path}: this MusicGen uses what mmdgen's LM does not implement: "
                         + "; ".join(problems))
    codebooks = int(_require(checkpoint, "transformer_lm.n_q"))
    channels = int(checkpoint.get("channels", 1))
    stereo = bool(checkpoint.get("interleave_stereo_codebooks.use", False))
    delays = checkpoint.get("codebooks_pattern.delay.delays")
    segment = checkpoint.get("dataset.segment_duration")
    return LMConfig(num_codebooks=codebooks, codebook_size=int(_require(checkpoint, "transformer_lm.card")), dim=dim,
                    layers=int(_require(checkpoint, "transformer_lm.num_layers")),
                    heads=int(_require(checkpoint, "transformer_lm.num_heads")),
                    ffn_dim=int(dim * float(checkpoint.get("transformer_lm.hidden_scale", 4))), text_dim=text_dim,
                    delays=None if delays is None else tuple(int(d) for d in delays),
                    audio_channels=2 if stereo and channels == 2 else 1, attend_text_padding=True,
                    context_frames=None if segment is None or frame_rate is None else int(round(segment * frame_rate)))


_LM_NAMES = [(r"^emb\.", "embeddings."), (r"^transformer\.layers\.", "layers."),
             (r"\.cross_attention\.", ".cross_attn."), (r"\.mha\.", "."),
             (r"\.in_proj_weight\[([qkv])\]$", r".\1_proj.weight"), (r"\.linear1\.", ".fc1."),
             (r"\.linear2\.", ".fc2."), (r"\.norm1\.", ".self_attn_norm."), (r"\.norm_cross\.", ".cross_attn_norm."),
             (r"\.norm2\.", ".ffn_norm."), (r"^out_norm\.", "norm."), (r"^linears\.", "heads."),
             (r"^condition_provider\.conditioners\.description\.output_proj\.", "text_projection.")]


def lm_tensors_from_audiocraft(checkpoint: AudiocraftCheckpoint, dim: int) -> TensorFiles:
    """The LM's tensors under audiocraft's names, each stacked ``in_proj_weight`` split into its q, k and v rows
    (``...in_proj_weight[q]``); load them with ``load_module(lm, tensors, lm_key_from_audiocraft)``."""
    tensors = {}
    for name in checkpoint.tensors.names():
        value = checkpoint.tensors.get(name)
        if not name.endswith(".in_proj_weight"):
            tensors[name] = value
            continue
        if value.dim() != 2 or value.shape[0] != 3 * dim:
            raise ValueError(f"{checkpoint.path}: tensor {name} has shape {tuple(value.shape)}, expected "
                             f"({3 * dim}, {dim}) stacked q, k, v projections")
        for part, rows in zip("qkv", value.split(dim)):
            tensors[f"{name}[{part}]"] = rows
    return TensorFiles.from_mapping(tensors, checkpoint.path)


def lm_key_from_audiocraft(name: str) -> str:
    """A name of ``lm_tensors_from_audiocraft`` -> the LM's."""
    for theirs, ours in _LM_NAMES:
        name = re.sub(theirs, ours, name)
    return name


_LM_NAMES_TO_THEIRS = [(r"^embeddings\.", "emb."), (r"^layers\.", "transformer.layers."),
                       (r"\.cross_attn\.", ".cross_attention."), (r"\.fc1\.", ".linear1."), (r"\.fc2\.", ".linear2."),
                       (r"\.self_attn_norm\.", ".norm1."), (r"\.cross_attn_norm\.", ".norm_cross."),
                       (r"\.ffn_norm\.", ".norm2."), (r"^norm\.", "out_norm."), (r"^heads\.", "linears."),
                       (r"^text_projection\.", "condition_provider.conditioners.description.output_proj.")]
_QKV = re.compile(r"^(.*)\.([qkv])_proj\.weight$")


def lm_tensors_to_audiocraft(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The LM's state dict under audiocraft's names, each attention's q, k and v rows stacked into its
    ``in_proj_weight`` (``lm_tensors_from_audiocraft`` splits them again)."""
    tensors, stacks = {}, {}
    for name, value in state.items():
        theirs = name
        for ours, replacement in _LM_NAMES_TO_THEIRS:
            theirs = re.sub(ours, replacement, theirs)
        match = _QKV.match(theirs)
        if match:
            stacks.setdefault(f"{match[1]}.in_proj_weight", {})[match[2]] = value
        else:
            tensors[theirs] = value
    for name, parts in stacks.items():
        tensors[name] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return tensors


def lm_config_to_audiocraft(cfg: LMConfig, t5_name: str, sample_rate: int, frame_rate: float) -> dict:
    """The ``xp.cfg`` (as a dictionary) of an exported MusicGen LM whose text encoder audiocraft fetches as
    ``t5_name`` (``"???"``, OmegaConf's unset value, when the user must name it), for a codec of ``sample_rate``
    and ``frame_rate``. ValueError naming what audiocraft's LM cannot hold."""
    problems = []
    if cfg.pattern not in ("delay", "parallel"):
        problems.append(f"pattern {cfg.pattern!r} (audiocraft's MusicGen LMs decode with delays; mmdgen reads "
                        "those back only)")
    if cfg.text_dim == cfg.dim:
        problems.append(f"text_dim = dim = {cfg.dim}: audiocraft always projects the text states, mmdgen's LM has no "
                        "projection at equal widths")
    hidden_scale = cfg.ffn_dim / cfg.dim
    if int(hidden_scale * cfg.dim) != cfg.ffn_dim:
        problems.append(f"ffn_dim={cfg.ffn_dim} is not dim x a hidden_scale audiocraft reproduces")
    if cfg.norm_eps != 1e-5:
        problems.append(f"norm_eps={cfg.norm_eps} (audiocraft's LayerNorms have eps 1e-5)")
    if problems:
        raise ValueError("audiocraft's LM cannot hold this one: " + "; ".join(problems))
    delays = [0] * cfg.num_codebooks if cfg.pattern == "parallel" else list(cfg.delays or range(cfg.num_codebooks))
    transformer = {key.removeprefix("transformer_lm."): implemented for key, (_, implemented) in _LM_SETTINGS.items()
                   if key.startswith("transformer_lm.")}
    transformer.update(dim=cfg.dim, num_heads=cfg.heads, num_layers=cfg.layers, hidden_scale=hidden_scale,
                       n_q=cfg.num_codebooks, card=cfg.codebook_size, dropout=cfg.dropout, emb_lr=None,
                       custom=False, memory_efficient=True, attention_as_float32=False, xpos=False,
                       checkpointing="none", weight_init="gaussian", depthwise_init="current", zero_bias_init=True,
                       cross_attention=False, attention_dropout=None, two_step_cfg=False)
    segment = None if cfg.context_frames is None else cfg.context_frames / frame_rate
    return {
        "device": "cpu", "dtype": "float32", "autocast": False, "autocast_dtype": "float16",
        "efficient_attention_backend": "torch", "solver": "musicgen", "sample_rate": sample_rate,
        "channels": cfg.audio_channels,
        "interleave_stereo_codebooks": {"use": cfg.audio_channels == 2, "per_timestep": False},
        "dataset": {"segment_duration": segment}, "lm_model": "transformer_lm",
        "codebooks_pattern": {"modeling": "delay", "delay": {"delays": delays, "flatten_first": 0,
                                                             "empty_initial": 0}},
        "transformer_lm": transformer,
        "classifier_free_guidance": {"training_dropout": 0.3, "inference_coef": 3.0},
        "attribute_dropout": {},
        "fuser": {"cross_attention_pos_emb": False, "cross_attention_pos_emb_scale": 1, "sum": [], "prepend": [],
                  "cross": ["description"], "input_interpolate": []},
        "conditioners": {"description": {"model": "t5", "t5": {"name": t5_name, "finetune": False,
                                                               "word_dropout": 0.3, "normalize_text": False}}},
        "generate": {"lm": {"use_sampling": True, "top_k": 250, "top_p": 0.0}},
    }


# -- the codec ---------------------------------------------------------------------------------------------

_CODEC_SETTINGS = {  # EncodecModel's / SEANetEncoder's / SEANetDecoder's defaults (None: the builder needs it)
    "compression_model": (None, "encodec"), "encodec.autoencoder": (None, "seanet"),
    "encodec.quantizer": (None, "rvq"), "encodec.renormalize": (False, False),
    "seanet.norm": ("none", "weight_norm"), "seanet.norm_params": ({}, {}), "seanet.activation": ("ELU", "ELU"),
    "seanet.activation_params": ({"alpha": 1.0}, {"alpha": 1.0}), "seanet.disable_norm_outer_blocks": (0, 0),
    "seanet.decoder.final_activation": (None, None),
}
_SEANET_DEFAULTS = dict(n_residual_layers=3, residual_kernel_size=3, dilation_base=2, kernel_size=7,
                        last_kernel_size=7, compress=2, lstm=0, causal=False, pad_mode="reflect", true_skip=True,
                        channels=1)
_DECODER_ONLY = {"trim_right_ratio", "final_activation", "final_activation_params"}


def codec_config_from_audiocraft(checkpoint: AudiocraftCheckpoint) -> CodecConfig:
    """CodecConfig of an exported EnCodec (``compression_model: encodec`` with a SEANet and an RVQ)."""
    problems = _unsupported(checkpoint, _CODEC_SETTINGS)
    seanet = {key: checkpoint.get(f"seanet.{key}", default) for key, default in _SEANET_DEFAULTS.items()}
    for side in ("encoder", "decoder"):  # per-side overrides of the shared seanet settings
        for key, value in (checkpoint.get(f"seanet.{side}") or {}).items():
            if not (side == "decoder" and key in _DECODER_ONLY) and value != checkpoint.get(f"seanet.{key}"):
                problems.append(f"seanet.{side}.{key}={value!r} (encoder and decoder built alike only)")
    if int(seanet["lstm"]) < 1:
        problems.append(f"seanet.lstm={seanet['lstm']} (mmdgen's SEANet has its LSTM; 1 layer or more)")
    if seanet["pad_mode"] not in ("reflect", "constant", "replicate"):
        problems.append(f"seanet.pad_mode={seanet['pad_mode']!r} (reflect, constant or replicate)")
    channels = int(_require(checkpoint, "encodec.channels"))
    if int(seanet["channels"]) != channels:
        problems.append(f"seanet.channels={seanet['channels']} while encodec.channels={channels}")
    if problems:
        raise ValueError(f"{checkpoint.path}: this EnCodec uses what mmdgen's codec does not implement: "
                         + "; ".join(problems))
    dimension = int(_require(checkpoint, "seanet.dimension"))
    return CodecConfig(
        sample_rate=int(_require(checkpoint, "encodec.sample_rate")), channels=channels,
        num_filters=int(_require(checkpoint, "seanet.n_filters")),
        ratios=tuple(int(r) for r in _require(checkpoint, "seanet.ratios")), dimension=dimension,
        num_residual_layers=int(seanet["n_residual_layers"]), residual_kernel_size=int(seanet["residual_kernel_size"]),
        dilation_base=int(seanet["dilation_base"]), kernel_size=int(seanet["kernel_size"]),
        last_kernel_size=int(seanet["last_kernel_size"]), lstm_layers=int(seanet["lstm"]),
        compress=int(seanet["compress"]), causal=bool(seanet["causal"]), pad_mode=str(seanet["pad_mode"]),
        trim_right_ratio=float(checkpoint.get("seanet.decoder.trim_right_ratio", 1.0)),
        conv_shortcut=not bool(seanet["true_skip"]),
        quantizer=QuantizerConfig(dim=dimension, codebook_size=int(_require(checkpoint, "rvq.bins")),
                                  num_codebooks=int(_require(checkpoint, "rvq.n_q")), kmeans_init=False),
    )


_SEANET = re.compile(r"^(encoder|decoder)\.model\.")


def codec_key_from_audiocraft(name: str) -> str:
    """An audiocraft EnCodec tensor name -> ours (through transformers' names, which ours follow)."""
    name = _SEANET.sub(lambda m: f"{m[1]}.layers.", name)
    name = name.replace(".conv.conv.", ".conv.").replace(".convtr.convtr.", ".conv.")
    name = re.sub(r"^quantizer\.vq\.layers\.(\d+)\._codebook\.", r"quantizer.layers.\1.codebook.", name)
    return codec_key_from_transformers(name)


_WEIGHT_NORM_TO_THEIRS = {"parametrizations.weight.original0": "weight_g",
                          "parametrizations.weight.original1": "weight_v"}
_CONV = re.compile(r"^(.*)\.conv\.(bias|weight|parametrizations\.weight\.original[01])$")


def codec_tensors_to_audiocraft(codec: Codec) -> dict[str, torch.Tensor]:
    """The codec's state dict under audiocraft's EnCodec names (``codec_key_from_audiocraft`` reads them back):
    ``.conv.conv.`` or, for a transposed convolution, ``.convtr.convtr.``, weight norm as ``weight_g`` /
    ``weight_v``."""
    transposed = {path for path, module in codec.named_modules() if isinstance(module, torch.nn.ConvTranspose1d)}
    tensors = {}
    for name, value in codec.state_dict().items():
        match = _CONV.match(name)
        if match:
            kind = "convtr" if f"{match[1]}.conv" in transposed else "conv"
            name = f"{match[1]}.{kind}.{kind}.{_WEIGHT_NORM_TO_THEIRS.get(match[2], match[2])}"
        name = re.sub(r"^(encoder|decoder)\.layers\.", r"\1.model.", codec_key_to_transformers(name))
        tensors[re.sub(r"^quantizer\.layers\.(\d+)\.codebook\.", r"quantizer.vq.layers.\1._codebook.", name)] = value
    return tensors


def codec_config_to_audiocraft(cfg: CodecConfig) -> dict:
    """The ``xp.cfg`` (as a dictionary) of an exported EnCodec: audiocraft's defaults with this codec's settings
    (``codec_config_from_audiocraft`` reads it back)."""
    quantizer = cfg.quantizer
    return {
        "device": "cpu", "dtype": "float32", "solver": "compression", "sample_rate": cfg.sample_rate,
        "channels": cfg.channels, "compression_model": "encodec",
        "encodec": {"autoencoder": "seanet", "quantizer": "rvq", "sample_rate": cfg.sample_rate,
                    "channels": cfg.channels, "causal": cfg.causal, "renormalize": False},
        "seanet": {"dimension": cfg.dimension, "channels": cfg.channels, "causal": cfg.causal,
                   "n_filters": cfg.num_filters, "n_residual_layers": cfg.num_residual_layers,
                   "ratios": list(cfg.ratios), "activation": "ELU", "activation_params": {"alpha": 1.0},
                   "norm": "weight_norm", "norm_params": {}, "kernel_size": cfg.kernel_size,
                   "residual_kernel_size": cfg.residual_kernel_size, "last_kernel_size": cfg.last_kernel_size,
                   "dilation_base": cfg.dilation_base, "pad_mode": cfg.pad_mode, "true_skip": not cfg.conv_shortcut,
                   "compress": cfg.compress, "lstm": cfg.lstm_layers, "disable_norm_outer_blocks": 0,
                   "decoder": {"trim_right_ratio": cfg.trim_right_ratio, "final_activation": None,
                               "final_activation_params": None},
                   "encoder": {}},
        "rvq": {"n_q": quantizer.num_codebooks, "q_dropout": False, "bins": quantizer.codebook_size,
                "decay": quantizer.decay, "kmeans_init": quantizer.kmeans_init, "kmeans_iters": quantizer.kmeans_iters,
                "threshold_ema_dead_code": quantizer.dead_code_threshold, "orthogonal_reg_weight": 0.0,
                "orthogonal_reg_active_codes_only": False},
    }
