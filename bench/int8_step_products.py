"""The int8 products of one decode step, alone, on CPU: every linear layer of a MusicGen-sized decoder (random
int8 codes) applied once to ``--rows`` rows, as the compiled step does (2 rows: batch 1 with guidance; 16: batch
8).

Side by side in one run, median time of the whole set over ``--repeats`` rounds (each round runs every method
once, in a new random order: ``harness.interleaved_median_seconds``):

- ``C loop``: ``int8_gemv_cpu.int8_gemv`` (the weight-only path of ``int8_linear`` for up to 4 rows, eager or
  compiled), one call per layer, and ``C loop, compiled``: the same calls inside one ``torch.compile`` graph
  (as the compiled step makes them);
- ``traced``: the compiled weight-only path where the C loop cannot run (``int8_linear._traced_gemv``, up to 2
  rows: inductor's loops, no library call) inside one ``torch.compile`` graph, the layers as MusicLM has them;
- ``traced, q/k/v and heads fused``: the same with each layer's q/k/v as one [3 dim, dim] weight and the K heads
  as one: what fusing the weights themselves would give;
- ``dynamic C loop`` and ``dynamic C loop, compiled``: ``int8_gemv_cpu.int8_gemv_dynamic`` (int8-dynamic's path:
  each row rounded to int8, int8 dot products), eager and in one graph;
- ``dynamic, int_mm``: the same numbers through ``torch._int_mm`` (its path where the C loop cannot run);
- ``fbgemm``: ``quantized::linear_dynamic`` on prepacked weights, called directly (transformers + torch.ao
  dynamic int8's kernel: activations rounded per tensor to 7 bits).

Methods that do not serve ``--rows`` rows are left out (the weight-only C loop past 4 rows, the traced loops
past 2).

The products are chained as in the decoder: each layer's input is the output of the one before (q, k and v share
theirs), so that a compiled graph cannot merge the loops of layers that would run one after the other in a step.
The weights (344 MB at MusicGen-small size) do not fit in the caches: each set streams them from memory. The
int8 bound is their bytes over the copy bandwidth (``dst.copy_(src)`` of a 1 GiB fp32 tensor, bytes read +
written). Prints a table and writes ``bench/results/int8_step_products-<device>.json`` and the text as
``.txt``. Under ``ATEN_CPU_CAPABILITY=avx2`` the C loop runs its AVX2 variant and inductor generates AVX2 code
(what an AVX2-only CPU gets); fbgemm chooses its instructions itself.

    python bench/int8_step_products.py                  # MusicGen-small: 24 layers, width 1024, FFN 4096
    python bench/int8_step_products.py --layers 8 --dim 512 --ffn 2048 --rows 1
    python bench/int8_step_products.py --rows 16 --out bench/results/int8_step_products-cpu-rows16.json
    ATEN_CPU_CAPABILITY=avx2 python bench/int8_step_products.py --out bench/results/int8_step_products-cpu-avx2.json
"""

from __future__ import annotations

import argparse

import torch
from harness import (FBGEMM_REDUCE_RANGE, RESULTS, available_bytes, device_name, fbgemm_packed,
                     interleaved_median_seconds, median_seconds, output_path, positive_int, write_json)

from mmdgen.kernels import int8_gemv_cpu
from mmdgen.kernels.int8_linear import (CPU_GEMV_MAX_ROWS, DYNAMIC_LEVELS, TRACED_GEMV_MAX_ROWS, _torch_int8_linear,
                                        _traced_gemv)


def _layer_shapes(layers: int, dim: int, ffn: int, heads: int, codes: int, fused: bool) -> list[tuple[int, int]]:
    """(out, in) of every linear layer a step applies: self-attention q, k, v, out; cross-attention q, out; the
    FFN; the K heads."""
    attention = [(3 * dim, dim)] if fused else [(dim, dim)] * 3
    per_layer = attention + [(dim, dim)] * 3 + [(ffn, dim), (dim, ffn)]
    return per_layer * layers + ([(heads * codes, dim)] if fused else [(codes, dim)] * heads)


def _step(product, weights: list, x: torch.Tensor, fused: bool, layers: int, dim: int) -> list[torch.Tensor]:
    """The step's products in the decoder's order, each layer's input the output of the one before (q, k and v
    share theirs), so that no product can start before its input exists: ``product(x, codes, scale)``."""
    outputs, i, h = [], 0, x
    for _ in range(layers):
        if fused:
            qkv = product(h, *weights[i])
            outputs.append(qkv)
            v, i = qkv[:, 2 * dim:], i + 1
        else:
            outputs += [product(h, *weights[i]), product(h, *weights[i + 1])]
            v, i = product(h, *weights[i + 2]), i + 3
        for _ in range(3):  # self-attention out, cross-attention q and out
            v, i = product(v, *weights[i]), i + 1
        h, i = product(product(v, *weights[i]), *weights[i + 1]), i + 2
        outputs.append(h)
    return outputs + [product(h, *w) for w in weights[i:]]


def _copy_bandwidth() -> float:
    src = torch.empty(2**28)
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), 5)
    return 2 * src.numel() * src.element_size() / seconds


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=positive_int, default=24)
    parser.add_argument("--dim", type=positive_int, default=1024)
    parser.add_argument("--ffn", type=positive_int, default=4096)
    parser.add_argument("--heads", type=positive_int, default=4, help="output heads (codebooks)")
    parser.add_argument("--codes", type=positive_int, default=2048, help="codes per codebook")
    parser.add_argument("--rows", type=positive_int, default=2, help="rows (2: batch 1 with guidance, 16: batch 8)")
    parser.add_argument("--repeats", type=positive_int, default=15)
    parser.add_argument("--out", type=output_path, default=RESULTS / "int8_step_products-cpu.json",
                        help="JSON path (the table goes beside it as .txt)")
    args = parser.parse_args(argv)
    shape_args = (args.layers, args.dim, args.ffn, args.heads, args.codes)
    # both sets of codes and fbgemm's packed copy, with room to spare
    needed = 5 * sum(out * inp for out, inp in _layer_shapes(*shape_args, False))
    if needed > available_bytes(torch.device("cpu")):
        parser.error(f"--layers {args.layers} --dim {args.dim} --ffn {args.ffn} --heads {args.heads} --codes "
                     f"{args.codes}: the codes and their copies need about {needed / 2**30:.1f} GiB, more than this "
                     f"machine has available ({available_bytes(torch.device('cpu')) / 2**30:.1f} GiB)")
    torch.manual_seed(0)
    torch.set_flush_denormal(True)  # a chain of 196 products may drift toward zero: no slow denormal arithmetic
    sets = {}
    for fused in (False, True):
        # scales that keep a row's magnitude about the same from one product to the next
        sets[fused] = [(torch.randint(-127, 128, shape, dtype=torch.int8), torch.rand(shape[0]) / (32 * shape[1] ** 0.5))
                       for shape in _layer_shapes(*shape_args, fused)]
    x = torch.randn(args.rows, args.dim)

    def chained(product, fused: bool):
        return lambda: _step(product, sets[fused], x, fused, args.layers, args.dim)

    methods = {}
    if int8_gemv_cpu.kernel_ready():
        loops = {"C loop": int8_gemv_cpu.int8_gemv} if args.rows <= CPU_GEMV_MAX_ROWS else {}
        loops["dynamic C loop"] = int8_gemv_cpu.int8_gemv_dynamic
        for name, product in loops.items():
            methods[name] = chained(product, False)
            methods[f"{name}, compiled"] = torch.compile(methods[name], fullgraph=True, dynamic=False)
    else:
        print(f"no C loop: {int8_gemv_cpu.unavailable_reason()}")
    if args.rows <= TRACED_GEMV_MAX_ROWS:
        for fused, name in ((False, "traced"), (True, "traced, q/k/v and heads fused")):
            methods[name] = torch.compile(chained(_traced_gemv, fused), fullgraph=True, dynamic=False)
    methods["dynamic, int_mm"] = chained(lambda h, q, s: _torch_int8_linear(h, q, s, DYNAMIC_LEVELS), False)
    packed = {id(q): fbgemm_packed(q, s) for q, s in sets[False]}
    methods["fbgemm"] = chained(lambda h, q, s: torch.ops.quantized.linear_dynamic(h.contiguous(), packed[id(q)],
                                                                                     FBGEMM_REDUCE_RANGE), False)
    weights = sets[False]
    device = device_name(torch.device("cpu"))
    capability = torch.backends.cpu.get_cpu_capability()  # ATEN_CPU_CAPABILITY lowers it: inductor's and our loops
    weight_bytes = sum(q.numel() for q, _ in weights)
    bandwidth = _copy_bandwidth()
    bound_ms = weight_bytes / bandwidth * 1e3
    with torch.no_grad():
        results = {name: seconds * 1e3 for name, seconds in interleaved_median_seconds(methods, args.repeats).items()}
    lines = [f"the int8 products of one decode step ({args.layers} layers, width {args.dim}, FFN {args.ffn}, "
             f"{args.heads} x {args.codes} heads: {len(weights)} layers, {weight_bytes / 1e6:.1f} MB of codes), "
             f"{args.rows} rows, on {device}, torch CPU capability {capability} (fbgemm picks its "
             f"own); median of {args.repeats}",
             f"copy bandwidth {bandwidth / 1e9:.1f} GB/s: int8 bound {bound_ms:.2f} ms",
             f"{'method':32} {'ms':>7} {'of bound':>9}"]
    lines += [f"{name:32} {ms:7.2f} {bound_ms / ms:9.2f}" for name, ms in results.items()]
    text = "\n".join(lines)
    print(text)
    write_json(args.out, {"device": device, "cpu_capability": capability, "args": {**vars(args), "out": str(args.out)}, "weight_bytes": weight_bytes,
                          "copy_bytes_per_s": bandwidth, "bound_ms": bound_ms, "ms": results})
    args.out.with_suffix(".txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
