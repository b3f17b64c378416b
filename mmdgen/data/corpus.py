"""The works of the score corpus that ships inside music21, with what their folder tells about them.

music21's metadata composer field is unreliable, so genre, composer and texture come from the corpus
folder. ABC files are collections (opus files): every ``X:`` tune in them is its own work.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class Style:
    genre: str
    composer: str | None  # None: many or unknown composers (folk collections)
    polyphonic: bool
    tempo_range: tuple[int, int]  # bpm drawn uniformly per clip (most scores carry no tempo)
    instruments: tuple[str, ...]  # General MIDI names from INSTRUMENTS


# General MIDI programs (0-based) of the instruments captions may name.
INSTRUMENTS = {
    "piano": 0, "harpsichord": 6, "organ": 19, "accordion": 21, "acoustic guitar": 24, "violin": 40, "cello": 42,
    "strings": 48, "choir": 52, "trumpet": 56, "french horn": 60, "oboe": 68, "clarinet": 71, "flute": 73,
    "recorder": 74, "pan flute": 75, "fiddle": 110,
}

_CHORAL = ("organ", "strings", "choir", "piano", "harpsichord")
_FOLK = ("violin", "flute", "accordion", "piano", "acoustic guitar", "recorder", "clarinet", "fiddle", "oboe")

STYLES = {
    "bach": Style("baroque chorale", "J. S. Bach", True, (60, 100), _CHORAL),
    "palestrina": Style("renaissance mass", "Palestrina", True, (56, 92), ("choir", "organ", "strings", "recorder")),
    "josquin": Style("renaissance motet", "Josquin des Prez", True, (56, 92), ("choir", "organ", "strings", "recorder")),
    "monteverdi": Style("madrigal", "Monteverdi", True, (60, 100), ("choir", "strings", "harpsichord", "recorder")),
    "trecento": Style("trecento ballata", None, True, (60, 104), ("recorder", "strings", "organ", "flute")),
    "beethoven": Style("string quartet", "Beethoven", True, (60, 132), ("strings", "piano", "cello")),
    "mozart": Style("string quartet", "Mozart", True, (60, 132), ("strings", "piano", "harpsichord")),
    "haydn": Style("string quartet", "Haydn", True, (60, 132), ("strings", "piano", "harpsichord")),
    "essenFolksong": Style("European folk song", None, False, (72, 126), _FOLK),
    "oneills1850": Style("Irish folk tune", None, False, (88, 140), _FOLK),
    "ryansMammoth": Style("fiddle tune", None, False, (90, 144), _FOLK),
    "miscFolk": Style("folk tune", None, False, (80, 132), _FOLK),
    "airdsAirs": Style("Scottish air", None, False, (66, 112), _FOLK),
}

# Score files only: .rntxt holds Roman-numeral analyses, not notes to play.
_SCORE_EXTENSIONS = {".abc", ".krn", ".mxl", ".xml", ".musicxml"}
_TUNE = re.compile(r"^X:\s*(\d+)", re.MULTILINE)
_TITLE = re.compile(r"^T:(.*)$", re.MULTILINE)


@dataclass(frozen=True)
class Work:
    """One piece: a score file, or one tune of an ABC collection (``number``)."""

    folder: str
    path: str  # relative to the music21 corpus root
    number: int | None = None

    @property
    def work_id(self) -> str:
        return self.path if self.number is None else f"{self.path}#{self.number}"

    @property
    def style(self) -> Style:
        return STYLES[self.folder]


def corpus_root() -> str:
    from music21 import common

    return str(common.getCorpusFilePath())


def abc_tunes(path: str) -> list[tuple[int, str]]:
    """(X: number, first T: title) of every tune of an ABC file."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    tunes = []
    for match in _TUNE.finditer(text):
        title = _TITLE.search(text, match.end())
        tunes.append((int(match.group(1)), title.group(1).strip() if title else ""))
    return tunes


def abc_works(folder: str, rel: str, full: str) -> list[Work]:
    """A collection gives one work per tune. In a polyphonic folder, tunes that all share one title
    are the voices of one piece (the Josquin files): one work, parsed whole and merged. (A folk file
    of many variants of one ballad stays a collection.)"""
    tunes = abc_tunes(full)
    one_piece = STYLES[folder].polyphonic and len({title for _, title in tunes}) == 1
    if len(tunes) <= 1 or one_piece:
        return [Work(folder, rel)]
    return [Work(folder, rel, number) for number, _ in tunes]


@lru_cache(maxsize=None)
def list_works(folders: tuple[str, ...] | None = None) -> tuple[Work, ...]:
    """Every work of the selected corpus folders (default: all folders with a style), in a fixed order."""
    from music21 import corpus

    wanted = set(folders or STYLES)
    unknown = wanted - set(STYLES)
    if unknown:
        raise ValueError(f"unknown corpus folders {sorted(unknown)}; expected some of {sorted(STYLES)}")
    root = corpus_root()
    works = []
    for full in sorted(str(p) for p in corpus.getPaths()):
        rel = os.path.relpath(full, root)
        folder = rel.split(os.sep)[0]
        ext = os.path.splitext(rel)[1].lower()
        if folder not in wanted or ext not in _SCORE_EXTENSIONS:
            continue
        if ext == ".abc":
            works.extend(abc_works(folder, rel, full))
        else:
            works.append(Work(folder, rel))
    return tuple(works)
