"""EnCodec's multi-scale STFT discriminator (its losses: ``mmdgen.losses.adversarial``).

Each scale looks at the complex STFT (real and imaginary parts as channels, [B, 2C, frames, bins])
through weight-normalised 2-D convolutions: one (3, 9) input convolution, dilated (1, 2, 4) in time
and strided by 2 in frequency, a (3, 3) convolution and a (3, 3) output to one logit channel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from mmdgen.validation import check_fields, option


@dataclass
class DiscriminatorConfig:
    channels: int = option(1, "audio channels", at_least=1)
    filters: int = option(32, "filters of the first convolutions", at_least=1)
    max_filters: int = option(1024, "the most filters of any convolution", at_least=1)
    filters_scale: int = option(1, "filters grow by this factor per dilated convolution", at_least=1)
    n_ffts: tuple[int, ...] = option((1024, 2048, 512, 256, 128), "one scale per STFT size", at_least=4)
    dilations: tuple[int, ...] = option((1, 2, 4), "the time dilations of the strided convolutions", at_least=1)
    negative_slope: float = option(0.2, "the leaky ReLUs' negative slope", at_least=0)

    def __post_init__(self):
        check_fields(self)


def _padding(kernel: tuple[int, int], dilation: tuple[int, int] = (1, 1)) -> tuple[int, int]:
    return ((kernel[0] - 1) * dilation[0] // 2, (kernel[1] - 1) * dilation[1] // 2)


class STFTDiscriminator(nn.Module):
    def __init__(self, cfg: DiscriminatorConfig, n_fft: int):
        super().__init__()
        self.n_fft, self.hop = n_fft, n_fft // 4
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        self.slope = cfg.negative_slope
        width = cfg.filters
        convs = [weight_norm(nn.Conv2d(2 * cfg.channels, width, (3, 9), padding=_padding((3, 9))))]
        for i, dilation in enumerate(cfg.dilations):
            out = min(cfg.filters_scale ** (i + 1) * cfg.filters, cfg.max_filters)
            convs.append(weight_norm(nn.Conv2d(width, out, (3, 9), stride=(1, 2), dilation=(dilation, 1),
                                               padding=_padding((3, 9), (dilation, 1)))))
            width = out
        out = min(cfg.filters_scale ** (len(cfg.dilations) + 1) * cfg.filters, cfg.max_filters)
        convs.append(weight_norm(nn.Conv2d(width, out, (3, 3), padding=_padding((3, 3)))))
        self.convs = nn.ModuleList(convs)
        self.post = weight_norm(nn.Conv2d(out, 1, (3, 3), padding=_padding((3, 3))))

    def forward(self, audio: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        batch, channels, length = audio.shape
        spec = torch.stft(audio.reshape(-1, length), self.n_fft, self.hop, window=self.window, center=False,
                          normalized=True, return_complex=True)  # [B C, bins, frames]
        spec = spec.reshape(batch, channels, *spec.shape[-2:])
        x = torch.cat([spec.real, spec.imag], dim=1).transpose(2, 3)  # [B, 2C, frames, bins]
        features = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), self.slope)
            features.append(x)
        return self.post(x), features


class MultiScaleSTFTDiscriminator(nn.Module):
    def __init__(self, cfg: DiscriminatorConfig | None = None):
        super().__init__()
        self.cfg = cfg or DiscriminatorConfig()
        self.scales = nn.ModuleList(STFTDiscriminator(self.cfg, n) for n in self.cfg.n_ffts)

    def forward(self, audio: torch.Tensor) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
        """audio [B, C, L] (L >= the largest n_fft) -> logits and feature maps per scale."""
        if audio.shape[-1] < max(self.cfg.n_ffts):
            raise ValueError(f"the discriminator needs at least {max(self.cfg.n_ffts)} samples, got {audio.shape[-1]}")
        outputs = [scale(audio) for scale in self.scales]
        return [o[0] for o in outputs], [o[1] for o in outputs]
