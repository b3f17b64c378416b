"""What one int8 linear call costs besides its matrix product, on CPU: the per-call overheads that add up over the
~200 linear calls of a MusicGen-small decode step.

Side by side in one run, on a layer small enough (``--features`` square, 2 rows, one thread) that the product
itself is a few microseconds, median time of one call over ``--calls`` calls, for:

- ``fbgemm``: ``quantized::linear_dynamic`` on a prepacked weight (a C++ op from end to end: the floor of a
  dispatched call, and what transformers + torch.ao dynamic int8 pays per layer);
- ``C loop, ctypes``: ``int8_gemv_cpu``'s dynamic C function called through ctypes on preallocated tensors;
- ``library op``: ``torch.ops.mmdgen.int8_gemv_dynamic``, the plain library definition around it (checks, the
  output tensor, the ctypes call: what the compiled decode step calls);
- ``custom_op``: the same function behind ``torch.library.custom_op`` (why the op is a plain definition).

Prints a table and writes ``bench/results/int8_dispatch-<device>.json`` and the text as ``.txt``.

    python bench/int8_dispatch.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from harness import FBGEMM_REDUCE_RANGE, RESULTS, device_name, fbgemm_packed, positive_int, write_json

from mmdgen.kernels import int8_gemv_cpu
from mmdgen.kernels.int8_linear import quantize_weight


def _median_call_us(call, calls: int, rounds: int) -> float:
    for _ in range(calls // 10):
        call()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def _custom_op():
    """The library op's function behind ``torch.library.custom_op``, defined here for the comparison only."""
    @torch.library.custom_op("mmdgen_bench::int8_gemv_dynamic", mutates_args=())
    def linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return int8_gemv_cpu.int8_gemv_dynamic(x, qweight, scale)

    return linear


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", type=positive_int, default=256)
    parser.add_argument("--rows", type=positive_int, default=2)
    parser.add_argument("--calls", type=positive_int, default=20000)
    parser.add_argument("--rounds", type=positive_int, default=5)
    parser.add_argument("--threads", type=positive_int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    qweight, scale = quantize_weight(torch.randn(args.features, args.features))
    x = torch.randn(args.rows, args.features)
    if not int8_gemv_cpu.kernel_ready():
        parser.error(f"the C loop cannot run here: {int8_gemv_cpu.unavailable_reason()}")
    packed = fbgemm_packed(qweight, scale)
    function = int8_gemv_cpu._load()[0]["dynamic"]
    out = torch.empty(args.rows, args.features)
    pointers = (x.data_ptr(), args.rows, args.features, qweight.data_ptr(), args.features, scale.data_ptr(), None,
                out.data_ptr())
    custom = _custom_op()
    methods = {
        "fbgemm": lambda: torch.ops.quantized.linear_dynamic(x, packed, FBGEMM_REDUCE_RANGE),
        "C loop, ctypes": lambda: function(*pointers),
        "library op": lambda: torch.ops.mmdgen.int8_gemv_dynamic(x, qweight, scale, None),
        "custom_op": lambda: custom(x, qweight, scale),
    }
    device = device_name(torch.device("cpu"))
    lines = [f"one dynamic int8 linear call ({int8_gemv_cpu.kernel_variant('dynamic')} loop), {args.rows} x "
             f"{args.features} -> {args.features}, on {device}; median over {args.rounds} rounds of {args.calls} calls",
             f"{'method':16} {'us/call':>8} {'over fbgemm':>12}"]
    results = {}
    with torch.no_grad():
        for name, call in methods.items():
            results[name] = _median_call_us(call, args.calls, args.rounds)
    for name, us in results.items():
        lines.append(f"{name:16} {us:8.1f} {us - results['fbgemm']:+12.1f}")
    text = "\n".join(lines)
    print(text)
    stem = "int8_dispatch-" + ("cuda" if "cuda" in device.lower() else "cpu")
    write_json(RESULTS / f"{stem}.json", {"device": device, "args": vars(args), "us_per_call": results})
    (RESULTS / f"{stem}.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
