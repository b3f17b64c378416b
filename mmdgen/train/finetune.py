"""What ``--init`` fine-tunes: a trained or published model read in any format the loader reads, checked against
the options and the data it meets.

``mmdgen train lm --init MODEL``: the LM (its size, pattern and delays, its weights), its text conditioner (a T5 or
MiniLM stays frozen, a learned encoder trains on) and the identity of its codec; the options that describe the
model (``--preset``, ``--pattern``, ``--delays``, ``--text``, ``--text-dim``, ``--text-layers``, ``--text-path``)
may be left out, and one that disagrees with it is refused by name. The tokens must hold the codes the LM predicts
(K codebooks of V codes); tokens of another codec only draw a warning (fine-tuning then adapts the LM to them).

``mmdgen train codec --init CODEC``: the codec (its configuration and weights, EMA codebooks included); a
``--preset`` that disagrees with it is refused.

The weights are copied before the first step only: a resumed run reads its checkpoint's over them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from mmdgen.data.tokenize import TokenSet
from mmdgen.model.codec import Codec, codec_config
from mmdgen.model.lm import MusicLM, lm_config
from mmdgen.model.patterns import make_pattern
from mmdgen.model.text import LearnedTextEncoder, T5TextEncoder, TextConditioner
from mmdgen.pretrained.directory import CONFIG, loaded_codec_identity, tensors_sha256
from mmdgen.pretrained.loader import load_codec_model, load_music_model, locate
from mmdgen.train.config import CodecTrainConfig, LMTrainConfig
from mmdgen.validation import label

log = logging.getLogger(__name__)

LM_SHAPE = ("dim", "layers", "heads", "ffn_dim")  # what an LM preset sets
CODEC_TRAINING_FIELDS = ("decay", "epsilon", "kmeans_init", "kmeans_iters", "dead_code_threshold", "dropout",
                         "stage_latent")  # quantizer settings of training, not of the codec's shape


@dataclass
class LMInit:
    """The parts of the model ``--init`` names, as the LM trainer takes them."""

    lm: MusicLM
    text: TextConditioner
    text_record: dict  # what a model directory records to rebuild the conditioner (mmdgen.pretrained.directory)
    codec: Codec
    codec_identity: dict  # of the codec whose codes the LM learned
    format: str


def load_lm_init(cfg: LMTrainConfig, tokens: TokenSet) -> LMInit:
    """The model of ``cfg.init``, checked against the options and the tokens; ValueError naming what disagrees."""
    model = load_music_model(cfg.init, text_encoder=cfg.text_path or None)
    source = f"{label('init')} {cfg.init}"
    if cfg.text_path and model.format != "audiocraft":
        raise ValueError(f"{label('text_path')} {cfg.text_path}: {source} brings its own text conditioner (only an "
                         f"audiocraft checkpoint, which holds no T5, takes one); leave {label('text_path')} out")
    record, codec_identity = _records(model)
    lm_cfg = model.lm.cfg
    _check_lm_options(cfg, lm_cfg, record, source)
    if (tokens.num_codebooks, tokens.codebook_size) != (lm_cfg.num_codebooks, lm_cfg.codebook_size):
        stereo = " (stereo: two channels of the mono codec)" if lm_cfg.audio_channels == 2 else ""
        raise ValueError(f"{source}: its LM predicts {lm_cfg.num_codebooks} x {lm_cfg.codebook_size} codes{stereo}, "
                         f"the tokens of {tokens.folder} hold {tokens.num_codebooks} x {tokens.codebook_size}; "
                         f"tokenize with its codec: mmdgen data tokenize --codec {cfg.init}")
    if not _same_codec(tokens.codec, codec_identity, model.codec):
        log.warning("%s: the tokens of %s come from another codec than the one %s was trained with; fine-tuning "
                    "adapts the LM to them", source, tokens.folder, cfg.init)
    # generation windows: the longest sequences the model has seen, the source's or this run's crops
    lm_cfg.context_frames = max(lm_cfg.context_frames or 0, cfg.crop_frames)
    model.lm.train()
    return LMInit(model.lm, model.text, record, model.codec, codec_identity, model.format)


def _records(model) -> tuple[dict, dict]:
    """(the text conditioner's record, the identity of the codec the LM learned) of a loaded model."""
    if model.format == "mmdgen":
        config = json.loads((locate(model.source) / CONFIG).read_text())
        record, identity = dict(config["text"]), config["codec"]
    else:  # published: a T5 conditioner, the codec beside the LM
        record, identity = {"kind": "t5"}, loaded_codec_identity(model.codec)
    if isinstance(model.text, LearnedTextEncoder):  # its tokenizer where the loader found it
        record = {"kind": "learned", "config": dataclasses.asdict(model.text.config)}
    elif isinstance(model.text, T5TextEncoder):
        record = {"kind": "t5", "path": str(Path(model.text.folder).resolve())}
    return record, identity


def _check_lm_options(cfg: LMTrainConfig, lm_cfg, record: dict, source: str) -> None:
    problems = []
    if cfg.preset is not None:
        preset = lm_config(cfg.preset)
        if any(getattr(preset, name) != getattr(lm_cfg, name) for name in LM_SHAPE):
            problems.append(f"{label('preset')} {cfg.preset} ({_shape(preset, LM_SHAPE)}) is not its size "
                            f"({_shape(lm_cfg, LM_SHAPE)})")
    if cfg.pattern is not None and cfg.pattern != lm_cfg.pattern:
        problems.append(f"{label('pattern')} {cfg.pattern} is not its pattern ({lm_cfg.pattern})")
    own_delays = make_pattern(lm_cfg.pattern, lm_cfg.num_codebooks, lm_cfg.delays).delays
    if cfg.delay_values() is not None and tuple(cfg.delay_values()) != tuple(own_delays):
        problems.append(f"{label('delays')} {cfg.delays} are not its delays ({','.join(map(str, own_delays))})")
    if cfg.text is not None and cfg.text != record["kind"]:
        problems.append(f"{label('text')} {cfg.text} is not its text conditioner ({record['kind']})")
    defaults = {f.name: f.default for f in dataclasses.fields(LMTrainConfig)}
    own = record.get("config", {}) if record["kind"] == "learned" else {}
    for name, own_name in (("text_dim", "dim"), ("text_layers", "layers")):
        value = getattr(cfg, name)
        if value in (defaults[name], own.get(own_name)):
            continue
        problems.append(f"{label(name)} {value} is not its learned encoder's {own_name} ({own[own_name]})"
                        if own_name in own else
                        f"{label(name)} {value} sizes a learned encoder (its conditioner is {record['kind']})")
    if problems:
        raise ValueError(f"{source} disagrees with the options: {'; '.join(problems)}; leave them out to fine-tune "
                         "the model as it is")


def _shape(cfg, names: tuple[str, ...]) -> str:
    return ", ".join(f"{name} {getattr(cfg, name)}" for name in names)


def _same_codec(tokens_identity: dict, init_identity: dict, codec: Codec) -> bool:
    if tokens_identity == init_identity:
        return True
    return "tensors_sha256" in tokens_identity and tensors_sha256(codec) == tokens_identity["tensors_sha256"]


def load_codec_init(cfg: CodecTrainConfig) -> Codec:
    """The codec of ``cfg.init`` in training mode; ValueError when ``--preset`` names another size."""
    codec = load_codec_model(cfg.init)
    if cfg.preset is not None:
        preset, own = _codec_shape(codec_config(cfg.preset)), _codec_shape(codec.cfg)
        differing = sorted(name for name in preset if preset[name] != own[name])
        if differing:
            raise ValueError(f"{label('init')} {cfg.init} disagrees with {label('preset')} {cfg.preset}: "
                             + ", ".join(f"{name} {own[name]} (the preset's {preset[name]})" for name in differing)
                             + f"; leave {label('preset')} out to fine-tune the codec as it is")
    return codec.train()


def _codec_shape(cfg) -> dict:
    shape = dataclasses.asdict(cfg)
    quantizer = shape.pop("quantizer")
    shape.update({f"quantizer.{k}": v for k, v in quantizer.items() if k not in CODEC_TRAINING_FIELDS})
    return shape
