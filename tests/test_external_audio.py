"""Fetching out-of-domain music from Debian packages, offline: tiny .deb files built here with dpkg-deb stand
in for the archive, and an injected download step hands them over instead of apt-get."""

import json
import os
import shutil
import subprocess
import tempfile

import numpy as np
import pytest
import soundfile

from mmdgen.data import external
from mmdgen.data.external import (ExternalAudioError, apt_download, audible_clip_offsets, copyright_stanzas,
                                  fetch_debian_music, licence_of)
from mmdgen.data.audio import manifest_entries

pytestmark = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb to build test packages")

RATE = 16000
SETTINGS = dict(sample_rate=RATE, clip_seconds=1.0, min_track_seconds=2.0, progress=False)
COPYRIGHT = """Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: fake

Files: *
Copyright: 2020 Someone
License: GPL-2+

Files: sounds/click.wav
       music/*
Copyright: 2020 A Composer
License: CC-BY-SA-3.0
 The licence text, which is not the licence's name.
"""


def _tone(seconds: float, frequency: float, source_rate: int = 44100) -> np.ndarray:
    t = np.arange(int(seconds * source_rate)) / source_rate
    return 0.3 * np.sin(2 * np.pi * frequency * t)


def _build_deb(tmp_path, name: str, files: dict) -> str:
    """A .deb of package ``name`` holding ``files`` ({path: bytes, numpy stereo audio for .ogg/.wav, or
    ("link", target)}) and a copyright file."""
    root = tmp_path / f"{name}-root"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(f"Package: {name}\nVersion: 1.2-3\nArchitecture: all\n"
                                             f"Maintainer: Test <test@example.org>\nDescription: test music\n")
    files = {f"usr/share/doc/{name}/copyright": COPYRIGHT.encode(), **files}
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, tuple):
            os.symlink(content[1], path)
        elif isinstance(content, np.ndarray):
            soundfile.write(str(path), content, 44100, format=path.suffix[1:].upper())
        else:
            path.write_bytes(content)
    deb = tmp_path / f"{name}.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(root), str(deb)], check=True,
                   capture_output=True)
    return str(deb)


def _local(debs: dict):
    """A download step that copies the prebuilt .deb of the package asked for."""
    def download(package, folder):
        return shutil.copy(debs[package], folder / f"{package}.deb")
    return download


@pytest.fixture(scope="module")
def debs(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("debs")
    left = np.concatenate([_tone(1, 440), np.zeros(44100), _tone(1.5, 330)])  # loud, silent, loud + a half
    theme = np.stack([left, 0.5 * left], axis=1)
    music = {"usr/share/fake-music/music/theme.ogg": theme,
             "usr/share/fake-music/music/theme-copy.ogg": ("link", "theme.ogg"),  # the same track again
             "usr/share/fake-music/sounds/click.wav": np.stack([_tone(0.3, 880)] * 2, axis=1)}  # an effect
    return {"fake-music": _build_deb(tmp_path, "fake-music", music),
            "fake-silence": _build_deb(tmp_path, "fake-silence",
                                       {"usr/share/fake/music/quiet.ogg": np.zeros((3 * 44100, 2))}),
            "fake-docs": _build_deb(tmp_path, "fake-docs", {"usr/share/fake/README": b"no music here\n"})}


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """Temporary folders go here, so a test can see that none is left behind."""
    folder = tmp_path / "scratch"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def _records(manifest):
    return [json.loads(line) for line in manifest.read_text().splitlines()]


def test_clips_are_mono_at_the_rate_with_silence_links_and_effects_skipped(debs, tmp_path, scratch):
    out = tmp_path / "out"
    manifest = fetch_debian_music(["fake-music"], out, download=_local(debs), **SETTINGS)
    records = _records(manifest)
    assert manifest == out / "manifest.jsonl"
    # theme.ogg has whole 1 s windows at 0, 1 and 2 s; the one at 1 s is silent; the link and the
    # 0.3 s effect give nothing
    assert [(r["source_file"], r["offset"]) for r in records] == [
        ("usr/share/fake-music/music/theme.ogg", 0.0), ("usr/share/fake-music/music/theme.ogg", 2.0)]
    for r in records:
        assert r["package"] == "fake-music" and r["version"] == "1.2-3"
        assert r["duration"] == 1.0 and r["sample_rate"] == RATE and r["caption"]
        assert r["licence"] == "CC-BY-SA-3.0"  # the music/* stanza, matched on the installed path's tail
        info = soundfile.info(str(out / r["path"]))
        assert (info.samplerate, info.channels, info.frames, info.format) == (RATE, 1, RATE, "WAV")
        audio, _ = soundfile.read(str(out / r["path"]))
        assert 0.1 < np.sqrt(np.mean(audio ** 2)) < 0.3  # the stereo mix of a 0.3 / 0.15 tone, not silence
    summary = json.loads((out / "fake-music" / "package.json").read_text())
    assert summary["clips"] == 2 and summary["tracks"] == 1 and summary["licences"] == ["CC-BY-SA-3.0"]
    assert summary["tracks_skipped"] == {"shorter than 2 s": 1}
    assert (out / "fake-music" / "copyright").read_text() == COPYRIGHT
    assert [e.path for e in manifest_entries(manifest)] == [out / r["path"] for r in records]
    assert list(scratch.iterdir()) == []


def test_a_rerun_skips_fetched_packages_and_refuses_other_settings(debs, tmp_path, scratch):
    out = tmp_path / "out"
    fetch_debian_music(["fake-music"], out, download=_local(debs), **SETTINGS)
    written = {p: p.stat().st_mtime_ns for p in (out / "fake-music").iterdir()}

    def no_download(package, folder):
        raise AssertionError(f"{package} was downloaded again")

    manifest = fetch_debian_music(["fake-music"], out, download=no_download, **SETTINGS)
    assert len(_records(manifest)) == 2
    assert {p: p.stat().st_mtime_ns for p in (out / "fake-music").iterdir()} == written
    with pytest.raises(ValueError, match="clip_seconds: 1.0 there, 2.0 asked"):
        fetch_debian_music(["fake-music"], out, download=no_download, **{**SETTINGS, "clip_seconds": 2.0})


@pytest.mark.parametrize("package, reason", [("fake-docs", "no audio files"),
                                             ("fake-silence", "no usable clip .*1 near-silent throughout")])
def test_a_package_without_usable_audio_names_itself_and_leaves_nothing(debs, tmp_path, scratch, package, reason):
    out = tmp_path / "out"
    with pytest.raises(ExternalAudioError, match=f"^{package}: {reason}"):
        fetch_debian_music([package], out, download=_local(debs), **SETTINGS)
    assert list(out.iterdir()) == [] and list(scratch.iterdir()) == []


def test_a_failing_download_or_unpack_leaves_nothing(debs, tmp_path, scratch):
    out = tmp_path / "out"

    def unreachable(package, folder):
        (folder / "partial.deb").write_bytes(b"half a download")
        raise ExternalAudioError(f"{package}: cannot download it: network unreachable")

    with pytest.raises(ExternalAudioError, match="^fake-music: cannot download it"):
        fetch_debian_music(["fake-music"], out, download=unreachable, **SETTINGS)

    def corrupt(package, folder):
        (folder / "broken.deb").write_bytes(b"not an archive")
        return folder / "broken.deb"

    with pytest.raises(ExternalAudioError, match="^fake-music: cannot unpack broken.deb: dpkg-deb exited"):
        fetch_debian_music(["fake-music"], out, download=corrupt, **SETTINGS)
    assert not out.exists() and list(scratch.iterdir()) == []


def _fake_apt_get(tmp_path, monkeypatch, script: str) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "apt-get").write_text("#!/bin/sh\n" + script)
    (bin_dir / "apt-get").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_apt_download_reports_apt_get_failures_and_timeouts(tmp_path, monkeypatch):
    _fake_apt_get(tmp_path, monkeypatch, 'echo "E: Unable to locate package $4" >&2\nexit 100\n')
    with pytest.raises(ExternalAudioError, match="^nosuch: cannot download it: apt-get exited with 100: "
                                                 "E: Unable to locate package nosuch"):
        apt_download("nosuch", tmp_path)
    monkeypatch.setattr(external, "DOWNLOAD_TIMEOUT_S", 0.2)
    (tmp_path / "bin" / "apt-get").write_text("#!/bin/sh\nexec sleep 5\n")
    with pytest.raises(ExternalAudioError, match="^slow: cannot download it: apt-get did not finish in 0.2 s"):
        apt_download("slow", tmp_path)


def test_audible_offsets_are_spread_over_the_track():
    clip = 100
    audio = np.full(10 * clip + 30, 0.1)
    audio[3 * clip: 4 * clip] = 0.0  # one silent window
    assert audible_clip_offsets(audio, clip, max_clips=20, silence_db=-50) == [i * clip for i in range(10) if i != 3]
    assert audible_clip_offsets(audio, clip, max_clips=3, silence_db=-50) == [0, 5 * clip, 9 * clip]


def test_licences_follow_the_last_matching_stanza():
    stanzas = copyright_stanzas(COPYRIGHT)
    assert stanzas == [(["*"], "GPL-2+"), (["sounds/click.wav", "music/*"], "CC-BY-SA-3.0")]
    assert licence_of("usr/share/game/music/a.ogg", stanzas) == "CC-BY-SA-3.0"
    assert licence_of("usr/share/game/other/a.ogg", stanzas) == "GPL-2+"
    assert licence_of("usr/share/game/a.ogg", copyright_stanzas("Upstream: free-form text\n")) == "see copyright"
    assert licence_of("usr/share/game/a.ogg", []) == "unknown"  # no copyright file
