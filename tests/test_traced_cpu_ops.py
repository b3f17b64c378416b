"""The decode step's small ops as inductor loops (``mmdgen.kernels.backend.traced_on_cpu``): inside a
``torch.compile`` graph on CPU the weight-only int8 product of up to two rows and the decode attention are written
as elementwise products and sums. Each is compared, compiled, with a float64 reference over awkward shapes (odd
widths, a K that is no multiple of the vector width, padded and fully masked rows, a tensor length), with its
input made by an elementwise producer in the same graph (which inductor must not recompute per output channel),
and checked to have taken the traced path (or not, past two rows)."""

import pytest
import torch
import torch.nn.functional as F

import mmdgen.kernels.attention as attention
import mmdgen.kernels.int8_gemv_cpu as int8_gemv_cpu
import mmdgen.kernels.int8_linear as int8_linear
from mmdgen.kernels.attention import decode_attention
from mmdgen.kernels.int8_linear import int8_linear as int8_product
from mmdgen.kernels.int8_linear import quantize_weight


@pytest.fixture(autouse=True)
def _without_the_c_loop(monkeypatch):
    """The traced loops serve where the C loop cannot (no compiler, no AVX2): take them here."""
    monkeypatch.setattr(int8_gemv_cpu, "kernel_ready", lambda: False)


def _spy(monkeypatch, module, name: str) -> list:
    """Record the calls of ``module.name`` (made while dynamo traces: once per compiled graph)."""
    calls, original = [], getattr(module, name)

    def spy(*args):
        calls.append(args[0].shape)
        return original(*args)

    monkeypatch.setattr(module, name, spy)
    return calls


def _compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, dynamic=False)


@pytest.mark.parametrize("rows", [0, 1, 2, 3])
@pytest.mark.parametrize("in_features,out_features,bias", [(37, 5, False), (130, 129, True)])
def test_the_traced_int8_product_matches_float64(monkeypatch, rows, in_features, out_features, bias):
    gen = torch.Generator().manual_seed(in_features + rows)
    qweight, scale = quantize_weight(torch.randn(out_features, in_features, generator=gen))
    bias_t = torch.randn(out_features, generator=gen) if bias else None
    x = torch.randn(rows, in_features, generator=gen) * 3
    norm_weight = torch.rand(in_features, generator=gen) + 0.5
    traced = _spy(monkeypatch, int8_linear, "_traced_gemv")

    def layer(x):  # a layer norm and a GELU feed the product: both are inlined unless x is stored
        h = F.gelu(F.layer_norm(x, (in_features,), norm_weight))
        return int8_product(h, qweight, scale, bias_t, mode="int8")

    got = _compiled(layer)(x)
    h64 = F.gelu(F.layer_norm(x.double(), (in_features,), norm_weight.double()))
    expected = h64 @ (qweight.double() * scale.double()[:, None]).T
    if bias:
        expected = expected + bias_t.double()
    assert got.dtype == torch.float32 and got.shape == (rows, out_features)
    largest = float(expected.abs().max()) if rows else 1.0
    torch.testing.assert_close(got.double(), expected, rtol=2e-6, atol=2e-6 * largest)
    assert len(traced) == (1 if 0 < rows <= int8_linear.TRACED_GEMV_MAX_ROWS else 0)  # no rows: nothing to trace


def test_the_dynamic_mode_and_eager_calls_keep_their_paths(monkeypatch):
    """int8-dynamic keeps its rounded activations when compiled (the traced weight-only loop is not taken); an
    eager call never traces."""
    qweight, scale = quantize_weight(torch.randn(9, 33))
    x = torch.randn(2, 33)
    traced = _spy(monkeypatch, int8_linear, "_traced_gemv")
    dynamic = _compiled(lambda x: int8_product(x, qweight, scale, mode="int8-dynamic"))(x)
    torch.testing.assert_close(dynamic, int8_product(x, qweight, scale, mode="int8-dynamic"))
    int8_product(x, qweight, scale, mode="int8")
    assert traced == []


def _attention_case(seed: int, queries: int, s_max: int, head_dim: int):
    gen = torch.Generator().manual_seed(seed)
    batch, heads = 3, 2
    query = torch.randn(batch, heads, queries, head_dim, generator=gen)
    keys = torch.randn(batch, heads, s_max, head_dim, generator=gen) * 2
    values = torch.randn(batch, heads, s_max, head_dim, generator=gen)
    key_mask = torch.rand(batch, s_max, generator=gen) > 0.3
    key_mask[1] = False  # a row that sees nothing: 0
    key_mask[2, :] = True
    return query, keys, values, key_mask


@pytest.mark.parametrize("queries,s_max,head_dim,cache_dtype", [(1, 1, 8, torch.float32), (1, 70, 10, torch.float32),
                                                              (3, 17, 64, torch.float32), (1, 70, 10, torch.bfloat16),
                                                              (3, 17, 64, torch.float16)])
@pytest.mark.parametrize("case", ["self-int", "self-tensor", "cross-masked"])
def test_the_traced_attention_matches_float64(monkeypatch, queries, s_max, head_dim, cache_dtype, case):
    """A 16-bit cache under the fp32 query is widened in the loops: the reference is the rounded cache in float64."""
    query, keys, values, key_mask = _attention_case(s_max + queries, queries, s_max, head_dim)
    keys, values = keys.to(cache_dtype), values.to(cache_dtype)
    length = max(s_max - 2, queries)
    traced = _spy(monkeypatch, attention, "_traced_attention")
    if case == "self-int":
        args, kwargs = (length,), dict(causal=True)
    elif case == "self-tensor":
        args, kwargs = (torch.tensor(length),), dict(causal=True)
    else:
        args, kwargs = (s_max,), dict(causal=False, key_mask=key_mask)

    def attend(query, keys, values):  # the query made by an elementwise op in the graph, as in the step
        return decode_attention(torch.tanh(query) * 2, keys, values, *args, **kwargs)

    got = _compiled(attend)(query, keys, values)
    expected = decode_attention(torch.tanh(query.double()) * 2, keys.double(), values.double(), *args,
                                backend="torch", **kwargs)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    assert len(traced) == 1
    if case == "cross-masked":
        assert bool((got[1] == 0).all())  # the fully masked row
