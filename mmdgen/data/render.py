"""Scores to audio: parse a work, take an excerpt, play it on a General MIDI SoundFont.

Notes are read straight from the music21 score (offsets in quarter notes, per part) and played by
scheduling note-on/note-off events on tinysoundfont's synthesizer, so no MIDI file is exported:
repeat marks cannot break anything (they are not expanded) and every note gets its note-off.
Rendering is a fixed number of samples, far faster than real time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from mmdgen.data.corpus import INSTRUMENTS, Work, corpus_root

TARGET_RMS_DB = -20.0
PEAK_LIMIT = 0.99
FADE_SECONDS = 0.05


class RenderError(Exception):
    """A work that cannot become a clip; ``cause`` names why, for the build report."""

    def __init__(self, cause: str, detail: str):
        super().__init__(f"{cause}: {detail}")
        self.cause = cause


@dataclass
class ParsedWork:
    parts: list[np.ndarray]  # per part: [n, 3] float64 rows (onset, duration) in quarter notes, MIDI pitch
    key: str  # e.g. "F# minor"
    metre: str  # e.g. "4/4"
    measure_starts: np.ndarray  # offsets (quarter notes) where a bar begins
    length: float  # quarter notes

    @property
    def voices(self) -> int:
        return len(self.parts)


def check_renderer() -> None:
    """Fail before any work is planned when the synthesizer or the SoundFont is missing."""
    try:
        import tinysoundfont  # noqa: F401
    except ImportError as error:
        raise RuntimeError("the corpus renderer tinysoundfont is not installed: run "
                           "`pip install --no-deps tinysoundfont` (its pyaudio dependency is only for live "
                           "playback); `make demo` / `make test` install it") from error
    soundfont_path()


def soundfont_path() -> str:
    """The 6 MB General MIDI SoundFont that ships with the pretty-midi package."""
    import pretty_midi

    path = os.path.join(os.path.dirname(pretty_midi.__file__), "TimGM6mb.sf2")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing; reinstall pretty-midi, which ships the TimGM6mb SoundFont")
    return path


def parse_work(work: Work) -> ParsedWork:
    """Notes, key, metre and bars of a work; RenderError (cause "parse", "no notes", "key analysis" or
    "score contents") when it cannot serve."""
    from music21 import converter

    path = os.path.join(corpus_root(), work.path)
    try:
        score = converter.parse(path, number=work.number) if work.number is not None else converter.parse(path)
        if hasattr(score, "mergeScores"):  # an ABC file holding the voices of one piece as tunes
            score = score.mergeScores()
    except Exception as error:  # music21 raises many kinds on malformed scores
        raise RenderError("parse", f"{work.work_id}: {type(error).__name__}: {error}") from error
    try:
        return _read_score(score, work.work_id)
    except RenderError:
        raise
    except Exception as error:
        raise RenderError("score contents", f"{work.work_id}: {type(error).__name__}: {error}") from error


def _read_score(score, work_id: str) -> ParsedWork:
    parts = []
    for part in (score.parts if hasattr(score, "parts") and len(score.parts) else [score]):
        rows = []
        for element in part.flatten().notes:
            if element.duration.quarterLength <= 0:
                continue  # grace notes
            onset, length = float(element.offset), float(element.duration.quarterLength)
            rows.extend((onset, length, p.midi) for p in element.pitches)
        if rows:
            parts.append(np.array(rows, dtype=np.float64))
    if not parts:
        raise RenderError("no notes", work_id)
    try:
        analysed = score.analyze("key")
        key = f"{analysed.tonic.name.replace('-', 'b')} {analysed.mode}"
    except Exception as error:
        raise RenderError("key analysis", f"{work_id}: {error}") from error
    signature = score.recurse().getElementsByClass("TimeSignature").first()
    metre = signature.ratioString if signature is not None else "4/4"
    first_part = score.parts[0] if hasattr(score, "parts") and len(score.parts) else score
    starts = np.array(sorted({float(m.offset) for m in first_part.getElementsByClass("Measure")}) or [0.0])
    length = max(float((p[:, 0] + p[:, 1]).max()) for p in parts)
    return ParsedWork(parts, key, metre, starts, length)


def excerpt_start(parsed: ParsedWork, span: float, rng: np.random.Generator) -> float:
    """A bar line from which ``span`` quarter notes of music follow (the first bar if none does)."""
    fitting = parsed.measure_starts[parsed.measure_starts + span <= parsed.length + 1e-9]
    return float(rng.choice(fitting)) if len(fitting) else float(parsed.measure_starts[0])


def note_events(parsed: ParsedWork, start: float, bpm: float, seconds: float) -> list[tuple[float, int, int, int]]:
    """(time s, 1 on / 0 off, channel, pitch), sorted; offs sort before ons at the same time."""
    seconds_per_quarter = 60.0 / bpm
    events = []
    for index, notes in enumerate(parsed.parts):
        channel = index if index < 9 else index + 1  # channel 9 is drums in General MIDI
        for onset, length, pitch in notes:
            on = (onset - start) * seconds_per_quarter
            off = min(on + length * seconds_per_quarter, seconds)
            if on < 0 or on >= seconds or channel > 15:
                continue
            events.append((on, 1, channel, int(pitch)))
            events.append((off, 0, channel, int(pitch)))
    events.sort(key=lambda e: (e[0], e[1]))
    return events


def synthesize(events, program: int, seconds: float, sample_rate: int, velocity: int = 90) -> np.ndarray:
    """Mono float32 audio of exactly round(seconds * sample_rate) samples."""
    import tinysoundfont

    synth = tinysoundfont.Synth(samplerate=sample_rate)
    sfid = synth.sfload(soundfont_path())
    for channel in range(16):
        if channel != 9:
            synth.program_select(channel, sfid, 0, program)
    total = int(round(seconds * sample_rate))
    chunks, done = [], 0
    for time_s, is_on, channel, pitch in events + [(seconds, -1, 0, 0)]:
        target = min(int(round(time_s * sample_rate)), total)
        if target > done:
            chunks.append(np.frombuffer(synth.generate(target - done), dtype=np.float32).copy())
            done = target
        if is_on == 1:
            synth.noteon(channel, pitch, velocity)
        elif is_on == 0:
            synth.noteoff(channel, pitch)
    stereo = np.concatenate(chunks) if chunks else np.zeros(2 * total, dtype=np.float32)
    return stereo.reshape(-1, 2).mean(axis=1)


def normalize_loudness(audio: np.ndarray) -> np.ndarray:
    """RMS to -20 dBFS, then scaled down if a peak would pass 0.99; short fades at both ends."""
    rms = float(np.sqrt(np.mean(audio.astype(np.float64) ** 2)))
    if rms <= 1e-8:
        raise RenderError("silent", "the excerpt rendered to silence")
    out = audio * (10 ** (TARGET_RMS_DB / 20) / rms)
    peak = float(np.abs(out).max())
    if peak > PEAK_LIMIT:
        out *= PEAK_LIMIT / peak
    return out.astype(np.float32)


def apply_fades(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    fade = min(int(FADE_SECONDS * sample_rate), len(audio) // 2)
    if fade:
        ramp = np.linspace(0.0, 1.0, fade, dtype=np.float32)
        audio[:fade] *= ramp
        audio[-fade:] *= ramp[::-1]
    return audio


def render_clip(parsed: ParsedWork, start: float, bpm: float, instrument: str, seconds: float,
                sample_rate: int) -> np.ndarray:
    events = note_events(parsed, start, bpm, seconds)
    if not events:
        raise RenderError("no notes", "the excerpt holds no notes")
    try:
        audio = synthesize(events, INSTRUMENTS[instrument], seconds, sample_rate)
    except Exception as error:  # the synthesizer's own errors, e.g. a SoundFont it cannot read
        raise RenderError("synthesis", f"{type(error).__name__}: {error}") from error
    return apply_fades(normalize_loudness(audio), sample_rate)
