"""The musicnn port: TF checkpoint reader, network and features against the original TensorFlow model,
and tagging sense on audio from the project's own renderer."""

import importlib.util
import json
import os
import sys

import numpy as np
import pytest
import torch
import torchaudio

from mmdgen.metrics.musicnn import (
    KAISER_BEST,
    MTT_TAGS,
    Musicnn,
    is_optimizer_state,
    load_musicnn,
    log_mel_patches,
    log_mel_spectrogram,
    mel_filterbank,
    musicnn_checkpoint,
    musicnn_state_dict,
    tag_index,
)
from mmdgen.metrics.tf_checkpoint import CheckpointError, crc32c, parse_protobuf, read_checkpoint, read_index
from tests.musicnn_tf_reference import REFERENCE_PATH, REFERENCE_RATES, reference_audio, reference_patches


@pytest.fixture(scope="module")
def prefix():
    return musicnn_checkpoint()  # the Makefile installs musicnn with --no-deps


@pytest.fixture(scope="module")
def tf_variables(prefix):
    return read_checkpoint(prefix)


@pytest.fixture(scope="module")
def model():
    return load_musicnn()


@pytest.fixture(scope="module")
def tf_reference():
    return json.loads(REFERENCE_PATH.read_text())


# ------------------------------------------------------------------ an independent bundle writer

TF_DTYPE_CODES = {np.float32: 1, np.float64: 2, np.int32: 3, np.uint8: 4, np.int16: 5, np.int8: 6, np.int64: 9,
                  np.bool_: 10, np.float16: 19}


def bitwise_crc32c(data: bytes) -> int:
    register = 0xFFFFFFFF
    for byte in data:
        register ^= byte
        for _ in range(8):
            register = (register >> 1) ^ (0x82F63B78 if register & 1 else 0)
    return register ^ 0xFFFFFFFF


def masked(crc: int) -> int:
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def varint_field(number: int, value: int) -> bytes:
    return varint(number << 3) + varint(value)


def bytes_field(number: int, payload: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def sstable_block(entries: list[tuple[bytes, bytes]], restart_interval: int = 2) -> bytes:
    out, restarts, previous = bytearray(), [], b""
    for i, (key, value) in enumerate(entries):
        shared = 0 if i % restart_interval == 0 else len(os.path.commonprefix([previous, key]))
        if i % restart_interval == 0:
            restarts.append(len(out))
        out += varint(shared) + varint(len(key) - shared) + varint(len(value)) + key[shared:] + value
        previous = key
    restarts = restarts or [0]
    return bytes(out) + b"".join(r.to_bytes(4, "little") for r in restarts) + len(restarts).to_bytes(4, "little")


def write_bundle(prefix, tensors: dict, num_shards: int = 2, dtype_codes: dict | None = None,
                 compression: int = 0, entries_per_block: int = 2) -> None:
    """A TF V2 checkpoint: tensor i in shard i % num_shards, sorted keys in blocks of ``entries_per_block``."""
    shards = [bytearray() for _ in range(num_shards)]
    entries = []
    for i, name in enumerate(sorted(tensors)):
        array = np.asarray(tensors[name])
        raw, shard = array.tobytes(), i % num_shards
        code = (dtype_codes or {}).get(name, TF_DTYPE_CODES[array.dtype.type])
        shape = b"".join(bytes_field(2, varint_field(1, d)) for d in array.shape)
        entry = (varint_field(1, code) + bytes_field(2, shape) + varint_field(3, shard)
                 + varint_field(4, len(shards[shard])) + varint_field(5, len(raw))
                 + varint(6 << 3 | 5) + masked(bitwise_crc32c(raw)).to_bytes(4, "little"))
        entries.append((name.encode(), entry))
        shards[shard] += raw
    header = varint_field(1, num_shards) + bytes_field(3, varint_field(1, 1))
    entries = [(b"", header)] + entries

    table, index = bytearray(), []

    def append_block(block: bytes) -> bytes:
        handle = varint(len(table)) + varint(len(block))
        trailer = bytes([compression])
        table.extend(block + trailer + masked(bitwise_crc32c(block + trailer)).to_bytes(4, "little"))
        return handle

    for start in range(0, len(entries), entries_per_block):
        chunk = entries[start: start + entries_per_block]
        index.append((chunk[-1][0], append_block(sstable_block(chunk))))
    metaindex_handle = append_block(sstable_block([]))
    index_handle = append_block(sstable_block(index))
    footer = (metaindex_handle + index_handle).ljust(40, b"\0") + (0xDB4775248B80FB57).to_bytes(8, "little")
    with open(f"{prefix}.index", "wb") as f:
        f.write(bytes(table) + footer)
    for shard, data in enumerate(shards):
        with open(f"{prefix}.data-{shard:05d}-of-{num_shards:05d}", "wb") as f:
            f.write(bytes(data))


def small_tensors() -> dict:
    rng = np.random.default_rng(0)
    return {
        "dense/kernel": rng.standard_normal((3, 2)).astype(np.float32),
        "dense/kernel/Adam": rng.standard_normal((3, 2)).astype(np.float32),  # shares a long key prefix
        "dense/bias": np.array([0.5, -1.25]),
        "global_step": np.array(1234567890123, dtype=np.int64),
        "mask": np.array([True, False, True, True]),
        "half": rng.standard_normal((2, 2)).astype(np.float16),
        "codes": np.arange(-2, 3, dtype=np.int8),
        "empty": np.zeros((0, 3), dtype=np.float32),
    }


# ------------------------------------------------------------------ checkpoint reader


def test_crc32c_matches_a_bitwise_reference():
    assert crc32c(b"123456789") == 0xE3069283  # the standard CRC-32C check value
    rng = np.random.default_rng(0)
    for size in (0, 1, 3, 4, 5, 1023, 1024, 1025, 5000):
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        assert crc32c(data) == bitwise_crc32c(data), size


def _meta_graph_variables(meta_path) -> dict[str, tuple[int, ...]]:
    """VariableV2 nodes of a MetaGraphDef and their declared shapes."""
    variables = {}
    graph = next(v for n, v in parse_protobuf(meta_path.read_bytes(), "meta") if n == 2)  # graph_def
    for number, node in parse_protobuf(graph, "graph"):
        if number != 1:  # GraphDef.node
            continue
        fields = parse_protobuf(node, "node")
        if dict(fields).get(2) != b"VariableV2":  # NodeDef.op
            continue
        for attr in (v for n, v in fields if n == 5):  # NodeDef.attr map entries
            key_value = dict(parse_protobuf(attr, "attr"))
            if key_value[1] == b"shape":
                shape = dict(parse_protobuf(key_value[2], "attr value"))[7]  # AttrValue.shape
                dims = [dict(parse_protobuf(d, "dim")).get(1, 0) for n, d in parse_protobuf(shape, "shape") if n == 2]
                variables[dict(fields)[1].decode()] = tuple(dims)
    return variables


def test_every_variable_of_the_meta_graph_is_read_with_its_shape(prefix, tf_variables):
    declared = _meta_graph_variables(prefix / ".meta")
    num_shards, entries = read_index(prefix)
    assert num_shards == 1 and len(declared) == 150
    assert set(entries) == set(declared) == set(tf_variables)
    for name, shape in declared.items():
        assert entries[name].shape == shape, name
        assert tf_variables[name].shape == shape and tf_variables[name].dtype == torch.float32, name
        assert torch.isfinite(tf_variables[name]).all(), name


@pytest.mark.parametrize("as_directory", [False, True])
def test_a_hand_built_bundle_round_trips(tmp_path, as_directory):
    tensors = small_tensors()
    if as_directory:  # saved to "DIR/": the files are DIR/.index and DIR/.data-*
        write_bundle(f"{tmp_path}/", tensors)
        read = read_checkpoint(tmp_path)
    else:
        write_bundle(tmp_path / "model.ckpt", tensors)
        read = read_checkpoint(tmp_path / "model.ckpt")
    assert set(read) == set(tensors)
    for name, array in tensors.items():
        expected = torch.from_numpy(array)
        assert read[name].dtype == expected.dtype and torch.equal(read[name], expected), name


def test_corrupt_or_unsupported_files_give_clear_errors(tmp_path):
    prefix = tmp_path / "ckpt"
    write_bundle(prefix, small_tensors())
    index = prefix.with_name("ckpt.index")
    shard = prefix.with_name("ckpt.data-00000-of-00002")
    good_index, good_shard = index.read_bytes(), shard.read_bytes()

    index.write_bytes(good_index[:-20])
    with pytest.raises(CheckpointError, match=r"ckpt\.index: bad magic number .* truncated"):
        read_checkpoint(prefix)
    index.write_bytes(good_index[:30])
    with pytest.raises(CheckpointError, match=r"ckpt\.index: 30 bytes is shorter than the 48-byte SSTable footer"):
        read_checkpoint(prefix)
    footer = (varint(0) + varint(0) + varint(10**6) + varint(50)).ljust(40, b"\0") + good_index[-8:]
    index.write_bytes(good_index[:-48] + footer)
    with pytest.raises(CheckpointError, match="bad footer: index block at 1000000"):
        read_checkpoint(prefix)
    corrupted = bytearray(good_index)
    corrupted[12] ^= 0x01  # inside the first data block of the index
    index.write_bytes(bytes(corrupted))
    with pytest.raises(CheckpointError, match=r"ckpt\.index: block at 0 fails its CRC-32C check"):
        read_checkpoint(prefix)
    index.write_bytes(good_index)

    shard.write_bytes(good_shard[:-3])
    with pytest.raises(CheckpointError, match=r"ckpt\.data-00000-of-00002: tensor .* truncated"):
        read_checkpoint(prefix)
    corrupted = bytearray(good_shard)
    corrupted[0] ^= 0x80
    shard.write_bytes(bytes(corrupted))
    with pytest.raises(CheckpointError, match=r"ckpt\.data-00000-of-00002: tensor 'codes' fails its CRC-32C"):
        read_checkpoint(prefix)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=r"ckpt\.data-00000-of-00002"):
        read_checkpoint(prefix)

    write_bundle(prefix, small_tensors(), dtype_codes={"mask": 7})
    with pytest.raises(CheckpointError, match=r"ckpt\.index: entry 'mask': unsupported dtype string \(enum 7\)"):
        read_checkpoint(prefix)
    write_bundle(prefix, small_tensors(), dtype_codes={"codes": 3})  # int32 needs 20 bytes, 5 stored
    with pytest.raises(CheckpointError, match=r"entry 'codes': 5 bytes stored for shape \[5\], expected 20"):
        read_checkpoint(prefix)
    write_bundle(prefix, small_tensors(), compression=1)
    with pytest.raises(CheckpointError, match="snappy-compressed"):
        read_checkpoint(prefix)
    with pytest.raises(FileNotFoundError, match=r"nothing\.index"):
        read_checkpoint(tmp_path / "nothing")


# ------------------------------------------------------------------ weight mapping


def test_every_checkpoint_variable_is_used_exactly_once(model, tf_variables):
    weights = {name: tensor for name, tensor in tf_variables.items() if not is_optimizer_state(name)}
    ours = {name: tensor for name, tensor in model.state_dict().items() if not name.endswith("num_batches_tracked")}
    assert len(weights) == len(ours) == 64  # 11 batch norms x 4, 8 convs x 2, 2 dense x 2
    assert sum(t.numel() for t in weights.values()) == sum(t.numel() for t in ours.values())
    # Independently of the mapping's bookkeeping: each checkpoint tensor's values (up to the layout
    # change) are found in exactly one of the model's tensors.
    matches = {}
    for name, tensor in weights.items():
        values = tensor.flatten().sort().values
        matches[name] = [ours_name for ours_name, ours_tensor in ours.items()
                         if ours_tensor.numel() == tensor.numel()
                         and torch.equal(ours_tensor.flatten().sort().values, values)]
        assert len(matches[name]) == 1, (name, matches[name])
    assert sorted(m[0] for m in matches.values()) == sorted(ours)


def test_mapping_refuses_a_checkpoint_that_does_not_fit(tf_variables):
    network = Musicnn()
    with pytest.raises(ValueError, match=r"not used by the model: \['extra/kernel'\]"):
        musicnn_state_dict(network, {**tf_variables, "extra/kernel": torch.zeros(1)})
    missing = {name: t for name, t in tf_variables.items() if name != "dense_1/bias"}
    with pytest.raises(ValueError, match=r"'dense_1/bias' \(for tags.bias\) not found"):
        musicnn_state_dict(network, missing)
    reshaped = {**tf_variables, "conv2d_2/kernel": torch.zeros(64, 1, 1, 51)}
    with pytest.raises(ValueError, match=r"conv2d_2/kernel gives frontend.2.conv.weight shape \(51, 1, 64, 1\)"):
        musicnn_state_dict(network, reshaped)


# ------------------------------------------------------------------ numerics against TensorFlow


def test_network_matches_the_tensorflow_graph(model, tf_reference):
    with torch.no_grad():
        penultimate, logits = model(torch.from_numpy(reference_patches()))
    expected = tf_reference["model"]
    # float32 in both; TF's oneDNN sums in another order
    torch.testing.assert_close(logits, torch.tensor(expected["logits"]), atol=1e-4, rtol=0)
    torch.testing.assert_close(penultimate, torch.tensor(expected["penultimate"]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("rate", REFERENCE_RATES)
def test_embed_matches_the_original_extractor(model, tf_reference, rate):
    features, probabilities = model.embed(torch.from_numpy(reference_audio(rate)), rate)
    expected = tf_reference["extractor"][str(rate)]
    assert list(MTT_TAGS) == expected["tags"]
    # Looser than the network alone: the original takes the logarithm in float16 (module docstring).
    torch.testing.assert_close(probabilities, torch.tensor(expected["tag_probabilities"]), atol=1e-3, rtol=0)
    torch.testing.assert_close(features, torch.tensor(expected["penultimate"]), atol=5e-3, rtol=0)


def _tf_same_conv_numpy(x, kernel, bias):
    """TF conv2d, stride 1, padding 'same', NHWC input [H, W, 1] and HWIO kernel, float64, by loops."""
    height, width = x.shape[:2]
    k_h, k_w = kernel.shape[:2]
    top, left = (k_h - 1) // 2, (k_w - 1) // 2  # TF: the odd extra padding goes bottom/right
    padded = np.zeros((height + k_h - 1, width + k_w - 1))
    padded[top: top + height, left: left + width] = x[:, :, 0]
    out = np.zeros((height, width, kernel.shape[3]))
    for dh in range(k_h):
        for dw in range(k_w):
            out += padded[dh: dh + height, dw: dw + width, None] * kernel[dh, dw, 0][None, None, :]
    return out + bias


def test_a_temporal_branch_matches_a_numpy_tf_same_conv(model, tf_variables):
    """The 128x1 branch (padding 63 above, 64 below) from the raw TF variables, without torch."""
    v = {name: t.double().numpy() for name, t in tf_variables.items()}

    def batch_norm(x, layer):  # tf.layers.batch_normalization at inference, epsilon 1e-3
        scale = v[f"{layer}/gamma"] / np.sqrt(v[f"{layer}/moving_variance"] + 1e-3)
        return (x - v[f"{layer}/moving_mean"]) * scale + v[f"{layer}/beta"]

    patch = reference_patches(1)[0].astype(np.float64)
    x = batch_norm(patch, "batch_normalization")
    conv = np.maximum(_tf_same_conv_numpy(x[:, :, None], v["conv2d_2/kernel"], v["conv2d_2/bias"]), 0)
    expected = batch_norm(conv, "batch_normalization_3").max(axis=1).T  # max over frequency -> [filters, time]
    with torch.no_grad():
        ours = model.frontend[2](model.input_norm(torch.from_numpy(patch).float()[None, None]))[0]
    np.testing.assert_allclose(ours.numpy(), expected, atol=1e-4, rtol=0)


# ------------------------------------------------------------------ input features


def _slaney_mel_numpy(n_fft: int, sample_rate: int, n_mels: int) -> np.ndarray:
    """Slaney's Auditory Toolbox mel filterbank (linear below 1 kHz, log above), area-normalised."""
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, log_step = min_log_hz / f_sp, np.log(6.4) / 27.0

    def to_mel(hz):
        hz = np.asarray(hz, dtype=np.float64)
        return np.where(hz < min_log_hz, hz / f_sp, min_log_mel + np.log(np.maximum(hz, 1e-10) / min_log_hz) / log_step)

    def to_hz(mel):
        return np.where(mel < min_log_mel, mel * f_sp, min_log_hz * np.exp(log_step * (mel - min_log_mel)))

    edges = to_hz(np.linspace(0.0, to_mel(sample_rate / 2), n_mels + 2))
    bins = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    weights = np.zeros((n_fft // 2 + 1, n_mels))
    for m in range(n_mels):
        lower, centre, upper = edges[m: m + 3]
        rising, falling = (bins - lower) / (centre - lower), (upper - bins) / (upper - centre)
        weights[:, m] = np.maximum(0, np.minimum(rising, falling)) * 2.0 / (upper - lower)
    return weights


def test_mel_filterbank_is_slaney(model):
    ours = mel_filterbank(model.config).double().numpy()
    np.testing.assert_allclose(ours, _slaney_mel_numpy(512, 16000, 96), atol=1e-7, rtol=1e-4)


def test_log_mel_matches_a_numpy_reference():
    audio = reference_audio(16000).astype(np.float64)
    padded = np.pad(audio, 256, mode="reflect")  # centred frames
    frames = 1 + audio.size // 256
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(512) / 512)  # periodic Hann
    spectra = np.fft.rfft(np.stack([padded[i * 256: i * 256 + 512] * window for i in range(frames)]), axis=1)
    mel = (np.abs(spectra) ** 2) @ _slaney_mel_numpy(512, 16000, 96)
    expected = np.log10(10000 * mel.astype(np.float16).astype(np.float64) + 1)
    ours = log_mel_spectrogram(torch.from_numpy(audio.astype(np.float32)), 16000).numpy()
    assert ours.shape == (frames, 96) == (407, 96)
    # float32 vs float64 can land on either side of a float16 rounding step: one step near 4.4 is 4e-4
    np.testing.assert_allclose(ours, expected, atol=1e-3, rtol=0)
    # ... too loose to see the float16 rounding itself (2e-4 at most), so check that the mel powers
    # behind the features are float16 values (a float32 power is off one by 1e-4 on average)
    power = (10 ** ours.astype(np.float64) - 1) / 10000
    power = power[power > 1e-3]  # audible cells: there the +1 in the logarithm loses nothing
    assert power.size > 5000 and (np.abs(power - power.astype(np.float16)) / power).max() < 2e-5


def test_resampling_is_resampys_kaiser_best():
    """The 32 kHz -> 16 kHz impulse response against resampy's kaiser_best formula (numpy)."""
    impulse_at, length = 4001, 8000
    impulse = torch.zeros(length)
    impulse[impulse_at] = 1.0
    ours = torchaudio.functional.resample(impulse, 32000, 16000, **KAISER_BEST).double().numpy()
    scale, rolloff, zeros, beta = 0.5, 0.917347, 50, 12.9846
    offsets = scale * (2 * np.arange(length // 2) - impulse_at)  # output time in input samples, scaled
    inside = np.abs(offsets) <= zeros
    taper = np.i0(beta * np.sqrt(np.clip(1 - (offsets / zeros) ** 2, 0, None))) / np.i0(beta)
    expected = np.where(inside, scale * rolloff * np.sinc(rolloff * offsets) * taper, 0.0)
    np.testing.assert_allclose(ours, expected, atol=1e-6, rtol=0)


def test_patches_cut_the_spectrogram_without_overlap():
    audio = torch.from_numpy(reference_audio(32000, seconds=10.0))
    spectrogram = log_mel_spectrogram(audio, 32000)
    patches = log_mel_patches(audio, 32000)
    assert spectrogram.shape == (626, 96) and patches.shape == (3, 187, 96)  # 1 + 160000 // 256 frames
    for k in range(3):
        assert torch.equal(patches[k], spectrogram[187 * k: 187 * (k + 1)])
    stereo = torch.stack([audio, 0.5 * audio])
    torch.testing.assert_close(log_mel_patches(stereo, 32000), log_mel_patches(0.75 * audio, 32000))
    with pytest.raises(ValueError, match="at least 2.98 s"):
        log_mel_patches(audio[: int(2.9 * 32000)], 32000)


# ------------------------------------------------------------------ behaviour


def _melody(seconds: float, seed: int, low: int) -> list:
    """(time, on/off, channel, pitch) events: a random walk melody with occasional bass notes."""
    rng = np.random.default_rng(seed)
    events, time = [], 0.0
    while time < seconds - 0.5:
        duration = float(rng.choice([0.25, 0.5, 0.5, 1.0]))
        pitch = low + int(rng.choice([0, 2, 4, 5, 7, 9, 11])) + 12 * int(rng.integers(0, 2))
        events += [(time, 1, 0, pitch), (time + 0.95 * duration, 0, 0, pitch)]
        if rng.random() < 0.3:
            events += [(time, 1, 1, pitch - 12), (time + duration, 0, 1, pitch - 12)]
        time += duration
    return sorted(events, key=lambda e: (e[0], e[1]))


def test_piano_tag_picks_out_rendered_piano(model):
    from mmdgen.data.corpus import INSTRUMENTS
    from mmdgen.data.render import normalize_loudness, synthesize

    seconds, rate = 6.5, 32000

    def tag_probabilities(program: int, seed: int, low: int = 60) -> torch.Tensor:
        audio = normalize_loudness(synthesize(_melody(seconds, seed, low), program, seconds, rate))
        return model.embed(torch.from_numpy(audio), rate)[1].mean(0)

    piano = [tag_probabilities(INSTRUMENTS["piano"], seed, low) for seed, low in ((1, 60), (2, 48), (3, 67))]
    others = {name: tag_probabilities(INSTRUMENTS[name], 1)
              for name in ("violin", "flute", "strings", "choir", "acoustic guitar", "organ", "trumpet", "clarinet")}
    piano_scores = [float(p[tag_index("piano")]) for p in piano]
    other_scores = [float(p[tag_index("piano")]) for p in others.values()]
    auc = np.mean([float(a > b) + 0.5 * float(a == b) for a in piano_scores for b in other_scores])
    assert auc == 1.0, (piano_scores, other_scores)
    assert min(piano_scores) > 0.5
    for name, tag in (("flute", "flute"), ("choir", "choir"), ("violin", "violin")):
        top_three = [MTT_TAGS[i] for i in others[name].argsort(descending=True)[:3]]
        assert tag in top_three, (name, top_three)

    silence = torch.zeros(4 * rate)
    noise = 0.1 * torch.randn(4 * rate, generator=torch.Generator().manual_seed(0))
    for audio in (silence, noise):
        assert model.embed(audio, rate)[1].mean(0)[tag_index("piano")] < 0.3


def test_embeddings_are_deterministic_and_batch_independent(model):
    audio = torch.from_numpy(reference_audio(32000, seconds=10.0))
    features, probabilities = model.embed(audio, 32000)
    assert features.shape == (3, 200) and probabilities.shape == (3, 50)
    assert ((probabilities > 0) & (probabilities < 1)).all()
    again = model.embed(audio, 32000)
    assert torch.equal(features, again[0]) and torch.equal(probabilities, again[1])
    one_at_a_time = model.embed(audio, 32000, batch_size=1)
    torch.testing.assert_close(one_at_a_time[0], features, atol=1e-5, rtol=0)
    model.train()
    assert not model.training and not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())


def test_loading_never_imports_tensorflow_and_names_the_missing_package(monkeypatch):
    load_musicnn()
    assert "tensorflow" not in sys.modules and "musicnn.extractor" not in sys.modules
    with pytest.raises(ValueError, match="unknown musicnn model 'MSD_vgg'; supported: MTT_musicnn"):
        load_musicnn("MSD_vgg")
    with pytest.raises(ValueError, match="'kazoo' is not an MTT tag"):
        tag_index("kazoo")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "musicnn" else find_spec(name, *args))
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps musicnn"):
        load_musicnn()
