"""Models out: ``export_model(source, out, format)`` writes any model ``load_music_model`` reads (an LM trained
here, a transformers MusicGen folder, audiocraft's files, a cache id) in transformers' or audiocraft's format,
with neither library installed. What each format can hold:

``transformers``  with a T5 conditioner and the delays transformers' MusicGen decodes with (0..K-1; stereo
                  0, 0, 1, 1, ...): a ``MusicgenForConditionalGeneration`` folder (config.json with its
                  text_encoder / audio_encoder / decoder parts, model.safetensors under transformers' names, the
                  T5 tokenizer files, generation_config.json with MusicGen's sampling defaults and the LM's
                  context as max_length, preprocessor_config.json). Otherwise (a learned or MiniLM conditioner,
                  another pattern) what transformers can hold, in subfolders: ``decoder/`` (a
                  ``MusicgenForCausalLM``, when the LM takes its text states unprojected) and ``audio_encoder/``
                  (an ``EncodecModel``); README.txt says what was left out and why. An export without the LM
                  (nothing but the codec) is refused.
``audiocraft``    ``state_dict.bin`` (the LM) and ``compression_state_dict.bin`` (its EnCodec) as audiocraft's
                  exporter writes them: ``{"best_state": tensors, "xp.cfg": YAML, "version", "exported"}``,
                  plain tensors and strings (they load with ``weights_only=True``). T5 conditioner only:
                  audiocraft's LM fetches its T5 by name, so the name is written when it is one audiocraft
                  knows (from ``t5_name``, the source's own record, or the Hugging Face cache folder the T5 was
                  read from); else xp.cfg leaves it unset (``???``) and README.txt says what to set. A learned or
                  MiniLM conditioner has no audiocraft counterpart: refused (the codec alone is in the
                  transformers export's ``audio_encoder/``).

Both formats differ from the source in one rule, stated in README.txt and the summary whenever it applies:
audiocraft's cross-attention attends to the zeroed text padding, transformers' (and mmdgen's by default) masks
it; greedy codes agree for one text, with or without guidance, and for texts of one token length.

The folder is written atomically (``files.write_folder_atomic``): an error leaves no half-written export, and
an existing non-empty ``out`` is only replaced with ``overwrite``. Weights are written as loaded (float32).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args

import torch

from mmdgen.choices import ExportFormat
from mmdgen.files import write_folder_atomic
from mmdgen.model.convert import (codec_config_to_dict, codec_key_to_transformers, lm_config_to_dict,
                                  lm_key_to_transformers, transformers_delays)
from mmdgen.model.lm import LMConfig
from mmdgen.model.quantize import quantize_lm
from mmdgen.model.text import LearnedTextEncoder, MiniLMTextEncoder, T5TextEncoder, TextConditioner
from mmdgen.model.text.t5 import T5Tokenizer, t5_transformers_names
from mmdgen.pretrained import audiocraft_files as audiocraft
from mmdgen.pretrained.directory import BUNDLED_CODEC, codec_identity, save_codec, save_music_lm
from mmdgen.pretrained.loader import MusicModel, load_music_model, locate
from mmdgen.version import __version__

FORMATS = get_args(ExportFormat)
README = "README.txt"
AUDIOCRAFT_VERSION = "1.3.0"  # the release whose loaders read these files (tests/audiocraft_export_check.py)
UNSET = "???"  # OmegaConf's mandatory value: audiocraft stops with "Missing mandatory value" until it is set
AUDIOCRAFT_EXTEND_STRIDE = 18.0  # seconds: MusicGen.__init__ asserts it is below max_duration (the LM's context)
TOKENIZER_FILES = (*T5Tokenizer.FILES, "tokenizer_config.json", "special_tokens_map.json")
DECODER_FOLDER, CODEC_FOLDER = "decoder", "audio_encoder"
PADDING_NOTE = ("text padding: {source} {source_rule}, {target} {target_rule}; greedy codes agree for one text "
                "(with or without guidance) and for texts of one token length, not for the shorter texts of a "
                "padded batch")
_MASKS, _ATTENDS = "masks the padding of shorter texts in a batch", "attends to it (zero keys, no mask)"
_POSSESSIVE = {"transformers": "transformers'", "audiocraft": "audiocraft's", "mmdgen": "mmdgen's"}
T5_FOLDER = "text"

Writer = Callable[[Path], None]


@dataclass
class Note:
    """Something left out or computed differently: a few words for the summary, the whole story for README."""

    short: str
    detail: str


@dataclass
class Plan:
    """What an export writes (path inside ``out`` -> its writer), what it holds (README's lines), its notes."""

    files: dict[str, Writer]
    what: str  # the summary's start
    contents: list[str]
    notes: list[Note] = field(default_factory=list)

    @property
    def summary(self) -> str:
        return self.what + "".join(f"; {note.short}" for note in self.notes) + (
            f" (see {README})" if self.notes else "")


def export_model(source: str | Path, out: str | Path, format: str, overwrite: bool = False,
                 text_encoder: str | Path | None = None, codec: str | Path | None = None,
                 t5_name: str | None = None, quantize: str | None = None) -> str:
    """Write the model ``source`` (anything ``load_music_model`` reads; ``text_encoder`` and ``codec`` as there)
    to the folder ``out`` in ``format`` ("transformers", "audiocraft", or "mmdgen": a self-contained mmdgen LM
    directory, its decoder and heads in int8 with ``quantize``); return a one-line summary that names what was
    left out. ``overwrite`` replaces a non-empty ``out``; ``t5_name``: the name audiocraft fetches the T5 by,
    where the source does not tell it. ValueError, with nothing written, for an unknown format, an ``out`` that
    is a file or a non-empty folder, a source that is not a model, or a model the format cannot hold."""
    if format not in FORMATS:
        raise ValueError(f"export format {format!r}: expected one of {', '.join(FORMATS)}")
    if quantize is not None and format != "mmdgen":
        raise ValueError(f"int8 weights ({quantize}) are written in mmdgen's format only (--format mmdgen); "
                         f"{format} holds float weights")
    out = Path(out).expanduser()
    _check_out(out, overwrite)
    path = locate(source)
    if path.resolve() == out.resolve() or out.resolve() in path.resolve().parents:
        raise ValueError(f"{out}: holds the source {source}; exporting there would replace it")
    model = load_music_model(source, codec, text_encoder)
    if model.lm.cfg.conditioning != "cross":
        raise ValueError(f"{source}: a {model.lm.cfg.conditioning}-conditioned LM (MusicGen-melody); exporting one is "
                         "not supported yet (nothing written)")
    plans = {"transformers": lambda: transformers_plan(model), "audiocraft": lambda: audiocraft_plan(model, path, t5_name),
             "mmdgen": lambda: mmdgen_plan(model, quantize)}
    plan = plans[format]()
    readme = _readme(model, format, plan)

    def write(folder: Path) -> None:
        for name, writer in plan.files.items():  # in order: a later writer may read what an earlier one wrote
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            writer(folder / name)
        (folder / README).write_text(readme, encoding="utf-8")

    write_folder_atomic(out, write)
    return f"{out}: {plan.summary}"


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder; an export is written as a new folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"{out}: a folder that is not empty; choose a new one, or overwrite it (--overwrite)")


# -- transformers ------------------------------------------------------------------------------------------------

def transformers_plan(model: MusicModel) -> Plan:
    """A ``MusicgenForConditionalGeneration`` folder when transformers can hold the whole model, else its
    decoder and codec in subfolders; ValueError when not even the decoder fits."""
    cfg = model.lm.cfg
    try:
        decoder_config = lm_config_to_dict(cfg)
        decoder_problem = None
    except ValueError as error:
        decoder_config, decoder_problem = None, f"the decoder: {error}"
    left_out = []
    if not isinstance(model.text, T5TextEncoder):
        kind = _conditioner_kind(model.text)
        left_out.append(Note(f"left out: the {kind} text conditioner (T5 only)",
                             f"left out: the {kind} text conditioner: transformers' MusicGen conditions on a T5 "
                             "encoder only"))
    expected = transformers_delays(cfg.num_codebooks, cfg.audio_channels)
    if _delays(cfg) != expected:
        left_out.append(Note(f"left out: the {_pattern(cfg)} pattern (transformers generates with delays "
                             f"{list(expected)})",
                             f"left out: the codebook pattern ({_pattern(cfg)}): transformers' MusicGen generates "
                             f"with delays {list(expected)}, so its generate would decode this LM wrongly; the "
                             "decoder's forward is the LM's"))
    if decoder_problem is None and not left_out:
        return _musicgen_plan(model, decoder_config)
    if decoder_problem is None and cfg.text_dim != cfg.dim:
        decoder_problem = (f"the decoder: its {cfg.text_dim}-wide text states are projected to its width {cfg.dim} "
                           "by a layer a MusicgenForCausalLM cannot hold")
    if decoder_problem is not None:
        raise ValueError(f"{model.source}: transformers' format cannot hold this LM: "
                         + "; ".join([*(note.detail.removeprefix("left out: ") for note in left_out), decoder_problem]))
    return _parts_plan(model, decoder_config, left_out)


def _musicgen_plan(model: MusicModel, decoder_config: dict) -> Plan:
    lm, text, codec, cfg = model.lm, model.text, model.codec, model.lm.cfg
    tensors = {f"text_encoder.{theirs}": text.encoder.state_dict()[ours]
               for ours, theirs in t5_transformers_names(text.encoder.config).items()}
    tensors.update({f"audio_encoder.{codec_key_to_transformers(name)}": value
                    for name, value in codec.state_dict().items()})
    tensors.update({lm_key_to_transformers(name): value for name, value in lm.state_dict().items()})
    config = {"architectures": ["MusicgenForConditionalGeneration"], "model_type": "musicgen",
              "is_encoder_decoder": True, "text_encoder": text.encoder.config.to_dict(),
              "audio_encoder": codec_config_to_dict(codec.cfg), "decoder": decoder_config,
              "dtype": _dtype_name(lm)}
    special = cfg.special_token
    generation = {"_from_model_config": False, "bos_token_id": special, "decoder_start_token_id": special,
                  "pad_token_id": special, "do_sample": True, "guidance_scale": 3.0, "top_k": 250}
    notes = []
    if cfg.context_frames is None:
        notes.append(Note("no max_length (no context recorded)", "generation_config.json has no max_length: the LM "
                          "records no context (transformers then stops at its default of 20 tokens; pass "
                          "max_new_tokens)"))
    else:  # what makes transformers' generate (from its config alone) give the context's frames
        generation["max_length"] = cfg.context_frames + max(_delays(cfg))
    if cfg.attend_text_padding:
        notes.append(Note("text padding attended by the source, masked by transformers: padded batches differ",
                          PADDING_NOTE.format(source="the source (audiocraft's rule)", source_rule=_ATTENDS,
                                              target="transformers' MusicGen", target_rule=_MASKS)))
    preprocessor = {"feature_extractor_type": "EncodecFeatureExtractor", "feature_size": codec.cfg.channels,
                    "sampling_rate": codec.cfg.sample_rate, "padding_side": "right", "padding_value": 0.0,
                    "chunk_length_s": None, "overlap": None, "return_attention_mask": True,
                    "processor_class": "MusicgenProcessor"}
    files = {"config.json": _json_writer(config), "generation_config.json": _json_writer(generation),
             "preprocessor_config.json": _json_writer(preprocessor), "model.safetensors": _safetensors_writer(tensors)}
    tokenizer_folder = text.tokenizer.path.parent
    files.update({name: _copy_writer(tokenizer_folder / name) for name in TOKENIZER_FILES
                  if (tokenizer_folder / name).is_file()})
    layout = f"{cfg.num_codebooks} x {cfg.codebook_size} codes, {'stereo' if cfg.audio_channels == 2 else 'mono'}"
    contents = [f"config.json, model.safetensors: MusicgenForConditionalGeneration (T5 text encoder, EnCodec, "
                f"decoder; {layout}); load with transformers.MusicgenForConditionalGeneration.from_pretrained",
                "generation_config.json: guidance 3, top-k 250, sampling on"
                + (f", max_length {generation['max_length']} (the LM's context of {cfg.context_frames} frames)"
                   if "max_length" in generation else ""),
                f"the T5 tokenizer ({', '.join(name for name in TOKENIZER_FILES if name in files)}) and "
                "preprocessor_config.json: transformers.AutoProcessor.from_pretrained reads them"]
    return Plan(files, f"transformers MusicgenForConditionalGeneration ({layout})", contents, notes)


def _parts_plan(model: MusicModel, decoder_config: dict, left_out: list[Note]) -> Plan:
    lm, codec, cfg = model.lm, model.codec, model.lm.cfg
    decoder = {lm_key_to_transformers(name, causal_lm=True): value for name, value in lm.state_dict().items()}
    decoder_config = {**decoder_config, "architectures": ["MusicgenForCausalLM"]}
    files = {f"{DECODER_FOLDER}/config.json": _json_writer(decoder_config),
             f"{DECODER_FOLDER}/model.safetensors": _safetensors_writer(decoder),
             f"{CODEC_FOLDER}/config.json": _json_writer({**codec_config_to_dict(codec.cfg),
                                                          "architectures": ["EncodecModel"]}),
             f"{CODEC_FOLDER}/model.safetensors": _safetensors_writer(
                 {codec_key_to_transformers(name): value for name, value in codec.state_dict().items()})}
    mask = ("an all-True encoder_attention_mask (this LM attends to its zeroed text padding, audiocraft's rule)"
            if cfg.attend_text_padding else "encoder_attention_mask = the text mask")
    contents = [f"{DECODER_FOLDER}/: MusicgenForCausalLM (transformers.MusicgenForCausalLM.from_pretrained): "
                f"forward(input_ids = mmdgen's pattern sequence [B * {cfg.num_codebooks}, S], encoder_hidden_states = "
                f"the source's text states [B, L, {cfg.dim}] (zero at padding), {mask}) gives the source LM's logits",
                f"{CODEC_FOLDER}/: EncodecModel (transformers.EncodecModel.from_pretrained), the codec whose codes the "
                "LM predicts" + (", each stereo channel through it" if cfg.audio_channels == 2 else ""),
                f"the text states come from the source's own conditioner: mmdgen's load_music_model("
                f"{model.source!r}).text(captions)"]
    what = f"transformers, in parts: {DECODER_FOLDER}/ (MusicgenForCausalLM) and {CODEC_FOLDER}/ (EncodecModel)"
    return Plan(files, what, contents, left_out)


# -- mmdgen ------------------------------------------------------------------------------------------------------

def mmdgen_plan(model: MusicModel, quantize: str | None) -> Plan:
    """A self-contained mmdgen LM directory (``mmdgen.pretrained.directory``): the LM (int8 with ``quantize``:
    loaded as it is, never quantized again), its codec in ``codec/``, a T5 conditioner's weights and tokenizer in
    ``text/`` (a learned one beside the LM, as the trainer writes it; MiniLM by reference to its package)."""
    lm, text, codec = model.lm, model.text, model.codec
    if quantize is not None:
        quantize_lm(lm, quantize)
    record = {"kind": _conditioner_kind(text)}
    if isinstance(text, LearnedTextEncoder):
        record["config"] = dataclasses.asdict(text.config)
    files: dict[str, Writer] = {BUNDLED_CODEC: lambda folder: save_codec(codec, folder)}
    contents = [f"{BUNDLED_CODEC}/: the codec (config.json, codec.safetensors)"]
    if isinstance(text, T5TextEncoder):
        record["path"] = T5_FOLDER
        files[T5_FOLDER] = lambda folder: _write_t5_folder(text, folder)
        contents.append(f"{T5_FOLDER}/: the T5 text encoder (config.json, model.safetensors, its tokenizer)")
    files["."] = lambda folder: save_music_lm(folder, lm, text, record, codec_identity(folder / BUNDLED_CODEC))
    mode = getattr(lm, "quantization", None)
    contents.insert(0, "config.json, lm.safetensors: the LM" + (f", its decoder and heads in {mode}" if mode else "")
                    + "; load with mmdgen.generate.Generator.from_pretrained or mmdgen generate --model")
    what = "mmdgen LM directory" + (f" ({mode})" if mode else "")
    return Plan(files, what, contents)


def _write_t5_folder(text: T5TextEncoder, folder: Path) -> None:
    """A transformers-layout T5 folder our loader (and transformers' T5EncoderModel) reads."""
    folder.mkdir(parents=True, exist_ok=True)
    state = text.encoder.state_dict()
    _json_writer(text.encoder.config.to_dict())(folder / "config.json")
    _safetensors_writer({theirs: state[ours] for ours, theirs in
                         t5_transformers_names(text.encoder.config).items()})(folder / "model.safetensors")
    source = text.tokenizer.path.parent
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)


# -- audiocraft ---------------------------------------------------------------------------------------------------

def audiocraft_plan(model: MusicModel, path: Path, t5_name: str | None = None) -> Plan:
    """``state_dict.bin`` and ``compression_state_dict.bin``; ValueError for what audiocraft's MusicGen cannot
    hold (a conditioner other than T5, a pattern without delays, ...)."""
    if not isinstance(model.text, T5TextEncoder):
        raise ValueError(f"{model.source}: its {_conditioner_kind(model.text)} text conditioner has no audiocraft "
                         "counterpart (audiocraft's MusicGen LMs condition on a T5 they fetch by name); format "
                         f"transformers writes this LM's decoder and codec ({DECODER_FOLDER}/, {CODEC_FOLDER}/)")
    cfg, codec = model.lm.cfg, model.codec
    name = _audiocraft_t5_name(model, path, t5_name)
    try:
        lm_config = audiocraft.lm_config_to_audiocraft(cfg, name or UNSET, codec.cfg.sample_rate, codec.cfg.frame_rate)
    except ValueError as error:
        raise ValueError(f"{model.source}: {error}") from error
    files = {audiocraft.LM_FILE: _audiocraft_writer(audiocraft.lm_tensors_to_audiocraft(model.lm.state_dict()),
                                                    lm_config),
             audiocraft.CODEC_FILE: _audiocraft_writer(audiocraft.codec_tensors_to_audiocraft(codec),
                                                       audiocraft.codec_config_to_audiocraft(codec.cfg))}
    notes = []
    if name is None:
        known = ", ".join(known for known, width in audiocraft.T5_WIDTHS.items() if width == model.text.dim)
        notes.append(Note("T5 name unset: set conditioners.description.t5.name in xp.cfg",
                          f"xp.cfg leaves conditioners.description.t5.name unset ({UNSET}): audiocraft fetches the "
                          "T5 by name and this one's is not known; set it to the name of this T5 among audiocraft's "
                          f"({known or 'none is ' + str(model.text.dim) + ' wide'}), whose weights must be this "
                          "T5's; mmdgen loads the export with text_encoder = the T5's folder (--text-encoder)"))
    if not cfg.attend_text_padding:
        notes.append(Note("text padding masked by this LM, attended by audiocraft: padded batches differ",
                          PADDING_NOTE.format(source="this LM", source_rule=_MASKS, target="audiocraft's",
                                              target_rule=_ATTENDS)))
    seconds = None if cfg.context_frames is None else cfg.context_frames / codec.cfg.frame_rate
    if seconds is None:
        notes.append(Note("no context recorded (dataset.segment_duration null)",
                          "dataset.segment_duration is null: the LM records no context; audiocraft's MusicGen "
                          "needs it (seconds) as its max_duration"))
    elif seconds <= AUDIOCRAFT_EXTEND_STRIDE:
        notes.append(Note(f"a {seconds:g} s context: audiocraft's MusicGen class refuses it, its LMModel works",
                          f"the LM's context is {seconds:g} s: audiocraft's MusicGen class asserts its default "
                          f"extend_stride ({AUDIOCRAFT_EXTEND_STRIDE:g} s) is shorter, so MusicGen.get_pretrained "
                          "fails; load_lm_model and LMModel.generate work"))
    contents = [f"{audiocraft.LM_FILE}: the LM (audiocraft.models.loaders.load_lm_model), T5 "
                f"{name or 'name unset (' + UNSET + ')'}, delays {list(_delays(cfg))}"
                + (", stereo (interleave_stereo_codebooks)" if cfg.audio_channels == 2 else ""),
                f"{audiocraft.CODEC_FILE}: its EnCodec (load_compression_model); MusicGen.get_pretrained(<this "
                "folder>) loads both"]
    what = f"audiocraft {audiocraft.LM_FILE} + {audiocraft.CODEC_FILE}" + (f" (T5 {name})" if name else "")
    return Plan(files, what, contents, notes)


def _audiocraft_t5_name(model: MusicModel, path: Path, given: str | None) -> str | None:
    """The name audiocraft fetches this T5 by: ``given`` (checked), else the first of the source's own names
    for it that audiocraft knows at this width, else None."""
    width = model.text.dim
    if given is not None:
        if audiocraft.T5_WIDTHS.get(given) != width:
            raise ValueError(f"t5_name {given!r}: expected one of audiocraft's T5 names {width} wide "
                             f"({', '.join(n for n, w in audiocraft.T5_WIDTHS.items() if w == width) or 'none'})")
        return given
    for candidate in _t5_names_of(model, path):
        candidate = candidate.removeprefix("google-t5/")  # the hub's new home of t5-base and its siblings
        if audiocraft.T5_WIDTHS.get(candidate) == width:
            return candidate
    return None


def _t5_names_of(model: MusicModel, path: Path) -> list[str]:
    """What the source calls its T5: an audiocraft checkpoint's setting, the cache repository the T5's files lie
    in, a transformers config's ``_name_or_path``."""
    names = []
    if model.format == "audiocraft":
        checkpoint = audiocraft.AudiocraftCheckpoint(path if path.is_file() else path / audiocraft.LM_FILE)
        names.append(str(checkpoint.get("conditioners.description.t5.name", "")))
    folder = model.text.tokenizer.path.parent
    cached = re.search(r"models--([^/]+)/snapshots/", folder.resolve().as_posix())
    if cached:
        names.append(cached[1].replace("--", "/"))
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    for part in (config.get("text_encoder"), config):
        if isinstance(part, dict) and isinstance(part.get("_name_or_path"), str):
            names.append(part["_name_or_path"])
    return names


# -- writers and descriptions -------------------------------------------------------------------------------------

def _json_writer(value: dict) -> Writer:
    return lambda path: path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


def _plain(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: value.detach().cpu().contiguous() for name, value in tensors.items()}


def _safetensors_writer(tensors: dict[str, torch.Tensor]) -> Writer:
    from safetensors.torch import save_file

    tensors = _plain(tensors)
    return lambda path: save_file(tensors, str(path), metadata={"format": "pt"})  # transformers reads "format"


def _audiocraft_writer(tensors: dict[str, torch.Tensor], config: dict) -> Writer:
    import yaml

    payload = {"best_state": _plain(tensors), "xp.cfg": yaml.safe_dump(config, sort_keys=False),
               "version": AUDIOCRAFT_VERSION, "exported": True}
    return lambda path: torch.save(payload, path)


def _copy_writer(source: Path) -> Writer:
    return lambda path: shutil.copyfile(source, path)


def _readme(model: MusicModel, format: str, plan: Plan) -> str:
    lines = [f"Exported by mmdgen {__version__} from {model.source} ({model.format} format) to "
             f"{_POSSESSIVE[format]} format.", "", "Contents:", *[f"- {line}" for line in plan.contents]]
    if plan.notes:
        lines += ["", "Left out and differences:", *[f"- {note.detail}" for note in plan.notes]]
    return "\n".join(lines) + "\n"


def _conditioner_kind(text: TextConditioner) -> str:
    kinds = {LearnedTextEncoder: "learned", MiniLMTextEncoder: "minilm", T5TextEncoder: "t5"}
    return next((kind for cls, kind in kinds.items() if isinstance(text, cls)), type(text).__name__)


def _delays(cfg: LMConfig) -> tuple[int, ...] | None:
    """The delays of a delay (or parallel: all zero) pattern, else None."""
    if cfg.pattern == "parallel":
        return (0,) * cfg.num_codebooks
    if cfg.pattern == "delay":
        return tuple(cfg.delays) if cfg.delays is not None else tuple(range(cfg.num_codebooks))
    return None


def _pattern(cfg: LMConfig) -> str:
    return f"delay {list(_delays(cfg))}" if cfg.pattern == "delay" else cfg.pattern


def _dtype_name(module: torch.nn.Module) -> str:
    return str(next(module.parameters()).dtype).removeprefix("torch.")
