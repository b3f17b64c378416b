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


def _torchaudio_mel_loss(fake, real, sample_rate, n_ffts, floor=1e-5):
    """The mel loss as first written, on torchaudio's MelSpectrogram (the formula the fast path must keep)."""
    import warnings

    import torchaudio

    terms = []
    for n in n_ffts:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mel = torchaudio.transforms.MelSpectrogram(sample_rate=sample_rate, n_fft=n, win_length=n,
                                                       hop_length=n // 4, n_mels=64, normalized=True, center=False,
                                                       power=1.0)
        log_fake = torch.log(mel(fake.float()).clamp_min(floor))
        log_real = torch.log(mel(real.float()).clamp_min(floor))
        terms.append(torch.nn.functional.l1_loss(log_fake, log_real) + torch.nn.functional.mse_loss(log_fake, log_real))
    return torch.stack(terms).mean()


def _dft_log_mel(audio, n, filters, floor=1e-5):
    """An independent float64 reference: frames by indexing, the DFT as a matrix product, magnitudes, mels."""
    audio = audio.double()
    starts = torch.arange(0, audio.shape[-1] - n + 1, n // 4)
    frames = audio[..., starts[:, None] + torch.arange(n)]
    window = 0.5 - 0.5 * torch.cos(2 * torch.pi * torch.arange(n, dtype=torch.float64) / n)
    angles = 2 * torch.pi * torch.outer(torch.arange(n, dtype=torch.float64), torch.arange(n // 2 + 1,
                                                                                          dtype=torch.float64)) / n
    weighted = frames * window / window.square().sum().sqrt()
    magnitude = torch.sqrt((weighted @ torch.cos(angles)) ** 2 + (weighted @ torch.sin(angles)) ** 2)
    return torch.log((magnitude @ filters.double()).clamp_min(floor))


@pytest.mark.parametrize("shape", [(1, 1, 1024), (2, 1, 3001), (3, 2, 2221), (8, 1, 4096)])
def test_mel_loss_keeps_the_torchaudio_formula_and_a_float64_dft_reference(shape):
    """Values and gradients of the fast mel loss against the first (torchaudio) formula, in fp32, over lengths that
    leave a partial hop, one or two channels, one to eight items; its log-mels against a float64 DFT."""
    torch.manual_seed(sum(shape))
    sample_rate = 16000 if shape[-1] < 3000 else 32000
    n_ffts = (64, 128, 256, 512, 1024)
    loss = MultiScaleMelLoss(sample_rate)
    real = 0.3 * torch.randn(shape)
    fake = (real + 0.1 * torch.randn(shape)).requires_grad_()
    ours = loss(fake, real)
    (ours_grad,) = torch.autograd.grad(ours, fake)
    fake_ref = fake.detach().clone().requires_grad_()
    theirs = _torchaudio_mel_loss(fake_ref, real, sample_rate, n_ffts)
    (theirs_grad,) = torch.autograd.grad(theirs, fake_ref)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    assert torch.allclose(ours_grad, theirs_grad, rtol=1e-3, atol=1e-4 * float(theirs_grad.abs().max()))
    for n in (64, 1024):
        expected = _dft_log_mel(real, n, getattr(loss, f"filters_{n}"))
        assert torch.allclose(loss.log_mel(real, n).double(), expected, atol=1e-4)


def test_stft_magnitude_gradient_matches_finite_differences():
    """The hand-written backward of the STFT magnitudes, in float64, for odd and even frame sizes (an even size has a
    Nyquist bin), with a frame of zeros (no gradient through a zero magnitude)."""
    from mmdgen.losses.reconstruction import _STFTMagnitude

    torch.manual_seed(0)
    for n in (7, 8):
        frames = torch.randn(2, 3, n, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(_STFTMagnitude.apply, (frames,))
        zeros = torch.zeros(1, n, dtype=torch.float64, requires_grad=True)
        _STFTMagnitude.apply(zeros).sum().backward()
        assert torch.equal(zeros.grad, torch.zeros_like(zeros))
