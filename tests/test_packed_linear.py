"""oneDNN-packed linear layers: packed_linear against a float64 reference over awkward shapes (eager and compiled),
the exact unpacking, PackedLinear's state dict, copies and moves, bad input refused; pack_lm on cross- and
prefix-conditioned LMs; the Generator's packed decode against the plain one (codes, logits; eager and compiled);
the cpu_linear option and its refusals.

Run also under ATEN_CPU_CAPABILITY=avx2 and =default (oneDNN picks its kernels itself)."""

import copy

import pytest
import torch
from torch import nn

from mmdgen.generate import Generator, Sampling
from mmdgen.kernels.packed_linear import (PackedLinear, pack_weight, packed_linear, packing_unavailable_reason,
                                          unpack_weight)
from mmdgen.model.lm import MusicLM, lm_config
from mmdgen.model.packing import pack_lm, unpack_lm
from mmdgen.model.quantize import quantize_lm
from tests.tiny_parts import tiny_parts

TEXTS = ["a calm jig on flute", "a fast reel on fiddle with drums"]
ROWS = (1, 2, 3, 17)
FEATURES = ((1, 1), (7, 130), (130, 7), (1000, 7), (7, 1000))  # (K, N)
# fp32 products summed in another order than float64's: the error of each output stays far below
# 1e-5 * sum_k |x_k w_k| (about 100 fp32 epsilons), which a wrong weight, bias or layout exceeds by orders
FP32_RTOL = 1e-5
BF16_RTOL = 2 ** -7  # the output rounded to bf16 (8 bits), the sums in fp32

def _reference(x, weight, bias):
    """(float64 x @ weight.T + bias, the sum of the absolute terms: the scale of each output's rounding error)."""
    out = x.double() @ weight.double().T
    scale = x.double().abs() @ weight.double().abs().T
    if bias is not None:
        out, scale = out + bias.double(), scale + bias.double().abs()
    return out, scale


def _assert_close(out, x, weight, bias, rtol):
    expected, scale = _reference(x, weight, bias)
    assert out.shape == expected.shape and out.dtype == x.dtype
    error = (out.double() - expected).abs()
    assert bool((error <= rtol * scale + 1e-30).all()), float((error / scale.clamp_min(1e-30)).max())


def test_packing_is_available_on_this_cpu_or_refused_by_name():
    """oneDNN is built into every x86 and arm64 torch wheel (the tests below need it); fp32 on CPU packs."""
    assert torch.backends.mkldnn.is_available() and packing_unavailable_reason("cpu", torch.float32) is None
    assert "CPU tensors" in packing_unavailable_reason("meta", torch.float32)
    assert "float32 or bfloat16, the weight is torch.float64" in packing_unavailable_reason("cpu", torch.float64)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", ROWS)
def test_packed_linear_matches_float64_over_awkward_shapes(rows, bias):
    gen = torch.Generator().manual_seed(rows * 10 + bias)
    for in_features, out_features in FEATURES:
        weight = torch.randn(out_features, in_features, generator=gen)
        b = torch.randn(out_features, generator=gen) if bias else None
        x = torch.randn(rows, in_features, generator=gen)
        packed = pack_weight(weight)
        _assert_close(packed_linear(x, packed, b), x, weight, b, FP32_RTOL)
        leading = torch.randn(2, rows, 3, in_features, generator=gen)  # leading dims
        out = packed_linear(leading, packed, b)
        assert out.shape == (2, rows, 3, out_features)
        _assert_close(out.reshape(-1, out_features), leading.reshape(-1, in_features), weight, b, FP32_RTOL)
        strided = torch.randn(rows, 2 * in_features, generator=gen)[:, ::2]  # a non-contiguous input
        _assert_close(packed_linear(strided, packed, b), strided, weight, b, FP32_RTOL)
    assert packed_linear(torch.zeros(0, 7), pack_weight(torch.ones(3, 7))).shape == (0, 3)


def test_bf16_weights_pack_where_onednn_runs_bf16_and_are_refused_elsewhere():
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(130, 70, generator=gen).bfloat16()
    bias = torch.randn(130, generator=gen).bfloat16()
    x = torch.randn(3, 70, generator=gen).bfloat16()
    reason = packing_unavailable_reason("cpu", torch.bfloat16)
    if reason is not None:
        with pytest.raises(ValueError, match="cannot be packed: oneDNN does not run bfloat16"):
            pack_weight(weight)
        return
    _assert_close(packed_linear(x, pack_weight(weight), bias), x, weight, bias, BF16_RTOL)


def test_a_packed_weight_unpacks_bit_for_bit():
    gen = torch.Generator().manual_seed(4)
    for in_features, out_features in FEATURES + ((1024, 4096),):
        weight = torch.randn(out_features, in_features, generator=gen)
        for hint in (1, 2, 16):
            unpacked = unpack_weight(pack_weight(weight, hint))
            assert unpacked.layout == torch.strided and torch.equal(unpacked, weight)


def test_the_compiled_layers_give_the_eager_results():
    """Packed weights are inputs of a full graph (through the mmdgen::packed_linear op), at several row counts."""
    torch.manual_seed(5)
    layers = nn.Sequential(PackedLinear.from_linear(nn.Linear(130, 7)), nn.GELU(),
                           PackedLinear.from_linear(nn.Linear(7, 1000, bias=False)))
    compiled = torch.compile(layers, fullgraph=True, dynamic=False)
    for shape in ((1, 130), (17, 130), (2, 3, 130)):
        x = torch.randn(shape)
        with torch.no_grad():
            eager, graphed = layers(x), compiled(x)
        assert graphed.shape == eager.shape == (*shape[:-1], 1000)
        assert float((graphed - eager).abs().max()) <= 1e-6 * float(eager.abs().max())


def test_packed_linear_follows_the_linear_layer_saves_loads_copies_and_moves():
    torch.manual_seed(6)
    linear = nn.Linear(130, 7)
    layer = PackedLinear.from_linear(linear)
    assert (layer.in_features, layer.out_features) == (130, 7) and not list(layer.parameters())
    assert torch.equal(layer.weight, linear.weight) and layer.weight.device.type == "cpu"
    state = layer.state_dict()
    assert sorted(state) == ["bias", "weight"]
    assert all(torch.equal(state[key], value) for key, value in linear.state_dict().items())
    x = torch.randn(3, 130)
    with torch.no_grad():
        _assert_close(layer(x), x, linear.weight, linear.bias, FP32_RTOL)

    other = PackedLinear.from_linear(nn.Linear(130, 7))  # other weights, overwritten by the load
    assert other.load_state_dict(state) is not None
    assert torch.equal(other.weight, linear.weight) and torch.equal(other.bias, linear.bias)
    with pytest.raises(RuntimeError, match="Missing key.*weight"):
        other.load_state_dict({"bias": linear.bias})
    with pytest.raises(RuntimeError, match=r"size mismatch for weight.*\(7, 131\)"):
        other.load_state_dict({"weight": torch.zeros(7, 131), "bias": linear.bias})

    duplicate = copy.deepcopy(layer)
    assert duplicate.packed is not layer.packed and torch.equal(duplicate.weight, linear.weight)
    plain = layer.to_linear()
    assert isinstance(plain, nn.Linear) and torch.equal(plain.weight, linear.weight)
    assert layer.to("cpu") is layer and torch.equal(layer.weight, linear.weight)
    with pytest.raises(ValueError, match="converted to torch.float64.*cannot be packed.*unpack_lm"):
        layer.double()


def test_bad_input_is_refused_by_name():
    packed = pack_weight(torch.randn(7, 130))
    with pytest.raises(ValueError, match=r"x \(3, 129\) does not fit the packed weight \(7, 130\)"):
        packed_linear(torch.zeros(3, 129), packed)
    with pytest.raises(ValueError, match=r"x must be a CPU torch.float32 tensor.*got torch.float64"):
        packed_linear(torch.zeros(3, 130, dtype=torch.float64), packed)
    with pytest.raises(ValueError, match=r"bias must be a CPU torch.float32 tensor \[N\] = \[7\].*\(8,\)"):
        packed_linear(torch.zeros(3, 130), packed, torch.zeros(8))
    with pytest.raises(ValueError, match="packed must be a packed weight.*got torch.float32 \\(7, 130\\)"):
        packed_linear(torch.zeros(3, 130), torch.zeros(7, 130))
    with pytest.raises(ValueError, match="weight must be a tensor \\[N, K\\]"):
        pack_weight(torch.zeros(7))
    with pytest.raises(ValueError, match="rows_hint must be a positive int, got 0"):
        pack_weight(torch.zeros(7, 3), 0)


# -- the LM ------------------------------------------------------------------------------------------------------

def _tiny_lm(seed: int, **overrides) -> MusicLM:
    """A random tiny LM whose heads are sharpened (x20) so that greedy choices are far from ties."""
    torch.manual_seed(seed)
    lm = MusicLM(lm_config("tiny", text_dim=32, **overrides)).eval()
    with torch.no_grad():
        for head in lm.heads:
            head.weight.mul_(20.0)
    return lm


def _kinds(lm: MusicLM) -> dict[str, str]:
    return {name: type(module).__name__ for name, module in lm.named_modules()
            if isinstance(module, (nn.Linear, PackedLinear))}


@pytest.mark.parametrize("conditioning", ["cross", "prefix"])
def test_pack_lm_packs_the_per_step_layers_keeps_the_state_dict_and_unpacks_exactly(conditioning):
    lm = _tiny_lm(7, conditioning=conditioning)
    state = {key: value.clone() for key, value in lm.state_dict().items()}
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 257, (2, 4, 9), generator=gen)
    states, mask = torch.randn(2, 5, 32, generator=gen), torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        plain = lm(tokens, states, mask)
        packed = pack_lm(lm)(tokens, states, mask)
    kinds = _kinds(lm)
    per_step = [name for name in kinds if name.startswith("heads.") or ".self_attn." in name or ".fc" in name
                or name.endswith(("cross_attn.q_proj", "cross_attn.out_proj"))]
    assert len(per_step) == 2 * (4 + 2 * (conditioning == "cross") + 2) + 4
    assert {kinds[name] for name in per_step} == {"PackedLinear"}
    assert {kind for name, kind in kinds.items() if name not in per_step} == {"Linear"}  # text proj., cross k/v
    assert float((packed - plain).abs().max()) <= 1e-5 * float(plain.abs().max())
    saved = lm.state_dict()
    assert sorted(saved) == sorted(state) and all(torch.equal(saved[key], state[key]) for key in state)
    unpack_lm(lm)
    assert set(_kinds(lm).values()) == {"Linear"}
    assert all(torch.equal(lm.state_dict()[key], state[key]) for key in state)
    with torch.no_grad():
        assert torch.equal(lm(tokens, states, mask), plain)


@pytest.fixture(scope="module")
def conditioning(tmp_path_factory):
    _, text, codec = tiny_parts(tmp_path_factory.mktemp("packed"), TEXTS)
    return text, codec


@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("lm_kind", ["cross", "prefix"])
def test_the_packed_decode_gives_the_plain_codes_eager_and_compiled(conditioning, lm_kind, compile):
    """Greedy with guidance (sharpened heads: no near ties), and a prompt: the codes of the packed LM (the
    default on CPU) equal the plain LM's; its step logits agree to fp32 rounding."""
    text, codec = conditioning
    lm = _tiny_lm(8, conditioning=lm_kind)
    sampling = Sampling(guidance_scale=3.0, top_k=1)
    codes = {}
    for cpu_linear in ("plain", "auto"):
        generator = Generator(lm, text, codec, compile=compile, cpu_linear=cpu_linear)
        assert isinstance(lm.layers[0].fc1, PackedLinear) == (cpu_linear == "auto")
        codes[cpu_linear] = generator.generate_codes(TEXTS, duration=0.2, sampling=sampling, seed=1)
        prompt = generator.decode(codes[cpu_linear][..., :4])
        codes[cpu_linear, "prompt"] = generator.generate_codes(TEXTS, duration=0.2, sampling=sampling,
                                                               prompt_audio=prompt)
    assert codes["auto"].shape == (2, 4, 10) and len(set(codes["auto"].flatten().tolist())) > 8
    assert torch.equal(codes["auto"], codes["plain"])
    assert torch.equal(codes["auto", "prompt"], codes["plain", "prompt"])

    memory = None
    if lm_kind == "cross":
        condition = text(TEXTS)
        memory = lm.cross_memory(condition.states, condition.mask)
    inputs = torch.randint(0, 257, (2, 4, 3))
    logits = {}
    for cpu_linear in ("plain", "packed"):
        Generator(lm, text, codec, cpu_linear=cpu_linear)
        caches, position = lm.new_caches(2, 32), 0
        with torch.no_grad():
            if lm_kind == "prefix":
                condition = text(TEXTS)
                prefix = lm.prefix(condition.states, condition.mask)
                lm.prefill_prefix(prefix, caches)
                position = prefix.shape[1]
            logits[cpu_linear] = lm.step(inputs, position, caches, memory)
    scale = float(logits["plain"].abs().max())
    assert 0 < float((logits["packed"] - logits["plain"]).abs().max()) <= 1e-5 * scale


def test_a_melody_lm_generates_packed_as_plain(conditioning):
    text, codec = conditioning
    lm = _tiny_lm(9, conditioning="prefix", melody_dim=12, melody_frames=6)
    melody = torch.randn(1, 1, codec.cfg.sample_rate // 2, generator=torch.Generator().manual_seed(9))
    codes = [Generator(lm, text, codec, cpu_linear=cpu_linear).generate_codes(
        TEXTS, duration=0.2, sampling=Sampling(guidance_scale=3.0, top_k=1), melody=melody)
        for cpu_linear in ("plain", "packed")]
    assert isinstance(lm.heads[0], PackedLinear) and torch.equal(codes[0], codes[1])


def test_cpu_linear_choices_are_checked(conditioning):
    text, codec = conditioning
    with pytest.raises(ValueError, match="cpu_linear must be one of auto, packed, plain, got 'onednn'"):
        Generator(_tiny_lm(10), text, codec, cpu_linear="onednn")
    quantized = quantize_lm(_tiny_lm(10))
    with pytest.raises(ValueError, match="cpu_linear='packed'.*cannot be packed: its weights are int8"):
        Generator(quantized, text, codec, cpu_linear="packed")
    assert not any(isinstance(m, PackedLinear) for m in Generator(quantized, text, codec).lm.modules())
    wide = _tiny_lm(10).double()
    with pytest.raises(ValueError, match="cpu_linear='packed'.*float32 or bfloat16, the weight is torch.float64"):
        Generator(wide, text, codec, cpu_linear="packed")
    assert set(_kinds(Generator(wide, text, codec).lm).values()) == {"Linear"}  # auto: plain where it cannot
