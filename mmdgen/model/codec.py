"""EnCodec-style audio codec: SEANet encoder and decoder around the residual vector quantizer.

Audio ``[B, C, L]`` -> latents ``[B, D, T]`` (T = ceil(L / hop), hop = prod(ratios)) -> codes
``[B, K, T]`` -> audio. Convolutions are weight-normalised and padded so that no sample is lost
(non-causal: split padding; causal: all on the left); the encoder ends and the decoder starts with a
residual LSTM. Layers sit in one ``layers`` list per side, in the order EnCodec uses, so weights convert
to and from transformers' ``EncodecModel`` by name (``mmdgen.model.convert``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from mmdgen.model.quantizer import QuantizerConfig, QuantizerOutput, ResidualVectorQuantizer
from mmdgen.validation import check_fields, option


@dataclass
class CodecConfig:
    sample_rate: int = option(32000, "the audio's sample rate in Hz", at_least=1)
    channels: int = option(1, "audio channels (1: mono, 2: stereo)", at_least=1, at_most=2)
    num_filters: int = option(64, "the first convolution's filters (doubled at each downsampling)", at_least=1)
    ratios: tuple[int, ...] = option((8, 5, 4, 4), "up-sampling ratios in decoder order (the encoder uses them "
                                                   "reversed); their product is the hop length", at_least=1)
    dimension: int = option(128, "the latents' width", at_least=1)
    num_residual_layers: int = option(1, "residual blocks per resolution", at_least=0)
    residual_kernel_size: int = option(3, "the residual blocks' kernel size", at_least=1)
    dilation_base: int = option(2, "the residual blocks' dilation grows as its powers", at_least=1)
    kernel_size: int = option(7, "the first convolution's kernel size", at_least=1)
    last_kernel_size: int = option(7, "the last convolution's kernel size", at_least=1)
    lstm_layers: int = option(2, "layers of the residual LSTMs", at_least=1)
    compress: int = option(2, "the residual blocks' width is divided by this", at_least=1)
    causal: bool = option(False, "causal convolutions (all padding on the left)")
    pad_mode: str = option("reflect", "how the convolutions pad", choices=("reflect", "constant", "replicate"))
    trim_right_ratio: float = option(1.0, "causal: share of a transposed convolution's padding trimmed on the right",
                                     at_least=0, at_most=1)
    conv_shortcut: bool = option(False, "a convolution on the residual blocks' skip (False: identity, EnCodec's "
                                        "true_skip)")
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)

    def __post_init__(self):
        if isinstance(self.quantizer, dict):
            self.quantizer = QuantizerConfig(**self.quantizer)
        if isinstance(self.ratios, list):
            self.ratios = tuple(self.ratios)
        check_fields(self)
        if self.quantizer.dim != self.dimension:
            raise ValueError(f"quantizer.dim ({self.quantizer.dim}) must equal dimension ({self.dimension})")
        if not self.causal and self.trim_right_ratio != 1.0:
            raise ValueError("trim_right_ratio != 1 only makes sense for causal convolutions")

    @property
    def hop_length(self) -> int:
        return math.prod(self.ratios)

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop_length


PRESETS = {
    # CPU tests and the demo: 50 frames/s like the paper's model, small everything else.
    "tiny": lambda: CodecConfig(num_filters=8, dimension=32, lstm_layers=1,
                                quantizer=QuantizerConfig(dim=32, codebook_size=256, num_codebooks=4)),
    # The paper's EnCodec 32 kHz mono: 64 filters, ratios 8-5-4-4, dimension 128, 4 x 2048 codebooks.
    "paper": lambda: CodecConfig(),
}


def codec_config(preset: str) -> CodecConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown codec preset {preset!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[preset]()


def _pad(x: torch.Tensor, left: int, right: int, mode: str) -> torch.Tensor:
    """F.pad that also reflects inputs shorter than the padding (zero-extends them first)."""
    if mode != "reflect" or x.shape[-1] > max(left, right):
        return F.pad(x, (left, right), mode=mode)
    extra = max(left, right) - x.shape[-1] + 1
    padded = F.pad(F.pad(x, (0, extra)), (left, right), mode="reflect")
    return padded[..., : padded.shape[-1] - extra]


class SConv1d(nn.Module):
    """Weight-normalised Conv1d padded so the output covers every input sample."""

    def __init__(self, cfg: CodecConfig, in_ch: int, out_ch: int, kernel: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        self.conv = weight_norm(nn.Conv1d(in_ch, out_ch, kernel, stride, dilation=dilation))
        self.causal, self.pad_mode = cfg.causal, cfg.pad_mode
        self.effective_kernel = (kernel - 1) * dilation + 1
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[-1]
        padding = self.effective_kernel - self.stride
        frames = math.ceil((length - self.effective_kernel + padding) / self.stride + 1) - 1
        extra = frames * self.stride + self.effective_kernel - padding - length
        if self.causal:
            x = _pad(x, padding, extra, self.pad_mode)
        else:
            right = padding // 2
            x = _pad(x, padding - right, right + extra, self.pad_mode)
        return self.conv(x)


class SConvTranspose1d(nn.Module):
    """Weight-normalised ConvTranspose1d with the fixed padding trimmed (right-heavy when causal)."""

    def __init__(self, cfg: CodecConfig, in_ch: int, out_ch: int, kernel: int, stride: int):
        super().__init__()
        self.conv = weight_norm(nn.ConvTranspose1d(in_ch, out_ch, kernel, stride))
        padding = kernel - stride
        self.right = math.ceil(padding * cfg.trim_right_ratio) if cfg.causal else padding // 2
        self.left = padding - self.right

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y[..., self.left: y.shape[-1] - self.right]


class ResidualLSTM(nn.Module):
    def __init__(self, dim: int, layers: int):
        super().__init__()
        self.lstm = nn.LSTM(dim, dim, layers)

    # eager inside a compiled codec: Dynamo cannot trace nn.LSTM, and its experimental support unrolls the frames
    # (compile time grows with the crop length)
    @torch.compiler.disable
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = x.permute(2, 0, 1)  # [T, B, C]
        return (self.lstm(seq)[0] + seq).permute(1, 2, 0)


class ResidualBlock(nn.Module):
    """ELU -> conv k (dilated, dim -> dim / compress) -> ELU -> conv 1 (back to dim), plus the skip."""

    def __init__(self, cfg: CodecConfig, dim: int, dilation: int):
        super().__init__()
        hidden = dim // cfg.compress
        self.block = nn.ModuleList([nn.ELU(), SConv1d(cfg, dim, hidden, cfg.residual_kernel_size, dilation=dilation),
                                    nn.ELU(), SConv1d(cfg, hidden, dim, 1)])
        self.shortcut = SConv1d(cfg, dim, dim, 1) if cfg.conv_shortcut else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for layer in self.block:
            y = layer(y)
        return self.shortcut(x) + y


def _residual_blocks(cfg: CodecConfig, dim: int) -> list[nn.Module]:
    return [ResidualBlock(cfg, dim, cfg.dilation_base ** j) for j in range(cfg.num_residual_layers)]


class SEANetEncoder(nn.Module):
    def __init__(self, cfg: CodecConfig):
        super().__init__()
        layers: list[nn.Module] = [SConv1d(cfg, cfg.channels, cfg.num_filters, cfg.kernel_size)]
        width = cfg.num_filters
        for ratio in reversed(cfg.ratios):
            layers += _residual_blocks(cfg, width)
            layers += [nn.ELU(), SConv1d(cfg, width, width * 2, ratio * 2, stride=ratio)]
            width *= 2
        layers += [ResidualLSTM(width, cfg.lstm_layers), nn.ELU(), SConv1d(cfg, width, cfg.dimension, cfg.last_kernel_size)]
        self.layers = nn.ModuleList(layers)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        return _through_layers(self.layers, audio)


class SEANetDecoder(nn.Module):
    def __init__(self, cfg: CodecConfig):
        super().__init__()
        width = cfg.num_filters * 2 ** len(cfg.ratios)
        layers: list[nn.Module] = [SConv1d(cfg, cfg.dimension, width, cfg.kernel_size),
                                   ResidualLSTM(width, cfg.lstm_layers)]
        for ratio in cfg.ratios:
            layers += [nn.ELU(), SConvTranspose1d(cfg, width, width // 2, ratio * 2, stride=ratio)]
            width //= 2
            layers += _residual_blocks(cfg, width)
        layers += [nn.ELU(), SConv1d(cfg, cfg.num_filters, cfg.channels, cfg.last_kernel_size)]
        self.layers = nn.ModuleList(layers)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return _through_layers(self.layers, latents)


def _through_layers(layers: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    """The layers in turn, the LSTM called outside the loops: a compiled codec then breaks its graph once there,
    into one graph before the LSTM and one after (a break inside a loop over layers makes Dynamo compile each layer
    apart, once per width, and fall back to eager past its recompile limit)."""
    at = next(index for index, layer in enumerate(layers) if isinstance(layer, ResidualLSTM))
    for layer in layers[:at]:
        x = layer(x)
    x = layers[at](x)
    for layer in layers[at + 1:]:
        x = layer(x)
    return x


@dataclass
class CodecOutput:
    audio: torch.Tensor  # [B, C, L] reconstruction, cropped to the input length
    latents: torch.Tensor  # [B, D, T] encoder output
    quantizer: QuantizerOutput  # codes, straight-through quantized latents, stage latents, commitment


class Codec(nn.Module):
    def __init__(self, cfg: CodecConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = SEANetEncoder(cfg)
        self.quantizer = ResidualVectorQuantizer(cfg.quantizer)
        self.decoder = SEANetDecoder(cfg)

    def _check_audio(self, audio: torch.Tensor) -> None:
        if audio.dim() != 3 or audio.shape[1] != self.cfg.channels:
            raise ValueError(f"expected audio [B, {self.cfg.channels}, L], got {tuple(audio.shape)}")

    def forward(self, audio: torch.Tensor) -> CodecOutput:
        self._check_audio(audio)
        latents = self.encoder(audio)
        quantized = self.quantizer(latents)
        decoded = self.decoder(quantized.quantized)[..., : audio.shape[-1]]
        return CodecOutput(decoded, latents, quantized)

    def stage_latents(self, audio: torch.Tensor) -> torch.Tensor:
        """[B, C, L] -> per-stage latents [B, K, D, T] with the gradient reaching the encoder; no codebook update."""
        self._check_audio(audio)
        return self.quantizer.stage_latents(self.encoder(audio))

    @torch.no_grad()
    def encode(self, audio: torch.Tensor) -> torch.Tensor:
        """[B, C, L] -> codes [B, K, ceil(L / hop)]."""
        self._check_audio(audio)
        return self.quantizer.encode(self.encoder(audio))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """codes [B, K, T] -> audio [B, C, T * hop] (or ``length`` samples)."""
        audio = self.decoder(self.quantizer.decode(codes))
        return audio if length is None else audio[..., :length]
