"""The fused MMD against the materialising estimator, side by side in one run.

For each N, D (F = K * D) and mode (forward, forward+backward): median time over repeats and peak
memory of the naive estimator (three N x N matrices, each exponential checkpointed, as in the public
reference) and of ``mmdgen.rbf_mmd``. Prints a table and writes ``bench/results/mmd-<device>.json``.

CPU: every case runs in a fresh subprocess, so its peak resident memory (minus what the process held
before the call) is the case's own; an address-space limit turns an allocation that does not fit into
an "OOM" row rather than a killed machine. CUDA: in process, ``torch.cuda.max_memory_allocated``.

    python bench/mmd.py                      # N in 1k 4k 16k 64k, D in 32 128, K = 4
    python bench/mmd.py --sizes 1024 4096 --dims 32 --repeats 5
    python bench/mmd.py --sizes 4096 16384 --dims 128 --modes forward+backward
"""

from __future__ import annotations

import argparse
import time

import torch
from harness import (RESULTS, available_bytes, device_name, fmt_mem, fmt_time, ratio, run_case,
                     parse_args, time_and_peak, write_json)

METHODS = ("naive", "mmdgen")
MODES = ("forward", "forward+backward")


def _inputs(n: int, f: int, device: torch.device, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, f, generator=gen)
    y = torch.randn(n, f, generator=gen)
    return x.to(device, dtype), y.to(device, dtype)


def _run_once(method: str, mode: str, x: torch.Tensor, y: torch.Tensor) -> None:
    """One estimate; in forward+backward mode x and y are leaves whose gradients are reset first."""
    from mmdgen import naive_rbf_mmd, rbf_mmd

    fn = naive_rbf_mmd if method == "naive" else rbf_mmd
    if mode == "forward":
        with torch.no_grad():
            fn(x, y)
    else:
        x.grad = y.grad = None
        fn(x, y).backward()


def measure(spec: dict) -> dict:
    """Median seconds and peak extra bytes of one case, in this process."""
    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    backward = spec["mode"] != "forward"
    x, y = (t.requires_grad_(backward) for t in _inputs(spec["n"], spec["f"], device, dtype))
    small_x, small_y = (t.requires_grad_(backward) for t in _inputs(64, spec["f"], device, dtype))
    _run_once(spec["method"], spec["mode"], small_x, small_y)  # load (and on CUDA compile) kernels first
    return time_and_peak(lambda: _run_once(spec["method"], spec["mode"], x, y), spec["repeats"], device)


def _naive_floor_bytes(n: int) -> int:
    return 3 * n * n * 4  # the three fp32 N x N matrices it must hold at once


def case(method, mode, n, f, repeats, device, dtype) -> dict:
    if method == "naive" and _naive_floor_bytes(n) > available_bytes(device):
        return {"oom": f"needs at least {_naive_floor_bytes(n) / 2**30:.0f} GiB for three N x N matrices, "
                       f"{available_bytes(device) / 2**30:.0f} GiB available"}
    spec = {"method": method, "mode": mode, "n": n, "f": f, "repeats": repeats, "device": str(device),
            "dtype": str(dtype).split(".")[-1]}
    return run_case(__file__, measure, spec, device)


# Peak rates used for the GPU bound, by device-name fragment: dense tensor-core TFLOP/s for 16-bit
# inputs and for fp32 inputs (3xTF32 = three TF32 passes), and exp2 per second (16 per clock per SM on
# the special-function units, at boost clock). H100 SXM: 132 SMs at 1.98 GHz. Override with flags.
GPU_PEAKS = {
    "H100": {"tflops_16bit": 989.0, "tflops_fp32": 494.0 / 3, "exp_per_s": 132 * 16 * 1.98e9},
    "H200": {"tflops_16bit": 989.0, "tflops_fp32": 494.0 / 3, "exp_per_s": 132 * 16 * 1.98e9},
}


def kernel_work(n: int, f: int, mode: str, bandwidths: int) -> tuple[float, float]:
    """(matmul FLOPs, exponentials) of mmdgen's Triton kernels for one estimate.

    Forward only: the upper triangle of xx and yy and all of xy, about 2 N^2 pairs, one distance dot
    (2F FLOPs) each. Forward+backward: each row of x and y against both sets, 4 N^2 pairs, a distance
    dot and a W @ Z dot (4F FLOPs) each. Every pair evaluates every bandwidth.
    """
    pairs, flops_per_pair = (2 * n * n, 2 * f) if mode == "forward" else (4 * n * n, 4 * f)
    return pairs * flops_per_pair, pairs * bandwidths


def gpu_bound_seconds(n, f, mode, dtype, peaks) -> float:
    flops, exps = kernel_work(n, f, mode, 6)
    tflops = peaks["tflops_fp32"] if dtype == torch.float32 else peaks["tflops_16bit"]
    return max(flops / (tflops * 1e12), exps / peaks["exp_per_s"])


def _gpu_peaks(name: str, args) -> dict:
    peaks = next((dict(p) for key, p in GPU_PEAKS.items() if key in name), None)
    if peaks is None and (args.peak_tflops is None or args.peak_exp_per_s is None):
        raise SystemExit(f"no peak rates known for {name!r}: pass --peak-tflops and --peak-exp-per-s")
    peaks = peaks or {}
    if args.peak_tflops is not None:
        peaks["tflops_16bit"] = peaks["tflops_fp32"] = args.peak_tflops
    if args.peak_exp_per_s is not None:
        peaks["exp_per_s"] = args.peak_exp_per_s
    return peaks


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--dims", type=int, nargs="+", default=[32, 128], help="D per codebook; F = K * D")
    parser.add_argument("--stages", type=int, default=4, help="K codebooks")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--large-repeats", type=int, default=1, help="repeats for N >= --large")
    parser.add_argument("--large", type=int, default=65536)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--peak-tflops", type=float, default=None, help="GPU tensor-core TFLOP/s for the bound")
    parser.add_argument("--peak-exp-per-s", type=float, default=None, help="GPU exp2 per second for the bound")
    args = parse_args(parser, measure, argv)
    if args is None:
        return

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    name = device_name(device)
    peaks = _gpu_peaks(name, args) if device.type == "cuda" else None
    rows = []
    header = (f"{'N':>6} {'F':>4} {'mode':<17} {'naive':>9} {'mmdgen':>9} {'speedup':>8} {'naive mem':>10} "
              f"{'mmdgen mem':>11} {'mem ratio':>9}" + (f" {'bound':>9} {'x bound':>7}" if peaks else ""))
    print(f"MMD^2, 6 bandwidths, {args.dtype}, on {name}; median of repeats (N >= {args.large}: "
          f"{args.large_repeats} run)")
    print(header)
    print("-" * len(header))
    for n in args.sizes:
        repeats = args.large_repeats if n >= args.large else args.repeats
        for dim in args.dims:
            f = args.stages * dim
            for mode in args.modes:
                results = {m: case(m, mode, n, f, repeats, device, dtype) for m in METHODS}
                naive, ours = results["naive"], results["mmdgen"]
                row = {"n": n, "f": f, "stages": args.stages, "dim": dim, "mode": mode, "repeats": repeats,
                       "naive": naive, "mmdgen": ours}
                line = (f"{n:>6} {f:>4} {mode:<17} {fmt_time(naive):>9} {fmt_time(ours):>9} "
                        f"{ratio(naive, ours, 'seconds'):>8} {fmt_mem(naive):>10} {fmt_mem(ours):>11} "
                        f"{ratio(naive, ours, 'peak_bytes'):>9}")
                if peaks:
                    row["bound_seconds"] = bound = gpu_bound_seconds(n, f, mode, dtype, peaks)
                    line += f" {bound * 1e3:>7.2f}ms " + ("-" if "oom" in ours else f"{ours['seconds'] / bound:>6.1f}x")
                print(line, flush=True)
                rows.append(row)
    suffix = "" if dtype == torch.float32 else f"-{args.dtype}"
    out = args.out or RESULTS / f"mmd-{device.type}{suffix}.json"
    payload = {"device": name, "torch": torch.__version__, "threads": torch.get_num_threads(),
               "bandwidths": [0.1, 1, 5, 10, 20, 50], "dtype": args.dtype, "gpu_peaks": peaks, "rows": rows,
               "date": time.strftime("%Y-%m-%d")}
    write_json(out, payload)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
