"""`mmdgen codec encode|decode|reconstruct` and `mmdgen train codec` from the command line."""

import numpy as np
import pytest
import soundfile
import torch

from mmdgen import cli
from mmdgen.model.codec import Codec, codec_config
from mmdgen.pretrained.directory import load_codec, save_codec


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model")
    cfg = codec_config("tiny")
    cfg.quantizer.kmeans_init = False
    save_codec(Codec(cfg), folder)
    return folder


def test_save_and_load_round_trip(model_dir):
    codec = load_codec(model_dir)
    again = load_codec(model_dir)
    audio = torch.randn(1, 1, 3000)
    assert torch.equal(codec.encode(audio), again.encode(audio))


def test_encode_decode_reconstruct(model_dir, tmp_path, capsys):
    stereo = (0.2 * np.random.default_rng(0).standard_normal((22050, 2))).astype(np.float32)
    soundfile.write(tmp_path / "in.wav", stereo, 44100)  # stereo at another rate: mixed down and resampled
    assert cli.main(["codec", "encode", str(tmp_path / "in.wav"), str(tmp_path / "codes.pt"), "--model", str(model_dir)]) == 0
    payload = torch.load(tmp_path / "codes.pt", weights_only=True)
    assert payload["codes"].shape == (4, 25) and int(payload["length"]) == 16000
    assert cli.main(["codec", "decode", str(tmp_path / "codes.pt"), str(tmp_path / "out.wav"), "--model", str(model_dir)]) == 0
    audio, rate = soundfile.read(tmp_path / "out.wav")
    assert rate == 32000 and audio.shape == (16000,)
    assert cli.main(["codec", "reconstruct", str(tmp_path / "in.wav"), str(tmp_path / "re.flac"), "--model", str(model_dir)]) == 0
    assert soundfile.info(tmp_path / "re.flac").frames == 16000


def test_bad_inputs_are_named_and_leave_nothing(model_dir, tmp_path, capsys):
    (tmp_path / "broken.wav").write_bytes(b"not audio")
    assert cli.main(["codec", "encode", str(tmp_path / "broken.wav"), str(tmp_path / "c.pt"), "--model", str(model_dir)]) == 2
    assert "broken.wav" in capsys.readouterr().err and not (tmp_path / "c.pt").exists()
    assert cli.main(["codec", "decode", str(tmp_path / "broken.wav"), str(tmp_path / "o.wav"), "--model", str(model_dir)]) == 2
    assert "not a codes file" in capsys.readouterr().err and not (tmp_path / "o.wav").exists()
    assert cli.main(["codec", "encode", str(tmp_path / "broken.wav"), str(tmp_path / "c.pt"), "--model", str(tmp_path)]) == 2
    assert "config.json" in capsys.readouterr().err
    soundfile.write(tmp_path / "ok.wav", np.zeros(3200, dtype=np.float32), 32000)
    assert cli.main(["codec", "reconstruct", str(tmp_path / "ok.wav"), str(tmp_path / "o.mp4"), "--model", str(model_dir)]) == 2
    assert ".wav, .flac or .ogg" in capsys.readouterr().err and not list(tmp_path.glob("o.mp4*"))


def test_train_codec_command(tmp_path, capsys):
    for i in range(4):
        soundfile.write(tmp_path / f"c{i}.wav", (0.3 * np.sin(np.arange(8000) * (0.05 + 0.01 * i))).astype(np.float32),
                        32000)
    out = tmp_path / "run"
    assert cli.main(["train", "codec", "--data", str(tmp_path), "--out", str(out), "--steps", "2", "--batch-size", "2",
                     "--crop-seconds", "0.1", "--disc-filters", "4", "--mmd-weight", "5", "--mmd-delay"]) == 0
    assert (out / "model" / "codec.safetensors").exists()
    assert load_codec(out / "model").cfg.quantizer.codebook_size == 256
    assert cli.main(["train", "codec", "--data", str(tmp_path / "nowhere")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
