"""Every ``mmdgen`` command: its words, its help, its options (a configuration dataclass: a library's own, such as
``CodecTrainConfig``, or one declared here) and the function that runs it.

To add a command: declare its options as a dataclass of ``option(...)`` fields (or reuse a configuration), write its
function (it imports torch and the models inside, so that ``--help`` stays fast), and add a row to ``COMMANDS`` (and
its group's help to ``GROUPS`` for a new group). To add an option: add a field to the options' dataclass.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmdgen.choices import Backend, CpuLinear, ExportFormat, KVCacheDtype, Quantization, Scheduling, Split
from mmdgen.data.build import BuildConfig
from mmdgen.demo.config import DemoConfig
from mmdgen.eval.config import CoupledLatentsConfig
from mmdgen.files import AUDIO_SUFFIXES
from mmdgen.generate.config import Sampling
from mmdgen.train.config import CodecTrainConfig, LMTrainConfig, LoopConfig
from mmdgen.validation import INT64_MAX, MAX_SECONDS, check_fields, label, option, path_problem


@dataclass(frozen=True)
class Command:
    words: tuple[str, ...]  # ("train", "codec") for `mmdgen train codec`
    help: str
    options: type  # a dataclass whose fields are the command's options
    run: Callable[[Any], None]


def _check_device(device: str, backend: str = "auto") -> None:
    import torch

    from mmdgen.kernels.backend import resolve_backend

    try:
        chosen = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"--device {device!r} is not a torch device ({error})") from error
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r}: no CUDA device is available on this machine")
    resolve_backend(backend, chosen)


# -- demo and evaluation -----------------------------------------------------------------------------------------

def demo(cfg: DemoConfig) -> None:
    from mmdgen.demo.run import run

    _check_device(cfg.device)
    out = run(cfg)
    print(f"mmdgen demo: everything is in {out}; the report is {out / 'report.md'}")


@dataclass
class ReportOptions:
    run_dir: str = option(help="the demo's output folder", positional=True, path="folder")
    recompute: bool = option(False, "measure again even if evaluation.json exists")

    def __post_init__(self):
        check_fields(self)


def eval_report(options: ReportOptions) -> None:
    from mmdgen.demo.report import report

    print(report(options.run_dir, recompute=options.recompute))


@dataclass
class CodecReportOptions:
    codecs: tuple[str, ...] = option(help="NAME=CODEC pairs (or CODECs): codec directories, transformers EnCodec "
                                          "or MusicGen folders, audiocraft compression files or cache ids",
                                     positional=True)
    manifest: str = option("", "a corpus manifest.jsonl", required=True, path="file")
    split: Split = option("test", "the manifest's split to measure on")
    clips: int = option(64, "clips of the split to use", at_least=1)
    out: str = option("", "folder for codecs.md, codecs.json and the figures", required=True, path="new_folder")

    def __post_init__(self):
        check_fields(self)
        self.named_codecs()

    def named_codecs(self) -> dict[str, str]:
        """Name -> folder of each codec (a bare DIR is named after its folder); ValueError for a name used twice or
        a folder that does not exist."""
        named: dict[str, str] = {}
        for value in self.codecs:
            name, sep, path = value.partition("=")
            name, path = (name, path) if sep else (Path(value).name or value, value)
            if name in named:
                raise ValueError(f"{label('codecs')}: two codecs named {name!r}; name them NAME=DIR")
            problem = path_problem(path, "model", label("codecs"))
            if problem:
                raise ValueError(problem)
            named[name] = path
        return named


def eval_codec(options: CodecReportOptions) -> None:
    from mmdgen.eval.codec import codec_report

    print(codec_report(options.named_codecs(), options.manifest, options.out, options.split, options.clips))


def coupled_latents(cfg: CoupledLatentsConfig) -> None:
    from mmdgen.eval.coupled_latents import run

    _check_device(cfg.device, cfg.backend)
    run(cfg)


# -- data and text -----------------------------------------------------------------------------------------------

@dataclass
class BuildOptions:
    out: str = option("", "output folder (resumed when it exists)", required=True, path="new_folder")
    workers: int | None = option(None, "processes rendering shards (default: one per CPU)", at_least=1)
    build: BuildConfig = dataclasses.field(default_factory=BuildConfig)

    def __post_init__(self):
        check_fields(self)


def data_build(options: BuildOptions) -> None:
    import os

    from mmdgen.data.build import build_corpus

    out = options.out
    report = build_corpus(out, options.build, workers=options.workers or os.cpu_count() or 1)
    failures = ", ".join(f"{k} {v}" for k, v in report["failures_by_cause"].items()) or "none"
    print(f"{report['clips']} clips, {report['hours']:.2f} h from {report['works']} works in {out} "
          f"(splits {report['clips_by_split']}); failures: {failures}; "
          f"{report['audio_seconds_per_second']} s of audio per second this run")
    print(f"manifest: {out}/manifest.jsonl")


@dataclass
class TokenizeOptions:
    codec: str = option("", "the codec: an mmdgen codec or LM directory, a transformers EnCodec or MusicGen folder, "
                            "audiocraft's compression_state_dict.bin, or a repository id in the local cache (the "
                            "codec of the model `train lm --init` fine-tunes)", required=True, path="model")
    manifest: str = option("", "the corpus manifest.jsonl", required=True, path="file")
    out: str = option("", "token folder to write (replaced atomically)", required=True, path="new_folder")
    batch_size: int = option(8, "clips encoded at once", at_least=1)
    device: str = option("cpu", "cpu or cuda", required=True)

    def __post_init__(self):
        check_fields(self)


def data_tokenize(options: TokenizeOptions) -> None:
    from mmdgen.data.tokenize import describe, tokenize_corpus

    _check_device(options.device)
    header = tokenize_corpus(options.codec, options.manifest, options.out, batch_size=options.batch_size,
                             device=options.device)
    print(f"{options.out}: {describe(header)}")


@dataclass
class TokenizerOptions:
    manifest: str = option("", "a corpus manifest.jsonl", required=True, path="file")
    out: str = option("", "the sentencepiece .model file to write", required=True, path="new_file")
    vocab_size: int = option(1000, "at most this many pieces (fewer when the captions cannot fill it)", at_least=3)
    split: Split = option("train", "the manifest's split whose captions it learns")

    def __post_init__(self):
        check_fields(self)


def text_tokenizer(options: TokenizerOptions) -> None:
    from mmdgen.model.text import build_tokenizer_from_manifest

    path, size = build_tokenizer_from_manifest(options.manifest, options.out, options.vocab_size, split=options.split)
    print(f"{path}: sentencepiece model with {size} pieces")


# -- training ----------------------------------------------------------------------------------------------------

def _train(trainer_class, cfg: LoopConfig) -> None:
    import gc

    import torch.distributed as dist

    trainer = trainer_class(cfg)
    try:
        report = trainer.train()
        if trainer.process.main:
            print(f"model: {Path(cfg.out) / 'model'}" + (f"; validation: {report}" if report else ""))
    finally:
        # under torchrun: the (sharded) model and its pending collectives go before their process group, which
        # goes before the interpreter (whose exit gloo can still abort: cli.entry then leaves without it)
        del trainer
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()


def train_codec(cfg: CodecTrainConfig) -> None:
    from mmdgen.train.codec import CodecTrainer

    _train(CodecTrainer, cfg)


def train_lm(cfg: LMTrainConfig) -> None:
    from mmdgen.train.lm import LMTrainer

    _train(LMTrainer, cfg)


# -- generation and the codec ------------------------------------------------------------------------------------

@dataclass
class GenerateOptions:
    text: str | None = option(None, "a description of the music (or use --prompts)", positional=True)
    model: str = option("", "the model: an LM directory from `mmdgen train lm`, a transformers MusicGen folder, "
                            "audiocraft's state_dict.bin (or its folder), or a repository id in the local Hugging "
                            "Face cache (facebook/musicgen-small)", required=True, path="model")
    codec: str | None = option(None, "another codec to decode with (any codec format; an mmdgen LM needs the one "
                                     "its codes came from)", path="model")
    text_encoder: str | None = option(None, "the T5 folder or cache id for an audiocraft checkpoint (default: the "
                                            "T5 it names, from the local cache)", path="model")
    out: str = option("out.wav", "output file for one text", required=True, path="new_file",
                      suffixes=AUDIO_SUFFIXES)
    prompts: str | None = option(None, "JSON lines of {text, id?, duration?, seed?} for batch generation",
                                 path="file")
    out_dir: str | None = option(None, "output folder for --prompts (reruns skip finished clips)",
                                 path="new_folder")
    batch_size: int = option(8, "clips generated at once from --prompts", at_least=1)
    scheduling: Scheduling = option("auto", "how --prompts clips share the batch: continuous (a row that finishes "
                                            "its clip is refilled at once; each clip reproduces alone with its "
                                            "seed), bucketed (batches of equal duration sharing one seed), auto "
                                            "(continuous; bucketed for prefix-conditioned LMs: MusicGen-melody)")
    duration: float = option(10.0, "seconds per clip (a prompt's own duration comes first)", above=0,
                             at_most=MAX_SECONDS)
    sampling: Sampling = dataclasses.field(default_factory=Sampling)
    seed: int = option(0, "seed of the sampling (a prompt's default seed is this plus its line number)",
                       at_least=0, at_most=INT64_MAX)
    prompt_audio: str | None = option(None, "an audio file to continue (with one text)", path="file")
    melody: str | None = option(None, "a MusicGen-melody model: an audio file whose chroma (its first 30 s) "
                                      "conditions the music (with one text)", path="file")
    device: str = option("cpu", "cpu or cuda", required=True)
    backend: Backend = option("auto", "the fused ops' implementation")
    compile: bool = option(False, "run the decode step through torch.compile: faster steps after a one-off compile "
                                  "(seconds to a minute) per batch size and length; worth it for long or many clips")
    cuda_graph: bool = option(False, "(CUDA) capture the decode step in a CUDA graph once and replay it at every "
                                     "step")
    quantize: Quantization = option("none", "int8 weights for the decoder and heads: int8 (weight-only: the float "
                                            "model's results to int8 rounding; on CPU with --compile the fastest at "
                                            "batch 1), int8-dynamic (CPU: each row of activations rounded to int8 "
                                            "too, the fastest at larger batches, least exact)")
    cpu_linear: CpuLinear = option("auto", "a float model's linear layers on CPU: packed (weights held in oneDNN's "
                                           "packed layout: the same results to fp32 rounding, several times faster "
                                           "on some CPUs), plain (torch's F.linear, MKL), auto (packed where oneDNN "
                                           "can, plain elsewhere: CUDA, int8, float16)")
    kv_cache: KVCacheDtype = option("model", "the KV cache's dtype: model (the LM's), or bfloat16/float16 under a "
                                        "float32 model (half the bytes each step reads: faster at larger batches; "
                                        "the keys and values rounded to 16 bits)")

    def __post_init__(self):
        check_fields(self)
        prompts, out_dir = label("prompts"), label("out_dir")
        if self.cpu_linear == "packed" and (not self.device.startswith("cpu") or self.quantize != "none"):
            found = f"{label('device')} {self.device}" if not self.device.startswith("cpu") else \
                f"{label('quantize')} {self.quantize}"
            raise ValueError(f"{label('cpu_linear')} packed packs a float model's weights on the CPU; it does not go "
                             f"with {found} (auto packs only where it can)")
        if (self.text is None) == (self.prompts is None):
            raise ValueError(f"give either a text or {prompts} FILE.jsonl")
        if self.text is not None and not self.text.strip():
            raise ValueError("the text is empty; give a description of the music")
        if self.prompts is not None and self.out_dir is None:
            raise ValueError(f"{prompts} needs {out_dir}")
        if self.prompts is None and self.out_dir is not None:
            raise ValueError(f"{out_dir} goes with {prompts}; one text is written to {label('out')}")
        if self.prompts is not None and self.prompt_audio is not None:
            raise ValueError(f"{label('prompt_audio')} continues one text; it does not go with {prompts}")
        if self.prompts is not None and self.melody is not None:
            raise ValueError(f"{label('melody')} conditions one text; it does not go with {prompts}")


def generate(options: GenerateOptions) -> None:
    from mmdgen.files import write_audio
    from mmdgen.generate.batch import generate_batch, read_prompts
    from mmdgen.generate.generator import Generator

    _check_device(options.device, options.backend)
    requests = read_prompts(options.prompts, options.duration, options.seed) if options.prompts else None
    rank, world, device = _process_share(options)
    generator = Generator.from_pretrained(options.model, options.codec, device=device,
                                          backend=options.backend, compile=options.compile,
                                          cuda_graph=options.cuda_graph, text_encoder=options.text_encoder,
                                          quantize=None if options.quantize == "none" else options.quantize,
                                          cpu_linear=options.cpu_linear, kv_cache=options.kv_cache)
    if requests is not None:
        scheduling = options.scheduling
        if scheduling == "auto":
            scheduling = "continuous" if generator.lm.cfg.conditioning == "cross" else "bucketed"
        report = generate_batch(generator, requests, options.out_dir, options.sampling,
                                batch_size=options.batch_size, progress=rank == 0, scheduling=scheduling, rank=rank,
                                world=world)
        share = f" (rank {rank} of {world})" if world > 1 else ""
        print(f"{options.out_dir}{share}: {report['generated']} clips generated, {report['skipped']} already there; "
              f"real-time factor {report['real_time_factor']:.2f}x; manifest "
              f"{Path(options.out_dir) / 'manifest.jsonl'}")
        return
    generator.frames(options.duration, "--duration")  # holds a frame of this codec
    prompt, melody, melody_rate = None, None, None
    if options.prompt_audio:
        from mmdgen.data.audio import read_audio

        prompt = read_audio(Path(options.prompt_audio), generator.sample_rate)[None]
    if options.melody:
        from mmdgen.data.audio import read_melody

        melody, melody_rate = read_melody(Path(options.melody))
    audio = generator.generate([options.text], options.duration, options.sampling, seed=options.seed,
                               prompt_audio=prompt, melody=melody, melody_sample_rate=melody_rate)
    write_audio(options.out, audio[0], generator.sample_rate)
    print(f"{options.out}: {options.duration:g} s at {generator.sample_rate} Hz")


def _process_share(options: GenerateOptions) -> tuple[int, int, str]:
    """(rank, world, device): under torchrun (RANK and WORLD_SIZE set) a --prompts job is shared among the
    processes, each on its own GPU (cuda:LOCAL_RANK) when the device is cuda."""
    environ = os.environ
    if options.prompts is None or "WORLD_SIZE" not in environ:
        return 0, 1, options.device
    try:
        rank, world, local = int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ.get("LOCAL_RANK", 0))
    except (KeyError, ValueError) as error:
        raise ValueError(f"torchrun's RANK, WORLD_SIZE and LOCAL_RANK must be integers, got "
                         f"RANK={environ.get('RANK')!r} WORLD_SIZE={environ['WORLD_SIZE']!r} "
                         f"LOCAL_RANK={environ.get('LOCAL_RANK')!r}") from error
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} must lie in [0, WORLD_SIZE={world})")
    if local < 0:
        raise ValueError(f"LOCAL_RANK must be >= 0, got {local}")
    import torch

    device = options.device
    if torch.device(device).type == "cuda" and torch.device(device).index is None:
        device = f"cuda:{local}"
    return rank, world, device


def _codec_model():
    return option("", "the codec: an mmdgen codec directory, a transformers EnCodec or MusicGen folder, audiocraft's "
                      "compression_state_dict.bin, or a repository id in the local cache", required=True, path="model")


@dataclass
class EncodeOptions:
    input: str = option(help="an audio file", positional=True, path="file")
    output: str = option(help="the codes file to write (a torch file)", positional=True, path="new_file")
    model: str = _codec_model()

    def __post_init__(self):
        check_fields(self)


@dataclass
class DecodeOptions:
    input: str = option(help="a codes file from `mmdgen codec encode`", positional=True, path="file")
    output: str = option(help="the audio file to write", positional=True, path="new_file", suffixes=AUDIO_SUFFIXES)
    model: str = _codec_model()

    def __post_init__(self):
        check_fields(self)


@dataclass
class ReconstructOptions:
    input: str = option(help="an audio file", positional=True, path="file")
    output: str = option(help="the audio file to write", positional=True, path="new_file", suffixes=AUDIO_SUFFIXES)
    model: str = _codec_model()

    def __post_init__(self):
        check_fields(self)


def codec_encode(options: EncodeOptions) -> None:
    from mmdgen.codec_cli import encode_file

    codes = encode_file(options.model, options.input, options.output)
    print(f"{options.output}: codes {tuple(codes.shape)}")


def codec_decode(options: DecodeOptions) -> None:
    from mmdgen.codec_cli import decode_file

    decode_file(options.model, options.input, options.output)
    print(options.output)


def codec_reconstruct(options: ReconstructOptions) -> None:
    from mmdgen.codec_cli import reconstruct_file

    reconstruct_file(options.model, options.input, options.output)
    print(options.output)


GROUPS = {
    ("eval",): "evaluation: reports, the loss on a toy",
    ("data",): "the captioned music corpus and its token folders",
    ("text",): "text conditioning tools",
    ("train",): "train a model",
    ("codec",): "encode audio to codes and back",
}

@dataclass
class ExportOptions:
    model: str = option(help="the model to write: anything `mmdgen generate --model` takes", positional=True,
                        path="model")
    format: ExportFormat = option("transformers", "transformers: a MusicgenForConditionalGeneration folder "
                                  "(from_pretrained); audiocraft: state_dict.bin + compression_state_dict.bin; "
                                  "mmdgen: a self-contained mmdgen model directory (int8 with --quantize)")
    out: str = option("", "the folder to write (replaced atomically)", required=True, path="new_folder")
    overwrite: bool = option(False, "replace a non-empty --out")
    text_encoder: str | None = option(None, "the T5 folder or cache id of an audiocraft source", path="model")
    codec: str | None = option(None, "another codec to export with the LM", path="model")
    t5_name: str | None = option(None, "audiocraft: the name it fetches the T5 by (t5-base, ...), when the source "
                                        "does not tell it")
    quantize: Quantization = option("none", "mmdgen format: the decoder and heads in int8 (loaded as they are)")

    def __post_init__(self):
        check_fields(self)


def export(options: ExportOptions) -> None:
    from mmdgen.pretrained.export import export_model

    print(export_model(options.model, options.out, options.format, overwrite=options.overwrite,
                       text_encoder=options.text_encoder, codec=options.codec, t5_name=options.t5_name,
                       quantize=None if options.quantize == "none" else options.quantize))


COMMANDS = (
    Command(("demo",), "the whole pipeline on CPU in minutes: corpus, codecs with and without the independence loss, "
                       "tokens, LMs, generation, evaluation, report", DemoConfig, demo),
    Command(("eval", "report"), "evaluate a `mmdgen demo` run (if not yet) and write its report.md with tables, "
                                "figures and links to the clips", ReportOptions, eval_report),
    Command(("eval", "codec"), "dependence between codebooks and reconstruction of codecs (ours or published ones) on "
                               "a corpus split", CodecReportOptions, eval_codec),
    Command(("eval", "coupled-latents"), "train coupled latents to independence on the loss and compare the fused "
                                         "estimator with the naive one", CoupledLatentsConfig, coupled_latents),
    Command(("data", "build"), "render music21's score corpus to captioned clips (resumable)", BuildOptions,
            data_build),
    Command(("data", "tokenize"), "encode a corpus with a codec into token files for LM training", TokenizeOptions,
            data_tokenize),
    Command(("text", "tokenizer"), "train the caption tokenizer (sentencepiece) on a manifest", TokenizerOptions,
            text_tokenizer),
    Command(("train", "codec"), "train the EnCodec-MMD codec (resumes from --out/checkpoint)", CodecTrainConfig,
            train_codec),
    Command(("train", "lm"), "train the music LM on a token folder (resumes from --out/checkpoint)", LMTrainConfig,
            train_lm),
    Command(("generate",), "text to music with a trained or published MusicGen (and its codec)", GenerateOptions,
            generate),
    Command(("codec", "encode"), "audio file -> codes", EncodeOptions, codec_encode),
    Command(("codec", "decode"), "codes -> audio file", DecodeOptions, codec_decode),
    Command(("codec", "reconstruct"), "audio file -> codes -> audio file", ReconstructOptions, codec_reconstruct),
    Command(("export",), "write a model (trained here or published) as a transformers folder or as audiocraft's "
                         "files", ExportOptions, export),
)
