"""The codec's adversarial losses against ``mmdgen.model.discriminator``'s outputs: hinge losses for the
generator and the discriminator, and feature matching."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def generator_adversarial_loss(fake_logits: list[torch.Tensor]) -> torch.Tensor:
    """Hinge: mean over scales of mean(relu(1 - D(fake)))."""
    return torch.stack([F.relu(1 - logits).mean() for logits in fake_logits]).mean()


def discriminator_loss(real_logits: list[torch.Tensor], fake_logits: list[torch.Tensor]) -> torch.Tensor:
    """Hinge: mean over scales of mean(relu(1 - D(real))) + mean(relu(1 + D(fake)))."""
    return torch.stack([F.relu(1 - r).mean() + F.relu(1 + f).mean()
                        for r, f in zip(real_logits, fake_logits)]).mean()


def feature_matching_loss(real_features: list[list[torch.Tensor]], fake_features: list[list[torch.Tensor]]
                          ) -> torch.Tensor:
    """Mean over every feature map of L1(fake - real) / mean |real| (scale-free across layers)."""
    terms = [F.l1_loss(fake, real.detach()) / (real.detach().abs().mean() + 1e-8)
             for real_scale, fake_scale in zip(real_features, fake_features)
             for real, fake in zip(real_scale, fake_scale)]
    return torch.stack(terms).mean()
