"""The int8 products of one decode step, alone, on CPU: every linear layer of a MusicGen-sized decoder (random
int8 codes) applied once to ``--rows`` rows, as the compiled step does at batch 1 (2 rows with guidance).

Side by side in one run, median time of the whole set over ``--repeats``:

- ``C loop``: ``int8_gemv_cpu.int8_gemv`` (the weight-only path of ``int8_linear`` for up to 4 rows, eager or
  compiled), one call per layer, and ``C loop, compiled``: the same calls inside one ``torch.compile`` graph
  (as the compiled step makes them);
- ``traced``: the compiled weight-only path where the C loop cannot run (``int8_linear._traced_gemv``, up to 2
  rows: inductor's loops, no library call) inside one ``torch.compile`` graph for the whole set, the layers as
  MusicLM has them (q, k and v apart: inductor fuses their loops, as they share an input; here they take
  independent inputs, so this is the unfused case);
- ``traced, q/k/v and heads fused``: the same with each layer's q/k/v as one [3 dim, dim] weight and the K heads
  as one: what fusing the weights themselves would give;
- ``fbgemm``: ``quantized::linear_dynamic`` on prepacked weights, called directly (int8-dynamic's kernel, and
  transformers + torch.ao dynamic int8's);
- ``_int_mm``: ``torch._int_mm`` of int8 rows against the transposed codes (the product under the eager
  weight-only path).

The weights (344 MB at MusicGen-small size) do not fit in the caches: each set streams them from memory. The
int8 bound is their bytes over the copy bandwidth (``dst.copy_(src)`` of a 1 GiB fp32 tensor, bytes read +
written). Prints a table and writes ``bench/results/int8_step_products-<device>.json`` and the text as ``.txt``.

    python bench/int8_step_products.py                  # MusicGen-small: 24 layers, width 1024, FFN 4096
    python bench/int8_step_products.py --layers 8 --dim 512 --ffn 2048 --rows 1
"""

from __future__ import annotations

import argparse

import torch
from harness import RESULTS, available_bytes, device_name, median_seconds, output_path, positive_int, write_json

from mmdgen.kernels import int8_gemv_cpu
from mmdgen.kernels.int8_linear import DYNAMIC_REDUCE_RANGE, TRACED_GEMV_MAX_ROWS, _traced_gemv, packed_dynamic_weight


def _layer_shapes(layers: int, dim: int, ffn: int, heads: int, codes: int, fused: bool) -> list[tuple[int, int]]:
    """(out, in) of every linear layer a step applies: self-attention q, k, v, out; cross-attention q, out; the
    FFN; the K heads."""
    attention = [(3 * dim, dim)] if fused else [(dim, dim)] * 3
    per_layer = attention + [(dim, dim)] * 3 + [(ffn, dim), (dim, ffn)]
    return per_layer * layers + ([(heads * codes, dim)] if fused else [(codes, dim)] * heads)


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
    parser.add_argument("--rows", type=positive_int, default=2, help="rows (2: batch 1 with guidance)")
    parser.add_argument("--repeats", type=positive_int, default=15)
    parser.add_argument("--out", type=output_path, default=RESULTS / "int8_step_products-cpu.json",
                        help="JSON path (the table goes beside it as .txt)")
    args = parser.parse_args(argv)
    if args.rows > TRACED_GEMV_MAX_ROWS:
        parser.error(f"--rows {args.rows}: the traced loops serve up to {TRACED_GEMV_MAX_ROWS} rows "
                     "(int8_linear.TRACED_GEMV_MAX_ROWS); more rows are measured by bench/int8_linear.py")
    shape_args = (args.layers, args.dim, args.ffn, args.heads, args.codes)
    # both sets of codes, fbgemm's packed copy and the transposed copy, with a quarter to spare
    needed = 5 * sum(out * inp for out, inp in _layer_shapes(*shape_args, False))
    if needed > available_bytes(torch.device("cpu")):
        parser.error(f"--layers {args.layers} --dim {args.dim} --ffn {args.ffn} --heads {args.heads} --codes "
                     f"{args.codes}: the codes and their copies need about {needed / 2**30:.1f} GiB, more than this "
                     f"machine has available ({available_bytes(torch.device('cpu')) / 2**30:.1f} GiB)")
    torch.manual_seed(0)
    sets = {}
    for fused in (False, True):
        shapes = _layer_shapes(*shape_args, fused)
        weights = [(torch.randint(-127, 128, shape, dtype=torch.int8), torch.rand(shape[0]) / 127)
                   for shape in shapes]
        inputs = {width: torch.randn(args.rows, width) for width in {shape[1] for shape in shapes}}
        sets[fused] = (weights, inputs)

    def traced(fused: bool):
        weights, inputs = sets[fused]
        return torch.compile(lambda: [_traced_gemv(inputs[q.shape[1]], q, s) for q, s in weights],
                             fullgraph=True, dynamic=False)

    weights, inputs = sets[False]
    packed = [packed_dynamic_weight(q, s) for q, s in weights]
    transposed = [q.T.contiguous() for q, _ in weights]
    int_rows = {width: torch.randint(-127, 128, (args.rows, width), dtype=torch.int8) for width in inputs}
    methods = {}
    if int8_gemv_cpu.kernel_ready():
        def c_loop():
            return [int8_gemv_cpu.int8_gemv(inputs[q.shape[1]], q, s) for q, s in weights]

        methods["C loop"] = c_loop
        methods["C loop, compiled"] = torch.compile(c_loop, fullgraph=True, dynamic=False)
    else:
        print(f"no C loop: {int8_gemv_cpu.unavailable_reason()}")
    methods |= {
        "traced": traced(False),
        "traced, q/k/v and heads fused": traced(True),
        "fbgemm": lambda: [torch.ops.quantized.linear_dynamic(inputs[q.shape[1]], p, DYNAMIC_REDUCE_RANGE)
                           for (q, _), p in zip(weights, packed)],
        "_int_mm": lambda: [torch._int_mm(int_rows[t.shape[0]], t) for t in transposed],
    }
    device = device_name(torch.device("cpu"))
    weight_bytes = sum(q.numel() for q, _ in weights)
    bandwidth = _copy_bandwidth()
    bound_ms = weight_bytes / bandwidth * 1e3
    results = {}
    with torch.no_grad():
        for name, run in methods.items():
            results[name] = median_seconds(run, args.repeats) * 1e3
    lines = [f"the int8 products of one decode step ({args.layers} layers, width {args.dim}, FFN {args.ffn}, "
             f"{args.heads} x {args.codes} heads: {len(weights)} layers, {weight_bytes / 1e6:.1f} MB of codes), "
             f"{args.rows} rows, on {device}; median of {args.repeats}",
             f"copy bandwidth {bandwidth / 1e9:.1f} GB/s: int8 bound {bound_ms:.2f} ms",
             f"{'method':32} {'ms':>7} {'of bound':>9}"]
    lines += [f"{name:32} {ms:7.2f} {bound_ms / ms:9.2f}" for name, ms in results.items()]
    text = "\n".join(lines)
    print(text)
    write_json(args.out, {"device": device, "args": {**vars(args), "out": str(args.out)}, "weight_bytes": weight_bytes,
                          "copy_bytes_per_s": bandwidth, "bound_ms": bound_ms, "ms": results})
    args.out.with_suffix(".txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
