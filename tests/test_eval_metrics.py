"""Evaluation metrics (mmdgen.metrics: reconstruction, fad, instruments, key, tempo; mmdgen.eval: the generation
report, plots) on cases with known answers."""

import json
import math

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from mmdgen.data.corpus import INSTRUMENTS
from mmdgen.eval.generation import generation_report
from mmdgen.eval.plots import plot_mi_heatmap, plot_mi_with_others, plot_spectrogram, plot_training_curves
from mmdgen.losses.reconstruction import MultiScaleMelLoss, si_snr
from mmdgen.metrics.fad import (audio_features, frechet_audio_distance, frechet_distance,
                                frechet_distance_from_statistics)
from mmdgen.metrics.instruments import INSTRUMENT_TAGS, instrument_adherence, roc_auc
from mmdgen.metrics.key import (KRUMHANSL_KESSLER, chroma, estimate_key, key_adherence, key_relation, mirex_key_score,
                                parse_key)
from mmdgen.metrics.musicnn import MTT_TAGS, load_musicnn, tag_index
from mmdgen.metrics.reconstruction import mel_distance, multi_resolution_stft_distance, reconstruction_report
from mmdgen.metrics.tempo import estimate_tempo, tempo_adherence, tempo_reliability
from mmdgen.model.codec import Codec, codec_config

RATE = 16000


@pytest.fixture(scope="module")
def tagger():
    return load_musicnn()


def noise(seconds: float, seed: int, scale: float = 0.1) -> torch.Tensor:
    return scale * torch.randn(int(seconds * RATE), generator=torch.Generator().manual_seed(seed))


def sine(hz: float, seconds: float, amplitude: float = 0.3) -> torch.Tensor:
    return amplitude * torch.sin(2 * math.pi * hz * torch.arange(int(seconds * RATE)) / RATE)


# --------------------------------------------------------------------------------------------
# Reconstruction


def test_si_snr_matches_a_hand_computation():
    reference = torch.tensor([1.0, -1.0, 1.0, -1.0])  # zero mean
    orthogonal = torch.tensor([1.0, 1.0, -1.0, -1.0])  # zero mean, orthogonal to the reference
    estimate = 2 * reference + 0.5 * orthogonal + 3.0  # scaled, noisy, offset
    # target = 2 * reference (energy 16), noise = 0.5 * orthogonal (energy 1): 10 log10 16
    expected = 10 * math.log10(16)
    assert float(si_snr(estimate[None, None], reference[None, None])[0]) == pytest.approx(expected, abs=1e-4)
    assert float(si_snr(-5 * estimate[None, None], -reference[None, None])[0]) == pytest.approx(expected, abs=1e-4)
    batch = torch.stack([torch.stack([estimate, reference]), torch.stack([reference, reference])])  # [2, 2, 4]
    values = si_snr(batch, torch.stack([torch.stack([reference, reference])] * 2))
    # item 0: target energies 16 + 4, noise energy 1 (channel 1 is exact); item 1: no noise at all
    assert values.shape == (2,) and float(values[0]) == pytest.approx(10 * math.log10(20), abs=1e-4)
    assert float(values[1]) > 70


def test_multi_resolution_stft_distance_zero_growth_invariance_and_scale():
    clean = noise(1.0, seed=0)
    assert multi_resolution_stft_distance(clean, clean) == pytest.approx(0.0, abs=1e-12)
    assert multi_resolution_stft_distance(-clean, clean) == pytest.approx(0.0, abs=1e-9)  # phase is ignored
    distances = [multi_resolution_stft_distance(clean + level * noise(1.0, seed=1), clean)
                 for level in (0.01, 0.1, 0.5, 2.0)]
    assert all(a < b for a, b in zip(distances, distances[1:])), distances
    # a gain a: spectral convergence |1 - a|, log-magnitude |log a| at every resolution
    assert multi_resolution_stft_distance(2 * clean, clean) == pytest.approx(1 + math.log(2), abs=1e-4)
    assert multi_resolution_stft_distance(clean[None, None].repeat(2, 1, 1), clean[None, None].repeat(2, 1, 1)) == 0
    with pytest.raises(ValueError, match="2048 samples"):
        multi_resolution_stft_distance(clean[:1000], clean[:1000])
    with pytest.raises(ValueError, match="same shape"):
        multi_resolution_stft_distance(clean[:4000], clean[:5000])


def test_mel_distance_is_the_trainers_loss():
    a, b = noise(0.5, seed=2)[None, None], noise(0.5, seed=3)[None, None]
    assert mel_distance(a, a, RATE) == 0.0
    assert mel_distance(a, b, RATE) == pytest.approx(float(MultiScaleMelLoss(RATE)(a, b)), rel=1e-6)
    assert 0 < mel_distance(a + 0.01 * b, a, RATE) < mel_distance(a + 0.1 * b, a, RATE) < mel_distance(b, a, RATE)


def test_reconstruction_report_averages_the_per_clip_metrics():
    torch.manual_seed(0)
    codec = Codec(codec_config("tiny")).eval()
    rate = codec.cfg.sample_rate
    clips = [0.1 * torch.randn(1, rate // 4), 0.3 * torch.sin(torch.arange(rate // 3) * 0.05)[None]]
    report = reconstruction_report(codec, clips)
    decoded = [codec.decode(codec.encode(c[None]), c.shape[-1]) for c in clips]
    expected_mel = sum(mel_distance(d, c[None], rate) for d, c in zip(decoded, clips)) / 2
    expected_snr = sum(float(si_snr(d, c[None])[0]) for d, c in zip(decoded, clips)) / 2
    expected_stft = sum(multi_resolution_stft_distance(d, c[None]) for d, c in zip(decoded, clips)) / 2
    assert report["clips"] == 2
    assert report["mel_distance"] == pytest.approx(expected_mel, rel=1e-5)
    assert report["si_snr_db"] == pytest.approx(expected_snr, rel=1e-5)
    assert report["mr_stft_distance"] == pytest.approx(expected_stft, rel=1e-5)
    with pytest.raises(ValueError, match=r"clip 0: expected \[1, samples\]"):
        reconstruction_report(codec, [torch.zeros(2, rate)])


# --------------------------------------------------------------------------------------------
# Frechet distance


def _closed_form_commuting(mean_a, mean_b, eigenvalues_a, eigenvalues_b) -> float:
    """Covariances sharing eigenvectors: |dmu|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2."""
    return float((mean_a - mean_b).square().sum() + (eigenvalues_a.sqrt() - eigenvalues_b.sqrt()).square().sum())


def test_frechet_distance_matches_closed_forms():
    gen = torch.Generator().manual_seed(0)
    mean_a, mean_b = torch.randn(6, generator=gen, dtype=torch.float64), torch.randn(6, generator=gen,
                                                                                      dtype=torch.float64)
    a, b = torch.rand(6, generator=gen, dtype=torch.float64) + 0.1, torch.rand(6, generator=gen, dtype=torch.float64)
    expected = _closed_form_commuting(mean_a, mean_b, a, b)
    assert frechet_distance_from_statistics(mean_a, torch.diag(a), mean_b, torch.diag(b)) == pytest.approx(expected)
    rotation, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=torch.float64))
    rotated = frechet_distance_from_statistics(mean_a, rotation @ torch.diag(a) @ rotation.T,
                                               mean_b, rotation @ torch.diag(b) @ rotation.T)
    assert rotated == pytest.approx(expected, rel=1e-9)
    # Any 2x2 pair (not commuting): C_a C_b has eigenvalues l1, l2 >= 0, so
    # tr sqrt(C_a C_b) = sqrt(l1) + sqrt(l2) = sqrt(tr(C_a C_b) + 2 sqrt(det C_a det C_b)).
    cov_a = torch.tensor([[2.0, 0.8], [0.8, 1.0]], dtype=torch.float64)
    cov_b = torch.tensor([[0.5, -0.3], [-0.3, 1.5]], dtype=torch.float64)
    trace_sqrt = math.sqrt(float((cov_a @ cov_b).trace()) + 2 * math.sqrt(float(cov_a.det() * cov_b.det())))
    expected_2x2 = 1.0 + float(cov_a.trace() + cov_b.trace()) - 2 * trace_sqrt
    zero, shifted = torch.zeros(2, dtype=torch.float64), torch.tensor([1.0, 0.0], dtype=torch.float64)
    assert frechet_distance_from_statistics(zero, cov_a, shifted, cov_b) == pytest.approx(expected_2x2, rel=1e-10)


def test_frechet_distance_is_symmetric_for_non_commuting_covariances():
    gen = torch.Generator().manual_seed(1)
    factor_a, factor_b = torch.randn(8, 8, generator=gen), torch.randn(8, 8, generator=gen)
    cov_a, cov_b = factor_a @ factor_a.T, factor_b @ factor_b.T
    mean = torch.zeros(8)
    forward = frechet_distance_from_statistics(mean, cov_a, mean, cov_b)
    assert forward > 1.0
    assert frechet_distance_from_statistics(mean, cov_b, mean, cov_a) == pytest.approx(forward, rel=1e-8)


def test_frechet_distance_of_samples():
    gen = torch.Generator().manual_seed(2)
    std_a, std_b = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([2.0, 1.0, 0.5])
    mean_a, mean_b = torch.tensor([0.0, 0.0, 0.0]), torch.tensor([1.0, -1.0, 0.0])
    samples_a = mean_a + std_a * torch.randn(20000, 3, generator=gen)
    samples_b = mean_b + std_b * torch.randn(20000, 3, generator=gen)
    expected = _closed_form_commuting(mean_a, mean_b, std_a.square(), std_b.square())  # 2 + 1 + 1 = 4
    assert frechet_distance(samples_a, samples_b) == pytest.approx(expected, rel=0.05)
    assert frechet_distance(samples_a, samples_a) == pytest.approx(0.0, abs=1e-9)
    # fewer samples than dimensions: singular covariances, still finite and 0 for the same sample
    few = torch.randn(20, 50, generator=gen)
    assert frechet_distance(few, few) == pytest.approx(0.0, abs=1e-8)
    assert math.isfinite(frechet_distance(few, torch.randn(30, 50, generator=gen)))
    with pytest.raises(ValueError, match="N >= 2"):
        frechet_distance(few[:1], few)
    with pytest.raises(ValueError, match="50 dimensions but features_b has 49"):
        frechet_distance(few, few[:, :49])


# --------------------------------------------------------------------------------------------
# musicnn features and instrument adherence


def test_audio_features_take_every_patch_and_refuse_short_clips(tagger):
    clips = [sine(440, 3.0), noise(3.0, seed=4)[None].repeat(2, 1), sine(220, 6.5)]  # 1 + 1 + 2 patches
    features = audio_features(clips, RATE, tagger)
    assert features.shape == (4, 200) and features.dtype == torch.float64
    assert torch.allclose(features[2:].float(), tagger.embed(clips[2], RATE)[0], atol=1e-5)
    with pytest.raises(ValueError, match="clip 1 lasts 2.00 s; musicnn needs at least 2.98 s"):
        audio_features([sine(440, 3.0), sine(440, 2.0)], RATE, tagger)


def test_frechet_audio_distance_separates_tones_from_noise(tagger):
    noise_a = [noise(3.0, seed) for seed in (10, 11, 12)]
    noise_b = [noise(3.0, seed) for seed in (20, 21, 22)]
    tones = [sine(hz, 3.0) for hz in (220, 330, 523)]
    assert frechet_audio_distance(noise_a, noise_a, RATE, tagger) == pytest.approx(0.0, abs=1e-6)
    same_kind = frechet_audio_distance(noise_a, noise_b, RATE, tagger)
    assert frechet_audio_distance(noise_a, tones, RATE, tagger) > 5 * same_kind


def test_roc_auc_equals_the_pairwise_count():
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = rng.integers(0, 6, size=30).astype(float)  # many ties
        labels = rng.random(30) < 0.4
        positives, negatives = scores[labels], scores[~labels]
        pairs = [(1.0 if p > n else 0.5 if p == n else 0.0) for p in positives for n in negatives]
        assert roc_auc(scores, labels) == pytest.approx(sum(pairs) / len(pairs), abs=1e-12)
    assert roc_auc([0.1, 0.2, 0.9], [False, False, True]) == 1.0
    with pytest.raises(ValueError, match="positives and negatives"):
        roc_auc([0.1, 0.2], [True, True])


def test_every_corpus_instrument_has_a_tag_or_is_marked_as_having_none():
    missing = sorted(set(INSTRUMENTS) - set(INSTRUMENT_TAGS))
    assert not missing, f"instruments captions can name but INSTRUMENT_TAGS lacks: {missing}"
    assert all(tag in MTT_TAGS for tag in INSTRUMENT_TAGS.values() if tag is not None)
    assert {name for name in INSTRUMENTS if INSTRUMENT_TAGS[name] is None} == {
        "organ", "accordion", "trumpet", "french horn", "oboe", "clarinet"}
    assert INSTRUMENT_TAGS["fiddle"] == INSTRUMENT_TAGS["violin"] == "violin"


def test_instrument_adherence_scores_the_captions_tag(tagger):
    clips = [sine(262, 3.0), noise(3.0, seed=5), sine(440, 3.0) + noise(3.0, seed=6, scale=0.02),
             noise(3.0, seed=7, scale=0.3)]
    instruments = ["piano", "flute", "organ", "recorder"]
    result = instrument_adherence(clips, instruments, RATE, tagger)
    probabilities = torch.stack([tagger.embed(c, RATE)[1].mean(0) for c in clips])
    assert result.caption_tag_probability[0] == pytest.approx(float(probabilities[0, tag_index("piano")]), abs=1e-5)
    assert result.caption_tag_probability[3] == pytest.approx(float(probabilities[3, tag_index("flute")]), abs=1e-5)
    assert result.caption_tag_probability[2] is None  # organ has no MTT tag
    assert result.per_tag_clips == {"flute": (2, 2), "piano": (1, 3)}
    flute = probabilities[:, tag_index("flute")].tolist()
    assert result.per_tag_auc["flute"] == pytest.approx(roc_auc(flute, [False, True, False, True]), abs=1e-6)
    assert result.macro_auc == pytest.approx((result.per_tag_auc["flute"] + result.per_tag_auc["piano"]) / 2)
    with pytest.raises(ValueError, match="unknown instrument 'kazoo'"):
        instrument_adherence(clips, ["piano", "flute", "organ", "kazoo"], RATE, tagger)
    with pytest.raises(ValueError, match="4 clips but 3 instruments"):
        instrument_adherence(clips, instruments[:3], RATE, tagger)


# --------------------------------------------------------------------------------------------
# Key


def harmonic_note(midi: int, seconds: float) -> torch.Tensor:
    """A note with partials 1-4 at amplitudes 1/h, as instruments have: harmonics land on other pitch classes."""
    hz = 440.0 * 2 ** ((midi - 69) / 12)
    t = torch.arange(int(seconds * RATE)) / RATE
    envelope = torch.clamp(t / 0.01, max=1.0) * torch.exp(-t)
    return 0.05 * envelope * sum(torch.sin(2 * math.pi * h * hz * t) / h for h in range(1, 5))


def cadence(tonic: int, mode: str) -> torch.Tensor:
    """The scale (harmonic minor in minor) up an octave, then chords I - IV - V - I, from MIDI note ``tonic``."""
    steps = (0, 2, 4, 5, 7, 9, 11, 12) if mode == "major" else (0, 2, 3, 5, 7, 8, 11, 12)
    third = 4 if mode == "major" else 3
    parts = [harmonic_note(tonic + s, 0.3) for s in steps]
    for root, chord_third, seconds in ((0, third, 1.0), (5, third, 0.6), (7, 4, 0.6), (0, third, 1.2)):
        parts.append(sum(harmonic_note(tonic + root + i, seconds) for i in (0, chord_third, 7)))
    return torch.cat(parts)


def test_chroma_of_a_pure_tone_peaks_at_its_pitch_class():
    for hz, pitch_class in ((440.0, 9), (261.63, 0), (185.0, 6)):  # A4, C4, F#3
        energy = chroma(sine(hz, 2.0), RATE).sum(1)
        assert int(energy.argmax()) == pitch_class
        assert float(energy[pitch_class] / energy.sum()) > 0.95


@pytest.mark.parametrize("key", ["C major", "A minor", "F# major", "Bb major", "E minor", "C# minor", "Eb major"])
def test_estimate_key_of_a_synthesized_cadence(key):
    tonic, mode = parse_key(key)
    estimated_tonic, estimated_mode, correlation = estimate_key(chroma(cadence(60 + tonic, mode), RATE))
    assert (parse_key(f"{estimated_tonic} {estimated_mode}")) == (tonic, mode)
    assert correlation > 0.8


def test_estimate_key_recovers_each_rotated_profile():
    for mode, profile in KRUMHANSL_KESSLER.items():
        for tonic in range(12):
            estimated = estimate_key(torch.roll(torch.tensor(profile), tonic))
            assert parse_key(f"{estimated[0]} {estimated[1]}") == (tonic, mode)
            assert estimated[2] == pytest.approx(1.0)


def test_mirex_scores_of_hand_made_cases():
    cases = [("C major", "C major", 1.0), ("G major", "C major", 0.5), ("F major", "C major", 0.0),
             ("E minor", "A minor", 0.5), ("A minor", "C major", 0.3), ("C major", "A minor", 0.3),
             ("C minor", "C major", 0.2), ("A major", "A minor", 0.2), ("D major", "C major", 0.0),
             ("E minor", "C major", 0.0), ("Gb major", "F# major", 1.0), ("B- major", "Bb major", 1.0),
             ("C# major", "F# major", 0.5), ("D# minor", "F# major", 0.3)]
    for estimated, reference, score in cases:
        assert mirex_key_score(estimated, reference) == score, (estimated, reference)
    assert key_relation("G minor", "C minor") == "fifth"
    for bad in ("H major", "C dorian", "C", "C #x major"):
        with pytest.raises(ValueError, match="cannot read key"):
            parse_key(bad)


def test_key_adherence_aggregates_relations():
    clips = [cadence(60, "major"), cadence(57, "minor")]
    result = key_adherence(clips, ["C major", "D minor"], RATE)  # A minor against D minor: a fifth above
    assert result.estimated == ["C major", "A minor"]
    assert result.relations == ["same", "fifth"]
    assert result.exact_rate == 0.5 and result.weighted_score == 0.75
    assert result.relation_counts == {"same": 1, "fifth": 1, "relative": 0, "parallel": 0, "other": 0}


# --------------------------------------------------------------------------------------------
# Tempo


def click_track(bpm: float, seconds: float) -> torch.Tensor:
    audio = torch.zeros(int(seconds * RATE))
    click = sine(1500, 0.02, amplitude=0.5) * torch.exp(-torch.arange(int(0.02 * RATE)) / (0.004 * RATE))
    for beat in range(int(seconds * bpm / 60)):
        start = int(beat * 60 / bpm * RATE)
        audio[start: start + click.shape[0]] += click[: audio.shape[0] - start]
    return audio


@pytest.mark.parametrize("bpm", [72, 96, 132, 170])
def test_estimate_tempo_of_a_click_track(bpm):
    assert estimate_tempo(click_track(bpm, 10.0), RATE) == pytest.approx(bpm, rel=0.02)


def test_estimate_tempo_refuses_clips_too_short_for_the_slowest_tempo():
    with pytest.raises(ValueError, match="40.0 bpm needs at least 3.0 s"):
        estimate_tempo(click_track(120, 2.0), RATE)


def test_tempo_reliability_counts_agreement_and_octave_errors():
    result = tempo_reliability([100, 50, 210, 93, 150], [100, 100, 100, 100, 100])
    # within 8%: 100 and 93; also allowing half / double: 50 and 210 (5% off 200); 150 never
    assert result.clips == 5 and result.within == pytest.approx(2 / 5) and result.within_octave == pytest.approx(4 / 5)
    with pytest.raises(ValueError, match="equally many"):
        tempo_reliability([100], [100, 120])


def test_generation_report_combines_the_measures(tagger):
    generated = [cadence(60, "major")[: 4 * RATE], cadence(57, "minor")[: 4 * RATE] + click_track(96, 4.0)]
    fields = [{"instrument": "piano", "key": "C major", "tempo_bpm": 96},
              {"instrument": "flute", "key": "A minor", "tempo_bpm": 96}]
    reference = [noise(4.0, seed) for seed in (30, 31)]
    report = generation_report(generated, fields, reference, RATE, reference_fields=fields, tagger=tagger)
    assert report["fad"] == pytest.approx(frechet_audio_distance(generated, reference, RATE, tagger), rel=1e-9)
    assert report["generated_patches"] == report["reference_patches"] == 2
    keys = key_adherence(generated, ["C major", "A minor"], RATE)
    assert (report["key_exact"], report["key_weighted"]) == (keys.exact_rate, keys.weighted_score)
    _, tempo = tempo_adherence(generated, [96, 96], RATE)
    assert report["tempo_within_8_percent"] == tempo.within
    assert report["tempo_within_8_percent_or_octave"] == tempo.within_octave
    instruments = instrument_adherence(generated, ["piano", "flute"], RATE, tagger)
    assert report["instrument_per_tag_auc"] == pytest.approx(instruments.per_tag_auc)
    assert report["instrument_macro_auc"] == pytest.approx(instruments.macro_auc)
    reference_instruments = instrument_adherence(reference, ["piano", "flute"], RATE, tagger)
    assert report["reference"]["instrument_per_tag_auc"] == pytest.approx(reference_instruments.per_tag_auc)
    assert set(report["reference"]) == {key for key in report if key not in (
        "fad", "generated_clips", "reference_clips", "generated_patches", "reference_patches", "reference")}
    with pytest.raises(ValueError, match="2 reference clips but 1 reference field records"):
        generation_report(generated, fields, reference, RATE, reference_fields=fields[:1], tagger=tagger)


# --------------------------------------------------------------------------------------------
# Plots


def _png(path, width_px, height_px):
    image = imread(path)
    assert image.shape == (height_px, width_px, 4)
    rgb = image[..., :3]
    assert (rgb < 0.9).any(axis=-1).mean() > 0.02  # not a blank canvas
    return rgb


def _has_colour(rgb, hex_colour, tolerance=0.02):
    target = np.array([int(hex_colour[i: i + 2], 16) / 255 for i in (1, 3, 5)])
    return int((np.abs(rgb - target).max(axis=-1) < tolerance).sum())


def test_mi_heatmap_png(tmp_path):
    matrix = torch.tensor([[100.0, 5.0, 1.0, 0.5], [5.0, 100.0, 3.0, 1.0], [1.0, 3.0, 100.0, 2.0],
                           [0.5, 1.0, 2.0, 100.0]])
    path = plot_mi_heatmap(matrix, tmp_path / "mi.png", "codec without the loss")
    assert path == tmp_path / "mi.png" and sorted(p.name for p in tmp_path.iterdir()) == ["mi.png"]  # no temp file
    rgb = _png(path, 550, 400)  # figure (1.2 + 0.7 K + 1.5) x (1.2 + 0.7 K) inches at 100 dpi
    # the colour scale spans the off-diagonal values: viridis' top for 5.0 (two cells), its bottom for 0.5
    assert _has_colour(rgb, "#fde725") > 500 and _has_colour(rgb, "#440154") > 500
    diagonal_cell = rgb[65:80, 155:170]  # the middle of the first diagonal cell: blank, not coloured
    assert diagonal_cell.min() > 0.95
    with_diagonal = _png(plot_mi_heatmap(matrix, tmp_path / "full.png", hide_diagonal=False), 550, 400)
    assert with_diagonal[65:80, 155:170].max(axis=-1).min() < 0.95  # now coloured
    with pytest.raises(ValueError, match="square"):
        plot_mi_heatmap([[1.0, 2.0]], tmp_path / "bad.png")


def test_mi_with_others_grouped_bars_png(tmp_path):
    path = plot_mi_with_others({"without loss": [0.9, 0.7, 0.5, 0.4], "with loss": [0.3, 0.2, 0.2, 0.1]},
                               tmp_path / "others.png")
    rgb = _png(path, 550, 350)  # 1.5 + K (0.4 + 0.3 codecs) x 3.5 inches
    assert _has_colour(rgb, "#1f77b4") > 300 and _has_colour(rgb, "#ff7f0e") > 100  # one colour per codec
    with pytest.raises(ValueError, match="same number"):
        plot_mi_with_others({"a": [1.0, 2.0], "b": [1.0]}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match=r"\.png"):
        plot_mi_with_others({"a": [1.0]}, tmp_path / "figure.jpg")


def test_spectrogram_png(tmp_path):
    audio = torch.cat([sine(440, 1.0), sine(1760, 1.0)])
    rgb = _png(plot_spectrogram(audio, RATE, tmp_path / "spec.png", "two tones"), 800, 350)
    assert rgb.std() > 0.1


def test_training_curves_png(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    lines = [{"kind": "train", "step": s, "time": 0.0, "mel": 5 - s / 100, "l1": 0.1} for s in range(10, 210, 10)]
    lines += [{"kind": "valid", "step": s, "time": 0.0, "mel_distance": 4 - s / 100} for s in (100, 200)]
    metrics.write_text("".join(json.dumps(line) + "\n" for line in lines))
    rgb = _png(plot_training_curves(metrics, ["mel", "mel_distance"], tmp_path / "curves.png"), 700, 480)
    assert _has_colour(rgb, "#1f77b4") > 100
    with pytest.raises(ValueError, match="no values of \\['loss'\\]; its metrics are: l1, mel, mel_distance"):
        plot_training_curves(metrics, ["loss"], tmp_path / "bad.png")
