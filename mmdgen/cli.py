"""The `mmdgen` command. Subcommands grow with the project: demo for now."""

from __future__ import annotations

import argparse
import sys

from mmdgen import __version__


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
    from mmdgen.demo import DemoConfig, run

    _check_device(args.device, args.backend)

    cfg = DemoConfig(steps=args.steps, seed=args.seed, backend=args.backend, device=args.device,
                     compare_sizes=tuple(args.compare_sizes))
    run(cfg)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmdgen", description="MusicGen-MMD: text-to-music with independent codebooks")
    parser.add_argument("--version", action="version", version=f"mmdgen {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train coupled latents to independence and compare with the naive estimator")
    demo.add_argument("--steps", type=int, default=150, help="optimiser steps (default 150)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--backend", choices=["auto", "triton", "torch"], default="auto")
    demo.add_argument("--device", default="cpu", help="cpu or cuda")
    demo.add_argument("--compare-sizes", type=int, nargs="*", default=[1024, 4096],
                      help="sample counts for the side-by-side with the naive estimator")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "steps", 1) < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    try:
        return args.func(args)
    except ValueError as error:
        print(f"mmdgen {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
