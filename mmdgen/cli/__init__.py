"""The ``mmdgen`` command: demo, eval (report, codec, coupled-latents), data (build, tokenize), text (tokenizer),
train (codec, lm), generate, codec (encode, decode, reconstruct).

The commands and their options are declared in ``commands`` (each command's options are a configuration
dataclass; ``options`` makes them argparse options). A bad value is refused before anything runs, with one line
on stderr, ``mmdgen <command>: error: <message>``, and exit status 2; so is any error a command meets in its files
(a ValueError, RuntimeError or OSError), never with a traceback. ``--help`` imports neither torch nor triton.
"""

from __future__ import annotations

import logging
import os
import re
import sys

from mmdgen.cli.commands import COMMANDS, GROUPS, Command
from mmdgen.cli.options import Parser, UsageError, add_options, build
from mmdgen.validation import option_names
from mmdgen.version import __version__

COMMAND = "mmdgen_command"  # where the parsed arguments keep the Command to run


def build_parser() -> Parser:
    parser = Parser(prog="mmdgen", description="MusicGen-MMD: text-to-music with independent codebooks")
    parser.add_argument("--version", action="version", version=f"mmdgen {__version__}")
    children = {(): parser.add_subparsers(required=True)}
    for command in COMMANDS:
        for depth in range(1, len(command.words)):
            group = command.words[:depth]
            if group not in children:
                parent = children[group[:-1]].add_parser(group[-1], help=GROUPS[group], description=GROUPS[group])
                children[group] = parent.add_subparsers(required=True)
        sub = children[command.words[:-1]].add_parser(command.words[-1], help=command.help, description=command.help)
        add_options(sub, command.options)
        sub.set_defaults(**{COMMAND: command})
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command of ``argv`` (default: ``sys.argv[1:]``); 0 when it succeeded, 2 when it was refused."""
    prog = "mmdgen"
    try:
        given = vars(build_parser().parse_args(argv))
        command: Command = given.pop(COMMAND)
        prog = " ".join(("mmdgen",) + command.words)
        with option_names():  # also while it runs: a trainer's messages about its options name them as flags
            options = build(command.options, given)
            command.run(options)
    except UsageError as error:
        return _refuse(error.prog, error)
    except (ValueError, RuntimeError, OSError) as error:
        return _refuse(prog, error)
    return 0


def entry() -> None:
    """The ``mmdgen`` program (and ``python -m mmdgen.cli``): exits with ``main``'s status. A process started by
    torchrun (``WORLD_SIZE`` > 1) leaves without the interpreter's exit destructors once its output is flushed:
    there, after a good run whose process group was destroyed, gloo's threads could still abort the exit
    ("terminate called without an active exception", about once in 50 two-rank runs with torch 2.14), which
    torchrun reports as a failed rank."""
    code = main()
    world = os.environ.get("WORLD_SIZE", "").strip()
    if world.isdigit() and int(world) > 1:
        leave_now(code)
    sys.exit(code)


def leave_now(code: int) -> None:
    """End the process with ``code`` once logging and the standard streams are flushed, without the interpreter's
    exit destructors (a gloo process's exit can abort after a good run: see ``entry``)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _refuse(prog: str, error: Exception) -> int:
    message = re.sub(r"\s*\n\s*", " ", str(error).strip()) or type(error).__name__
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2
