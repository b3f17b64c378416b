"""Int8 weight linear layers on CPU: which path a decode step should take, measured side by side in one run.

For M rows (a decode step: 2 with guidance at batch 1, up to 32 in batch jobs) and the LM's linear shapes
K -> N (attention 1024 -> 1024, feed-forward 1024 -> 4096 and 4096 -> 1024, a head 1024 -> 2048, a small model's
512 -> 2048), median time of one ``x [M, K] @ W.T`` for:

- ``fp32``, ``bf16``: ``F.linear`` on float weights (the bf16 row with bf16 activations);
- int8 weight-only: ``torch.ops.aten._weight_int8pack_mm``; torchao's ``Int8WeightOnlyConfig``; a
  ``torch.compile``d dequantise-then-matmul; a blocked dequantise (rows of the weight converted to fp32 1 MiB at a
  time, so the fp32 weight never exists in full); mmdgen's ``int8_linear`` (``mode="int8"``, eager and
  compiled: the C loop up to ``CPU_GEMV_MAX_ROWS`` rows, past them an int8 x int8 ``torch._int_mm`` over
  activations split into 3 int8 levels); those two alone at every row count (``ours-C``: ``int8_gemv_cpu``,
  ``ours-L3``), and the levels product with 2 levels;
  the same 3 levels through oneDNN's int8 linear on weights prepacked once (``onednn::qlinear_pointwise``: not
  shipped, its packed weight is an opaque tensor that ``torch.compile`` (without freezing) and ``deepcopy``
  reject; measured to see what packing would buy);
- int8 with dynamic activations: fbgemm's ``quantized::linear_dynamic`` over prepacked weights (what
  ``torch.ao.nn.quantized.dynamic.Linear`` runs, ``reduce_range=True``: 7-bit activations, per tensor), and
  mmdgen's ``mode="int8-dynamic"`` (each row rounded to int8 on its own step; the C loop of
  ``int8_gemv_cpu.int8_gemv_dynamic``, or ``torch._int_mm`` with one level where it cannot run).

Weights are read from memory, not from the cache, as in a decode step (which reads every weight once): each
weight family (fp32, bf16, the int8 codes, torchao's, fbgemm's packed) is a pool of copies of at least
``--cold-mib`` in all, and every call takes the next copy of its pool. Methods take turns call by call, in a
new random order each turn, so that a change of machine load hits them alike and no method always runs after
the same one. Each case runs in its own process (``harness.isolated``, under its address-space limit): its pools
and compiled code go with it. Also measured: the copy bandwidth (``dst.copy_(src)`` of 256 MiB, bytes
read + written per second, the STREAM convention) and from it the weight-read bound of each weight width; and
the max abs error of each method against the fp32 result (and, for int8, against the exact product with the
dequantised weight). Prints tables and writes ``bench/results/int8_linear-<device>.json`` and the text as
``.txt``.

    python bench/int8_linear.py                               # everything (a few minutes with compilation)
    python bench/int8_linear.py --rows 2 --shapes 1024x4096 --repeats 20
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from harness import FBGEMM_REDUCE_RANGE, RESULTS, child, device_name, fbgemm_packed, isolated, write_json

SHAPES = ("1024x1024", "1024x4096", "4096x1024", "1024x2048", "512x2048")
ROWS = (1, 2, 4, 8, 16, 32)
BLOCK_BYTES = 2**20  # fp32 rows converted at a time by the blocked dequantise
COPY_BYTES = 256 * 2**20
# method -> (column title, weight family, kind); kind "float", "weight-only" or "dynamic"
METHODS = {
    "fp32": ("fp32", "fp32", "float"),
    "bf16": ("bf16", "bf16", "float"),
    "int8pack_mm": ("i8pack", "int8", "weight-only"),
    "torchao": ("torchao", "torchao", "weight-only"),
    "compiled-dequant": ("cmp-deq", "int8", "weight-only"),
    "blocked-dequant": ("blk-deq", "int8", "weight-only"),
    "mmdgen-int8": ("ours", "int8", "weight-only"),
    "mmdgen-int8-compiled": ("ours-cmp", "int8", "weight-only"),
    "mmdgen-int8-2-levels": ("ours-L2", "int8", "weight-only"),
    "mmdgen-int8-3-levels": ("ours-L3", "int8", "weight-only"),
    "mmdgen-int8-c-loop": ("ours-C", "int8", "weight-only"),
    "onednn-prepacked-levels": ("1dnn-L3", "onednn", "weight-only"),
    "fbgemm-dynamic": ("fbgemm", "fbgemm", "dynamic"),
    "mmdgen-int8-dynamic": ("ours-dyn", "int8", "dynamic"),
}


def copy_bandwidth(repeats: int = 10) -> float:
    """Bytes read + written per second by a 256 MiB ``copy_`` (median of repeats)."""
    src = torch.ones(COPY_BYTES // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * COPY_BYTES / statistics.median(times)


class Pool:
    """Copies of one weight family, handed out in turn: a copy comes back only after all the others."""

    def __init__(self, copies: list):
        self.copies, self.next = copies, 0

    def take(self):
        item = self.copies[self.next % len(self.copies)]
        self.next += 1
        return item


def _copies(weight_bytes: int, cold_bytes: int) -> int:
    return max(2, -(-cold_bytes // weight_bytes))


def _torchao_linear(weight: torch.Tensor):
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    quantize_(linear, Int8WeightOnlyConfig())
    return linear


def _blocked_dequant(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    rows = max(1, BLOCK_BYTES // (4 * qweight.shape[1]))
    out_t = torch.empty(qweight.shape[0], x.shape[0])  # [N, M]: each block of rows is a contiguous slice
    for start in range(0, qweight.shape[0], rows):
        torch.mm(qweight[start: start + rows].float(), x.T, out=out_t[start: start + rows])
    return out_t.T * scale


def _onednn_levels(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, levels: int = 3) -> torch.Tensor:
    """mmdgen's activation levels through oneDNN's int8 linear on weights prepacked once (its u8 x s8 kernels:
    the int8 levels shifted by 128, bit for bit a flip of the sign bit, with zero point 128)."""
    from mmdgen.kernels.int8_linear import _split_rows

    parts, step = _split_rows(x, levels)
    shifted = parts.view(torch.uint8).bitwise_xor_(128)
    zero_points = torch.zeros_like(scale, dtype=torch.long)
    out = torch.ops.onednn.qlinear_pointwise(shifted, 1.0, 128, packed, scale, zero_points, None, 1.0, 0,
                                             torch.float32, "none", [], "")
    out = out.view(levels, x.shape[0], -1)
    total = out[0]
    for level in range(1, levels):
        total = total.add_(out[level], alpha=254.0 ** -level)
    return total * step


def _dequant_matmul(x, qweight, scale):
    return F.linear(x, qweight.to(x.dtype)) * scale


def _variant(weight: torch.Tensor, index: int) -> torch.Tensor:
    """Copy ``index`` of a weight family: the weight itself, then slightly perturbed copies (distinct memory)."""
    if index == 0:
        return weight
    return weight + 1e-3 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(index))


def build(weight: torch.Tensor, x: torch.Tensor, cold_bytes: int, methods: list[str], log: Callable[[str], None]):
    """Weight pools per family and one callable per method (taking a pool item), plus the unavailable methods."""
    from mmdgen.kernels import int8_gemv_cpu
    from mmdgen.kernels import int8_linear as ours

    elements = weight.numel()
    families = {METHODS[m][1] for m in methods}
    pools, unavailable = {}, {}
    if "fp32" in families:
        pools["fp32"] = Pool([_variant(weight, i) for i in range(_copies(4 * elements, cold_bytes))])
    if "bf16" in families:
        pools["bf16"] = Pool([_variant(weight, i).bfloat16() for i in range(_copies(2 * elements, cold_bytes))])
    if families & {"int8", "fbgemm", "onednn"}:
        pools["int8"] = Pool([ours.quantize_weight(_variant(weight, i))
                              for i in range(_copies(elements, cold_bytes))])
    if "onednn" in families:
        pools["onednn"] = Pool([(torch.ops.onednn.qlinear_prepack(q, [3 * x.shape[0], x.shape[1]]), s)
                                for q, s in pools["int8"].copies])
    if "fbgemm" in families:
        pools["fbgemm"] = Pool([fbgemm_packed(q, s) for q, s in pools["int8"].copies])
    if "torchao" in families:
        try:
            pools["torchao"] = Pool([_torchao_linear(_variant(weight, i))
                                     for i in range(_copies(elements, cold_bytes))])
        except Exception as error:  # an absent or incompatible torchao is a result, not a crash
            unavailable["torchao"] = f"{type(error).__name__}: {error}"
    compiled_dequant = torch.compile(_dequant_matmul, dynamic=False)
    compiled_ours = torch.compile(ours.int8_linear, dynamic=False)
    x_bf16 = x.bfloat16()
    table = {
        "fp32": lambda w: F.linear(x, w),
        "bf16": lambda w: F.linear(x_bf16, w),
        "int8pack_mm": lambda qs: torch.ops.aten._weight_int8pack_mm(x, qs[0], qs[1]),
        "torchao": lambda linear: linear(x),
        "compiled-dequant": lambda qs: compiled_dequant(x, qs[0], qs[1]),
        "blocked-dequant": lambda qs: _blocked_dequant(x, qs[0], qs[1]),
        "mmdgen-int8": lambda qs: ours.int8_linear(x, qs[0], qs[1], backend="torch"),
        "mmdgen-int8-compiled": lambda qs: compiled_ours(x, qs[0], qs[1], backend="torch"),
        "mmdgen-int8-2-levels": lambda qs: ours._torch_int8_linear(x, qs[0], qs[1], levels=2),
        "mmdgen-int8-3-levels": lambda qs: ours._torch_int8_linear(x, qs[0], qs[1], levels=3),
        "mmdgen-int8-c-loop": lambda qs: int8_gemv_cpu.int8_gemv(x, qs[0], qs[1]),
        "onednn-prepacked-levels": lambda packed: _onednn_levels(x, *packed),
        "fbgemm-dynamic": lambda packed: torch.ops.quantized.linear_dynamic(x, packed, FBGEMM_REDUCE_RANGE),
        "mmdgen-int8-dynamic": lambda qs: ours.int8_linear(x, qs[0], qs[1], backend="torch", mode="int8-dynamic"),
    }
    if not int8_gemv_cpu.kernel_ready():
        unavailable["mmdgen-int8-c-loop"] = int8_gemv_cpu.unavailable_reason()
    calls = {}
    for method in methods:
        family = METHODS[method][1]
        if family in pools and method not in unavailable:
            calls[method] = table[method]
        else:
            unavailable[method] = unavailable.get(family, "not built")
            log(f"  {method}: unavailable ({unavailable[method]})")
    return pools, calls, unavailable


def measure(spec: dict) -> dict:
    """One case in its own process (``harness.isolated``): its pools and compiled code go with it."""
    torch.set_num_threads(spec.pop("threads"))
    return measure_case(**spec, log=lambda line: print(line, file=sys.stderr))


@torch.no_grad()
def measure_case(k: int, n: int, rows: int, methods: list[str], repeats: int, cold_bytes: int, budget_s: float,
                 log: Callable[[str], None]) -> dict:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(n, k, generator=gen) / k ** 0.5
    x = torch.randn(rows, k, generator=gen)
    pools, calls, unavailable = build(weight, x, cold_bytes, methods, log)
    reference = F.linear(x, weight).double()
    q0, s0 = pools["int8"].copies[0] if "int8" in pools else (None, None)
    dequantised = None if q0 is None else x.double() @ (q0.double() * s0.double()[:, None]).T
    results, counts = {}, {}
    for method, call in calls.items():  # warm up (compiles), check, and set the repeat count from one call's time
        family = METHODS[method][1]
        first = pools[family].copies[0]
        out = call(first).double()
        start = time.perf_counter()
        call(pools[family].take())
        once = time.perf_counter() - start
        counts[method] = max(5, min(repeats, int(budget_s / max(once, 1e-6))))
        results[method] = {"times": [], "max_abs_error_vs_fp32": float((out - reference).abs().max())}
        if dequantised is not None and family in ("int8", "fbgemm", "onednn"):  # torchao quantises its own way
            results[method]["max_abs_error_vs_int8_product"] = float((out - dequantised).abs().max())
    order = list(calls)
    for turn in range(max(counts.values(), default=0)):
        random.Random(turn).shuffle(order)  # no method always follows the same one (thread wake-ups, caches)
        for method in order:
            call = calls[method]
            if turn < counts[method]:
                item = pools[METHODS[method][1]].take()
                start = time.perf_counter()
                call(item)
                results[method]["times"].append(time.perf_counter() - start)
    for result in results.values():
        result["median_ms"] = 1e3 * statistics.median(result["times"])
        result["min_ms"] = 1e3 * min(result["times"])
    for method, reason in unavailable.items():
        if method in METHODS:
            results[method] = {"unavailable": reason}
    return {"k": k, "n": n, "rows": rows, "reference_max_abs": float(reference.abs().max()), "methods": results}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=list(ROWS), help="M rows")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), help="KxN (in x out features)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--repeats", type=int, default=200, help="calls per method and case (fewer for slow ones)")
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of calls per method and case at most")
    parser.add_argument("--cold-mib", type=int, default=128, help="MiB of weight copies per family (> the L3)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=str, default=None)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(measure, json.loads(args.child))
        return
    torch.set_num_threads(args.threads)
    name = device_name(torch.device("cpu"))
    bandwidth = copy_bandwidth()
    lines = []

    def log(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    log(f"int8 linear layers on {name}, torch {torch.__version__}; ms per call, median and min of up to "
        f"{args.repeats} calls (at most {args.budget:g} s per method and case), weights read from {args.cold_mib} MiB "
        "pools")
    log(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write); weight-read bound = weight bytes / that")
    cases = []
    for shape in args.shapes:
        k, n = (int(v) for v in shape.lower().split("x"))
        bounds = {width: 1e3 * n * k * size / bandwidth for width, size in (("fp32", 4), ("bf16", 2), ("int8", 1))}
        log("")
        log(f"{k} -> {n}: bound fp32 {bounds['fp32']:.3f} ms, bf16 {bounds['bf16']:.3f} ms, int8 "
            f"{bounds['int8']:.3f} ms")
        header = f"{'M':>3}     " + " ".join(f"{METHODS[m][0]:>9}" for m in args.methods) + "  fastest weight-only"
        log(header)
        log("-" * len(header))
        for rows in args.rows:
            spec = {"k": k, "n": n, "rows": rows, "methods": args.methods, "repeats": args.repeats,
                    "cold_bytes": args.cold_mib * 2**20, "budget_s": args.budget, "threads": args.threads}
            case = isolated(__file__, spec)
            if "oom" in case:
                log(f"{rows:>3} out of memory: {case['oom']}")
                continue
            for method, result in case["methods"].items():
                if "unavailable" in result:
                    log(f"    {method}: unavailable ({result['unavailable']})")
            case["bound_ms"] = bounds
            cases.append(case)
            timed = {m: case["methods"][m] for m in args.methods if "median_ms" in case["methods"][m]}
            weight_only = [m for m in timed if METHODS[m][2] == "weight-only"]
            case["fastest_weight_only"] = min(weight_only, key=lambda m: timed[m]["median_ms"], default=None)
            for statistic in ("median", "min"):
                cells = [f"{timed[m][statistic + '_ms']:>9.3f}" if m in timed else f"{'-':>9}" for m in args.methods]
                label = f"{rows:>3} med " if statistic == "median" else "    min "
                fastest = f"  {case['fastest_weight_only']}" if statistic == "median" else ""
                log(label + " ".join(cells) + fastest)
    log("")
    log("max abs error against the fp32 result, relative to max |fp32 result| (worst over shapes and M); in "
        "brackets against the exact product with the dequantised int8 weight")
    for method in args.methods:
        errors = [(c["methods"][method]["max_abs_error_vs_fp32"] / c["reference_max_abs"],
                   c["methods"][method].get("max_abs_error_vs_int8_product", float("nan")) / c["reference_max_abs"])
                  for c in cases if "median_ms" in c["methods"][method]]
        if errors:
            log(f"  {method:<22} {max(e[0] for e in errors):.2e}  [{max(e[1] for e in errors):.2e}]")
    out = Path(args.out) if args.out else RESULTS / "int8_linear-cpu.json"
    write_json(out, {"device": name, "torch": torch.__version__, "threads": args.threads,
                     "copy_bandwidth_bytes_per_s": bandwidth, "cold_bytes": args.cold_mib * 2**20,
                     "methods": {m: {"title": METHODS[m][0], "family": METHODS[m][1], "kind": METHODS[m][2]}
                                 for m in args.methods},
                     "cases": cases, "date": time.strftime("%Y-%m-%d")})
    from mmdgen.files import write_text_atomic

    write_text_atomic(out.with_suffix(".txt"), "\n".join(lines) + f"\nwrote {out}\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
