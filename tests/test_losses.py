"""Codec losses: the balancer's gradient shares, the mel loss, the discriminator and its losses."""

import pytest
import torch

from mmdgen.losses.adversarial import discriminator_loss, feature_matching_loss, generator_adversarial_loss
from mmdgen.losses.balancer import Balancer
from mmdgen.losses.reconstruction import MultiScaleMelLoss, waveform_l1
from mmdgen.model.discriminator import DiscriminatorConfig, MultiScaleSTFTDiscriminator


def test_balancer_gives_each_loss_its_share_of_the_gradient():
    output = torch.randn(4, 10, requires_grad=True)
    target = torch.randn(4, 10)
    losses = {"big": 1000 * ((output - target) ** 2).sum(), "small": 1e-3 * output.abs().sum()}
    balancer = Balancer({"big": 3.0, "small": 1.0}, total_norm=2.0)
    combined, norms = balancer.gradient(losses, output)
    output.backward(combined)
    big = torch.autograd.grad(1000 * ((output - target) ** 2).sum(), output)[0]
    small = torch.autograd.grad(1e-3 * output.abs().sum(), output)[0]
    expected = 2.0 * (0.75 * big / big.norm() + 0.25 * small / small.norm())
    assert torch.allclose(output.grad, expected, rtol=1e-5)
    assert norms["big"] == pytest.approx(float(big.norm()), rel=1e-5)
    with pytest.raises(ValueError, match="no balancer weight"):
        balancer.gradient({"other": output.sum()}, output)


def test_balancer_state_round_trip():
    a = Balancer({"l1": 1.0})
    out = torch.randn(3, requires_grad=True)
    a.gradient({"l1": out.sum() * 5}, out)
    b = Balancer({"l1": 1.0})
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict()


def test_mel_loss_is_zero_for_equal_audio_and_grows_with_difference():
    torch.manual_seed(0)
    loss = MultiScaleMelLoss(sample_rate=16000)
    audio = torch.randn(2, 1, 4000)
    assert float(loss(audio, audio)) == 0.0
    small, large = loss(audio + 0.01 * torch.randn_like(audio), audio), loss(audio + 0.5 * torch.randn_like(audio), audio)
    assert 0 < float(small) < float(large)
    assert float(waveform_l1(audio + 1, audio)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 1024 samples"):
        loss(audio[..., :500], audio[..., :500])


def test_discriminator_shapes_and_losses():
    torch.manual_seed(0)
    disc = MultiScaleSTFTDiscriminator(DiscriminatorConfig(filters=4, n_ffts=(256, 128)))
    audio = torch.randn(2, 1, 2048)
    with torch.no_grad():
        logits, features = disc(audio)
    assert len(logits) == 2 and len(features[0]) == 5
    assert logits[0].shape[:2] == (2, 1)
    ones = [torch.ones(3)]
    assert float(generator_adversarial_loss(ones)) == 0.0
    assert float(discriminator_loss(ones, [-torch.ones(3)])) == 0.0
    assert float(discriminator_loss([torch.zeros(3)], [torch.zeros(3)])) == pytest.approx(2.0)
    assert float(feature_matching_loss(features, features)) == 0.0
    with torch.no_grad():
        fake = disc(audio + 0.1)[1]
    assert float(feature_matching_loss(features, fake)) > 0
    with pytest.raises(ValueError, match="at least 256 samples"):
        disc(audio[..., :100])
