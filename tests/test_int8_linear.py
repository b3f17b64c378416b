"""Int8 weight linear layers: both backends against a float64 product with the dequantised weight over awkward
shapes and dtypes, the dynamic mode's error bound, quantisation round trips, compilation for sm80/sm90, bad input
refused."""

import json

import pytest
import torch

from mmdgen.kernels import int8_linear as module
from mmdgen.kernels.backend import TRITON_IMPORT_ERROR, TRITON_INTERPRETED
from mmdgen.kernels.int8_linear import int8_linear, quantize_weight
from tests.ptx_check import compile_in_subprocess
from tests.test_mmd import TRITON_DEVICE, needs_triton

BACKEND_DEVICES = [
    pytest.param("torch", torch.device("cpu"), id="torch"),
    pytest.param("triton", TRITON_DEVICE, id="triton", marks=needs_triton),
]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16"),
          pytest.param(torch.float16, id="fp16")]
# |error| <= RTOL * (|x| @ |dequantised W|.T + |bias|): fp32 accumulation over K <= 1000 (Triton: fp32 FMA or 3xTF32;
# PyTorch: exact int32 products over activations within 6.1e-8 * row max), then the output's own rounding: half an
# ulp, a whole one for bf16 under the interpreter, whose fp32 -> bf16 conversion truncates (triton 3.8)
RTOL = {torch.float32: 1e-5, torch.bfloat16: 2**-8 + 1e-5, torch.float16: 2**-11 + 1e-5}
INTERPRETED_BF16_RTOL = 2**-7 + 1e-5

# (M, K, N, bias): one element, GEMV rows (1-2: the FMA path), tensor-core tiles (3+ rows), more than one
# 64-row tile, K and N off every block size, K split across programs (1000 = 16 blocks of 64)
SHAPES = [(1, 1, 1, False), (2, 7, 130, True), (1, 1000, 33, False), (3, 130, 7, True), (17, 1000, 70, False),
          (33, 130, 1000, True), (70, 65, 9, True)]


def _case(rows, in_features, out_features, bias, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=gen).to(dtype)
    qweight, scale = quantize_weight(torch.randn(out_features, in_features, generator=gen) / in_features ** 0.5)
    b = torch.randn(out_features, generator=gen).to(dtype) if bias else None
    return x, qweight, scale, b


def reference(x, qweight, scale, bias=None):
    """float64: x @ (qweight * scale).T + bias, and the magnitude |x| @ |W|.T + |bias| that bounds rounding."""
    weight = qweight.double() * scale.double()[:, None]
    out, magnitude = x.double() @ weight.T, x.double().abs() @ weight.abs().T
    if bias is not None:
        out, magnitude = out + bias.double(), magnitude + bias.double().abs()
    return out, magnitude


def _ours(backend, device, x, qweight, scale, bias, **kwargs):
    moved = [None if t is None else t.to(device) for t in (x, qweight, scale, bias)]
    out = int8_linear(*moved, backend=backend, **kwargs)
    assert out.dtype == x.dtype and out.shape == (*x.shape[:-1], qweight.shape[0])
    return out.cpu()


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,in_features,out_features,bias", SHAPES)
def test_matches_the_dequantised_product(backend, device, dtype, rows, in_features, out_features, bias):
    x, qweight, scale, b = _case(rows, in_features, out_features, bias, dtype)
    expected, magnitude = reference(x, qweight, scale, b)
    out = _ours(backend, device, x, qweight, scale, b)
    error = (out.double() - expected).abs()
    rtol = RTOL[dtype]
    if backend == "triton" and dtype == torch.bfloat16 and TRITON_INTERPRETED:
        rtol = INTERPRETED_BF16_RTOL
    assert bool((error <= rtol * magnitude).all()), float((error / magnitude).max())


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_leading_dims_strides_and_an_empty_batch(backend, device):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 130, 3, generator=gen).transpose(1, 2)  # [5, 3, 130], features not contiguous
    qweight, scale = quantize_weight(torch.randn(67, 130, generator=gen))
    out = _ours(backend, device, x, qweight, scale, None)
    expected, magnitude = reference(x.reshape(-1, 130), qweight, scale)
    assert out.shape == (5, 3, 67)
    assert bool(((out.reshape(-1, 67).double() - expected).abs() <= 1e-5 * magnitude).all())
    assert _ours(backend, device, torch.zeros(0, 2, 130), qweight, scale, None).shape == (0, 2, 67)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dynamic_activations_stay_within_their_bound(dtype):
    """mode="int8-dynamic" on CPU: each row of activations rounded to int8 units of its own step (max |x_row| / 127),
    so each activation is within row max / 254 and the error at most that times sum_k |W[n, k]|, plus rounding; and
    really larger than the weight-only mode's."""
    x, qweight, scale, bias = _case(9, 1000, 130, True, dtype, seed=1)
    x[3] *= 1e-3  # a small row keeps its own, small step
    expected, magnitude = reference(x, qweight, scale, bias)
    out = int8_linear(x, qweight, scale, bias, backend="torch", mode="int8-dynamic")
    assert out.dtype == dtype
    weight = qweight.double() * scale.double()[:, None]
    row_max = x.double().abs().amax(dim=1, keepdim=True)
    bound = 1.01 * row_max / 254 * weight.abs().sum(dim=1) + RTOL[dtype] * magnitude
    error = (out.double() - expected).abs()
    assert bool((error <= bound).all()), float((error / bound).max())
    if dtype == torch.float32:
        weight_only = (int8_linear(x, qweight, scale, bias, backend="torch").double() - expected).abs()
        assert float(error.max()) > 100 * float(weight_only.max())


def test_a_dynamic_row_does_not_depend_on_the_others_and_changed_codes_count():
    """Each row is rounded on its own: a row's result is the same alone as among other rows (of other sizes), and
    an in-place change of the codes or scales is seen by the next call (nothing of them is kept)."""
    x, qweight, scale, _ = _case(7, 70, 20, False, torch.float32, seed=2)
    x[1] *= 1e4
    together = int8_linear(x, qweight, scale, mode="int8-dynamic")
    for row in range(7):
        assert torch.equal(int8_linear(x[row:row + 1], qweight, scale, mode="int8-dynamic")[0], together[row])
    qweight[4].neg_()
    scale[7].mul_(3.0)
    changed = int8_linear(x, qweight, scale, mode="int8-dynamic")
    assert torch.equal(changed[:, 4], -together[:, 4])
    torch.testing.assert_close(changed[:, 7], together[:, 7] * 3, rtol=1e-6, atol=0)


def test_the_int_mm_paths_are_right_for_a_single_input_feature():
    """torch 2.14's CPU ``_int_mm`` returns wrong sums when K = 1 (any rows, N > 1); both int8 modes' PyTorch paths
    must not (5 rows: past the C loop's rows in weight-only mode; the C loop off)."""
    x, qweight, scale, bias = _case(5, 1, 6, True, torch.float32, seed=3)
    expected, magnitude = reference(x, qweight, scale, bias)
    for mode in module.MODES:
        out = module._torch_int8_linear(x, qweight, scale, module.WEIGHT_ONLY_LEVELS if mode == "int8" else
                                        module.DYNAMIC_LEVELS) + bias
        assert bool(((out.double() - expected).abs() <= 0.01 * magnitude + 1e-6).all()), mode


@needs_triton
def test_the_triton_kernel_is_the_same_in_both_modes():
    x, qweight, scale, bias = [None if t is None else t.to(TRITON_DEVICE)
                               for t in _case(2, 130, 70, True, torch.float32)]
    modes = [int8_linear(x, qweight, scale, bias, backend="triton", mode=mode) for mode in module.MODES]
    assert torch.equal(modes[0], modes[1])


def test_quantize_weight_round_trip_and_zero_rows():
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(9, 37, generator=gen) * torch.logspace(-3, 2, 9)[:, None]
    weight[2] = 0.0  # a zero row
    weight[5] = 0.0
    weight[5, 11] = -1e-39  # a denormal row: the smallest normal scale, so its codes are 0 too
    qweight, scale = quantize_weight(weight)
    assert qweight.dtype == torch.int8 and qweight.shape == (9, 37)
    assert scale.dtype == torch.float32 and scale.shape == (9,) and bool((scale > 0).all() & scale.isfinite().all())
    assert int(qweight.abs().max()) <= 127 and bool((qweight[[2, 5]] == 0).all())
    normal = [r for r in range(9) if r not in (2, 5)]
    assert bool((qweight[normal].abs().amax(dim=1) == 127).all())  # the other rows use the full range
    error = (qweight.double() * scale.double()[:, None] - weight.double()).abs()
    assert bool((error <= scale.double()[:, None] * (0.5 + 1e-5)).all())
    # bf16 weights are quantised from their fp32 values
    q16, s16 = quantize_weight(weight.bfloat16())
    error16 = (q16.double() * s16.double()[:, None] - weight.bfloat16().double()).abs()
    assert bool((error16 <= s16.double()[:, None] * (0.5 + 1e-5)).all())
    # the zero row gives exactly the bias, with no NaN anywhere
    out = int8_linear(torch.randn(2, 37), qweight, scale, torch.arange(9.0))
    assert bool(out.isfinite().all()) and torch.equal(out[:, 2], torch.full((2,), 2.0))


def test_bad_input_is_refused():
    x, qweight, scale, bias = _case(2, 8, 5, True, torch.float32)
    with pytest.raises(ValueError, match=r"int8_linear: qweight must be an int8 tensor \[N, K\], got torch.float32"):
        int8_linear(x, qweight.float(), scale)
    with pytest.raises(ValueError, match=r"qweight must be an int8 tensor \[N, K\], got torch.uint8 \(5, 8\)"):
        int8_linear(x, qweight.view(torch.uint8), scale)
    with pytest.raises(ValueError, match=r"qweight must be an int8 tensor \[N, K\], got torch.int8 \(40,\)"):
        int8_linear(x, qweight.flatten(), scale)
    with pytest.raises(ValueError, match=r"x \(2, 7\) does not fit qweight \(5, 8\): expected x \[\.\.\., 8\]"):
        int8_linear(x[:, :7], qweight, scale)
    with pytest.raises(ValueError, match=r"x must be a float tensor \[\.\.\., K\], got torch.int64 \(2, 8\)"):
        int8_linear(x.long(), qweight, scale)
    with pytest.raises(ValueError, match=r"scale must be a float tensor \[N\] = \[5\], got torch.float32 \(4,\)"):
        int8_linear(x, qweight, scale[:4])
    with pytest.raises(ValueError, match=r"bias must be a float tensor \[N\] = \[5\], got torch.int64 \(5,\)"):
        int8_linear(x, qweight, scale, bias.long())
    with pytest.raises(ValueError, match=r"qweight \(5, 0\) has no input features; expected K >= 1"):
        int8_linear(torch.randn(2, 0), torch.zeros(5, 0, dtype=torch.int8), scale)
    with pytest.raises(ValueError, match="unknown mode 'int4'; expected one of int8, int8-dynamic"):
        int8_linear(x, qweight, scale, mode="int4")
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        int8_linear(x, qweight, scale, backend="cuda")
    with pytest.raises(ValueError, match=r"quantize_weight: weight must be a float tensor \[N, K\], got torch.int8"):
        quantize_weight(qweight)
    with pytest.raises(ValueError, match=r"quantize_weight: weight must be a float tensor \[N, K\], got .*\(8,\)"):
        quantize_weight(torch.randn(8))
    nan_weight = torch.randn(3, 4)
    nan_weight[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"weight \(3, 4\) holds NaN or infinite values; expected finite weights"):
        quantize_weight(nan_weight)
    with pytest.raises(ValueError, match=f"K=200000 input features overflow the int32 accumulator.*K <= "
                                         f"{module.TORCH_MAX_K}"):
        # past the rows of the C loop (fp32 sums, no such limit), which would take one row
        int8_linear(torch.ones(module.CPU_GEMV_MAX_ROWS + 1, 200000), torch.ones(1, 200000, dtype=torch.int8),
                    torch.ones(1), backend="torch")


@needs_triton
def test_triton_refuses_float64_and_auto_sends_it_to_torch():
    x, qweight, scale, bias = _case(2, 8, 5, True, torch.float64)
    on_device = [t.to(TRITON_DEVICE) for t in (x, qweight, scale, bias)]
    with pytest.raises(ValueError, match="x in float32, bfloat16 or float16, got torch.float64"):
        int8_linear(*on_device, backend="triton")
    expected, _ = reference(x, qweight, scale, bias)
    assert torch.allclose(int8_linear(x, qweight, scale, bias), expected, rtol=1e-12, atol=1e-12)  # auto: torch


# name -> (dtypes, constexprs, K and the pointers 16-byte aligned as the JIT specialises them for K % 16 == 0)
_VARIANTS = {
    "gemv": (("fp32", "bf16", "fp16"), dict(USE_DOT=False, BLOCK_M=2), True),
    "gemv-unaligned": (("bf16",), dict(USE_DOT=False, BLOCK_M=2), False),
    "tile16": (("fp32", "bf16", "fp16"), dict(USE_DOT=True, BLOCK_M=16), True),
    "tile64": (("fp32", "bf16", "fp16"), dict(USE_DOT=True, BLOCK_M=64), True),
}
_ALIGNED = ("x_ptr", "q_ptr", "scale_ptr", "out_ptr", "in_features", "chunk", "stride_xm", "stride_qn",
            "out_features")


def _compile_report():
    """Compile the kernels for sm80 and sm90 (run with TRITON_INTERPRET=0): per variant the global loads and stores,
    tensor-core instructions, local memory and the threads of a program."""
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from tests.ptx_check import signature

    kernel = module._int8_matmul_kernel
    report = {}
    for arch in (80, 90):
        for name, (dtypes, meta, aligned) in _VARIANTS.items():
            for dtype in dtypes:
                constexprs = dict(meta, HAS_BIAS=False, PARTIAL=True, bias_ptr=None, BLOCK_N=module.TRITON_BLOCK_N,
                                  BLOCK_K=module.TRITON_BLOCK_K, stride_xk=1, stride_qk=1,
                                  PRECISION="tf32x3" if dtype == "fp32" else "tf32")
                sig = dict(signature(kernel, dtype, {"x_ptr"}, set(), set(), constexprs), q_ptr="*i8")
                attrs = {(kernel.arg_names.index(arg),): [["tt.divisibility", 16]] for arg in _ALIGNED} \
                    if aligned else {}
                compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs),
                                          target=GPUTarget("cuda", arch, 32))
                ptx = compiled.asm["ptx"]
                report[f"sm{arch}-{dtype}-{name}"] = {
                    "block_m": meta["BLOCK_M"], "threads": 32 * compiled.metadata.num_warps,
                    "loads": re.findall(r"\bld\.global\.[\w.]+", ptx),
                    "async_copy_bytes": re.findall(r"cp\.async\.cg\.shared\.global[^;]*?,\s*(0x[0-9a-f]+|\d+)", ptx),
                    "stores": re.findall(r"\bst\.global\.[\w.]+", ptx),
                    "instructions": sorted(set(re.findall(r"\b(wgmma\.mma_async|mma\.sync)", ptx))),
                    "local_memory": len(re.findall(r"\b(?:ld|st)\.local", ptx)),
                    "cubin_bytes": len(compiled.asm["cubin"])}
        combine, constexprs = module._int8_combine_kernel, {"HAS_BIAS": True, "BLOCK": module.TRITON_COMBINE_BLOCK}
        sig = signature(combine, "bf16", {"bias_ptr", "out_ptr"}, set(), set(), constexprs)
        compiled = triton.compile(ASTSource(fn=combine, signature=sig, constexprs=constexprs),
                                  target=GPUTarget("cuda", arch, 32))
        report[f"sm{arch}-combine"] = {"local_memory": len(re.findall(r"\b(?:ld|st)\.local", compiled.asm["ptx"])),
                                       "cubin_bytes": len(compiled.asm["cubin"])}
    return report


_STORE_BYTES = {"b8": 1, "b16": 2, "b32": 4, "b64": 8, "f32": 4, "u32": 4, "v2.b32": 8, "v4.b32": 16}


@pytest.mark.skipif(TRITON_IMPORT_ERROR is not None, reason=f"triton does not import: {TRITON_IMPORT_ERROR}")
def test_kernels_compile_for_sm80_and_sm90():
    code = "import json; from tests.test_int8_linear import _compile_report; print(json.dumps(_compile_report()))"
    report = json.loads(compile_in_subprocess(code).strip().splitlines()[-1])
    assert len(report) == 2 * 11
    for key, entry in report.items():
        assert entry["cubin_bytes"] > 0 and entry["local_memory"] == 0, key  # no register spills
        if "combine" in key:
            continue
        # the codes come in 16 codes per load (aligned GEMV), 16 per asynchronous copy to shared memory (tiles),
        # or one byte per load when K is not a multiple of 16
        if "unaligned" in key:
            assert "ld.global.b8" in entry["loads"], key
        elif "gemv" in key:
            assert "ld.global.v4.b32" in entry["loads"] and "ld.global.b8" not in entry["loads"], key
        else:
            assert entry["async_copy_bytes"] and set(entry["async_copy_bytes"]) == {"0x10"}, key
            assert {"mma.sync", "wgmma.mma_async"} & set(entry["instructions"]), key
        # what goes to global memory is this program's share of one fp32 output tile, nothing else: no
        # dequantised weight is ever stored
        stored = sum(_STORE_BYTES[s.removeprefix("st.global.")] for s in entry["stores"])
        assert stored == entry["block_m"] * module.TRITON_BLOCK_N * 4 // entry["threads"], (key, entry["stores"])
