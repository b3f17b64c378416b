"""The `mmdgen` command: demo, data (build, tokenize), text (tokenizer), train (codec, lm), generate, codec."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from mmdgen.version import __version__


def _check_device(device: str, backend: str) -> None:
    import torch

    from mmdgen.kernels.backend import resolve_backend

    try:
        chosen = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"--device {device!r} is not a torch device ({error})") from error
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r}: no CUDA device is available on this machine")
    resolve_backend(backend, chosen)


def _demo(args: argparse.Namespace) -> int:
    from mmdgen.demo.config import DemoConfig
    from mmdgen.demo.run import run

    _check_device(args.device, "auto")
    cfg = DemoConfig(out=args.out, hours=args.hours, codec_steps=args.codec_steps, mmd_weight=args.mmd_weight,
                     lm_steps=args.lm_steps, clips=args.clips, duration=args.duration, seed=args.seed,
                     device=args.device)
    out = run(cfg)
    print(f"mmdgen demo: everything is in {out}; the report is {out / 'report.md'}")
    return 0


def _eval_report(args: argparse.Namespace) -> int:
    from mmdgen.demo.report import report

    print(report(args.run_dir, recompute=args.recompute))
    return 0


def _eval_codec(args: argparse.Namespace) -> int:
    from mmdgen.eval.codec import codec_report

    codecs = {}
    for value in args.codecs:
        name, sep, path = value.partition("=")
        name, path = (name, path) if sep else (Path(value).name or value, value)
        if name in codecs:
            raise ValueError(f"two codecs named {name!r}; name them NAME=DIR")
        codecs[name] = path
    if args.clips < 1:
        raise ValueError(f"--clips must be at least 1, got {args.clips}")
    print(codec_report(codecs, args.manifest, args.out, args.split, args.clips))
    return 0


def _coupled_latents(args: argparse.Namespace) -> int:
    from mmdgen.eval.coupled_latents import CoupledLatentsConfig, run

    _check_device(args.device, args.backend)
    run(CoupledLatentsConfig(steps=args.steps, seed=args.seed, backend=args.backend, device=args.device,
                             compare_sizes=tuple(args.compare_sizes)))
    return 0


def _data_build(args: argparse.Namespace) -> int:
    from mmdgen.data.build import BuildConfig, build_corpus

    folders = tuple(args.folders) if args.folders else None
    cfg = BuildConfig(hours=args.hours, clip_seconds=args.clip_seconds, sample_rate=args.sample_rate,
                      renderings=args.renderings, seed=args.seed, shard_clips=args.shard_clips, folders=folders,
                      audio_format=args.format)
    report = build_corpus(args.out, cfg, workers=args.workers)
    failures = ", ".join(f"{k} {v}" for k, v in report["failures_by_cause"].items()) or "none"
    print(f"{report['clips']} clips, {report['hours']:.2f} h from {report['works']} works in {args.out} "
          f"(splits {report['clips_by_split']}); failures: {failures}; "
          f"{report['audio_seconds_per_second']} s of audio per second this run")
    print(f"manifest: {args.out}/manifest.jsonl")
    return 0


def _data_tokenize(args: argparse.Namespace) -> int:
    from mmdgen.data.tokenize import describe, tokenize_corpus

    header = tokenize_corpus(args.codec, args.manifest, args.out, batch_size=args.batch_size, device=args.device)
    print(f"{args.out}: {describe(header)}")
    return 0


def _text_tokenizer(args: argparse.Namespace) -> int:
    from mmdgen.model.text import build_tokenizer_from_manifest

    path, size = build_tokenizer_from_manifest(args.manifest, args.out, args.vocab_size, split=args.split)
    print(f"{path}: sentencepiece model with {size} pieces")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from mmdgen.files import write_audio
    from mmdgen.generate import Generator, Sampling
    from mmdgen.generate.batch import generate_batch, read_prompts

    if (args.text is None) == (args.prompts is None):
        raise ValueError("give either a text or --prompts FILE.jsonl")
    _check_device(args.device, args.backend)
    generator = Generator.from_pretrained(args.model, args.codec, device=args.device, backend=args.backend,
                                          compile=args.compile, cuda_graph=args.cuda_graph)
    sampling = Sampling(guidance_scale=args.guidance if args.guidance > 0 else None, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p)
    if args.prompts is not None:
        if args.out_dir is None:
            raise ValueError("--prompts needs --out-dir")
        report = generate_batch(generator, read_prompts(args.prompts, args.duration, args.seed), args.out_dir,
                                sampling, batch_size=args.batch_size)
        print(f"{args.out_dir}: {report['generated']} clips generated, {report['skipped']} already there; "
              f"real-time factor {report['real_time_factor']:.2f}x; manifest {Path(args.out_dir) / 'manifest.jsonl'}")
        return 0
    if not args.text.strip():
        raise ValueError("the text is empty; give a description of the music")
    prompt = None
    if args.prompt_audio:
        from mmdgen.data.audio import read_audio

        prompt = read_audio(Path(args.prompt_audio), generator.sample_rate)[None]
    audio = generator.generate([args.text], args.duration, sampling, seed=args.seed, prompt_audio=prompt)
    write_audio(args.out, audio[0], generator.sample_rate)
    print(f"{args.out}: {args.duration:g} s at {generator.sample_rate} Hz")
    return 0


def _add_dataclass_arguments(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """One --option per field of a config dataclass, typed by its default."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif isinstance(default, tuple):
            parser.add_argument(flag, type=type(default[0]), nargs=len(default), default=default)
        else:
            parser.add_argument(flag, type=type(default), default=default)


def _train(args: argparse.Namespace) -> int:
    """``mmdgen train codec|lm``: the trainer's config from the options generated from its fields."""
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(args.config_class)}
    fields["betas"] = tuple(fields["betas"])
    trainer = args.trainer_class(args.config_class(**fields))
    report = trainer.train()
    if trainer.process.main:
        print(f"model: {Path(args.out) / 'model'}" + (f"; validation: {report}" if report else ""))
    return 0


def _codec(args: argparse.Namespace) -> int:
    from mmdgen import codec_cli

    if args.codec_command == "encode":
        codes = codec_cli.encode_file(args.model, args.input, args.output)
        print(f"{args.output}: codes {tuple(codes.shape)}")
    elif args.codec_command == "decode":
        codec_cli.decode_file(args.model, args.input, args.output)
        print(args.output)
    else:
        codec_cli.reconstruct_file(args.model, args.input, args.output)
        print(args.output)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmdgen", description="MusicGen-MMD: text-to-music with independent codebooks")
    parser.add_argument("--version", action="version", version=f"mmdgen {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the whole pipeline on CPU in minutes: corpus, codecs with and without the "
                                       "independence loss, tokens, LMs, generation, evaluation, report")
    demo.add_argument("--out", default="runs/demo", help="output folder (a rerun reuses what is there)")
    demo.add_argument("--hours", type=float, default=0.5, help="hours of corpus to render (default 0.5)")
    demo.add_argument("--codec-steps", type=int, default=700)
    demo.add_argument("--mmd-weight", type=float, default=3.0, help="the second codec's independence-loss weight")
    demo.add_argument("--lm-steps", type=int, default=600)
    demo.add_argument("--clips", type=int, default=6, help="clips generated per LM")
    demo.add_argument("--duration", type=float, default=10.0, help="seconds per generated clip")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", default="cpu", help="cpu or cuda")
    demo.set_defaults(func=_demo)

    evaluation = sub.add_parser("eval", help="evaluation: reports, the loss on a toy").add_subparsers(
        dest="eval_command", required=True)
    report = evaluation.add_parser("report", help="evaluate a `mmdgen demo` run (if not yet) and write its "
                                                  "report.md with tables, figures and links to the clips")
    report.add_argument("run_dir", help="the demo's output folder")
    report.add_argument("--recompute", action="store_true", help="measure again even if evaluation.json exists")
    report.set_defaults(func=_eval_report)
    codecs = evaluation.add_parser("codec", help="dependence between codebooks and reconstruction of codecs (ours "
                                                 "or local transformers EnCodec folders) on a corpus split")
    codecs.add_argument("codecs", nargs="+", help="NAME=DIR pairs (or DIRs): codec directories or transformers "
                                                  "EncodecModel folders")
    codecs.add_argument("--manifest", required=True, help="a corpus manifest.jsonl")
    codecs.add_argument("--split", default="test")
    codecs.add_argument("--clips", type=int, default=64, help="clips of the split to use (default 64)")
    codecs.add_argument("--out", required=True, help="folder for codecs.md, codecs.json and the figures")
    codecs.set_defaults(func=_eval_codec)
    toy = evaluation.add_parser("coupled-latents", help="train coupled latents to independence on the loss and "
                                                        "compare the fused estimator with the naive one")
    toy.add_argument("--steps", type=int, default=150, help="optimiser steps (default 150)")
    toy.add_argument("--seed", type=int, default=0)
    toy.add_argument("--backend", choices=["auto", "triton", "torch"], default="auto")
    toy.add_argument("--device", default="cpu", help="cpu or cuda")
    toy.add_argument("--compare-sizes", type=int, nargs="*", default=[1024, 4096],
                     help="sample counts for the side-by-side with the naive estimator")
    toy.set_defaults(func=_coupled_latents)

    data = sub.add_parser("data", help="build the captioned music corpus").add_subparsers(dest="data_command",
                                                                                         required=True)
    build = data.add_parser("build", help="render music21's score corpus to captioned 32 kHz clips (resumable)")
    build.add_argument("--out", required=True, help="output folder (resumed when it exists)")
    build.add_argument("--hours", type=float, default=1.0, help="hours of audio to render (default 1)")
    build.add_argument("--clip-seconds", type=float, default=10.0)
    build.add_argument("--sample-rate", type=int, default=32000)
    build.add_argument("--renderings", type=int, default=2, help="instrument/tempo renderings per excerpt")
    build.add_argument("--shard-clips", type=int, default=32)
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--folders", nargs="*", help="corpus folders to draw from (default: all with a style)")
    build.add_argument("--format", choices=["flac", "wav"], default="flac")
    build.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    build.set_defaults(func=_data_build)
    tokenize = data.add_parser("tokenize", help="encode a corpus with a codec into token files for LM training")
    tokenize.add_argument("--codec", required=True, help="codec directory (config.json + codec.safetensors)")
    tokenize.add_argument("--manifest", required=True, help="the corpus manifest.jsonl")
    tokenize.add_argument("--out", required=True, help="token folder to write (replaced atomically)")
    tokenize.add_argument("--batch-size", type=int, default=8)
    tokenize.add_argument("--device", default="cpu")
    tokenize.set_defaults(func=_data_tokenize)

    text = sub.add_parser("text", help="text conditioning tools").add_subparsers(dest="text_command", required=True)
    tokenizer = text.add_parser("tokenizer", help="train the caption tokenizer (sentencepiece) on a manifest")
    tokenizer.add_argument("--manifest", required=True)
    tokenizer.add_argument("--out", required=True, help="the .model file to write")
    tokenizer.add_argument("--vocab-size", type=int, default=1000, help="at most this many pieces (fewer when the "
                                                                        "captions cannot fill it)")
    tokenizer.add_argument("--split", default="train")
    tokenizer.set_defaults(func=_text_tokenizer)

    from mmdgen.train.codec import CodecTrainConfig, CodecTrainer
    from mmdgen.train.lm import LMTrainConfig, LMTrainer

    train = sub.add_parser("train", help="train a model").add_subparsers(dest="train_command", required=True)
    train_codec = train.add_parser("codec", help="train the EnCodec-MMD codec (resumes from --out/checkpoint)")
    _add_dataclass_arguments(train_codec, CodecTrainConfig)
    train_codec.set_defaults(func=_train, config_class=CodecTrainConfig, trainer_class=CodecTrainer)
    train_lm = train.add_parser("lm", help="train the music LM on a token folder (resumes from --out/checkpoint)")
    _add_dataclass_arguments(train_lm, LMTrainConfig)
    train_lm.set_defaults(func=_train, config_class=LMTrainConfig, trainer_class=LMTrainer)

    generate = sub.add_parser("generate", help="text to music with a trained LM (and its codec)")
    generate.add_argument("text", nargs="?", help="a description of the music (or use --prompts)")
    generate.add_argument("--model", required=True, help="LM directory from `mmdgen train lm` (its codec inside)")
    generate.add_argument("--codec", help="codec directory, when the LM directory has none")
    generate.add_argument("--out", default="out.wav", help="output file for one text (.wav, .flac, .ogg)")
    generate.add_argument("--prompts", help="JSONL of {text, id?, duration?, seed?} for batch generation")
    generate.add_argument("--out-dir", help="output folder for --prompts (reruns skip finished clips)")
    generate.add_argument("--batch-size", type=int, default=8)
    generate.add_argument("--duration", type=float, default=10.0, help="seconds (default 10)")
    generate.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance (0: off)")
    generate.add_argument("--top-k", type=int, default=250)
    generate.add_argument("--top-p", type=float, default=0.0)
    generate.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--prompt-audio", help="an audio file to continue")
    generate.add_argument("--device", default="cpu")
    generate.add_argument("--backend", choices=["auto", "triton", "torch"], default="auto")
    generate.add_argument("--compile", action="store_true",
                          help="run the decode step through torch.compile: faster steps after a one-off compile "
                               "(seconds to a minute) per batch size and length; worth it for long or many clips")
    generate.add_argument("--cuda-graph", action="store_true",
                          help="(CUDA) capture the decode step in a CUDA graph once and replay it at every step")
    generate.set_defaults(func=_generate)

    codec = sub.add_parser("codec", help="encode audio to codes and back").add_subparsers(dest="codec_command",
                                                                                        required=True)
    for name, what in (("encode", "audio file -> codes (.pt)"), ("decode", "codes (.pt) -> audio file"),
                       ("reconstruct", "audio file -> codes -> audio file")):
        command = codec.add_parser(name, help=what)
        command.add_argument("input")
        command.add_argument("output")
        command.add_argument("--model", required=True, help="codec directory (config.json + codec.safetensors)")
        command.set_defaults(func=_codec)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "steps", 1) < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    try:
        return args.func(args)
    except (ValueError, RuntimeError, FileNotFoundError) as error:
        print(f"mmdgen {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
