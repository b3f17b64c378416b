"""Shared measuring for the bench scripts: median time over repeats and peak memory of one case.

CPU: a case runs in a fresh subprocess (``isolated``), so its peak resident memory, minus what the
process held before the timed calls, is its own; an address-space limit turns an allocation that does
not fit into an "oom" result instead of a machine killed by the OOM killer. CUDA: in process, with
``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import json
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def proc_bytes(path: str, field: str) -> int:
    """A "<field>: <n> kB" line of /proc/meminfo or /proc/self/status, in bytes."""
    with open(path) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(f"{field} not in {path}")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    return proc_bytes("/proc/meminfo", "MemAvailable")


def cpu_model() -> str:
    """The CPU's model name with its family and model numbers (a hypervisor may shorten the name to
    "AMD EPYC"; family 26 is Zen 5, 25 Zen 3/4, 6 Intel) and the cache size it reports (L2 per core on
    AMD, L3 on Intel), from /proc/cpuinfo."""
    fields = {}
    with open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            if not key.strip():
                break  # the first processor's block is enough
            fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name", platform.machine())
    details = [f"family {fields['cpu family']} model {fields['model']}"] if "cpu family" in fields else []
    details += [f"cache {fields['cache size']}"] if "cache size" in fields else []
    return f"{name} ({', '.join(details)})" if details else name


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()}, {torch.get_num_threads()} threads"


def time_and_peak(run: Callable[[], None], repeats: int, device: torch.device) -> dict:
    """Median seconds of ``repeats`` calls and the peak bytes they added (warm up before calling)."""
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = proc_bytes("/proc/self/status", "VmRSS")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"seconds": statistics.median(times), "times": times, "peak_bytes": max(peak, 0)}


def child(measure: Callable[[dict], dict], spec: dict) -> None:
    """Run one CPU case under an address-space limit; print its result as JSON on the last line."""
    headroom = int(0.9 * proc_bytes("/proc/meminfo", "MemAvailable"))
    limit = proc_bytes("/proc/self/status", "VmSize") + headroom
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        result = measure(spec)
    except (RuntimeError, MemoryError) as error:  # torch reports a failed allocation as RuntimeError
        if "alloc" not in str(error).lower() and not isinstance(error, MemoryError):
            raise
        result = {"oom": f"allocation failed under a {headroom / 2**30:.1f} GiB limit"}
    print(json.dumps(result))


def isolated(script: str, spec: dict) -> dict:
    """Run ``script --child <spec>`` and return the JSON it printed last."""
    proc = subprocess.run([sys.executable, script, "--child", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode < 0:  # killed, e.g. by the kernel's OOM killer
        return {"oom": f"process killed by signal {-proc.returncode}"}
    if proc.returncode != 0:
        raise RuntimeError(f"case {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_case(script: str, measure: Callable[[dict], dict], spec: dict, device: torch.device) -> dict:
    """One case: in a subprocess on CPU, in process (out-of-memory caught) on CUDA."""
    if device.type != "cuda":
        return isolated(script, spec)
    try:
        return measure(spec)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"oom": "CUDA out of memory"}


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls, after one untimed call (CPU work: no sync)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_median_seconds(fns: dict[str, Callable[[], object]], repeats: int, seed: int = 0) -> dict[str, float]:
    """Median wall time of each ``fns[name]()`` over ``repeats`` rounds, after one untimed call each; every round
    calls each function once, in a new random order, so that a machine whose speed drifts (load, clocks) slows
    them alike and none always runs after the same one."""
    for fn in fns.values():
        fn()
    order, times = list(fns), {name: [] for name in fns}
    shuffle = random.Random(seed).shuffle
    for _ in range(repeats):
        shuffle(order)
        for name in order:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def fbgemm_packed(qweight: torch.Tensor, scale: torch.Tensor) -> torch.ScriptObject:
    """fbgemm's packed copy of int8 codes [N, K] with per-channel scales [N]: the weight of
    ``torch.ops.quantized.linear_dynamic(x, packed, FBGEMM_REDUCE_RANGE)``, what ``torch.ao``'s dynamic int8
    linear runs (a baseline; mmdgen's own dynamic product does not use it)."""
    import warnings

    with warnings.catch_warnings():  # quantized tensors are deprecated in torch 2.14; fbgemm's packing takes one
        warnings.simplefilter("ignore", UserWarning)
        per_channel = torch._make_per_channel_quantized_tensor(
            qweight, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(per_channel, None)


FBGEMM_REDUCE_RANGE = True  # torch.ao's default on x86: 7-bit activations, per tensor


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1 (sizes, repeats, threads), or a one-line usage error naming it."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def output_path(text: str) -> Path:
    """An argparse type for a results file: a path whose nearest existing folder is writable (checked before any
    measurement, so that a long run does not end in a write error)."""
    import argparse
    import tempfile

    path = Path(text)
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        if path.is_dir():
            raise OSError("a folder")
        with tempfile.TemporaryFile(dir=folder):  # what writing there needs, tried (and gone at once)
            pass
    except OSError:
        raise argparse.ArgumentTypeError(f"expected a file path in a writable folder, got {text!r}") from None
    return path


def parse_args(parser, measure: Callable[[dict], dict], argv=None):
    """Add the options every bench script has (--device, --out, and the hidden --child), parse, and run
    the case when this process is a child. Returns the arguments, or None after running a child."""
    import argparse

    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=output_path, default=None,
                        help="JSON path (default bench/results/<name>-<device>.json)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(measure, json.loads(args.child))
        return None
    return args


def write_json(path: Path, payload: dict) -> None:
    from mmdgen.files import write_text_atomic

    write_text_atomic(path, json.dumps(payload, indent=1))


def fmt_time(result: dict) -> str:
    return "OOM" if "oom" in result else f"{result['seconds']:.3f}s"


def fmt_mem(result: dict) -> str:
    return "-" if "oom" in result else f"{result['peak_bytes'] / 2**20:.0f} MiB"


def ratio(num: dict, den: dict, key: str) -> str:
    if "oom" in num or "oom" in den or den[key] <= 0:
        return "-"
    return f"{num[key] / den[key]:.1f}x"
