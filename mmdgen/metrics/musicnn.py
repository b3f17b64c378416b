"""The pretrained musicnn MagnaTagATune tagger (``MTT_musicnn``, Pons & Serra 2019) in plain PyTorch.

Used for evaluation: its 200-d penultimate layer is the embedding for a Frechet audio distance and
its 50 tag probabilities (``MTT_TAGS``) score instrument adherence. The weights are the TensorFlow
checkpoint inside the PyPI package ``musicnn``, read by ``mmdgen.metrics.tf_checkpoint``; installing it
with ``--no-deps`` keeps TensorFlow away, and the package is never imported (only located).

Input features, as musicnn computes them with librosa: the audio is averaged to mono and resampled
to 16 kHz (librosa's "kaiser_best" resampler, here torchaudio's kaiser-windowed sinc with the same
filter settings); a power mel spectrogram (n_fft 512, hop 256, periodic Hann window, centred frames
with reflect padding, 96 Slaney-scale mel bands with Slaney area normalisation, 0-8 kHz); rounded
to float16 (the form musicnn stored its training features in); then ``log10(10000 x + 1)``. The
spectrogram is cut into non-overlapping patches of 187 frames (3 s); a trailing part shorter than a
patch is dropped.

Deviation from the original: musicnn evaluates ``10000 x + 1`` and the logarithm in float16 as well,
which overflows to inf for any band with power above 6.55 (0.3% of the cells of our corpus clips,
rendered at -20 dBFS, do; one such cell makes the whole patch's output NaN); we take the logarithm
in float32. Where float16 does not overflow the two agree to float16 rounding (below 3e-3 on values
up to 5).

Checked against the original (TensorFlow graph and librosa features) in tests/test_musicnn.py: the
network agrees to 1e-4 in the logits, the whole pipeline to 1e-3 in the tag probabilities.

The network (eval mode; every batch norm uses TensorFlow's epsilon 1e-3):

frontend  batch norm of the log-mel patch ``[B, 1, 187, 96]``; five conv -> ReLU -> batch norm ->
          max over frequency branches, each TF-'same' padded in time and unpadded in frequency:
          timbral 7x38 and 7x67 (204 filters each), temporal 128x1, 64x1, 32x1 (51 filters each);
          concatenated to ``[B, 561, 187]``.
midend    three 1-D convs (64 filters, width 7, 'same') -> ReLU -> batch norm over the channels;
          the second and third add their input (residual). Frontend and the three midend outputs
          are concatenated: ``[B, 753, 187]``.
backend   max and mean over time, interleaved per channel as TensorFlow's flatten of
          ``[753, 2]`` orders them: ``[B, 1506]``; batch norm; dense 200 + ReLU; batch norm: the
          200-d penultimate features; dense 50: the tag logits.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
import torchaudio.functional as AF
from torch import nn

from mmdgen.metrics.tf_checkpoint import read_checkpoint
from mmdgen.metrics.waveform import mono

MUSICNN_PACKAGE = "musicnn"
MUSICNN_PIP_COMMAND = f"pip install --no-deps {MUSICNN_PACKAGE}"
SUPPORTED_MODELS = ("MTT_musicnn",)

# Output order of the MTT models (the 50 most frequent MagnaTagATune tags).
MTT_TAGS = (
    "guitar", "classical", "slow", "techno", "strings", "drums", "electronic", "rock", "fast", "piano",
    "ambient", "beat", "violin", "vocal", "synth", "female", "indian", "opera", "male", "singing",
    "vocals", "no vocals", "harpsichord", "loud", "quiet", "flute", "woman", "male vocal", "no vocal", "pop",
    "soft", "sitar", "solo", "man", "classic", "choir", "voice", "new age", "dance", "male voice",
    "female vocal", "beats", "harp", "cello", "no voice", "weird", "country", "metal", "female voice", "choral",
)

# resampy's "kaiser_best" filter (librosa's default resampler when musicnn was released): a Kaiser
# (beta 12.9846) windowed sinc with cutoff at 0.917347 of the lower Nyquist, tapered over 50 zero
# crossings of the sinc before roll-off. torchaudio counts its window width in zero crossings of
# the rolled-off sinc, so the same window is 50 * 0.917347 of them (a fractional width works).
RESAMPY_KAISER_BEST_ROLLOFF = 0.917347
KAISER_BEST = {"lowpass_filter_width": 50 * RESAMPY_KAISER_BEST_ROLLOFF, "rolloff": RESAMPY_KAISER_BEST_ROLLOFF,
               "resampling_method": "sinc_interp_kaiser", "beta": 12.9846}


@dataclass
class MusicnnConfig:
    sample_rate: int = 16000
    n_fft: int = 512
    hop_length: int = 256
    n_mels: int = 96
    patch_frames: int = 187  # 3 s: the length the model was trained on
    patch_hop: int = 187  # musicnn's default: patches do not overlap
    timbral_filters: int = 204
    timbral_kernels: tuple[tuple[int, int], ...] = ((7, 38), (7, 67))  # (time, frequency)
    temporal_filters: int = 51
    temporal_kernels: tuple[int, ...] = (128, 64, 32)  # time; frequency width 1
    midend_filters: int = 64
    midend_layers: int = 3
    midend_kernel: int = 7
    penultimate_units: int = 200
    num_tags: int = 50
    batch_norm_eps: float = 1e-3  # tf.layers.batch_normalization's default

    @property
    def frontend_channels(self) -> int:
        return self.timbral_filters * len(self.timbral_kernels) + self.temporal_filters * len(self.temporal_kernels)

    @property
    def midend_channels(self) -> int:
        return self.frontend_channels + self.midend_filters * self.midend_layers


# --------------------------------------------------------------------------------------------
# Features


def mel_filterbank(config: MusicnnConfig) -> torch.Tensor:
    """``[n_fft // 2 + 1, n_mels]`` Slaney-scale triangles with Slaney area normalisation, 0 to Nyquist."""
    return AF.melscale_fbanks(config.n_fft // 2 + 1, 0.0, config.sample_rate / 2, config.n_mels,
                              config.sample_rate, norm="slaney", mel_scale="slaney")


def log_mel_spectrogram(waveform: torch.Tensor, sample_rate: int, config: MusicnnConfig | None = None) -> torch.Tensor:
    """``[frames, n_mels]`` musicnn input features of ``waveform`` (``[samples]`` or ``[channels, samples]``,
    float in [-1, 1], any sample rate); frames = 1 + samples_at_16kHz // 256."""
    config = config or MusicnnConfig()
    if waveform.dim() == 2:
        waveform = waveform.mean(dim=0)
    elif waveform.dim() != 1:
        raise ValueError(f"waveform must be [samples] or [channels, samples], got {tuple(waveform.shape)}")
    audio = waveform.to(torch.float32)
    if sample_rate != config.sample_rate:
        audio = AF.resample(audio, sample_rate, config.sample_rate, **KAISER_BEST)
    if audio.numel() <= config.n_fft // 2:
        raise ValueError(f"{audio.numel()} samples at {config.sample_rate} Hz is too short for a spectrogram")
    window = torch.hann_window(config.n_fft, periodic=True, device=audio.device)
    spectrum = torch.stft(audio, config.n_fft, config.hop_length, window=window, center=True, pad_mode="reflect",
                          return_complex=True)
    power = spectrum.real.square() + spectrum.imag.square()  # [freq, frames]
    mel = power.T @ mel_filterbank(config).to(audio.device)
    mel = mel.to(torch.float16).to(torch.float32)
    return torch.log10(10000.0 * mel + 1.0)


def log_mel_patches(waveform: torch.Tensor, sample_rate: int, config: MusicnnConfig | None = None) -> torch.Tensor:
    """``[P, patch_frames, n_mels]`` model inputs: the log-mel spectrogram cut into patches.

    Audio shorter than one patch (about 2.98 s) is refused rather than padded.
    """
    config = config or MusicnnConfig()
    spectrogram = log_mel_spectrogram(waveform, sample_rate, config)
    frames = spectrogram.shape[0]
    if frames < config.patch_frames:
        seconds = (config.patch_frames - 1) * config.hop_length / config.sample_rate
        raise ValueError(f"audio of {frames} frames is shorter than one {config.patch_frames}-frame patch; "
                         f"musicnn needs at least {seconds:.2f} s")
    return spectrogram.unfold(0, config.patch_frames, config.patch_hop).transpose(1, 2).contiguous()


# --------------------------------------------------------------------------------------------
# The network


def tf_same_padding(kernel: int) -> tuple[int, int]:
    """(before, after) padding of TensorFlow's stride-1 'same': the odd extra goes after."""
    return (kernel - 1) // 2, kernel - 1 - (kernel - 1) // 2


class FrontendBranch(nn.Module):
    """Conv over (time, frequency), ReLU, batch norm, max over frequency: ``[B, 1, T, F] -> [B, filters, T]``.

    Time is TF-'same' padded with zeros and frequency is unpadded ('valid'): the max over all of
    frequency follows, so the frequency extent only has to stay inside the spectrogram.
    """

    def __init__(self, filters: int, time_kernel: int, frequency_kernel: int, eps: float):
        super().__init__()
        self.time_padding = tf_same_padding(time_kernel)
        self.conv = nn.Conv2d(1, filters, (time_kernel, frequency_kernel))
        self.norm = nn.BatchNorm2d(filters, eps=eps)

    def forward(self, spectrogram: torch.Tensor) -> torch.Tensor:
        padded = F.pad(spectrogram, (0, 0, *self.time_padding))
        return self.norm(F.relu(self.conv(padded))).amax(dim=3)


class MidendLayer(nn.Module):
    """1-D conv over time (TF-'same'), ReLU, batch norm: ``[B, C_in, T] -> [B, filters, T]``."""

    def __init__(self, in_channels: int, filters: int, kernel: int, eps: float):
        super().__init__()
        self.padding = tf_same_padding(kernel)
        self.conv = nn.Conv1d(in_channels, filters, kernel)
        self.norm = nn.BatchNorm1d(filters, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(F.relu(self.conv(F.pad(x, self.padding))))


class Musicnn(nn.Module):
    """``forward(log_mel [B, T, n_mels]) -> (penultimate features [B, 200], tag logits [B, 50])``.

    Always in eval mode: batch norm uses the checkpoint's moving statistics whatever ``train()``
    is asked for, since batch statistics would make a clip's embedding depend on its batch.
    """

    def __init__(self, config: MusicnnConfig | None = None):
        super().__init__()
        self.config = config = config or MusicnnConfig()
        eps = config.batch_norm_eps
        self.input_norm = nn.BatchNorm2d(1, eps=eps)
        self.frontend = nn.ModuleList(
            [FrontendBranch(config.timbral_filters, time, frequency, eps) for time, frequency in config.timbral_kernels]
            + [FrontendBranch(config.temporal_filters, time, 1, eps) for time in config.temporal_kernels]
        )
        self.midend = nn.ModuleList(
            MidendLayer(config.frontend_channels if i == 0 else config.midend_filters, config.midend_filters,
                        config.midend_kernel, eps)
            for i in range(config.midend_layers)
        )
        self.pooled_norm = nn.BatchNorm1d(2 * config.midend_channels, eps=eps)
        self.penultimate = nn.Linear(2 * config.midend_channels, config.penultimate_units)
        self.penultimate_norm = nn.BatchNorm1d(config.penultimate_units, eps=eps)
        self.tags = nn.Linear(config.penultimate_units, config.num_tags)
        self.eval()

    def train(self, mode: bool = True) -> Musicnn:
        return super().train(False)

    def forward(self, log_mel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        spectrogram = self.input_norm(log_mel.unsqueeze(1))
        frontend = torch.cat([branch(spectrogram) for branch in self.frontend], dim=1)
        levels = [frontend]
        x = self.midend[0](frontend)
        levels.append(x)
        for layer in self.midend[1:]:
            x = layer(x) + x
            levels.append(x)
        features = torch.cat(levels, dim=1)  # [B, 753, T]
        pooled = torch.stack([features.amax(dim=2), features.mean(dim=2)], dim=2).flatten(1)
        penultimate = self.penultimate_norm(F.relu(self.penultimate(self.pooled_norm(pooled))))
        return penultimate, self.tags(penultimate)

    @torch.no_grad()
    def embed(self, waveform: torch.Tensor, sample_rate: int,
              batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
        """(penultimate features ``[P, 200]``, tag probabilities ``[P, 50]`` in ``MTT_TAGS`` order), one row
        per 3 s patch of ``waveform`` (``[samples]`` or ``[channels, samples]``); ``batch_size`` patches
        run at a time to bound memory (the frontend holds about 10 MB per patch)."""
        device = self.tags.weight.device
        patches = log_mel_patches(waveform.to(device), sample_rate, self.config)
        outputs = [self(chunk) for chunk in patches.split(batch_size)]
        features = torch.cat([features for features, _ in outputs])
        return features, torch.sigmoid(torch.cat([logits for _, logits in outputs]))


# --------------------------------------------------------------------------------------------
# Loading the musicnn checkpoint


def _tf_layer_name(kind: str, index: int) -> str:
    # tf.layers numbers same-kind layers in creation order: conv2d, conv2d_1, conv2d_2, ...
    return kind if index == 0 else f"{kind}_{index}"


def is_optimizer_state(tf_name: str) -> bool:
    """Adam's slots and step powers: saved with the weights, unused at inference."""
    return tf_name.endswith(("/Adam", "/Adam_1")) or tf_name in ("beta1_power", "beta2_power")


def _conv2d_weight(kernel: torch.Tensor) -> torch.Tensor:
    return kernel.permute(3, 2, 0, 1)  # TF [time, freq, in, out] -> torch [out, in, time, freq]


def _conv1d_weight(kernel: torch.Tensor) -> torch.Tensor:
    # The midend's TF conv2d spans all channels as its "frequency" axis, on a [T, C, 1] map.
    return kernel[:, :, 0, :].permute(2, 1, 0)  # [time, C_in, 1, out] -> [out, C_in, time]


def _dense_weight(kernel: torch.Tensor) -> torch.Tensor:
    return kernel.T  # TF [in, out] -> torch [out, in]


def _tf_sources(model: Musicnn) -> dict[str, tuple[str, Callable | None]]:
    """Our state-dict name -> (TF variable name, conversion), following the original's layer order."""
    sources = {}
    convs, norms, denses = itertools.count(), itertools.count(), itertools.count()

    def norm(ours: str) -> None:
        tf = _tf_layer_name("batch_normalization", next(norms))
        for our_field, tf_field in (("weight", "gamma"), ("bias", "beta"), ("running_mean", "moving_mean"),
                                    ("running_var", "moving_variance")):
            sources[f"{ours}.{our_field}"] = (f"{tf}/{tf_field}", None)

    def layer(ours: str, kind: str, counter, kernel_conversion) -> None:
        tf = _tf_layer_name(kind, next(counter))
        sources[f"{ours}.weight"] = (f"{tf}/kernel", kernel_conversion)
        sources[f"{ours}.bias"] = (f"{tf}/bias", None)

    norm("input_norm")
    for i in range(len(model.frontend)):
        layer(f"frontend.{i}.conv", "conv2d", convs, _conv2d_weight)
        norm(f"frontend.{i}.norm")
    for i in range(len(model.midend)):
        layer(f"midend.{i}.conv", "conv2d", convs, _conv1d_weight)
        norm(f"midend.{i}.norm")
    norm("pooled_norm")
    layer("penultimate", "dense", denses, _dense_weight)
    norm("penultimate_norm")
    layer("tags", "dense", denses, _dense_weight)
    return sources


def musicnn_state_dict(model: Musicnn, tf_variables: dict[str, torch.Tensor], where: str = "checkpoint") -> dict:
    """``model``'s state dict filled from a musicnn TF checkpoint; every model weight must be found with
    the right shape and every checkpoint variable but the optimizer's used exactly once."""
    expected = {name: tensor for name, tensor in model.state_dict().items() if not name.endswith("num_batches_tracked")}
    sources = _tf_sources(model)
    tf_names = [tf_name for tf_name, _ in sources.values()]
    if set(sources) != set(expected) or len(set(tf_names)) != len(tf_names):  # a bug here, not in the checkpoint
        raise RuntimeError(f"weight mapping out of date: {sorted(set(sources) ^ set(expected))[:5]}")
    weights = dict(model.state_dict())
    for name, (tf_name, conversion) in sources.items():
        if tf_name not in tf_variables:
            raise ValueError(f"{where}: variable {tf_name!r} (for {name}) not found; "
                             "is this an MTT_musicnn checkpoint?")
        tensor = tf_variables[tf_name]
        tensor = conversion(tensor) if conversion else tensor
        if tensor.shape != expected[name].shape:
            raise ValueError(f"{where}: {tf_name} gives {name} shape {tuple(tensor.shape)}, "
                             f"expected {tuple(expected[name].shape)}")
        weights[name] = tensor.to(expected[name].dtype).contiguous()
    unused = sorted(name for name in set(tf_variables) - set(tf_names) if not is_optimizer_state(name))
    if unused:
        raise ValueError(f"{where}: variables not used by the model: {unused[:5]}")
    return weights


def musicnn_checkpoint(model: str = "MTT_musicnn") -> Path:
    """The checkpoint prefix (a directory) of ``model`` inside the installed musicnn package.

    The package is located, not imported: importing it would import TensorFlow.
    """
    if model not in SUPPORTED_MODELS:
        raise ValueError(f"unknown musicnn model {model!r}; supported: {', '.join(SUPPORTED_MODELS)}")
    spec = importlib.util.find_spec(MUSICNN_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the musicnn tagger needs the package {MUSICNN_PACKAGE!r} (its weights): "
                                  f"{MUSICNN_PIP_COMMAND}")
    prefix = Path(next(iter(spec.submodule_search_locations))) / model
    if not (prefix / ".index").is_file():
        raise FileNotFoundError(f"{prefix / '.index'} not found: the installed {MUSICNN_PACKAGE!r} package "
                                f"lacks the {model} weights; reinstall it with {MUSICNN_PIP_COMMAND}")
    return prefix


def load_musicnn(model: str = "MTT_musicnn", device: str | torch.device = "cpu") -> Musicnn:
    """The pretrained tagger, frozen and in eval mode."""
    prefix = musicnn_checkpoint(model)
    network = Musicnn()
    network.load_state_dict(musicnn_state_dict(network, read_checkpoint(prefix), str(prefix)))
    network.requires_grad_(False)
    return network.to(device)


def tag_index(tag: str) -> int:
    """Position of ``tag`` in ``MTT_TAGS``."""
    try:
        return MTT_TAGS.index(tag)
    except ValueError:
        raise ValueError(f"{tag!r} is not an MTT tag; the tags are: {', '.join(MTT_TAGS)}") from None


@lru_cache(maxsize=1)
def default_tagger() -> Musicnn:
    """The pretrained tagger, loaded once per process: what the metrics use when given none."""
    return load_musicnn()


def musicnn_outputs(clips: Sequence[torch.Tensor], sample_rate: int, tagger: Musicnn | None = None
                    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per clip, musicnn's (penultimate features ``[P, 200]``, tag probabilities ``[P, 50]``) for its P
    non-overlapping 3 s patches. Every clip must last at least one patch (2.98 s)."""
    if len(clips) == 0:
        raise ValueError("musicnn needs at least one clip, got none")
    tagger = tagger or default_tagger()
    config = tagger.config
    shortest = (config.patch_frames - 1) * config.hop_length / config.sample_rate
    outputs = []
    with torch.no_grad():
        for index, clip in enumerate(clips):
            audio = mono(clip, f"clip {index}")
            if audio.shape[-1] < math.ceil(shortest * sample_rate):
                raise ValueError(f"clip {index} lasts {audio.shape[-1] / sample_rate:.2f} s; musicnn needs at "
                                 f"least {shortest:.2f} s (one {config.patch_frames}-frame patch)")
            features, probabilities = tagger.embed(audio, sample_rate)
            outputs.append((features.double().cpu(), probabilities.double().cpu()))
    return outputs
