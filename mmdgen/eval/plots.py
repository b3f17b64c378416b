"""PNG figures for the evaluation: inter-codebook mutual information (the paper's Figures 4-5), log-mel
spectrograms and training curves.

Figures are built with matplotlib's object-oriented API (``matplotlib.figure.Figure`` renders PNGs with
the Agg canvas), never through pyplot, so nothing opens a window, touches the global backend or leaks
figures. Each function writes its PNG atomically (``mmdgen.files.write_atomic``) and returns its path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torchaudio
from matplotlib.figure import Figure

from mmdgen.files import read_jsonl, write_atomic

DPI = 100
ANNOTATE_UP_TO = 12  # codebooks: beyond that the cell values no longer fit in the cells


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path}: plots are written as .png")
    # The temporary name ends in .tmp, so the format cannot come from the suffix.
    write_atomic(path, lambda tmp: figure.savefig(tmp, format="png", dpi=DPI))
    return path


def plot_mi_heatmap(matrix: Sequence[Sequence[float]] | torch.Tensor, path: str | Path,
                    title: str = "pairwise mutual information", unit: str = "% of joint entropy",
                    hide_diagonal: bool = True) -> Path:
    """A ``[K, K]`` matrix between codebooks (e.g. ``dependence_report``'s ``pairwise_mi_percent``) as a
    heatmap, each cell labelled with its value when K <= 12; ``unit`` labels the colour bar.

    ``hide_diagonal`` leaves the diagonal blank (for K > 1): there ``dependence_report`` puts each
    codebook's entropy (or 100%), which would take the whole colour scale from the pairwise values.
    """
    values = np.asarray(matrix.tolist() if isinstance(matrix, torch.Tensor) else matrix, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] != values.shape[1] or values.shape[0] == 0:
        raise ValueError(f"the MI matrix must be square [K, K] with K >= 1, got shape {values.shape}")
    stages = values.shape[0]
    if hide_diagonal and stages > 1:
        values[np.diag_indices(stages)] = np.nan  # drawn as the background, left out of the colour scale
    figure = Figure(figsize=(1.2 + 0.7 * stages + 1.5, 1.2 + 0.7 * stages))
    axes = figure.add_subplot()
    image = axes.imshow(values, cmap="viridis", origin="upper")
    figure.colorbar(image, ax=axes, label=unit)
    labels = [str(k + 1) for k in range(stages)]
    axes.set_xticks(range(stages), labels)
    axes.set_yticks(range(stages), labels)
    axes.set_xlabel("codebook")
    axes.set_ylabel("codebook")
    axes.set_title(title)
    if stages <= ANNOTATE_UP_TO:
        middle = (np.nanmin(values) + np.nanmax(values)) / 2
        for i, j in zip(*np.nonzero(np.isfinite(values))):
            # dark text on the bright end of viridis, light text on the dark end
            axes.text(j, i, f"{values[i, j]:.3g}", ha="center", va="center", fontsize=8,
                      color="black" if values[i, j] > middle else "white")
    figure.tight_layout()
    return _save(figure, path)


def plot_mi_with_others(values_by_codec: dict[str, Sequence[float]], path: str | Path,
                        title: str = "mutual information of each codebook with all others",
                        ylabel: str = "I(Z_k; Z_-k) (bits)") -> Path:
    """Grouped bars: per codebook k, one bar per codec (``values_by_codec``: codec name -> K values, e.g.
    ``dependence_report``'s ``mi_with_others_bits``), in the dict's order and the default colour cycle."""
    if not values_by_codec:
        raise ValueError("values_by_codec is empty; expected at least one codec")
    lengths = {name: len(values) for name, values in values_by_codec.items()}
    if len(set(lengths.values())) != 1 or 0 in lengths.values():
        raise ValueError(f"every codec needs the same number (>= 1) of codebook values, got {lengths}")
    stages, codecs = next(iter(lengths.values())), len(values_by_codec)
    width = 0.8 / codecs
    figure = Figure(figsize=(max(4.0, 1.5 + stages * (0.4 + 0.3 * codecs)), 3.5))
    axes = figure.add_subplot()
    positions = np.arange(stages)
    for index, (name, values) in enumerate(values_by_codec.items()):
        axes.bar(positions + (index - (codecs - 1) / 2) * width, np.asarray(values, dtype=np.float64), width,
                 label=name, color=f"C{index % 10}")
    axes.set_xticks(positions, [str(k + 1) for k in range(stages)])
    axes.set_xlabel("codebook")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    return _save(figure, path)


def plot_spectrogram(waveform: torch.Tensor, sample_rate: int, path: str | Path, title: str = "",
                     n_fft: int = 2048, n_mels: int = 128, floor_db: float = -80.0) -> Path:
    """Log-mel power spectrogram (dB relative to the loudest cell, floored at ``floor_db``) of a ``[samples]``
    or ``[channels, samples]`` waveform (channels averaged): Hann window of ``n_fft``, hop ``n_fft // 4``,
    ``n_mels`` HTK-scale mel bands from 0 Hz to Nyquist; time in seconds, bands labelled in Hz."""
    if waveform.dim() not in (1, 2):
        raise ValueError(f"waveform must be [samples] or [channels, samples], got {tuple(waveform.shape)}")
    audio = waveform.detach().float().cpu()
    audio = audio.mean(0) if audio.dim() == 2 else audio
    if audio.shape[-1] < n_fft:
        raise ValueError(f"the spectrogram needs at least {n_fft} samples, got {audio.shape[-1]}")
    power = torchaudio.transforms.MelSpectrogram(sample_rate, n_fft=n_fft, hop_length=n_fft // 4, n_mels=n_mels)(audio)
    decibels = 10 * torch.log10(power.clamp_min(1e-10))
    decibels = (decibels - decibels.max()).clamp_min(floor_db).numpy()
    seconds = audio.shape[-1] / sample_rate
    figure = Figure(figsize=(8, 3.5))
    axes = figure.add_subplot()
    image = axes.imshow(decibels, origin="lower", aspect="auto", cmap="magma", extent=(0, seconds, 0, n_mels))
    figure.colorbar(image, ax=axes, label="dB")

    def hz_to_mel(hz: float) -> float:  # the HTK mel scale, torchaudio's default
        return 2595 * math.log10(1 + hz / 700)

    # Round frequencies on the band axis: frequency f sits at band n_mels mel(f) / mel(Nyquist).
    frequencies = [hz for hz in (0, 250, 500, 1000, 2000, 4000, 8000, 16000) if hz <= sample_rate / 2]
    axes.set_yticks([n_mels * hz_to_mel(hz) / hz_to_mel(sample_rate / 2) for hz in frequencies],
                    [str(hz) for hz in frequencies])
    axes.set_xlabel("time (s)")
    axes.set_ylabel("frequency (Hz, mel scale)")
    axes.set_title(title)
    figure.tight_layout()
    return _save(figure, path)


def plot_training_curves(metrics_jsonl_path: str | Path, keys: Sequence[str], path: str | Path,
                         title: str = "") -> Path:
    """One panel per metric in ``keys`` against the step, from a trainer's ``metrics.jsonl`` (lines of
    ``{"kind": "train" | "valid", "step", "time", <metric>: value, ...}``, ``mmdgen.train.loop.MetricLog``);
    the train and valid series of a metric are separate lines."""
    if not keys:
        raise ValueError("keys is empty; expected at least one metric name")
    rows = read_jsonl(metrics_jsonl_path)
    available = sorted({name for row in rows for name, value in row.items()
                        if name not in ("kind", "step", "time") and isinstance(value, (int, float))})
    missing = [key for key in keys if key not in available]
    if missing:
        raise ValueError(f"{metrics_jsonl_path}: no values of {missing}; its metrics are: {', '.join(available)}")
    figure = Figure(figsize=(7, 2.4 * len(keys)))
    panels = figure.subplots(len(keys), 1, sharex=True, squeeze=False)[:, 0]
    kinds = sorted({row["kind"] for row in rows})  # "train" before "valid": the same colours in every panel
    for axes, key in zip(panels, keys):
        for index, kind in enumerate(kinds):
            points = [(row["step"], row[key]) for row in rows if row["kind"] == kind and isinstance(row.get(key),
                                                                                                  (int, float))]
            if points:
                steps, values = zip(*points)
                axes.plot(steps, values, marker="." if len(points) < 50 else None, label=kind, color=f"C{index % 10}")
        axes.set_ylabel(key)
        axes.legend()
        axes.grid(alpha=0.3)
    panels[-1].set_xlabel("step")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return _save(figure, path)
