"""The fused MMD against the materialising estimator, side by side in one run.

For each N, D (F = K * D) and mode (forward, forward+backward): median time over repeats and peak
memory of the naive estimator (three N x N matrices, each exponential checkpointed, as in the public
reference) and of ``mmdgen.rbf_mmd``. Prints a table and writes ``bench/results/mmd-<device>.json``.

CPU: every case runs in a fresh subprocess, so its peak resident memory (minus what the process held
before the call) is the case's own; an address-space limit turns an allocation that does not fit into
an "OOM" row rather than a killed machine. CUDA: in process, ``torch.cuda.max_memory_allocated``.

    python bench/mmd.py                      # N in 1k 4k 16k 64k, D in 32 128, K = 4
    python bench/mmd.py --sizes 1024 4096 --dims 32 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("naive", "mmdgen")
MODES = ("forward", "forward+backward")


def _proc_bytes(path: str, field: str) -> int:
    """A "<field>: <n> kB" line of /proc/meminfo or /proc/self/status, in bytes."""
    with open(path) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(f"{field} not in {path}")


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


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(method: str, mode: str, n: int, f: int, repeats: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Median seconds and peak extra bytes of one case, in this process."""
    backward = mode != "forward"
    x, y = (t.requires_grad_(backward) for t in _inputs(n, f, device, dtype))
    small_x, small_y = (t.requires_grad_(backward) for t in _inputs(64, f, device, dtype))
    _run_once(method, mode, small_x, small_y)  # load kernels (and compile them on CUDA) outside the timing
    _synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _proc_bytes("/proc/self/status", "VmRSS")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _run_once(method, mode, x, y)
        _synchronize(device)
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"seconds": statistics.median(times), "times": times, "peak_bytes": max(peak, 0)}


def _child(spec: dict) -> None:
    """Run one CPU case under an address-space limit; print its result as JSON on the last line."""
    headroom = int(0.9 * _proc_bytes("/proc/meminfo", "MemAvailable"))
    limit = _proc_bytes("/proc/self/status", "VmSize") + headroom
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        result = measure(spec["method"], spec["mode"], spec["n"], spec["f"], spec["repeats"], torch.device("cpu"),
                         getattr(torch, spec["dtype"]))
    except (RuntimeError, MemoryError) as error:  # torch reports a failed allocation as RuntimeError
        if "alloc" not in str(error).lower() and not isinstance(error, MemoryError):
            raise
        result = {"oom": f"allocation failed under a {headroom / 2**30:.1f} GiB limit"}
    print(json.dumps(result))


def _naive_floor_bytes(n: int) -> int:
    return 3 * n * n * 4  # the three fp32 N x N matrices it must hold at once


def run_case(method, mode, n, f, repeats, device, dtype) -> dict:
    if method == "naive" and _naive_floor_bytes(n) > _available_bytes(device):
        need = _naive_floor_bytes(n) / 2**30
        return {"oom": f"needs at least {need:.0f} GiB for three N x N matrices, {_available_bytes(device) / 2**30:.0f} GiB available"}
    if device.type == "cuda":
        try:
            return measure(method, mode, n, f, repeats, device, dtype)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            return {"oom": "CUDA out of memory"}
    spec = {"method": method, "mode": mode, "n": n, "f": f, "repeats": repeats, "dtype": str(dtype).split(".")[-1]}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        if proc.returncode < 0:  # killed, e.g. by the kernel's OOM killer
            return {"oom": f"process killed by signal {-proc.returncode}"}
        raise RuntimeError(f"case {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    return _proc_bytes("/proc/meminfo", "MemAvailable")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.machine()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {torch.get_num_threads()} threads"


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


def _fmt_time(result: dict) -> str:
    return result.get("oom") and "OOM" or f"{result['seconds']:.3f}s"


def _fmt_mem(result: dict) -> str:
    return "-" if "oom" in result else f"{result['peak_bytes'] / 2**20:.0f} MiB"


def _ratio(num: dict, den: dict, key: str) -> str:
    if "oom" in num or "oom" in den or den[key] <= 0:
        return "-"
    return f"{num[key] / den[key]:.1f}x"


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
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--large-repeats", type=int, default=1, help="repeats for N >= --large")
    parser.add_argument("--large", type=int, default=65536)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/mmd-<device>.json)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--peak-tflops", type=float, default=None, help="GPU tensor-core TFLOP/s for the bound")
    parser.add_argument("--peak-exp-per-s", type=float, default=None, help="GPU exp2 per second for the bound")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(json.loads(args.child))
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
            for mode in MODES:
                results = {m: run_case(m, mode, n, f, repeats, device, dtype) for m in METHODS}
                naive, ours = results["naive"], results["mmdgen"]
                row = {"n": n, "f": f, "stages": args.stages, "dim": dim, "mode": mode, "repeats": repeats,
                       "naive": naive, "mmdgen": ours}
                line = (f"{n:>6} {f:>4} {mode:<17} {_fmt_time(naive):>9} {_fmt_time(ours):>9} "
                        f"{_ratio(naive, ours, 'seconds'):>8} {_fmt_mem(naive):>10} {_fmt_mem(ours):>11} "
                        f"{_ratio(naive, ours, 'peak_bytes'):>9}")
                if peaks:
                    row["bound_seconds"] = bound = gpu_bound_seconds(n, f, mode, dtype, peaks)
                    line += f" {bound * 1e3:>7.2f}ms " + ("-" if "oom" in ours else f"{ours['seconds'] / bound:>6.1f}x")
                print(line, flush=True)
                rows.append(row)
    suffix = "" if dtype == torch.float32 else f"-{args.dtype}"
    out = args.out or RESULTS / f"mmd-{device.type}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"device": name, "torch": torch.__version__, "threads": torch.get_num_threads(),
               "bandwidths": [0.1, 1, 5, 10, 20, 50], "dtype": args.dtype, "gpu_peaks": peaks, "rows": rows,
               "date": time.strftime("%Y-%m-%d")}
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
