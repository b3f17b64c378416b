"""Out-of-domain music for evaluation: real recordings from Debian's game-music packages, cut into clips.

Our corpus is rendered from scores, so a codec trained on it has never heard a mixed, mastered
recording. Debian ships such recordings (game soundtracks in OGG, FLAC or WAV) in packages that need no
installing: ``apt-get download`` fetches the .deb and ``dpkg-deb -x`` unpacks it into a temporary folder.

Layout of an output folder::

    <package>/package.json   name, version, licences, settings, tracks used and skipped, seconds, clips
    <package>/copyright      the package's copyright file as shipped (the licence text travels with the clips)
    <package>/clips.jsonl    the package's manifest lines
    <package>/*.wav          mono clips at the asked rate: ``<track number>-<track name>-<offset>s.wav``
    manifest.jsonl           the clips of the packages asked for, in their order (rewritten atomically)

A package's folder is written whole under a temporary name and renamed into place, so it either holds
all of the package's clips or does not exist: a failed download, unpack or decode leaves nothing behind,
and a rerun skips (and never downloads again) the packages whose folders exist. A folder made with other
settings is refused, never mixed.

Manifest lines carry ``path`` (relative to the output folder), ``package``, ``version``, ``source_file``
(the track's path inside the package), ``offset`` and ``duration`` (seconds), ``sample_rate``,
``licence`` and a ``caption`` (so ``mmdgen.data.audio.manifest_entries`` reads the manifest too).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from mmdgen.data.audio import NonFiniteAudioError, read_audio
from mmdgen.files import write_audio, write_folder_atomic, write_text_atomic
from mmdgen.validation import MAX_SECONDS, check_number

log = logging.getLogger(__name__)

# Recordings only: trackers (.xm, .mod) and MIDI are scores, the very thing the corpus already is.
TRACK_SUFFIXES = (".ogg", ".oga", ".flac", ".wav")
# Debian policy 5.6.1: two or more of a-z, 0-9, '+', '-', '.', starting with a letter or a digit (so never an option
# to apt-get, nor a path: a name also names the package's folder)
PACKAGE_NAME = re.compile(r"[a-z0-9][a-z0-9+.-]+")
DOWNLOAD_TIMEOUT_S = 900.0  # a 150 MB package on a slow mirror
UNPACK_TIMEOUT_S = 300.0


class ExternalAudioError(RuntimeError):
    """A package could not serve: its download, unpacking or audio failed. The message names the package."""


def _run(command: list[str], package: str, what: str, timeout: float, cwd: Path | None = None) -> str:
    """Run ``command``; its stdout, or an ExternalAudioError naming ``package`` and saying why."""
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as error:
        raise ExternalAudioError(f"{package}: cannot {what}: {command[0]} is not installed (this needs Debian's "
                                 f"apt and dpkg)") from error
    except subprocess.TimeoutExpired as error:
        raise ExternalAudioError(f"{package}: cannot {what}: {command[0]} did not finish in {timeout:g} s") from error
    if done.returncode != 0:
        detail = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-3:]
        raise ExternalAudioError(f"{package}: cannot {what}: {command[0]} exited with {done.returncode}: "
                                 + " / ".join(detail))
    return done.stdout


def apt_download(package: str, folder: Path) -> Path:
    """Fetch ``package``'s .deb into ``folder`` with ``apt-get download`` (nothing is installed); its path."""
    _run(["apt-get", "download", "-q", "--", package], package, "download it", DOWNLOAD_TIMEOUT_S, cwd=folder)
    debs = sorted(folder.glob("*.deb"))
    if len(debs) != 1:
        raise ExternalAudioError(f"{package}: apt-get download left {len(debs)} .deb files in {folder}, expected 1")
    return debs[0]


def unpack_deb(deb: Path, folder: Path, package: str) -> str:
    """Unpack ``deb``'s files into ``folder`` (``dpkg-deb -x``, what ``dpkg -x`` runs); returns its version."""
    _run(["dpkg-deb", "-x", str(deb), str(folder)], package, f"unpack {deb.name}", UNPACK_TIMEOUT_S)
    return _run(["dpkg-deb", "--field", str(deb), "Version"], package, f"read the version of {deb.name}",
                UNPACK_TIMEOUT_S).strip()


# -- licences -----------------------------------------------------------------------------------------


def copyright_stanzas(text: str) -> list[tuple[list[str], str]] | None:
    """(file patterns, licence name: the first line of its License field) for each ``Files`` stanza of a
    machine-readable (DEP-5) Debian copyright file, in file order; None for a free-form file."""
    if not re.match(r"Format:\s*\S*copyright-format", text):
        return None
    stanzas = []
    for paragraph in re.split(r"\n\s*\n", text):
        fields, name = {}, None
        for line in paragraph.splitlines():
            if line[:1] in (" ", "\t"):  # a continuation: more patterns for Files; licence text for License
                if name == "Files":
                    fields[name] += " " + line.strip()
            elif ":" in line:
                name, value = line.split(":", 1)
                fields[name] = value.strip()
        if "Files" in fields and "License" in fields:
            stanzas.append((fields["Files"].split(), fields["License"]))
    return stanzas


def licence_of(source_file: str, stanzas: list[tuple[list[str], str]] | None) -> str:
    """The short licence name of the installed file ``source_file`` (a path inside the package): "unknown"
    where no stanza matches (``stanzas`` is empty when the package has no copyright file of its own).

    DEP-5 patterns name files in the source tree, not where they are installed, so a pattern matches
    when it matches the path or any tail of it; as DEP-5 says, the last matching stanza wins.
    """
    if stanzas is None:
        return "see copyright"  # free-form: the file itself, copied beside the clips, is the record
    licence = "unknown"
    for patterns, name in stanzas:
        if any(fnmatch.fnmatchcase(source_file, p) or fnmatch.fnmatchcase(source_file, "*/" + p) for p in patterns):
            licence = name
    return licence


# -- cutting tracks into clips ------------------------------------------------------------------------


def audible_clip_offsets(audio: np.ndarray, clip_samples: int, max_clips: int, silence_db: float) -> list[int]:
    """Start samples of up to ``max_clips`` whole, non-overlapping clips of ``audio`` ([samples]) whose RMS
    is at least ``silence_db`` dBFS, spread evenly over the track (its intro alone would be a poor sample)."""
    starts = range(0, len(audio) - clip_samples + 1, clip_samples)
    floor = 10 ** (silence_db / 20)
    audible = [s for s in starts if np.sqrt(np.mean(np.square(audio[s: s + clip_samples], dtype=np.float64))) >= floor]
    if len(audible) <= max_clips:
        return audible
    return [audible[int(i)] for i in np.linspace(0, len(audible) - 1, max_clips).round()]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "track"


def _tracks(root: Path) -> list[Path]:
    # links repeat a file the package already holds (or point outside the unpacked tree)
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in TRACK_SUFFIXES and p.is_file()
                  and not p.is_symlink())


def _cut_package(package: str, version: str, root: Path, folder: Path, settings: dict, progress: bool) -> None:
    """Write ``package``'s clips, manifest lines, copyright and package.json into ``folder`` from its files
    unpacked under ``root``; ExternalAudioError when it yields no clip."""
    import soundfile

    copyright_path = root / "usr" / "share" / "doc" / package / "copyright"
    stanzas = []  # none: a package whose doc folder links to another package's
    if copyright_path.is_file():
        shutil.copyfile(copyright_path, folder / "copyright")
        stanzas = copyright_stanzas(copyright_path.read_text(errors="replace"))
    tracks = _tracks(root)
    if not tracks:
        raise ExternalAudioError(f"{package}: no audio files ({', '.join(TRACK_SUFFIXES)}) in the package")
    rate, clip_seconds = settings["sample_rate"], settings["clip_seconds"]
    clip_samples = int(round(clip_seconds * rate))
    records, skipped, seconds, used = [], Counter(), 0.0, 0
    for number, track in enumerate(tqdm(tracks, desc=package, unit="track", disable=not progress)):
        source_file = str(track.relative_to(root))
        try:
            duration = soundfile.info(str(track)).duration
            audio = read_audio(track, rate)[0] if duration >= settings["min_track_seconds"] else None
        except (ValueError, RuntimeError) as error:  # soundfile.info raises LibsndfileError, a RuntimeError
            log.warning("%s: skipping %s: %s", package, source_file, error)
            skipped["non-finite samples" if isinstance(error, NonFiniteAudioError) else "unreadable"] += 1
            continue
        if audio is None:
            skipped[f"shorter than {settings['min_track_seconds']:g} s"] += 1
            continue
        offsets = audible_clip_offsets(audio.numpy(), clip_samples, settings["max_clips_per_track"],
                                       settings["silence_db"])
        if not offsets:
            skipped["near-silent throughout"] += 1
            continue
        used += 1
        seconds += len(audio) / rate
        licence = licence_of(source_file, stanzas)
        for start in offsets:
            offset = start / rate
            name = f"{number:03d}-{_slug(track.stem)}-{offset:08.2f}s.wav"
            write_audio(folder / name, audio[None, start: start + clip_samples], rate)
            records.append({"path": f"{package}/{name}", "package": package, "version": version,
                            "source_file": source_file, "offset": offset, "duration": clip_seconds,
                            "sample_rate": rate, "licence": licence,
                            "caption": f"{track.stem} from the Debian package {package}"})
    if not records:
        reasons = ", ".join(f"{count} {reason}" for reason, count in skipped.items())
        raise ExternalAudioError(f"{package}: no usable clip in its {len(tracks)} audio files ({reasons})")
    write_text_atomic(folder / "clips.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    summary = {"package": package, "version": version, "licences": sorted({r["licence"] for r in records}),
               "settings": settings, "tracks": used, "tracks_skipped": dict(skipped),
               "track_seconds": round(seconds, 2), "clips": len(records)}
    write_text_atomic(folder / "package.json", json.dumps(summary, indent=1))


def _check_settings(folder: Path, settings: dict) -> None:
    """Refuse a finished package folder made with other settings: its clips would silently mix in."""
    previous = json.loads((folder / "package.json").read_text())["settings"]
    differing = {k: (previous.get(k), v) for k, v in settings.items() if previous.get(k) != v}
    if differing:
        detail = ", ".join(f"{k}: {a!r} there, {b!r} asked" for k, (a, b) in differing.items())
        raise ValueError(f"{folder} holds clips made with other settings ({detail}); use another output "
                         "folder or remove it")


def fetch_debian_music(packages: list[str], out_dir: str | Path, sample_rate: int, clip_seconds: float = 10.0,
                       max_clips_per_track: int = 6, min_track_seconds: float = 40.0,
                       silence_db: float = -50.0, download: Callable[[str, Path], Path] = apt_download,
                       progress: bool = True) -> Path:
    """Fetch each Debian package in ``packages``, cut its music into mono clips, and return the path of
    ``out_dir/manifest.jsonl`` (see the module's docstring for the layout).

    Each track (an OGG, FLAC or WAV file of at least ``min_track_seconds``; shorter ones are jingles and
    sound effects, such as HyperRogue's 30 s fanfare) is decoded, averaged to mono and resampled to
    ``sample_rate``; it gives up to ``max_clips_per_track`` whole clips of ``clip_seconds``, spread over the
    track, skipping clips quieter than ``silence_db`` dBFS RMS. ``download(package, folder)`` puts the
    package's .deb in ``folder`` and returns its path (default: ``apt-get download``). Packages whose
    folders exist are skipped.
    Raises ExternalAudioError naming the package when one cannot be fetched, unpacked or yields no clip.
    """
    if not packages:
        raise ValueError("no packages given")
    for package in packages:
        if not isinstance(package, str) or not PACKAGE_NAME.fullmatch(package):
            raise ValueError(f"package {package!r} is not a Debian package name: two or more of a-z, 0-9, '+', '-' "
                             "and '.', starting with a letter or a digit")
    check_number(sample_rate, "sample_rate", integer=True, at_least=1)
    check_number(clip_seconds, "clip_seconds", above=0, at_most=MAX_SECONDS)
    check_number(max_clips_per_track, "max_clips_per_track", integer=True, at_least=1)
    check_number(min_track_seconds, "min_track_seconds", at_least=0)
    check_number(silence_db, "silence_db", at_most=0)
    out_dir = Path(out_dir)
    settings = {"sample_rate": sample_rate, "clip_seconds": clip_seconds, "max_clips_per_track": max_clips_per_track,
                "min_track_seconds": min_track_seconds, "silence_db": silence_db}
    for package in packages:
        folder = out_dir / package
        if (folder / "package.json").exists():
            _check_settings(folder, settings)
            log.info("%s: already fetched, skipping", package)
            continue
        with tempfile.TemporaryDirectory(prefix=f"mmdgen-{package}-") as scratch:
            scratch = Path(scratch)
            (scratch / "deb").mkdir()
            deb = download(package, scratch / "deb")
            version = unpack_deb(deb, scratch / "root", package)
            write_folder_atomic(folder, lambda tmp: _cut_package(package, version, scratch / "root", tmp, settings,
                                                                 progress))
    manifest = out_dir / "manifest.jsonl"
    write_text_atomic(manifest, "".join((out_dir / p / "clips.jsonl").read_text() for p in packages))
    return manifest


def package_summaries(out_dir: str | Path, packages: list[str]) -> list[dict]:
    """The package.json of each fetched package: version, licences, tracks, seconds, clips."""
    return [json.loads((Path(out_dir) / p / "package.json").read_text()) for p in packages]
