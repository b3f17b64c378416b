"""The C loops of the int8 products on x86 CPUs (``mmdgen.kernels.int8_gemv_cpu``): every variant this CPU runs
against a float64 reference (weight-only) or an int64 reference of the rounding rule (dynamic: bit for bit) over
awkward shapes (K below, at and past the 64, 16, 32 and 8 code steps and their tails; odd N, N off the tiles of
codes; rows off the tiles of 2 and 4; one and two threads); ``int8_linear`` taking them eagerly and inside
``torch.compile``; and the build's failures (no compiler, a compiler that fails, an unwritable cache) leaving the
other paths, a reason, and nothing half-written."""

import os
import stat

import pytest
import torch
import torch.nn.functional as F

import mmdgen.kernels.int8_gemv_cpu as gemv_cpu
import mmdgen.kernels.int8_linear as int8_linear
from mmdgen.kernels.int8_linear import int8_linear as int8_product
from mmdgen.kernels.int8_linear import quantize_weight

SUPPORTED = {"avx512": torch.cpu._is_avx512_supported, "avx2": torch.cpu._is_avx2_supported}
TINY = torch.finfo(torch.float32).tiny


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """A process-wide build made again (in an empty cache under tmp_path), and forgotten afterwards."""
    monkeypatch.setenv(gemv_cpu.CACHE_ENV, str(tmp_path / "cache"))
    gemv_cpu._library.cache_clear()
    gemv_cpu._load.cache_clear()
    yield tmp_path / "cache"
    gemv_cpu._library.cache_clear()
    gemv_cpu._load.cache_clear()


def _reference(x, qweight, scale, bias):
    out = x.double() @ (qweight.double() * scale.double()[:, None]).T
    return out if bias is None else out + bias.double()


def _case(rows, in_features, out_features, seed):
    gen = torch.Generator().manual_seed(seed)
    qweight, scale = quantize_weight(torch.randn(out_features, in_features, generator=gen))
    return torch.randn(rows, in_features, generator=gen) * 3, qweight, scale, torch.randn(out_features, generator=gen)


def test_every_variant_this_cpu_runs_matches_float64_over_awkward_shapes():
    library, reason = gemv_cpu._library()
    assert library is not None, reason
    variants = [name for name, supported in SUPPORTED.items() if supported()]
    assert variants, "an x86 CPU without AVX2"
    threads = torch.get_num_threads()
    try:
        for variant in variants:
            function = gemv_cpu.variant_function(library, variant)
            for rows in (1, 2, 3, 5):
                for in_features in (1, 7, 8, 15, 16, 17, 31, 33, 63, 64, 65, 130, 1000):
                    for out_features, use_threads in ((1, 1), (5, 2), (129, 2), (131, 1)):
                        torch.set_num_threads(use_threads)
                        x, qweight, scale, bias = _case(rows, in_features, out_features, rows * 7919 + in_features)
                        for b in (bias, None):
                            out = torch.full((rows, out_features), float("nan"))
                            function(x.data_ptr(), rows, in_features, qweight.data_ptr(), out_features,
                                     scale.data_ptr(), None if b is None else b.data_ptr(), out.data_ptr())
                            expected = _reference(x, qweight, scale, b)
                            # the error of fp32 sums scales with the sum of the terms' magnitudes
                            magnitude = x.double().abs() @ (qweight.double().abs() * scale.double()[:, None]).T
                            err = ((out.double() - expected).abs() / (magnitude + 1)).max()
                            assert err < 1e-6, (variant, rows, in_features, out_features, float(err))
    finally:
        torch.set_num_threads(threads)


def _dynamic_reference(x, qweight, scale, bias):
    """The dynamic product's rule, written out: each row's step in fp32, its units rounded (ties to even) from the
    fp32 quotient, the sums exact in int64, then fp32 scaling; NaN for rows holding NaN or inf."""
    step = x.abs().amax(dim=1, keepdim=True).clamp_min(TINY) / 127
    finite = torch.isfinite(x).all(dim=1, keepdim=True)
    units = torch.where(finite, torch.round(x / step), 0).long()
    sums = units @ qweight.long().T
    out = sums.float() * torch.where(finite, step, float("nan")) * scale
    return out if bias is None else out + bias


def _dynamic_variants(library):
    variants = ["avx2"] if SUPPORTED["avx2"]() else []
    if SUPPORTED["avx512"]() and library.mmdgen_cpu_has_avx512_vnni():
        variants.append("vnni")
    assert variants, "an x86 CPU without AVX2"
    return variants


def test_every_dynamic_variant_this_cpu_runs_is_the_rounding_rule_bit_for_bit():
    library, reason = gemv_cpu._library()
    assert library is not None, reason
    threads = torch.get_num_threads()
    try:
        for variant in _dynamic_variants(library):
            function = gemv_cpu.variant_function(library, variant, "dynamic")
            for rows in (1, 2, 3, 4, 5, 8, 9, 17):
                for in_features in (1, 7, 15, 16, 17, 63, 64, 65, 127, 130, 1000):
                    for out_features, use_threads in ((1, 1), (3, 2), (5, 1), (129, 2)):
                        torch.set_num_threads(use_threads)
                        x, qweight, scale, bias = _case(rows, in_features, out_features, rows * 7919 + in_features)
                        x[0] *= 1e-3  # rows of very different sizes: each keeps its own step
                        for b in (bias, None):
                            out = torch.full((rows, out_features), float("nan"))
                            assert function(x.data_ptr(), rows, in_features, qweight.data_ptr(), out_features,
                                            scale.data_ptr(), None if b is None else b.data_ptr(),
                                            out.data_ptr()) == 0
                            expected = _dynamic_reference(x, qweight, scale, b)
                            assert torch.equal(out, expected), (variant, rows, in_features, out_features)
                            # and the rule is the product to within half a step per activation
                            step = x.double().abs().amax(dim=1, keepdim=True) / 127
                            bound = step / 2 @ (qweight.double().abs() * scale.double()[:, None]).sum(1, True).T
                            error = (out.double() - _reference(x, qweight, scale, b)).abs()
                            assert bool((error <= 1.001 * bound + 1e-5).all()), (variant, rows, in_features)
    finally:
        torch.set_num_threads(threads)


def test_dynamic_rows_of_zeros_nan_and_inf_and_one_huge_value():
    library, reason = gemv_cpu._library()
    assert library is not None, reason
    x, qweight, scale, bias = _case(6, 70, 9, 4)
    x[1] = 0
    x[2, 3] = float("nan")
    x[3, 69] = float("inf")  # in the tail past the vector steps
    x[4, 5] = -float("inf")
    x[5, 10] = 3e38  # finite: the other units of its row round to 0
    for variant in _dynamic_variants(library):
        function = gemv_cpu.variant_function(library, variant, "dynamic")
        out = torch.empty(6, 9)
        function(x.data_ptr(), 6, 70, qweight.data_ptr(), 9, scale.data_ptr(), bias.data_ptr(), out.data_ptr())
        assert torch.equal(out[1], bias) and bool(out[2:5].isnan().all()), variant
        torch.testing.assert_close(out, _dynamic_reference(x, qweight, scale, bias), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("rows", [1, 2, 16, 33])
def test_int8_linear_takes_the_dynamic_loop_for_any_rows_eager_and_compiled(monkeypatch, rows):
    """The same numbers through the C loop, eagerly and compiled, and through torch._int_mm where the loop does not
    run (ATEN_CPU_CAPABILITY=default, or no compiler)."""
    ready = gemv_cpu.kernel_ready()
    x, qweight, scale, bias = _case(rows, 130, 129, rows)
    calls = []
    original = gemv_cpu.int8_gemv_dynamic
    monkeypatch.setattr(gemv_cpu, "int8_gemv_dynamic", lambda *args: calls.append(args[0].shape) or original(*args))

    def layer(x):  # a product fed by another op of the graph (doubling: exact, so the units are the same)
        return int8_product(x * 2, qweight, scale, bias, mode="int8-dynamic")

    expected = _dynamic_reference(x * 2, qweight, scale, bias)
    eager = layer(x)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)(x)
    monkeypatch.setattr(gemv_cpu, "kernel_ready", lambda: False)
    fallback = layer(x)
    for got in (eager, compiled, fallback):
        assert torch.equal(got, expected)
    assert len(calls) == (2 if ready else 0)  # the eager call, the trace


def test_the_ops_sum_nothing_to_the_bias_when_k_is_zero():
    if not gemv_cpu.kernel_ready():  # only reachable where the loop runs (ATEN_CPU_CAPABILITY=default: it does not)
        assert torch.backends.cpu.get_cpu_capability() not in gemv_cpu.VARIANTS
        return
    bias = torch.randn(5)
    for op in (gemv_cpu.int8_gemv, gemv_cpu.int8_gemv_dynamic):
        out = op(torch.randn(3, 0), torch.zeros(5, 0, dtype=torch.int8), torch.rand(5), bias)
        assert torch.equal(out, bias.expand(3, 5)), op


def test_an_unknown_product_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown product 'int4'; expected one of gemv, dynamic"):
        gemv_cpu.kernel_variant("int4")


def test_dynamic_products_past_the_loops_k_take_int_mm_with_the_same_rule():
    x, qweight, scale, bias = _case(2, gemv_cpu.DYNAMIC_MAX_K + 1, 3, 11)
    got = int8_product(x, qweight, scale, bias, mode="int8-dynamic")
    assert torch.equal(got, _dynamic_reference(x, qweight, scale, bias))


@pytest.mark.parametrize("rows", [1, 2, 4, 5])
def test_int8_linear_takes_the_loop_for_few_rows_eager_and_compiled(monkeypatch, rows):
    """Where torch's CPU capability is AVX2 or AVX-512 (ATEN_CPU_CAPABILITY=default lowers it: the traced loops
    and oneDNN then serve, with the same results)."""
    ready = gemv_cpu.kernel_ready()
    assert ready == (torch.backends.cpu.get_cpu_capability() in gemv_cpu.VARIANTS), gemv_cpu.unavailable_reason()
    x, qweight, scale, bias = _case(rows, 130, 129, rows)
    calls = []
    original = gemv_cpu.int8_gemv
    monkeypatch.setattr(gemv_cpu, "int8_gemv", lambda *args: calls.append(args[0].shape) or original(*args))
    norm_weight = torch.rand(130) + 0.5

    def layer(x):  # a layer norm and a GELU feed the product in the compiled graph
        return int8_product(F.gelu(F.layer_norm(x, (130,), norm_weight)), qweight, scale, bias, mode="int8")

    expected = _reference(F.gelu(F.layer_norm(x.double(), (130,), norm_weight.double())), qweight, scale, bias)
    eager = layer(x)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)(x)
    for got in (eager, compiled):
        assert got.dtype == torch.float32 and got.shape == (rows, 129)
        torch.testing.assert_close(got.double(), expected, rtol=2e-6, atol=2e-6 * float(expected.abs().max()))
    assert len(calls) == (2 if ready and rows <= int8_linear.CPU_GEMV_MAX_ROWS else 0)  # the eager call, the trace


def test_bfloat16_rows_come_back_in_bfloat16():
    x, qweight, scale, bias = _case(2, 40, 24, 5)
    got = int8_product(x.bfloat16(), qweight, scale, bias.bfloat16(), mode="int8")
    expected = _reference(x.bfloat16().float(), qweight, scale, bias.bfloat16().float())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), expected, rtol=1e-2, atol=1e-2 * float(expected.abs().max()))


def _other_paths_serve(reason_part: str) -> None:
    library, reason = gemv_cpu._library()
    assert library is None and reason_part in reason
    assert gemv_cpu.kernel_variant() is None and not gemv_cpu.kernel_ready() and gemv_cpu.unavailable_reason()
    x, qweight, scale, bias = _case(2, 65, 9, 3)
    torch.testing.assert_close(int8_product(x, qweight, scale, bias, mode="int8").double(),
                               _reference(x, qweight, scale, bias), rtol=1e-5, atol=1e-5)
    assert torch.equal(int8_product(x, qweight, scale, bias, mode="int8-dynamic"),
                       _dynamic_reference(x, qweight, scale, bias))


def test_a_compiler_that_fails_leaves_a_reason_a_warning_and_no_library(fresh_build, tmp_path, monkeypatch):
    failing = tmp_path / "failing-cc"
    failing.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo failing-cc 1.0; exit 0; fi\n"
                       "echo 'int8_gemv.c:1: error: no such thing' >&2\nexit 3\n")
    failing.chmod(failing.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CC", str(failing))
    with pytest.warns(UserWarning, match="could not compile the int8 CPU loop \\(exit 3\\).*no such thing"):
        _other_paths_serve("failing-cc could not compile")
    assert list(fresh_build.iterdir()) == []  # nothing half-written, no temporary left


def test_no_compiler_or_an_unwritable_cache_leave_the_other_paths(fresh_build, tmp_path, monkeypatch):
    monkeypatch.setenv("CC", "no-such-compiler-here")
    with pytest.warns(UserWarning, match="CC='no-such-compiler-here' is not a program on PATH"):
        _other_paths_serve("no C compiler found (no-such-compiler-here; set CC)")
    monkeypatch.delenv("CC")
    gemv_cpu._library.cache_clear()
    gemv_cpu._load.cache_clear()
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    for cache in (blocked, blocked / "kernels"):
        gemv_cpu._library.cache_clear()
        gemv_cpu._load.cache_clear()
        monkeypatch.setenv(gemv_cpu.CACHE_ENV, str(cache))
        with pytest.warns(UserWarning, match=f"the kernel cache {cache} .*: {blocked} is a file; expected a "
                                             "folder"):
            _other_paths_serve(str(blocked))


def test_the_library_is_built_once_and_found_again(fresh_build):
    assert gemv_cpu._library()[0] is not None, gemv_cpu._library()[1]
    (library,) = fresh_build.iterdir()
    built = library.stat().st_mtime_ns
    gemv_cpu._library.cache_clear()
    assert gemv_cpu._library()[0] is not None and library.stat().st_mtime_ns == built
    assert library.name.startswith("int8_gemv-") and library.suffix == ".so" and os.access(library, os.R_OK)


@pytest.mark.parametrize("op", [gemv_cpu.int8_gemv, gemv_cpu.int8_gemv_dynamic], ids=["gemv", "dynamic"])
def test_the_ops_refuse_what_the_c_loops_would_read_out_of_bounds(op):
    if not gemv_cpu.kernel_ready():  # only reachable where the loop runs (ATEN_CPU_CAPABILITY=default: it does not)
        assert torch.backends.cpu.get_cpu_capability() not in gemv_cpu.VARIANTS
        return
    x, qweight, scale, bias = _case(2, 40, 24, 9)
    for args, shown in (((x.double(), qweight, scale, bias), "x torch.float64 (2, 40)"),
                        ((x[:, :39], qweight, scale, bias), "x torch.float32 (2, 39)"),
                        ((x, qweight.short(), scale, bias), "qweight torch.int16"),
                        ((x, qweight, scale[:23], bias), "scale torch.float32 (23,)"),
                        ((x, qweight, scale, bias.half()), "bias torch.float16 (24,)"),
                        ((x[0], qweight, scale, None), "x torch.float32 (40,)")):
        shown = shown.replace("(", r"\(").replace(")", r"\)")
        with pytest.raises(ValueError, match=r"expected x \[M, K\] float32.*" + shown):
            op(*args)
    if op is gemv_cpu.int8_gemv_dynamic:  # past DYNAMIC_MAX_K its int32 sums could overflow
        wide = gemv_cpu.DYNAMIC_MAX_K + 1
        with pytest.raises(ValueError, match=f"K={wide} input features overflow its int32 sums; expected K <= "
                                             f"{gemv_cpu.DYNAMIC_MAX_K}"):
            op(torch.ones(1, wide), torch.ones(1, wide, dtype=torch.int8), torch.ones(1))


def test_a_damaged_library_in_the_cache_is_built_again(fresh_build, tmp_path, monkeypatch):
    assert gemv_cpu._library()[0] is not None, gemv_cpu._library()[1]
    (built,) = fresh_build.iterdir()
    other = tmp_path / "other-cache"  # a path this process never loaded (the loader would hand back that handle)
    other.mkdir()
    damaged = other / built.name
    damaged.write_bytes(built.read_bytes()[:100])  # cut short
    monkeypatch.setenv(gemv_cpu.CACHE_ENV, str(other))
    gemv_cpu._library.cache_clear()
    gemv_cpu._load.cache_clear()
    assert gemv_cpu._library()[0] is not None
    assert damaged.stat().st_size == built.stat().st_size and list(other.iterdir()) == [damaged]
