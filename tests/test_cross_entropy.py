"""The fused heads + cross-entropy against F.cross_entropy on full float64 logits, on both backends."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from mmdgen.kernels import cross_entropy
from mmdgen.kernels.backend import TRITON_IMPORT_ERROR
from mmdgen.kernels.cross_entropy import linear_cross_entropy
from tests.ptx_check import compile_in_subprocess
from tests.test_mmd import TRITON_DEVICE, needs_triton

BACKEND_DEVICES = [
    pytest.param("torch", torch.device("cpu"), id="torch"),
    pytest.param("triton", TRITON_DEVICE, id="triton", marks=needs_triton),
]


def reference(hidden, weight, targets, ignore_index=-100):
    """(loss, per-codebook means) from the full [N, K, V] float64 logits: F.cross_entropy per codebook with
    ignore_index, averaged over K; a codebook without valid targets counts 0 (F.cross_entropy gives NaN)."""
    logits = torch.einsum("nc,kvc->nkv", hidden.double(), weight.double())
    per = []
    for k in range(weight.shape[0]):
        if (targets[:, k] != ignore_index).any():
            per.append(F.cross_entropy(logits[:, k], targets[:, k], ignore_index=ignore_index))
        else:
            per.append(logits.sum() * 0.0)
    per = torch.stack(per)
    return per.sum() / weight.shape[0], per


def reference_grads(hidden, weight, targets, ignore_index=-100):
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    loss, per = reference(h, w, targets, ignore_index)
    loss.backward()
    return loss.detach(), per.detach(), h.grad, w.grad


def make_inputs(n, c, k, v, seed, ignored=0.0, dead_codebook=None, dtype=torch.float32, ignore_index=-100):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, c, generator=gen).to(dtype)
    weight = (torch.randn(k, v, c, generator=gen) / c ** 0.5 * 2.0).to(dtype)
    targets = torch.randint(0, v, (n, k), generator=gen)
    targets[torch.rand(n, k, generator=gen) < ignored] = ignore_index
    if dead_codebook is not None:
        targets[:, dead_codebook] = ignore_index
    return hidden, weight, targets


def ours(hidden, weight, targets, backend, device, scale=1.0, **kwargs):
    h = hidden.to(device).requires_grad_()
    w = weight.to(device).requires_grad_()
    loss, per = linear_cross_entropy(h, w, targets.to(device), backend=backend, **kwargs)
    (scale * loss).backward()
    return loss.detach().cpu(), per.cpu(), h.grad.cpu(), w.grad.cpu()


def assert_close(value, ref, rel, name):
    err = (value.double() - ref).abs().max().item()
    bound = rel * max(ref.abs().max().item(), 1e-30)
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g} (max |ref| {ref.abs().max().item():.3g})"


# (N, C, K, V, chunk_rows, ignored fraction, fully ignored codebook, ignore_index):
CASES = [
    pytest.param(1, 5, 1, 17, None, 0.0, None, -100, id="N1-K1-V17"),
    pytest.param(23, 7, 4, 17, 5, 0.5, 1, -100, id="chunks-of-5-many-ignored-dead-codebook"),
    pytest.param(40, 24, 4, 300, 16, 0.2, None, -100, id="V300-3-chunks"),
    pytest.param(6, 8, 2, 2049, 4, 0.3, None, 2048, id="V2049-special-token-ignored"),
]


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("n,c,k,v,chunk,ignored,dead,ignore_index", CASES)
def test_matches_reference_fp32(backend, device, n, c, k, v, chunk, ignored, dead, ignore_index):
    hidden, weight, targets = make_inputs(n, c, k, v, seed=n * 31 + v, ignored=ignored, dead_codebook=dead,
                                          ignore_index=ignore_index)
    if ignore_index >= 0:  # the special token is a class in range that is ignored
        targets[0, 0] = ignore_index
    ref_loss, ref_per, ref_gh, ref_gw = reference_grads(hidden, weight, targets, ignore_index)
    loss, per, gh, gw = ours(hidden, weight, targets, backend, device, chunk_rows=chunk, ignore_index=ignore_index)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert per.shape == (k,) and per.dtype == torch.float32 and not per.requires_grad
    assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
    assert_close(per, ref_per, 1e-5, "per codebook")
    if dead is not None:
        assert float(per[dead]) == 0.0 and float(gw[dead].abs().max()) == 0.0
    assert gh.dtype == torch.float32 and gw.dtype == torch.float32
    assert_close(gh, ref_gh, 1e-5, "grad hidden")
    assert_close(gw, ref_gw, 1e-5, "grad weight")


@needs_triton
def test_triton_kernel_over_several_v_blocks(monkeypatch):
    """V = 200 over blocks of 64: three full blocks and a partial one, in both passes."""
    monkeypatch.setattr(cross_entropy, "TRITON_BLOCK_V", 64)
    hidden, weight, targets = make_inputs(12, 6, 2, 200, seed=4, ignored=0.25)
    targets[1, 0], targets[2, 1] = 199, 0  # the first and the last class
    ref_loss, ref_per, ref_gh, ref_gw = reference_grads(hidden, weight, targets)
    loss, per, gh, gw = ours(hidden, weight, targets, "triton", TRITON_DEVICE, chunk_rows=5)
    assert abs(float(loss) - float(ref_loss)) <= 1e-5 * float(ref_loss)
    assert_close(per, ref_per, 1e-5, "per codebook")
    assert_close(gh, ref_gh, 1e-5, "grad hidden")
    assert_close(gw, ref_gw, 1e-5, "grad weight")


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_inputs(backend, device, dtype):
    """Against the float64 reference on the same rounded inputs. The loss and per-codebook values are
    computed in fp32 from exact products: 1e-4 relative. The gradients come back in the input dtype
    (rounding 2^-8 bf16, 2^-11 fp16) and, on the Triton path, were formed from the logits' gradient
    rounded to the input dtype: 1e-2 (bf16) and 2e-3 (fp16) of the largest entry."""
    hidden, weight, targets = make_inputs(30, 16, 4, 100, seed=11, ignored=0.2, dtype=dtype)
    ref_loss, ref_per, ref_gh, ref_gw = reference_grads(hidden, weight, targets)
    loss, per, gh, gw = ours(hidden, weight, targets, backend, device, chunk_rows=8)
    assert loss.dtype == torch.float32 and gh.dtype == dtype and gw.dtype == dtype
    assert abs(float(loss) - float(ref_loss)) <= 1e-4 * float(ref_loss)
    assert_close(per, ref_per, 1e-4, "per codebook")
    rel = 1e-2 if dtype == torch.bfloat16 else 2e-3
    assert_close(gh, ref_gh, rel, "grad hidden")
    assert_close(gw, ref_gw, rel, "grad weight")


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_gradient_skipped_or_partial_and_scaled_by_grad_output(backend, device):
    hidden, weight, targets = make_inputs(9, 5, 3, 33, seed=2, ignored=0.3)
    ref_loss, ref_per, ref_gh, ref_gw = reference_grads(hidden, weight, targets)
    hidden, weight, targets = hidden.to(device), weight.to(device), targets.to(device)
    with torch.no_grad():
        loss, per = linear_cross_entropy(hidden.requires_grad_(), weight, targets, backend=backend)
    assert loss.grad_fn is None and abs(float(loss) - float(ref_loss)) <= 1e-5 * float(ref_loss)
    hidden.requires_grad_(False)
    loss, _ = linear_cross_entropy(hidden, weight, targets, backend=backend)
    assert not loss.requires_grad
    # only the weight needs a gradient, and the loss is scaled before backward
    w = weight.clone().requires_grad_()
    loss, _ = linear_cross_entropy(hidden, w, targets, backend=backend, chunk_rows=4)
    (2.5 * loss).backward()
    assert hidden.grad is None
    assert_close(w.grad.cpu(), 2.5 * ref_gw, 1e-5, "grad weight")


def test_gradcheck_float64_torch_path():
    hidden, weight, targets = make_inputs(5, 3, 2, 4, seed=7, dtype=torch.float64)
    targets[1, 0] = targets[3, 1] = -100
    h, w = hidden.requires_grad_(), weight.requires_grad_()

    def loss(h, w):
        return linear_cross_entropy(h, w, targets, backend="torch", chunk_rows=2)[0]

    assert loss(h, w).dtype == torch.float64
    assert torch.autograd.gradcheck(loss, (h, w), eps=1e-6, atol=1e-8)


def test_float64_runs_on_the_torch_path_only():
    hidden, weight, targets = make_inputs(4, 3, 2, 5, seed=1, dtype=torch.float64)
    loss, _ = linear_cross_entropy(hidden, weight, targets)  # auto: the PyTorch path
    assert abs(float(loss) - float(reference(hidden, weight, targets)[0])) < 1e-12
    if TRITON_DEVICE is not None:
        with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
            linear_cross_entropy(hidden.to(TRITON_DEVICE), weight.to(TRITON_DEVICE), targets.to(TRITON_DEVICE),
                                 backend="triton")


def test_int32_targets_and_empty_batch():
    hidden, weight, targets = make_inputs(7, 4, 2, 9, seed=5)
    loss64, _ = linear_cross_entropy(hidden, weight, targets, backend="torch")
    loss32, _ = linear_cross_entropy(hidden, weight, targets.int(), backend="torch")
    assert float(loss32) == float(loss64)
    h = torch.zeros(0, 4, requires_grad=True)
    w = weight.clone().requires_grad_()
    loss, per = linear_cross_entropy(h, w, torch.zeros(0, 2, dtype=torch.int64), backend="torch")
    loss.backward()
    assert loss.detach().item() == 0.0 and per.tolist() == [0.0, 0.0] and w.grad.abs().max().item() == 0.0


class LargestStorage(TorchDispatchMode):
    """Records the largest storage any op returns (every tensor the function creates passes here)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.bytes = max(self.bytes, t.untyped_storage().nbytes())
        return out


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_scratch_is_one_chunk_of_logits_not_n_k_v(backend, device):
    n, c, k, v, chunk = 48, 4, 4, 300, 8
    hidden, weight, targets = make_inputs(n, c, k, v, seed=9, ignored=0.1)
    h, w = hidden.to(device).requires_grad_(), weight.to(device).requires_grad_()
    with LargestStorage() as tracker:
        loss, _ = linear_cross_entropy(h, w, targets.to(device), backend=backend, chunk_rows=chunk)
        loss.backward()
    bound = 4 * max(chunk * v, k * v * c, n * c)  # a logits chunk, grad weight, grad hidden (fp32)
    assert tracker.bytes <= bound < 4 * n * k * v // 2
    ref_loss, _, ref_gh, ref_gw = reference_grads(hidden, weight, targets)
    assert abs(float(loss.detach()) - float(ref_loss)) <= 1e-5 * float(ref_loss)
    assert_close(h.grad.cpu(), ref_gh, 1e-5, "grad hidden")


def test_large_n_torch_path_matches_a_chunked_reference():
    """N = 4500, K = 4, V = 2048: naive fp32 logits would be 147 MB; chunks of 1024 rows use 8 MB."""
    n, c, k, v, chunk = 4500, 8, 4, 2048, 1024
    hidden, weight, targets = make_inputs(n, c, k, v, seed=13, ignored=0.1)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with LargestStorage() as tracker:
        loss, per = linear_cross_entropy(h, w, targets, backend="torch", chunk_rows=chunk)
        loss.backward()
    assert 4 * chunk * v // 2 < tracker.bytes <= 4 * chunk * v  # the logits chunk is the largest tensor
    # reference: F.cross_entropy per chunk of 1000 rows (sums), float64 logits, autograd
    hr, wr = hidden.double().requires_grad_(), weight.double().requires_grad_()
    counts = (targets != -100).sum(dim=0).double()
    sums = torch.zeros(k, dtype=torch.float64)
    for r0 in range(0, n, 1000):
        logits = torch.einsum("nc,kvc->nkv", hr[r0:r0 + 1000], wr)
        part = torch.stack([F.cross_entropy(logits[:, j], targets[r0:r0 + 1000, j], reduction="sum")
                            for j in range(k)])
        (part / counts).sum().div(k).backward()
        sums += part.detach()
    ref_per = sums / counts
    assert_close(per, ref_per, 1e-5, "per codebook")
    assert abs(float(loss.detach()) - float(ref_per.mean())) <= 1e-5 * float(ref_per.mean())
    assert_close(h.grad, hr.grad, 1e-4, "grad hidden")
    assert_close(w.grad, wr.grad, 1e-4, "grad weight")


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_bad_inputs(backend):
    h, w, t = make_inputs(4, 3, 2, 17, seed=0)
    device = torch.device("cpu") if backend == "torch" else TRITON_DEVICE
    h, w, t = h.to(device), w.to(device), t.to(device)

    def call(hidden=h, weight=w, targets=t, **kwargs):
        return linear_cross_entropy(hidden, weight, targets, backend=backend, **kwargs)

    with pytest.raises(ValueError, match=r"hidden must have shape \[N, C\]"):
        call(hidden=h[None])
    with pytest.raises(ValueError, match=r"weight must have shape \[K, V, C\]"):
        call(weight=w[0])
    with pytest.raises(ValueError, match=r"targets must have shape \[N, K\]"):
        call(targets=t[:, :1])
    with pytest.raises(ValueError, match=r"targets must have shape \[N, K\]"):
        call(targets=t[0])
    with pytest.raises(ValueError, match="C=3 features but weight .* has C=5"):
        call(weight=torch.randn(2, 17, 5, device=device))
    with pytest.raises(ValueError, match="share dtype and device"):
        call(weight=w.double())
    with pytest.raises(ValueError, match="share dtype and device"):
        call(weight=w.to("meta"))
    with pytest.raises(ValueError, match="floating point"):
        call(hidden=h.long(), weight=w.long())
    with pytest.raises(ValueError, match="int64"):
        call(targets=t.float())
    with pytest.raises(ValueError, match="chunk_rows"):
        call(chunk_rows=0)
    with pytest.raises(ValueError, match="unknown backend"):
        linear_cross_entropy(h, w, t, backend="cuda")
    bad = t.clone()
    bad[2, 1] = 17
    with pytest.raises(ValueError, match=r"target 17 at position 2 of codebook 1 .* 0 <= target < V=17"):
        call(targets=bad)
    bad[2, 1] = -1
    with pytest.raises(ValueError, match=r"target -1 at position 2 of codebook 1"):
        call(targets=bad)
    bad[2, 1] = -100
    bad[0, 0] = -100
    with pytest.raises(ValueError, match="target -100 at position 0 of codebook 0 .* ignore_index=-1"):
        call(targets=bad, ignore_index=-1)


@pytest.mark.skipif(TRITON_IMPORT_ERROR is not None, reason=f"triton does not import: {TRITON_IMPORT_ERROR}")
def test_kernel_compiles_for_ampere_and_hopper():
    """The row kernel compiles (no GPU needed) and its exponentials use the special-function unit."""
    script = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mmdgen.kernels.cross_entropy import _cross_entropy_rows_kernel as kernel, TRITON_BLOCK_V
sig = {"logits_ptr": "*fp32", "target_ptr": "*i64", "loss_ptr": "*fp32", "num_classes": "i32", "stride_row": "i32",
       "stride_target": "i32", "ignore_index": "i32", "WITH_GRAD": "constexpr", "BLOCK_V": "constexpr"}
for arch in (80, 90):
    for with_grad in (True, False):
        compiled = triton.compile(ASTSource(fn=kernel, signature=sig,
                                            constexprs={"WITH_GRAD": with_grad, "BLOCK_V": TRITON_BLOCK_V}),
                                  target=GPUTarget("cuda", arch, 32))
        assert "ex2.approx" in compiled.asm["ptx"] and compiled.asm["cubin"], (arch, with_grad)
print("ok")
"""
    assert compile_in_subprocess(script).strip() == "ok"
