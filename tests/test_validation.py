"""mmdgen.validation: every field checked against its declaration (NaN and infinity never pass, ranges open or
closed, choices from Literal annotations, path kinds), every configuration declares every field, and the names
configurations choose from (mmdgen.choices) are the ones the code acts on."""

import dataclasses
import importlib
import inspect
import math
import pkgutil
import typing
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import pytest

import mmdgen
from mmdgen import choices
from mmdgen.validation import (INT64_MAX, check_fields, check_number, field_spec, label, option, option_names,
                               parse_word)


@dataclass
class Example:
    rate: float = option(0.5, "a rate", above=0, at_most=1)
    count: int = option(2, "a count", at_least=1)
    weight: float = option(0.0, "any finite number")
    mode: Literal["fast", "slow"] = option("fast", "a mode")
    pair: tuple[float, float] = option((0.1, 0.2), "two numbers", at_least=0, below=1)
    sizes: tuple[int, ...] = option((4,), "sizes", at_least=2)
    limit: int | None = option(None, "a limit or none", at_least=1)
    name: str = option("x", "a name", required=True, rule=lambda v: None if v.isidentifier() else "an identifier")
    source: str = option("", "an existing file", path="file")
    output: str = option("", "a file to write", path="new_file", suffixes=(".wav",))
    folder: str = option("", "a folder to write into", path="new_folder")
    flag: bool = option(False, "a switch")

    def __post_init__(self):
        check_fields(self)


@dataclass
class Child(Example):
    count: int = 5  # a new default; the rules stay the parent's


@pytest.mark.parametrize("field, value, expected", [
    ("rate", float("nan"), "rate must be a finite number > 0 and <= 1, got nan"),
    ("rate", float("inf"), "rate must be a finite number > 0 and <= 1, got inf"),
    ("rate", 0.0, "rate must be a finite number > 0 and <= 1, got 0.0"),
    ("rate", 1.0000001, "rate must be a finite number > 0 and <= 1, got 1.0000001"),
    ("rate", "0.5", "rate must be a finite number > 0 and <= 1, got '0.5'"),
    ("rate", True, "rate must be a finite number > 0 and <= 1, got True"),
    ("weight", float("-inf"), "weight must be a finite number, got -inf"),
    ("count", 0, "count must be an integer >= 1, got 0"),
    ("count", 2.0, "count must be an integer >= 1, got 2.0"),
    ("count", True, "count must be an integer >= 1, got True"),
    ("count", 2**63, f"count must fit in 64 bits (at most {INT64_MAX} in size), got {2**63}"),
    ("mode", "medium", "mode must be one of fast, slow, got 'medium'"),
    ("pair", (0.1,), "pair must hold 2 values, got 1: (0.1,)"),
    ("pair", (0.1, 1.0), "pair[1] must be a finite number >= 0 and < 1, got 1.0"),
    ("pair", (0.1, float("nan")), "pair[1] must be a finite number >= 0 and < 1, got nan"),
    ("pair", 0.5, "pair must be a sequence of numbers, got 0.5"),
    ("sizes", (4, 1), "sizes[1] must be an integer >= 2, got 1"),
    ("limit", 0, "limit must be an integer >= 1, got 0"),
    ("name", "", "name is required: a name"),
    ("name", "two words", "name must be an identifier, got 'two words'"),
    ("name", 3, "name must be a string, got 3"),
    ("flag", 1, "flag must be true or false, got 1"),
])
def test_each_rule_refuses_with_the_field_the_value_and_what_was_expected(field, value, expected):
    with pytest.raises(ValueError) as refused:
        Example(**{field: value})
    assert str(refused.value) == expected


def test_good_values_pass_and_boundaries_are_open_or_closed_as_declared():
    Example(rate=1.0, count=1, weight=-1e300, mode="slow", pair=(0.0, 0.999), sizes=(2, 3, 4), limit=None, flag=True)
    Example(pair=[0.0, 0.5], sizes=[2])  # lists from JSON
    Example(rate=np.float32(0.25), count=np.int64(3))  # NumPy's scalars are numbers too
    with pytest.raises(ValueError):
        Example(rate=0.0)  # above=0: open
    assert check_number(0, "x", integer=True, at_least=0) == 0  # at_least=0: closed


def test_every_problem_is_named_in_one_message():
    with pytest.raises(ValueError) as refused:
        Example(rate=float("nan"), count=0)
    assert str(refused.value) == ("rate must be a finite number > 0 and <= 1, got nan; "
                                  "count must be an integer >= 1, got 0")


def test_paths_by_kind(tmp_path):
    (tmp_path / "a.wav").write_bytes(b"")
    Example(source=str(tmp_path / "a.wav"), output=str(tmp_path / "new" / "b.wav"), folder=str(tmp_path / "new"))
    cases = [(dict(source=str(tmp_path / "none.wav")), "no such file"),
             (dict(source=str(tmp_path)), "a folder, expected a file"),
             (dict(output=str(tmp_path)), "an existing folder, expected the name of a file to write"),
             (dict(output=str(tmp_path / "b.mp3")), "must end in .wav"),
             (dict(output=str(tmp_path / "a.wav" / "c.wav")), "a.wav is a file, not a folder"),
             (dict(folder=str(tmp_path / "a.wav")), "an existing file, expected a folder to write into"),
             (dict(folder=str(tmp_path / "a.wav" / "deeper")), "a.wav is a file, not a folder"),
             (dict(source="a\0b"), "a path cannot hold a NUL character")]
    for fields, expected in cases:
        with pytest.raises(ValueError) as refused:
            Example(**fields)
        (name,) = fields
        assert str(refused.value).startswith(f"{name} ") and expected in str(refused.value), fields


def test_a_subclass_default_keeps_the_parent_rules_and_help():
    assert Child().count == 5
    assert field_spec(Child, "count").help == "a count"
    with pytest.raises(ValueError, match="count must be an integer >= 1, got 0"):
        Child(count=0)


def test_within_option_names_fields_are_named_as_options():
    with option_names():
        assert label("mmd_weight") == "--mmd-weight"
        with pytest.raises(ValueError, match=r"^--rate must be a finite number"):
            Example(rate=float("nan"))
    assert label("mmd_weight") == "mmd_weight"
    from mmdgen.generate.config import Sampling

    with option_names(), pytest.raises(ValueError, match=r"^--guidance must be a finite number >= 0, got -1"):
        Sampling(guidance_scale=-1.0)  # the field's own flag


def test_command_line_words_parse_to_the_field_type():
    assert parse_word("3", int, "--n") == 3 and math.isnan(parse_word("nan", float, "--x"))
    assert parse_word("7", tuple[int, ...], "--sizes") == 7  # one word of a tuple option
    assert parse_word("a b", str, "--s") == "a b"
    for word, kind, name, expected in (("1e3", int, "--n", "--n must be an integer, got '1e3'"),
                                       ("ten", float, "--x", "--x must be a number, got 'ten'"),
                                       ("", int | None, "--limit", "--limit must be an integer, got ''")):
        with pytest.raises(ValueError) as refused:
            parse_word(word, kind, name)
        assert str(refused.value) == expected


def test_check_number_for_values_outside_a_configuration():
    assert check_number(2.5, "f.jsonl:3: duration", above=0) == 2.5
    for value in (float("nan"), "2", None, -1):
        with pytest.raises(ValueError, match=r"^f.jsonl:3: duration must be a finite number > 0, got"):
            check_number(value, "f.jsonl:3: duration", above=0)
    with pytest.raises(ValueError, match="seed must be an integer >= 0, got 1.5"):
        check_number(1.5, "seed", integer=True, at_least=0)


# published or packaged formats, read by their own loaders (T5's and BERT's config.json, musicnn's checkpoint)
FOREIGN = {"T5Config", "BertConfig", "MusicnnConfig"}


def _configurations() -> list[type]:
    """Every configuration dataclass of mmdgen (named *Config or *Options, or Sampling), foreign formats aside."""
    found = []
    for module in pkgutil.walk_packages(mmdgen.__path__, "mmdgen."):
        if module.name.endswith("__main__"):  # runs the command line when imported
            continue
        for name, cls in inspect.getmembers(importlib.import_module(module.name), dataclasses.is_dataclass):
            if cls.__module__ == module.name and name not in FOREIGN and (
                    name.endswith(("Config", "Options")) or name == "Sampling"):
                found.append(cls)
    return found


def test_every_field_of_every_configuration_is_declared_with_its_help():
    configurations = _configurations()
    assert len(configurations) >= 20
    for cls in configurations:
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            spec = field_spec(cls, field.name)
            nested = dataclasses.is_dataclass(hints[field.name])
            assert nested or (spec is not None and spec.help), f"{cls.__name__}.{field.name} has no option(...)"


def test_every_configuration_refuses_nan_in_each_float_field():
    checked = []
    for cls in _configurations():
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            if hints[field.name] not in (float, float | None):
                continue
            try:
                cls(**{field.name: math.nan})
            except TypeError:  # a field without a default (a command's positional argument) is missing
                continue
            except ValueError as refused:
                assert f"{field.name} must be a finite number" in str(refused) and "got nan" in str(refused)
                checked.append(f"{cls.__name__}.{field.name}")
            else:
                raise AssertionError(f"{cls.__name__}.{field.name} = nan was accepted")
    assert len(checked) >= 25, checked


def test_the_names_configurations_choose_from_are_the_ones_the_code_acts_on():
    from mmdgen.kernels.backend import BACKENDS
    from mmdgen.model.codec import PRESETS as CODEC_PRESETS
    from mmdgen.model.lm import PRESETS as LM_PRESETS
    from mmdgen.model.patterns import PATTERNS
    from mmdgen.model.text import CONDITIONER_KINDS

    assert set(get_args(choices.CodecPreset)) == set(CODEC_PRESETS)
    assert set(get_args(choices.LMPreset)) == set(LM_PRESETS)
    assert PATTERNS == get_args(choices.PatternName) and CONDITIONER_KINDS == get_args(choices.TextConditionerKind)
    assert BACKENDS == get_args(choices.Backend)
