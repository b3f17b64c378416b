"""Natural-language captions written from what is known about a clip, with varied wording."""

from __future__ import annotations

import numpy as np

_VOICES = {1: "a single melody", 2: "two voices", 3: "three voices", 4: "four voices", 5: "five voices",
           6: "six voices", 7: "seven voices", 8: "eight voices"}

TEMPLATES = (
    "{tempo} {genre} in {key}, {voices} played by {instrument}, {bpm} bpm, {metre}",
    "{genre} in {key} for {instrument}, {voices}, {tempo} at {bpm} bpm in {metre}",
    "{instrument} playing a {tempo} {genre} in {key}; {metre} time, {bpm} bpm, {voices}",
    "a {tempo} {genre}{by} in {key}, {voices} on {instrument}, {metre}, around {bpm} bpm",
    "{key} {genre}{by}, {tempo} tempo ({bpm} bpm), {metre}, performed on {instrument} with {voices}",
)


def tempo_word(bpm: float) -> str:
    for limit, word in ((66, "slow"), (84, "calm"), (104, "moderate"), (126, "lively")):
        if bpm < limit:
            return word
    return "fast"


def voices_phrase(voices: int) -> str:
    return _VOICES.get(voices, f"{voices} voices")


def caption(fields: dict, rng: np.random.Generator) -> str:
    """A caption stating genre, key and mode, instrument, tempo, metre and voices (composer when known)."""
    template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
    by = f" by {fields['composer']}" if fields.get("composer") else ""
    text = template.format(tempo=tempo_word(fields["tempo_bpm"]), genre=fields["genre"], key=fields["key"],
                           voices=voices_phrase(fields["voices"]), instrument=fields["instrument"],
                           bpm=fields["tempo_bpm"], metre=fields["metre"], by=by)
    return text[0].upper() + text[1:]
