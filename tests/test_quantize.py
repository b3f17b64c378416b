"""The int8 LM: Int8Linear against the float layer, which modules quantize_lm replaces, logits and greedy codes close
to the fp32 LM's, the state dict saved and restored exactly, the decode loop eager and compiled."""

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmdgen.generate import Generator, Sampling
from mmdgen.kernels import int8_gemv_cpu
from mmdgen.kernels.int8_linear import MODES
from mmdgen.model.lm import MusicLM, lm_config
from mmdgen.model.quantize import Int8Linear, quantize_lm
from tests.test_mmd import TRITON_DEVICE, needs_triton
from tests.tiny_parts import tiny_parts

TEXTS = ["a calm jig on flute", "a fast reel on fiddle with drums"]
# relative Frobenius error of the tiny LM's logits, int8 against fp32: about 0.004 measured over seeds (each weight
# within scale / 2 = max|row| / 254 of its value), so 0.01 leaves a margin and still catches a wrong scale or layer
LOGITS_RTOL = 0.01


def _tiny_lm(seed: int) -> MusicLM:
    """A random tiny LM whose heads are sharpened (x20) so that greedy choices are mostly far from ties."""
    torch.manual_seed(seed)
    lm = MusicLM(lm_config("tiny", text_dim=32)).eval()
    with torch.no_grad():
        for head in lm.heads:
            head.weight.mul_(20.0)
    return lm


def _inputs(seed: int, steps: int = 12):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 257, (2, 4, steps), generator=gen)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    return tokens, torch.randn(2, 5, 32, generator=gen), mask


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_int8_linear_module_follows_the_float_layer(bias):
    torch.manual_seed(0)
    linear = torch.nn.Linear(70, 33, bias=bias)
    module = Int8Linear.from_linear(linear)
    assert module.qweight.dtype == torch.int8 and module.scale.dtype == torch.float32
    assert (module.bias is not None) == bias and (not bias or torch.equal(module.bias, linear.bias))
    # the dequantised weight is within half a step of the float one, and the output within what that explains
    step = module.scale.double()[:, None]
    assert bool(((module.weight.double() - linear.weight.double()).abs() <= step * (0.5 + 1e-5)).all())
    x = torch.randn(3, 5, 70)
    with torch.no_grad():
        error = (module(x).double() - linear(x).double()).abs()
    bound = x.double().abs() @ (step / 2).expand(33, 70).T + 1e-5
    assert module(x).shape == (3, 5, 33) and bool((error <= bound).all())
    assert list(dict(module.named_parameters())) == []  # nothing to train


def test_the_dynamic_mode_follows_loads_and_moves():
    """mode "int8-dynamic" on CPU: the products follow load_state_dict and casts (nothing of the old codes kept)."""
    torch.manual_seed(1)
    first, second = (Int8Linear.from_linear(torch.nn.Linear(40, 24), "int8-dynamic") for _ in range(2))
    x = torch.randn(3, 40)
    with torch.no_grad():
        expected = second(x)
        assert not torch.equal(first(x), expected)
        first.load_state_dict(second.state_dict())
        assert torch.equal(first(x), expected)
        first.double().float()  # new scale tensors
        assert torch.equal(first(x), expected)


@pytest.mark.parametrize("mode", MODES)
def test_quantize_lm_replaces_the_decoder_and_head_linears_only(mode):
    lm = _tiny_lm(0)
    reference = copy.deepcopy(lm)
    assert quantize_lm(lm, mode) is lm and lm.quantization == mode
    replaced = {name for name, m in lm.named_modules() if isinstance(m, Int8Linear)}
    expected = {f"layers.{i}.{attention}.{projection}" for i in range(2) for attention in ("self_attn", "cross_attn")
                for projection in ("q_proj", "k_proj", "v_proj", "out_proj")}
    expected |= {f"layers.{i}.fc{j}" for i in range(2) for j in (1, 2)} | {f"heads.{k}" for k in range(4)}
    assert replaced == expected and all(lm.get_submodule(name).mode == mode for name in replaced)
    # the one float linear left is the text projection (text_dim 32 != dim 64); it, the embeddings and the norms
    # are untouched
    assert {name for name, m in lm.named_modules() if isinstance(m, torch.nn.Linear)} == {"text_projection"}
    state = lm.state_dict()
    kept = {k for k in reference.state_dict() if not any(k.startswith(name + ".") for name in expected)}
    for key in kept:
        assert torch.equal(state[key], reference.state_dict()[key]), key
    assert "text_projection.weight" in kept and "embeddings.0.weight" in kept
    for name in expected:
        assert state[f"{name}.qweight"].dtype == torch.int8 and state[f"{name}.scale"].dtype == torch.float32
        assert f"{name}.weight" not in state
    with pytest.raises(ValueError, match=f"already quantized \\(mode '{mode}'\\)"):
        quantize_lm(lm, mode)
    with pytest.raises(ValueError, match="unknown mode 'int4'; expected one of int8, int8-dynamic"):
        quantize_lm(_tiny_lm(0), "int4")


@pytest.mark.parametrize("mode", MODES)
def test_a_prefix_lm_without_cross_attention_is_quantized(mode):
    """MusicGen-melody's layers have no cross-attention: its self-attention, feed-forward and heads are replaced,
    and its logits stay close to the float LM's."""
    torch.manual_seed(0)
    lm = MusicLM(lm_config("tiny", text_dim=32, conditioning="prefix")).eval()
    reference = copy.deepcopy(lm)
    quantize_lm(lm, mode)
    replaced = {name for name, m in lm.named_modules() if isinstance(m, Int8Linear)}
    expected = {f"layers.{i}.self_attn.{projection}" for i in range(2)
                for projection in ("q_proj", "k_proj", "v_proj", "out_proj")}
    expected |= {f"layers.{i}.fc{j}" for i in range(2) for j in (1, 2)} | {f"heads.{k}" for k in range(4)}
    assert replaced == expected
    tokens, states, mask = _inputs(1)
    with torch.no_grad():
        exact = reference.logits(reference.hidden(tokens, states, mask))
        approximate = lm.logits(lm.hidden(tokens, states, mask))
    # the dynamic mode also rounds each row of activations to int8: about 0.7% here, twice the weight-only error
    # (fbgemm's 7 bits per tensor, its first version, gave 1.7%)
    tolerance = LOGITS_RTOL if mode == "int8" else 2 * LOGITS_RTOL
    assert 1e-4 < (torch.linalg.norm(approximate - exact) / torch.linalg.norm(exact)).item() < tolerance


def test_logits_and_greedy_codes_stay_close_to_the_fp32_lm():
    """On the same inputs (teacher forcing, so one different code cannot derail the rest): logits within
    LOGITS_RTOL; every cell whose fp32 top-2 gap exceeds twice the largest logit error keeps its greedy code (it
    must); and most cells do (sharpened heads: at least 90%; about 98% measured)."""
    for seed in range(2):
        lm = _tiny_lm(seed)
        quantized = quantize_lm(copy.deepcopy(lm))
        tokens, states, mask = _inputs(seed)
        with torch.no_grad():
            ours, theirs = quantized(tokens, states, mask), lm(tokens, states, mask)
        relative = float((ours - theirs).norm() / theirs.norm())
        assert 1e-4 < relative < LOGITS_RTOL, relative  # quantised, and close
        top2 = theirs.topk(2, dim=-1).values
        clear = (top2[..., 0] - top2[..., 1]) > 2 * (ours - theirs).abs().max()
        same = ours.argmax(-1) == theirs.argmax(-1)
        assert bool(same[clear].all()) and float(same.float().mean()) >= 0.9


@needs_triton
def test_the_lm_runs_through_the_triton_kernel(monkeypatch):
    """The same quantized LM with every Int8Linear on the Triton kernel (``MMDGEN_BACKEND=triton``) and on the
    PyTorch path: both compute the dequantised products to fp32 accuracy, so the logits agree far closer than
    either is to the fp32 LM."""
    quantized = quantize_lm(_tiny_lm(6)).to(TRITON_DEVICE)
    inputs = [t.to(TRITON_DEVICE) for t in _inputs(6)]
    with torch.no_grad():
        monkeypatch.setenv("MMDGEN_BACKEND", "triton")
        on_triton = quantized(*inputs).cpu()
        monkeypatch.setenv("MMDGEN_BACKEND", "torch")
        on_torch = quantized(*inputs).cpu()
    assert float((on_triton - on_torch).abs().max()) <= 1e-5 * float(on_torch.abs().max())


def test_head_weights_and_devices_read_the_dequantised_weights():
    lm = _tiny_lm(1)
    quantized = quantize_lm(copy.deepcopy(lm))
    stacked = quantized.head_weights()
    assert stacked.shape == (4, 256, 64) and stacked.dtype == torch.float32
    steps = torch.stack([head.scale for head in quantized.heads])[..., None] / 2
    assert bool(((stacked - lm.head_weights()).abs() <= steps * (1 + 1e-5)).all())
    caches = quantized.new_caches(2, 5)
    assert caches[0].keys.dtype == torch.float32 and caches[0].keys.shape == (2, 4, 5, 16)


@pytest.mark.parametrize("mode", MODES)
def test_the_state_dict_restores_a_quantized_lm_exactly(mode, tmp_path):
    quantized = quantize_lm(_tiny_lm(2), mode)
    save_file({k: v.contiguous() for k, v in quantized.state_dict().items()}, str(tmp_path / "lm.safetensors"))
    restored = quantize_lm(_tiny_lm(3), mode)  # other random weights, quantised, then overwritten
    restored.load_state_dict(load_file(str(tmp_path / "lm.safetensors")))
    for key, value in quantized.state_dict().items():
        assert restored.state_dict()[key].dtype == value.dtype and torch.equal(restored.state_dict()[key], value), key
    tokens, states, mask = _inputs(4)
    with torch.no_grad():
        assert torch.equal(restored(tokens, states, mask), quantized(tokens, states, mask))


@pytest.mark.parametrize("bad", [0.0, -1.0, 1e38, float("nan")])
def test_a_file_with_a_scale_quantize_weight_cannot_make_is_not_loaded(tmp_path, bad):
    """Zero, negative, past any finite weight / 127, NaN: refused by name (the NaN by the finite check first)."""
    from mmdgen.files import load_weights

    state = {k: v.contiguous().clone() for k, v in quantize_lm(_tiny_lm(2), "int8").state_dict().items()}
    state["layers.1.fc2.scale"][7] = bad
    save_file(state, str(tmp_path / "lm.safetensors"))
    expected = "non-finite" if bad != bad else r"layers.1.fc2.scale holds 1 values outside \(0, 2.68e\+36\]"
    with pytest.raises(ValueError, match=rf"lm.safetensors: .*{expected}"):
        load_weights(tmp_path / "lm.safetensors", quantize_lm(_tiny_lm(3), "int8"), "the int8 LM")


@pytest.fixture(scope="module")
def conditioning(tmp_path_factory):
    _, text, codec = tiny_parts(tmp_path_factory.mktemp("quantize"), TEXTS)
    return text, codec


@pytest.mark.parametrize("mode,texts,c_loop", [(mode, 2, True) for mode in MODES] + [("int8", 1, False)])
def test_the_decode_loop_runs_a_quantized_lm_eager_and_compiled(conditioning, monkeypatch, mode, texts, c_loop):
    """Nothing in the decode loop changes for an int8 LM: eager and compiled steps give the same codes (sampled,
    with guidance and top-k), and they are real codes. Two texts with guidance are 4 rows: the weight-only product
    is the C loop eagerly and compiled (``int8_linear.CPU_GEMV_MAX_ROWS``). Without it (no compiler, no AVX2) one
    text's 2 rows take inductor's loops compiled (``TRACED_GEMV_MAX_ROWS``) and oneDNN's product eagerly."""
    if not c_loop:
        monkeypatch.setattr(int8_gemv_cpu, "kernel_ready", lambda: False)
    text, codec = conditioning
    lm = quantize_lm(_tiny_lm(5), mode)
    sampling = Sampling(guidance_scale=3.0, top_k=20)
    eager, compiled = (Generator(lm, text, codec, compile=flag).generate_codes(TEXTS[:texts], duration=0.2,
                                                                                sampling=sampling, seed=4)
                       for flag in (False, True))
    assert eager.shape == (texts, 4, 10) and torch.equal(compiled, eager)
    assert len(set(eager.flatten().tolist())) > 8
