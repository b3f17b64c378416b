"""Every option and configuration field checked one way, so that a bad value is refused with the same words from
Python and from the command line, before anything runs or is written.

A configuration dataclass declares each field with ``option(default, help, ...)``: its help text (``--help`` shows
it with the default) and its rules: a range (``above`` / ``at_least``, ``below`` / ``at_most``), choices (a
``Literal`` annotation gives them), a path kind (an existing file or folder, or an output that must not be an
existing folder / file) with the suffixes it may end in, or a ``rule`` of its own. The dataclass's
``__post_init__`` calls ``check_fields(self)``, which checks every field against its declaration and its type
annotation and raises one ValueError naming each bad field, the value found and what was expected. Numbers must be
finite: NaN and infinity never pass (a check written as ``if value < 0: refuse`` lets NaN through, and a later
``if value > 0`` then reads it as "off").

The command line (``mmdgen.cli``) makes its options from the same declarations and builds the configuration
inside ``option_names()``, where the messages name options (``--mmd-weight``) instead of fields (``mmd_weight``).

No torch here: ``mmdgen --help`` imports this module.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import types
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
import re
from pathlib import Path
from typing import Any, Literal

PathKind = Literal["file", "folder", "file_or_folder", "model", "new_file", "new_folder"]
_REPOSITORY_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")  # owner/name (or an old bare name)
INT64_MAX = 2**63 - 1  # the largest integer a tensor, a seed or a step counter holds
MAX_SECONDS = 3600.0  # the longest audio an option may ask for: an hour (more is a typo, or a run that never ends)


@dataclass(frozen=True)
class Spec:
    """How a configuration field is shown and checked; see ``option``."""

    help: str
    above: float | None = None
    at_least: float | None = None
    below: float | None = None
    at_most: float | None = None
    choices: tuple | None = None
    path: PathKind | None = None
    suffixes: tuple[str, ...] = ()
    required: bool = False
    rule: Callable[[Any], str | None] | None = None
    flag: str | None = None
    positional: bool = False


def option(default: Any = dataclasses.MISSING, help: str = "", **rules: Any) -> Any:
    """A dataclass field with its help text and the rules ``check_fields`` applies:

    - ``above``, ``at_least``, ``below``, ``at_most``: the range of a number (of each element of a tuple);
    - ``choices``: the allowed values (a ``Literal`` annotation gives them without this);
    - ``path``: "file" / "folder" / "file_or_folder" (must exist), "model" (an existing file or folder, or a
      repository id such as facebook/musicgen-small, looked up later in the local Hugging Face cache),
      "new_file" (an output: not an existing folder),
      "new_folder" (an output: not an existing file); ``suffixes``: the endings a path may have;
    - ``required``: an empty string is refused;
    - ``rule``: a function of the value returning what was expected when the value breaks it, else None;
    - ``flag``: the command-line name when it is not the field's; ``positional``: a command-line argument
      without a flag.
    """
    return dataclasses.field(default=default, metadata={"spec": Spec(help, **rules)})


# -- names in messages -------------------------------------------------------------------------------------------

_OPTION_NAMES: ContextVar[bool] = ContextVar("option_names", default=False)


@contextmanager
def option_names() -> Iterator[None]:
    """Within it, ``check_fields`` names fields as command-line options (``--mmd-weight``): the command line builds
    its configurations in here."""
    token = _OPTION_NAMES.set(True)
    try:
        yield
    finally:
        _OPTION_NAMES.reset(token)


def flag_of(name: str, spec: Spec | None = None) -> str:
    """The command-line option of the field ``name``: ``--mmd-weight`` for ``mmd_weight`` (or the spec's flag)."""
    return "--" + (spec.flag if spec is not None and spec.flag else name).replace("_", "-")


def label(name: str, spec: Spec | None = None) -> str:
    """How a message names the field ``name``: as its option inside ``option_names()`` (a positional argument keeps
    its name), else as the field."""
    if not _OPTION_NAMES.get() or (spec is not None and spec.positional):
        return name
    return flag_of(name, spec)


# -- the fields of a configuration -------------------------------------------------------------------------------

@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotations of a dataclass's fields (``Literal``, ``X | None``, ``tuple[...]`` kept)."""
    return typing.get_type_hints(cls)


def field_spec(cls: type, name: str) -> Spec | None:
    """The spec of the field ``name`` of ``cls``: its own, or a base class's when a subclass only changes the
    default (``out: str = "runs/codec"``)."""
    for klass in cls.__mro__:
        found = getattr(klass, "__dataclass_fields__", {}).get(name)
        if found is not None and "spec" in found.metadata:
            return found.metadata["spec"]
    return None


def check_fields(config: Any) -> None:
    """ValueError naming every field of the dataclass instance ``config`` that breaks its spec or its annotation.
    Fields without a spec (nested configurations) are not looked at: they checked themselves."""
    cls = type(config)
    problems = []
    for field in dataclasses.fields(config):
        spec = field_spec(cls, field.name)
        if spec is not None:
            problem = value_problem(getattr(config, field.name), field_types(cls)[field.name], spec,
                                    label(field.name, spec))
            if problem:
                problems.append(problem)
    if problems:
        raise ValueError("; ".join(problems))


def check_number(value: Any, name: str, integer: bool = False, **bounds: float) -> Any:
    """``value`` when it is a finite number (an integer if ``integer``) within ``bounds`` (``above``, ``at_least``,
    ``below``, ``at_most``); else ValueError naming ``name``. For numbers that are not a configuration field (a
    line of a prompts file)."""
    problem = value_problem(value, int if integer else float, Spec("", **bounds), name)
    if problem:
        raise ValueError(problem)
    return value


def optional_type(hint: Any) -> tuple[Any, bool]:
    """(the type inside ``X | None``, True) for an optional annotation; (``hint``, False) otherwise."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if len(inner) == 1:
            return inner[0], True
    return hint, False


def tuple_element(hint: Any) -> tuple[Any, int | None] | None:
    """(element type, length or None for any length) of a ``tuple[X, X]`` / ``tuple[X, ...]`` annotation; None for
    anything else."""
    if typing.get_origin(hint) is not tuple:
        return None
    args = typing.get_args(hint)
    if len(args) == 2 and args[1] is Ellipsis:
        return args[0], None
    return args[0], len(args)


def choices_of(hint: Any, spec: Spec) -> tuple | None:
    """The values a field may take: its spec's choices, or its ``Literal`` annotation's."""
    if spec.choices is not None:
        return tuple(spec.choices)
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else None


def value_problem(value: Any, hint: Any, spec: Spec, name: str) -> str | None:
    """What is wrong with ``value`` for a field annotated ``hint`` with ``spec`` (named ``name``), or None."""
    hint, optional = optional_type(hint)
    if value is None and optional:
        return None
    element = tuple_element(hint)
    if element is None:
        problem = _scalar_problem(value, hint, spec, name)
    else:
        problem = _tuple_problem(value, element, spec, name)
    if problem is None and spec.rule is not None:
        expected = spec.rule(value)
        problem = f"{name} must be {expected}, got {value!r}" if expected else None
    return problem


def _tuple_problem(value: Any, element: tuple[Any, int | None], spec: Spec, name: str) -> str | None:
    kind, length = element
    if not isinstance(value, (tuple, list)):
        return f"{name} must be a sequence of {_kind_name(kind)}s, got {value!r}"
    if length is not None and len(value) != length:
        return f"{name} must hold {length} values, got {len(value)}: {value!r}"
    for index, item in enumerate(value):
        problem = _scalar_problem(item, kind, spec, f"{name}[{index}]")
        if problem:
            return problem
    return None


def _scalar_problem(value: Any, hint: Any, spec: Spec, name: str) -> str | None:
    if hint is bool:
        return None if isinstance(value, bool) else f"{name} must be true or false, got {value!r}"
    if hint in (int, float):
        return _number_problem(value, hint is int, spec, name)
    choices = choices_of(hint, spec)
    if choices is not None:
        return None if value in choices else f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}"
    if hint is str:
        return _text_problem(value, spec, name)
    return None


def _number_problem(value: Any, integer: bool, spec: Spec, name: str) -> str | None:
    bounds = _bounds(spec)
    expected = ("an integer" if integer else "a finite number") + (f" {bounds}" if bounds else "")
    # numbers.Integral / Real: NumPy's scalars too; a bool is an int to Python but never meant as a number here
    if isinstance(value, bool) or not isinstance(value, numbers.Integral if integer else numbers.Real):
        return f"{name} must be {expected}, got {value!r}"
    if not integer and not math.isfinite(value):
        return f"{name} must be {expected}, got {value!r}"
    inside = ((spec.above is None or value > spec.above) and (spec.at_least is None or value >= spec.at_least)
              and (spec.below is None or value < spec.below) and (spec.at_most is None or value <= spec.at_most))
    if not inside:
        return f"{name} must be {expected}, got {value!r}"
    if integer and abs(value) > INT64_MAX:
        return f"{name} must fit in 64 bits (at most {INT64_MAX} in size), got {value!r}"
    return None


def _bounds(spec: Spec) -> str:
    parts = [f"{sign} {_number(limit)}" for sign, limit in ((">", spec.above), (">=", spec.at_least),
                                                             ("<", spec.below), ("<=", spec.at_most))
             if limit is not None]
    return " and ".join(parts)


def _number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _text_problem(value: Any, spec: Spec, name: str) -> str | None:
    if not isinstance(value, str):
        return f"{name} must be a string, got {value!r}"
    if not value:
        return f"{name} is required: {spec.help}" if spec.required else None
    if spec.path is not None:
        return path_problem(value, spec.path, name, spec.suffixes)
    return None


def path_problem(value: str, kind: PathKind, name: str, suffixes: tuple[str, ...] = ()) -> str | None:
    """What is wrong with the path ``value`` (named ``name``) for a field of path kind ``kind`` (see ``option``),
    or None."""
    if "\0" in value:
        return f"{name} {value!r}: a path cannot hold a NUL character"
    path = Path(value)
    if kind == "file" and not path.is_file():
        return f"{name} {value}: " + ("a folder, expected a file" if path.is_dir() else "no such file")
    if kind == "folder" and not path.is_dir():
        return f"{name} {value}: " + ("a file, expected a folder" if path.exists() else "no such folder")
    if kind == "file_or_folder" and not path.exists():
        return f"{name} {value}: no such file or folder"
    if kind == "model" and not path.exists() and not _REPOSITORY_ID.match(value):
        return f"{name} {value}: no such file or folder, and not a repository id such as facebook/musicgen-small"
    if kind == "new_file" and path.is_dir():
        return f"{name} {value}: an existing folder, expected the name of a file to write"
    if kind == "new_folder" and path.exists() and not path.is_dir():
        return f"{name} {value}: an existing file, expected a folder to write into"
    if kind in ("new_file", "new_folder"):
        blocking = next((parent for parent in path.absolute().parents if parent.exists()), None)
        if blocking is not None and not blocking.is_dir():
            return f"{name} {value}: {blocking} is a file, not a folder"
    if suffixes and path.suffix.lower() not in suffixes:
        return f"{name} {value}: must end in {_listing(suffixes)}"
    return None


def _kind_name(kind: Any) -> str:
    return {int: "integer", float: "number", str: "string", bool: "boolean"}.get(kind, "value")


def _listing(items: tuple) -> str:
    words = [str(item) for item in items]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


# -- the command line's words ------------------------------------------------------------------------------------

def parse_word(text: str, hint: Any, name: str) -> Any:
    """A command-line word as a value of the type ``hint`` (of a tuple's element for a tuple): an int, a float, or
    the text itself. ValueError naming ``name`` when it does not parse; the range is ``check_fields``'s job."""
    hint, _ = optional_type(hint)
    element = tuple_element(hint)
    kind = element[0] if element else hint
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{name} must be an integer, got {text!r}") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{name} must be a number, got {text!r}") from None
    return text
