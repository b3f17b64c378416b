"""Outputs of the original musicnn (TensorFlow + librosa) that tests/test_musicnn.py compares our port to.

The test inputs are defined here with numpy only, so the test can rebuild them; running this file
writes tests/musicnn_tf_reference.json. It needs what the project must not depend on, so run it
with a throwaway environment, never the project's:

    python -m venv /tmp/tfvenv
    /tmp/tfvenv/bin/pip install tensorflow-cpu tf-keras librosa resampy soundfile
    /tmp/tfvenv/bin/pip install --no-deps musicnn
    /tmp/tfvenv/bin/python tests/musicnn_tf_reference.py

Two references:

``model``       the TF graph of ``musicnn.models`` restored from the MTT_musicnn checkpoint, fed the
                log-mel patches of ``reference_patches()``: checks the network alone.
``extractor``   ``musicnn.extractor.extractor`` on ``reference_audio(rate)`` written to a float WAV at
                16 kHz (no resampling) and 22.05 kHz (resampled): checks features and network
                together. librosa is set to the defaults it had when musicnn was released (0.7):
                "kaiser_best" resampling and reflect-padded frames (today's are soxr and zero
                padding). All patches run as one batch: the extractor's later batches repeat the
                first batch's penultimate features (it concatenates a stale variable).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

REFERENCE_PATH = Path(__file__).with_name("musicnn_tf_reference.json")
REFERENCE_RATES = (16000, 22050)
PATCH_SHAPE = (187, 96)


def reference_patches(count: int = 2) -> np.ndarray:
    """``[count, 187, 96]`` float32 log-mel-like patches (values 0 to about 4.5, as real ones range)."""
    rng = np.random.default_rng(0)
    frames, bands = PATCH_SHAPE
    # a smooth spectral tilt and a few held "notes" on top of noise, so pooling and ReLUs see structure
    tilt = np.linspace(3.0, 0.5, bands)[None, None, :]
    patches = tilt * rng.random((count, frames, bands))
    for patch in patches:
        for _ in range(6):
            band, start, length = rng.integers(0, bands - 4), rng.integers(0, frames), rng.integers(10, 90)
            patch[start: start + length, band: band + 3] += 1.5
    return patches.astype(np.float32)


def reference_audio(sample_rate: int, seconds: float = 6.5) -> np.ndarray:
    """A deterministic mono clip: decaying harmonic tones (a short melody) over soft noise, float32.

    RMS -30 dBFS keeps every mel band below the power (6.55) at which the original's float16
    ``10000 * x`` overflows, so the original pipeline gives finite features on it.
    """
    rng = np.random.default_rng(1)
    t = np.arange(int(round(seconds * sample_rate))) / sample_rate
    audio = 0.002 * rng.standard_normal(t.size)
    for onset, pitch in ((0.0, 60), (0.6, 64), (1.2, 67), (1.8, 72), (2.6, 71), (3.2, 67), (4.0, 62), (5.0, 55)):
        frequency = 440.0 * 2.0 ** ((pitch - 69) / 12)
        since = t - onset
        envelope = np.where(since >= 0, np.exp(-3.0 * np.clip(since, 0, None)), 0.0)
        for harmonic in range(1, 9):
            if harmonic * frequency < sample_rate / 2:
                audio += envelope * 0.6 ** harmonic * np.sin(2 * np.pi * harmonic * frequency * since)
    audio *= 10 ** (-30 / 20) / np.sqrt(np.mean(audio ** 2))
    return audio.astype(np.float32)


def _model_reference(tf, models, checkpoint: str) -> dict:
    tf.compat.v1.reset_default_graph()
    x = tf.compat.v1.placeholder(tf.float32, [None, *PATCH_SHAPE])
    is_training = tf.compat.v1.placeholder(tf.bool)
    logits, *_, penultimate = models.define_model(x, is_training, "MTT_musicnn", 50)
    with tf.compat.v1.Session() as session:
        tf.compat.v1.train.Saver().restore(session, checkpoint)  # raises if a variable is missing
        out_logits, out_penultimate = session.run([logits, penultimate],
                                                  {x: reference_patches(), is_training: False})
    return {"logits": out_logits.tolist(), "penultimate": out_penultimate.tolist()}


def _extractor_reference(rate: int, workdir: Path) -> dict:
    import soundfile

    from musicnn import configuration, extractor

    path = workdir / f"musicnn_reference_{rate}.wav"
    soundfile.write(str(path), reference_audio(rate), rate, subtype="FLOAT")
    configuration.BATCH_SIZE = 64  # every patch in the first batch (see the module docstring)
    taggram, tags, features = extractor.extractor(str(path), model="MTT_musicnn", extract_features=True)
    return {"tag_probabilities": taggram.tolist(), "penultimate": features["penultimate"].tolist(), "tags": tags}


def main() -> None:
    import functools
    import os
    import tempfile

    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # musicnn builds with tf.compat.v1.layers
    import librosa
    import tensorflow as tf

    librosa.load = functools.partial(librosa.load, res_type="kaiser_best")
    librosa.feature.melspectrogram = functools.partial(librosa.feature.melspectrogram, pad_mode="reflect")
    from musicnn import models

    tf.compat.v1.disable_eager_execution()  # musicnn builds TF1 graphs (its extractor does the same)

    checkpoint = str(Path(models.__file__).parent / "MTT_musicnn") + "/"
    # The extractor ignores a failed restore (and would run random weights): make one fail loudly.
    restored = []
    original_restore = tf.compat.v1.train.Saver.restore

    def restore(self, session, path):
        original_restore(self, session, path)
        restored.append(path)

    tf.compat.v1.train.Saver.restore = restore
    reference = {"tensorflow": tf.__version__, "librosa": librosa.__version__,
                 "model": _model_reference(tf, models, checkpoint)}
    with tempfile.TemporaryDirectory() as workdir:
        reference["extractor"] = {str(rate): _extractor_reference(rate, Path(workdir)) for rate in REFERENCE_RATES}
    if len(restored) != 1 + len(REFERENCE_RATES):
        sys.exit(f"the checkpoint was restored {len(restored)} times, expected {1 + len(REFERENCE_RATES)}")
    REFERENCE_PATH.write_text(json.dumps(reference) + "\n")
    print(f"wrote {REFERENCE_PATH}")


if __name__ == "__main__":
    main()
