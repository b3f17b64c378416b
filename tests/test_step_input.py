"""The decode step's input in one op: both backends against the pattern sequence built by ``Pattern.build`` and
embedded in float64, every step from the first to one past the last, MusicLM's own input (a whole sequence and
the decode loop, step by step), device-side steps, garbage in unread cells, strides, compilation for sm80/sm90,
bad input refused."""

import json

import pytest
import torch

from mmdgen.generate.loop import DecodeRuntime, Sampling, decode
from mmdgen.kernels.backend import TRITON_IMPORT_ERROR
from mmdgen.kernels.step_input import TRITON_BLOCK_D, pattern_step_input
from mmdgen.model.lm import MusicLM, lm_config, sinusoidal_positions
from mmdgen.model.patterns import PATTERNS, make_pattern
from tests.ptx_check import compile_in_subprocess
from tests.test_mmd import TRITON_DEVICE, needs_triton

BACKEND_DEVICES = [
    pytest.param("torch", torch.device("cpu"), id="torch"),
    pytest.param("triton", TRITON_DEVICE, id="triton", marks=needs_triton),
]
STEP_KINDS = [pytest.param(False, id="int-step"), pytest.param(True, id="tensor-step")]

VOCAB = 11  # codes 0..10, special token 11
DIM = TRITON_BLOCK_D + 44  # two feature blocks, the second partial
FRAMES = 5
# (B, K, delays) of a delay pattern: one codebook (undelayed and delayed), custom delays with gaps, MusicGen's
# default 0..K-1
CONFIGS = [
    pytest.param(1, 1, (0,), id="B1-K1"),
    pytest.param(3, 1, (2,), id="B3-K1-delay2"),
    pytest.param(3, 4, (0, 2, 3, 5), id="B3-K4-delays0235"),
    pytest.param(1, 4, (0, 1, 2, 3), id="B1-K4-default"),
]


def _tables(num_codebooks, dim=DIM, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(num_codebooks, VOCAB + 1, dim, generator=gen).to(dtype)


def _codes(batch, num_codebooks, frames=FRAMES, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, num_codebooks, frames), generator=gen)


def _delayed(codes, delays):
    """The delay pattern's sequence of ``codes``."""
    return make_pattern("delay", codes.shape[1], delays).build(codes, VOCAB)


def reference_input(sequence, step, embeddings, position):
    """float64: column step - 1 of the pattern sequence (special for step 0), embedded one cell at a time."""
    batch, num_codebooks = sequence.shape[:2]
    out = torch.zeros(batch, 1, embeddings.shape[2], dtype=torch.float64)
    for b in range(batch):
        for k in range(num_codebooks):
            token = VOCAB if step == 0 else int(sequence[b, k, step - 1])
            out[b, 0] += embeddings[k, token].double()
        out[b, 0] += position.double()
    return out


def _positions(steps, dim=DIM):
    return sinusoidal_positions(torch.arange(steps), dim)


def _step(step, as_tensor, device):
    return torch.tensor(step, device=device) if as_tensor else step


@pytest.mark.parametrize("as_tensor", STEP_KINDS)
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("batch,num_codebooks,delays", CONFIGS)
def test_delay_sequences_match_the_reference(backend, device, as_tensor, batch, num_codebooks, delays):
    codes, embeddings = _codes(batch, num_codebooks), _tables(num_codebooks)
    sequence = _delayed(codes, delays)
    last = sequence.shape[2]
    table = _positions(last + 1)
    dev = lambda t: t.to(device)  # noqa: E731
    for step in range(last + 1):  # before codebooks start, all present, after they end, the last step
        # the graph-style call (tensor step, whole position table) or the plain one (int step, this step's row)
        positions = dev(table) if as_tensor else dev(table[step])
        out = pattern_step_input(dev(sequence), _step(step, as_tensor, device), dev(embeddings), positions, VOCAB,
                                 backend=backend)
        assert out.shape == (batch, 1, DIM) and out.dtype == torch.float32
        expected = reference_input(sequence, step, embeddings, table[step])
        error = (out.cpu().double() - expected).abs().max()
        assert error <= 1e-6, (step, error)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_tables(backend, device, dtype):
    # The sum is fp32 and rounded once: the error is the output's rounding, at most one ulp (2^-7 relative for
    # bf16, 2^-10 for fp16; a whole ulp because the interpreter's fp32 -> bf16 cast truncates) of the exact sum
    # of the rounded table entries and the fp32 position.
    tol = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    codes, embeddings = _codes(3, 4), _tables(4, dtype=dtype)
    sequence = _delayed(codes, (0, 2, 3, 5))
    table = _positions(FRAMES + 6)
    for step in (0, 1, 4, 7, FRAMES + 5):
        out = pattern_step_input(sequence.to(device), torch.tensor(step, device=device), embeddings.to(device),
                                 table.to(device), VOCAB, backend=backend).cpu()
        assert out.dtype == dtype
        expected = reference_input(sequence, step, embeddings, table[step])
        assert ((out.double() - expected).abs() <= tol * expected.abs() + 1e-30).all(), step


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("name", PATTERNS)
def test_pattern_step_input_matches_the_reference(backend, device, name):
    codes, embeddings = _codes(3, 4, frames=2, seed=5), _tables(4, seed=6)
    pattern = make_pattern(name, 4)
    sequence = pattern.build(codes, VOCAB)
    steps = sequence.shape[2]
    table = _positions(steps + 1)
    for step in range(steps + 1):
        expected = reference_input(sequence, step, embeddings, table[step])
        for as_tensor in (False, True):
            out = pattern_step_input(sequence.to(device), _step(step, as_tensor, device), embeddings.to(device),
                                     table.to(device), VOCAB, backend=backend)
            assert torch.allclose(out.cpu().double(), expected, rtol=0, atol=1e-6), (step, as_tensor)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_unread_cells_may_hold_anything(backend, device):
    """Columns other than the step's (steps not sampled yet, steps long past) hold garbage: nothing changes."""
    sequence, embeddings = _delayed(_codes(3, 4), (0, 2, 3, 5)), _tables(4)
    steps = sequence.shape[2]
    table = _positions(steps + 1)
    garbage = torch.tensor([-3, VOCAB + 7, 2 ** 40])
    for step in range(steps + 1):
        clean = pattern_step_input(sequence, step, embeddings, table, VOCAB, backend="torch")
        buffer = garbage[torch.arange(steps) % 3].expand_as(sequence).clone()
        if step:
            buffer[..., step - 1] = sequence[..., step - 1]
        out = pattern_step_input(buffer.to(device), step, embeddings.to(device), table.to(device), VOCAB,
                                 backend=backend)
        assert torch.equal(out.cpu(), clean), step


def _tiny_lm(seed=0):
    torch.manual_seed(seed)
    # dim 72: not a power of two; K=4 codebooks of 256 codes
    return MusicLM(lm_config("tiny", dim=72, heads=4, text_dim=24)).eval()


def _stacked(lm):
    return torch.stack([embedding.weight for embedding in lm.embeddings]).detach()


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_equals_musiclm_hidden_input(backend, device):
    """fp32: bit-identical to what MusicLM.hidden feeds its first layer for the shifted pattern sequence."""
    lm = _tiny_lm()
    special, frames, delays = lm.cfg.special_token, 4, (0, 1, 2, 3)
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(0, lm.cfg.codebook_size, (2, 4, frames), generator=gen)
    sequence = make_pattern("delay", 4, delays).build(codes, special)
    inputs = torch.cat([torch.full_like(sequence[..., :1], special), sequence[..., :-1]], dim=-1)
    captured = []
    hook = lm.layers[0].register_forward_pre_hook(lambda module, args: captured.append(args[0].clone()))
    try:
        with torch.no_grad():
            lm.hidden(inputs, torch.randn(2, 3, 24, generator=gen), torch.ones(2, 3, dtype=torch.bool))
    finally:
        hook.remove()
    (x,) = captured
    steps = sequence.shape[2]
    table = _positions(steps, lm.cfg.dim)
    for step in range(steps):
        out = pattern_step_input(sequence.to(device), step, _stacked(lm).to(device), table[step].to(device), special,
                                 backend=backend)
        assert torch.equal(out.cpu(), x[:, step:step + 1]), step


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_equals_the_decode_loops_input(backend, device):
    """The loop's step-by-step input (first layer's input at each step of a greedy decode) from the final codes."""
    lm = _tiny_lm(seed=1)
    frames, pattern = 3, make_pattern("delay", 4)
    gen = torch.Generator().manual_seed(4)
    memory = lm.cross_memory(torch.randn(2, 3, 24, generator=gen), torch.ones(2, 3, dtype=torch.bool))
    captured = []
    hook = lm.layers[0].register_forward_pre_hook(lambda module, args: captured.append(args[0].clone()))
    try:
        codes = decode(lm, memory, 2, frames, pattern, Sampling(guidance_scale=None, temperature=0.0),
                       runtime=DecodeRuntime(backend="torch"))
    finally:
        hook.remove()
    assert len(captured) == pattern.num_steps(frames)
    sequence = pattern.build(codes, lm.cfg.special_token)
    table = _positions(len(captured), lm.cfg.dim)
    for step, x in enumerate(captured):
        out = pattern_step_input(sequence.to(device), torch.tensor(step, device=device), _stacked(lm).to(device),
                                 table.to(device), lm.cfg.special_token, backend=backend)
        assert torch.equal(out.cpu(), x), step


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_tensor_steps_out_of_range_read_the_special_token(backend, device):
    """Not range-checked (that would sync): out-of-range steps read special tokens, table rows past P add 0."""
    embeddings, sequence = _tables(4), _codes(2, 4)
    table = _positions(12)
    specials = embeddings[:, VOCAB].double().sum(0)
    for step, position in ((-1, None), (-7, None), (FRAMES + 4, 9), (11, 11), (12, None), (2 ** 40, None)):
        out = pattern_step_input(sequence.to(device), torch.tensor([step], device=device), embeddings.to(device),
                                 table.to(device), VOCAB, backend=backend).cpu()
        expected = specials + (0.0 if position is None else table[position].double())
        assert torch.allclose(out.double(), expected.expand(2, 1, DIM), rtol=0, atol=1e-6), step
        step32 = torch.tensor(min(step, 2 ** 31 - 1), dtype=torch.int32, device=device)
        out = pattern_step_input(sequence.to(device), step32, embeddings.to(device), table[3].to(device), VOCAB,
                                 backend=backend).cpu()
        assert torch.allclose(out.double(), (specials + table[3].double()).expand(2, 1, DIM), rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_codes_outside_the_table_add_nothing(backend, device):
    embeddings, sequence = _tables(2), _codes(2, 2)
    sequence[0, 0, 1], sequence[1, 1, 1] = -1, VOCAB + 1
    position = _positions(3)[2]
    out = pattern_step_input(sequence.to(device), 2, embeddings.to(device), position.to(device), VOCAB,
                             backend=backend).cpu()
    expected = torch.stack([embeddings[1, sequence[0, 1, 1]], embeddings[0, sequence[1, 0, 1]]]) + position
    assert torch.allclose(out[:, 0], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_strided_inputs_and_int32_codes(backend, device):
    sequence, embeddings = _delayed(_codes(3, 3), (1, 0, 3)), _tables(3)
    steps = sequence.shape[2]
    table = _positions(steps + 1)
    expected = [pattern_step_input(sequence, s, embeddings, table, VOCAB, backend="torch") for s in range(steps + 1)]
    sequence_t = torch.full((steps, 3, 3, 2), -9).permute(2, 1, 0, 3)[..., 0]  # strides (2, 6, 18)
    sequence_t.copy_(sequence)
    embeddings_t = embeddings.permute(2, 0, 1).contiguous().permute(1, 2, 0)  # feature stride K * (V + 1)
    table_t = torch.zeros(steps + 1, 2 * DIM)[:, ::2]
    table_t.copy_(table)
    for s in range(steps + 1):  # int64 codes and an int step, int32 codes and a tensor step, in turn
        out = pattern_step_input(sequence_t.int().to(device) if s % 2 else sequence_t.to(device),
                                 _step(s, s % 2 == 1, device), embeddings_t.to(device), table_t.to(device), VOCAB,
                                 backend=backend)
        assert torch.equal(out.cpu(), expected[s]), s


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_empty_batch_and_no_steps(backend, device):
    embeddings, table = _tables(2).to(device), _positions(4).to(device)
    out = pattern_step_input(torch.zeros(0, 2, 3, dtype=torch.long, device=device), 1, embeddings, table, VOCAB,
                             backend=backend)
    assert out.shape == (0, 1, DIM)
    # an empty sequence: only step 0, all special
    out = pattern_step_input(torch.zeros(2, 2, 0, dtype=torch.long, device=device), 0, embeddings, table, VOCAB,
                             backend=backend).cpu()
    expected = embeddings.cpu()[:, VOCAB].sum(0) + table.cpu()[0]
    assert torch.allclose(out, expected.expand(2, 1, DIM), rtol=0, atol=1e-6)


def test_float64_tables_take_the_pytorch_path():
    sequence, embeddings = _delayed(_codes(2, 2), (0, 1)), _tables(2, dtype=torch.float64)
    out = pattern_step_input(sequence, 3, embeddings, _positions(4)[3], VOCAB)  # "auto"
    assert out.dtype == torch.float64
    assert torch.allclose(out, reference_input(sequence, 3, embeddings, _positions(4)[3]), rtol=0, atol=1e-12)
    if TRITON_DEVICE is not None:
        with pytest.raises(ValueError, match="float32, bfloat16 or float16 embeddings, got torch.float64"):
            pattern_step_input(sequence.to(TRITON_DEVICE), 3, embeddings.to(TRITON_DEVICE),
                               _positions(4)[3].to(TRITON_DEVICE), VOCAB, backend="triton")


def test_bad_input_is_refused():
    sequence, embeddings, row = _codes(2, 4), _tables(4), _positions(1)[0]
    call = lambda **kw: pattern_step_input(**dict(dict(sequence=sequence, step=2, embeddings=embeddings,  # noqa: E731
                                                       positions=row, special=VOCAB), **kw))
    with pytest.raises(ValueError, match=r"sequence must have shape \[B, K, S\], got \(4, 5\)"):
        call(sequence=sequence[0])
    with pytest.raises(ValueError, match="sequence must be an int64 or int32 tensor, got torch.float32"):
        call(sequence=sequence.float())
    with pytest.raises(ValueError, match=r"embeddings must have shape \[K, V \+ 1, dim\].*got \(12, 300\)"):
        call(embeddings=embeddings[0])
    with pytest.raises(ValueError, match=r"sequence \(2, 3, 5\) has K=3 codebooks but embeddings \(4, 12, 300\) has "
                                         r"K=4"):
        call(sequence=sequence[:, :3])
    with pytest.raises(ValueError, match="special must be V=11, the last row of the embedding tables"):
        call(special=VOCAB + 1)
    with pytest.raises(ValueError, match=r"positions must be this step's row \[dim\] or a table \[P, dim\] with "
                                         r"dim=300, got \(299,\)"):
        call(positions=row[:-1])
    with pytest.raises(ValueError, match=r"step=6 is out of range: expected 0 <= step <= S = 5"):
        call(step=FRAMES + 1)
    with pytest.raises(ValueError, match=r"step=-1 is out of range"):
        call(step=-1)
    with pytest.raises(ValueError, match="step=3 needs row 3 of the positions table, which has P=3 rows"):
        call(step=3, positions=_positions(3))
    with pytest.raises(ValueError, match=r"a tensor step must hold one value \(0-d or \[1\]\), got shape \(2,\)"):
        call(step=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="a tensor step must be an int64 or int32 tensor, got torch.float32"):
        call(step=torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"step \(an int or a one-element integer tensor\) must be an int, got 1.0"):
        call(step=1.0)
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        call(backend="cuda")
    flattened = make_pattern("flatten", 4).build(sequence, VOCAB)
    with pytest.raises(ValueError, match=r"step=21 is out of range: expected 0 <= step <= S = 20"):
        pattern_step_input(flattened, 21, embeddings, row, VOCAB)


# ----------------------------------------------------------------------------------------------
# Compilation for Ampere and Hopper, without a GPU
# ----------------------------------------------------------------------------------------------


def _compile_report():
    """Compile the kernel for sm80 and sm90 (run with TRITON_INTERPRET=0): bytes of cubin, local-memory accesses."""
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mmdgen.kernels import step_input as module

    kernel = module._step_input_kernel
    variants = {  # name -> (dtypes, constexprs)
        # the CUDA-graph decode step: the step read from memory, the position table
        "graph": (("bf16",), dict(STEP_IN_MEMORY=True, POS_TABLE=True)),
        # an eager step: an int step, this step's position row
        "int-step": (("fp32",), dict(step_ptr=None, STEP_IN_MEMORY=False, POS_TABLE=False)),
    }
    report = {}
    for arch in (80, 90):
        for name, (dtypes, flags) in variants.items():
            for dtype in dtypes:
                constexprs = dict(flags, NUM_CODEBOOKS=4, BLOCK_D=module.TRITON_BLOCK_D)
                sig = {arg: "i32" for arg in kernel.arg_names}
                sig.update(seq_ptr="*i64", step_ptr="*i64", emb_ptr=f"*{dtype}",
                           pos_ptr="*fp32", out_ptr=f"*{dtype}")
                sig.update({key: "constexpr" for key in constexprs})
                compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs),
                                          target=GPUTarget("cuda", arch, 32))
                ptx = compiled.asm["ptx"]
                report[f"sm{arch}-{dtype}-{name}"] = {"local_memory": len(re.findall(r"\b(?:ld|st)\.local", ptx)),
                                                      "cubin_bytes": len(compiled.asm["cubin"])}
    return report


@pytest.mark.skipif(TRITON_IMPORT_ERROR is not None, reason=f"triton does not import: {TRITON_IMPORT_ERROR}")
def test_kernel_compiles_for_sm80_and_sm90():
    code = "import json; from tests.test_step_input import _compile_report; print(json.dumps(_compile_report()))"
    report = json.loads(compile_in_subprocess(code).strip().splitlines()[-1])
    assert len(report) == 4
    for key, entry in report.items():
        assert entry["cubin_bytes"] > 0 and entry["local_memory"] == 0, key
