"""Datasets over the corpus manifest and over plain audio folders; the sharded, resumable sampler."""

import json
import logging

import numpy as np
import pytest
import soundfile
import torch

from mmdgen.data.build import BuildConfig, build_corpus
from mmdgen.data.audio import AudioDataset, collate, folder_entries, manifest_entries, read_audio
from mmdgen.train.sampler import ShardedSampler


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    cfg = BuildConfig(hours=4 / 3600, clip_seconds=1.0, shard_clips=4, renderings=2, folders=("bach",))
    build_corpus(out, cfg, workers=1, progress=False)
    return out / "manifest.jsonl"


def _tone(seconds, rate, channels=1, amplitude=0.3):
    t = np.arange(int(seconds * rate)) / rate
    mono = amplitude * np.sin(2 * np.pi * 440 * t).astype(np.float32)
    return np.stack([mono, 0.5 * mono], axis=1) if channels == 2 else mono


def test_manifest_dataset_crops_and_fields(corpus):
    records = [json.loads(line) for line in corpus.read_text().splitlines()]
    data = AudioDataset(manifest_entries(corpus), crop_seconds=0.5, random_crop=False)
    item = data[0]
    assert item["audio"].shape == (1, 16000)
    assert item["caption"] == records[0]["caption"] and item["fields"]["key"] == records[0]["key"]
    whole, _ = soundfile.read(corpus.parent / records[0]["path"], dtype="float32")
    assert torch.allclose(item["audio"][0], torch.from_numpy(whole[:16000]))


def test_random_crops_are_reproducible_and_change_with_epoch(corpus):
    data = AudioDataset(manifest_entries(corpus), crop_seconds=0.25, seed=3)
    again = AudioDataset(manifest_entries(corpus), crop_seconds=0.25, seed=3)
    assert torch.equal(data[1]["audio"], again[1]["audio"])
    first = data[1]["audio"]
    data.set_epoch(1)
    assert not torch.equal(first, data[1]["audio"])


def test_split_filter(corpus):
    splits = {json.loads(line)["split"] for line in corpus.read_text().splitlines()}
    for split in splits:
        assert all(e.fields["split"] == split for e in manifest_entries(corpus, split))
    assert manifest_entries(corpus, "no-such-split") == []


def test_folder_resamples_mixes_down_and_skips_bad_files(tmp_path, caplog):
    music = tmp_path / "music"
    (music / "sub").mkdir(parents=True)
    soundfile.write(music / "good_song.wav", _tone(1.0, 44100, channels=2), 44100)
    soundfile.write(music / "sub" / "other.flac", _tone(1.0, 32000), 32000)
    soundfile.write(music / "quiet.wav", np.zeros(32000, dtype=np.float32), 32000)
    soundfile.write(music / "short.wav", _tone(0.1, 32000), 32000)
    (music / "broken.wav").write_bytes(b"RIFF\x00\x00not really a wave file")
    captions = tmp_path / "captions.jsonl"
    captions.write_text(json.dumps({"path": "music/sub/other.flac", "caption": "a pure tone"}) + "\n")

    with caplog.at_level(logging.WARNING):
        data = AudioDataset(folder_entries(music, captions), crop_seconds=0.5)
    assert sorted(e.path.name for e in data.entries) == ["good_song.wav", "other.flac"]
    reasons = {p.split("/")[-1]: r for p, r in data.skipped}
    assert reasons["quiet.wav"] == "silent" and reasons["short.wav"].startswith("too short")
    assert "cannot read audio" in reasons["broken.wav"]
    assert "broken.wav" in caplog.text
    by_name = {e.path.name: e.caption for e in data.entries}
    assert by_name == {"good_song.wav": "good song", "other.flac": "a pure tone"}

    audio = read_audio(music / "good_song.wav", 32000)
    assert audio.shape[0] == 1 and abs(audio.shape[1] - 32000) <= 1
    expected = 0.75 * torch.from_numpy(_tone(1.0, 32000))  # left + 0.5 left, averaged
    assert torch.allclose(audio[0, 100:31900], expected[100:31900], atol=2e-3)


def test_bad_inputs_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="no such manifest"):
        manifest_entries(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"path": "a.wav", "caption": "x"}\n{"caption": "no path"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        manifest_entries(bad)
    with pytest.raises(ValueError, match="no audio files"):
        folder_entries(tmp_path)
    with pytest.raises(ValueError, match="cannot read audio"):
        read_audio(bad, 32000)


def test_collate_stacks_equal_crops(corpus):
    data = AudioDataset(manifest_entries(corpus), crop_seconds=0.5)
    batch = collate([data[0], data[1]])
    assert batch["audio"].shape == (2, 1, 16000) and len(batch["captions"]) == 2
    whole = AudioDataset(manifest_entries(corpus))
    short = dict(whole[0], audio=whole[0]["audio"][:, :100])
    with pytest.raises(ValueError, match="different lengths"):
        collate([whole[0], short])


def test_sampler_shards_and_resumes():
    ranks = [ShardedSampler(10, rank, 3, seed=1) for rank in range(3)]
    parts = [list(s) for s in ranks]
    assert all(len(p) == 4 for p in parts)  # 10 padded to 12
    assert set().union(*map(set, parts)) == set(range(10))
    assert sum(map(len, parts)) == 12
    again = ShardedSampler(10, 1, 3, seed=1)
    again.set_position(epoch=0, consumed=3)
    assert list(again) == parts[1][3:] and len(again) == 1
    later = ShardedSampler(10, 1, 3, seed=1)
    later.set_position(epoch=1)
    assert list(later) != parts[1]
    with pytest.raises(ValueError, match="outside a world"):
        ShardedSampler(10, 3, 3)


@pytest.mark.parametrize("suffix, rate, seconds", [(".flac", 16000, 1.3), (".wav", 16000, 0.9), (".wav", 22050, 1.3),
                                                   (".ogg", 16000, 1.3), (".flac", 16000, 0.4)])
def test_a_crop_read_alone_is_the_crop_of_the_file_read_whole(tmp_path, suffix, rate, seconds):
    """Random crops at the target rate decode only their frames (WAV, FLAC); the same samples, offsets and lengths
    as cutting the whole file (resampled, Ogg, shorter than the crop: read whole), stereo averaged alike."""
    rng = np.random.default_rng(7)
    audio = (0.2 * rng.standard_normal((int(seconds * rate), 2))).astype(np.float32)
    soundfile.write(tmp_path / f"clip{suffix}", audio, rate)
    data = AudioDataset(folder_entries(tmp_path), sample_rate=16000, crop_seconds=0.5, seed=5, check=False)
    whole = read_audio(tmp_path / f"clip{suffix}", 16000)
    crop = int(0.5 * 16000)
    for epoch in range(4):
        data.set_epoch(epoch)
        spare = whole.shape[-1] - crop
        start = int(np.random.default_rng([5, epoch, 0]).integers(spare + 1)) if spare > 0 else 0
        assert torch.equal(data[0]["audio"], whole[:, start: start + crop])
