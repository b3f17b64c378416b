"""Command-line options made from configuration dataclasses: one option per field (``mmd_weight`` ->
``--mmd-weight``), with the help text, default and choices its ``option(...)`` declares (``mmdgen.validation``); the
fields of a nested configuration (``GenerateOptions.sampling``) become options of the same command.

``add_options`` declares them to argparse; ``build`` turns what was given into the configuration: each word is
parsed to the field's type, an option not given keeps the dataclass's default (the one source of every default),
and the configuration checks itself as it is made, inside ``option_names()`` so that its messages name the options.
argparse's own errors (an unknown option, a missing argument) are raised as ``UsageError`` instead of exiting.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from mmdgen.validation import (Spec, choices_of, field_spec, field_types, flag_of, label, optional_type, parse_word,
                               tuple_element)


class UsageError(Exception):
    """A command line argparse cannot parse; ``prog`` names the command (``mmdgen train codec``)."""

    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog = prog


class Parser(argparse.ArgumentParser):
    """argparse's parser, raising ``UsageError`` (one line, no usage dump) where argparse would exit; a command
    refuses words it does not know itself, so that the message names the command."""

    def error(self, message: str):
        raise UsageError(self.prog, message)

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras and self._subparsers is None:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


def add_options(parser: argparse.ArgumentParser, cls: type, prefix: tuple[str, ...] = ()) -> None:
    """One argument per field of the dataclass ``cls`` (and of the dataclasses nested in it)."""
    for field in dataclasses.fields(cls):
        hint = field_types(cls)[field.name]
        if dataclasses.is_dataclass(hint):
            add_options(parser, hint, prefix + (field.name,))
            continue
        spec = field_spec(cls, field.name)
        if spec is None:
            raise TypeError(f"{cls.__name__}.{field.name} has no option(...) declaration: no help text, no rules")
        dest = ".".join(prefix + (field.name,))
        settings = _argument_settings(field, hint, spec)
        if spec.positional:
            parser.add_argument(dest, **settings)
        else:
            parser.add_argument(flag_of(field.name, spec), dest=dest, **settings)


def _argument_settings(field: dataclasses.Field, hint: Any, spec: Spec) -> dict:
    inner, optional = optional_type(hint)
    element = tuple_element(inner)
    choices = choices_of(element[0] if element else inner, spec)
    settings: dict[str, Any] = {"default": argparse.SUPPRESS, "help": _help(field, spec)}
    if inner is bool:
        settings["action"] = argparse.BooleanOptionalAction
        return settings
    if choices is not None:
        settings["metavar"] = "{" + ",".join(map(str, choices)) + "}"
    elif not spec.positional:  # the option's own name, not its place in a nested configuration
        settings["metavar"] = flag_of(field.name, spec)[2:].replace("-", "_").upper()
    if element is not None:
        settings["nargs"] = element[1] or ("+" if spec.positional else "*")
    elif spec.positional and (optional or field.default is not dataclasses.MISSING):
        settings["nargs"] = "?"
    if not spec.positional:
        settings["required"] = field.default is dataclasses.MISSING or (spec.required and field.default == "")
    return settings


def _help(field: dataclasses.Field, spec: Spec) -> str:
    default = field.default
    if isinstance(default, bool):
        shown = "on" if default else "off"
    elif isinstance(default, tuple):
        shown = " ".join(map(str, default))
    else:
        shown = None if default in (None, "", dataclasses.MISSING) else str(default)
    text = spec.help + (f" (default: {shown})" if shown is not None else "")
    return text.replace("%", "%%")  # argparse formats help strings with %


def build(cls: type, given: dict[str, Any], prefix: tuple[str, ...] = ()) -> Any:
    """The dataclass ``cls`` from ``given`` (argparse's values by dest; an option not given is absent and keeps the
    field's default). Call it inside ``option_names()``: the configuration checks itself as it is made."""
    values = {}
    for field in dataclasses.fields(cls):
        hint = field_types(cls)[field.name]
        if dataclasses.is_dataclass(hint):
            values[field.name] = build(hint, given, prefix + (field.name,))
            continue
        dest = ".".join(prefix + (field.name,))
        if dest in given:
            values[field.name] = _parsed(given[dest], hint, label(field.name, field_spec(cls, field.name)))
    return cls(**values)


def _parsed(value: Any, hint: Any, name: str) -> Any:
    if isinstance(value, list):  # nargs: one word per element
        return tuple(parse_word(word, hint, name) for word in value)
    if isinstance(value, str):
        return parse_word(value, hint, name)
    return value  # a flag's True / False, or a positional left out (None)
