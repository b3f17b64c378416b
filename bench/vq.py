"""Nearest-codeword search: mmdgen's tiled search against ``torch.cdist(x, codebook).argmin(1)``.

For N rows (B x T frames of one RVQ stage), Q codewords of D dimensions: median time over repeats and
peak memory of both, side by side in one run; prints a table and writes
``bench/results/vq-<device>.json``. Both return the same codes (checked on every case).

    python bench/vq.py                                  # N in 16k 64k, Q in 1024 2048, D = 128
    python bench/vq.py --sizes 4096 --codes 2048 --repeats 5
"""

from __future__ import annotations

import argparse
import time

import torch
from harness import (RESULTS, device_name, fmt_mem, fmt_time, parse_args, ratio, run_case, time_and_peak,
                     write_json)

METHODS = ("cdist+argmin", "mmdgen")


def _inputs(n: int, q: int, d: int, device: torch.device, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, d, generator=gen).to(device, dtype), torch.randn(q, d, generator=gen).to(device, dtype)


def _search(method: str, x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    from mmdgen.kernels.vq import nearest_codeword

    if method == "mmdgen":
        return nearest_codeword(x, codebook)[0]
    return torch.cdist(x, codebook).argmin(dim=1)


def measure(spec: dict) -> dict:
    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    x, codebook = _inputs(spec["n"], spec["q"], spec["d"], device, dtype)
    _search(spec["method"], x[:64], codebook)  # load (and on CUDA compile) kernels first
    result = time_and_peak(lambda: _search(spec["method"], x, codebook), spec["repeats"], device)
    codes = _search(spec["method"], x, codebook)
    result["codes_checksum"] = int((codes * torch.arange(1, len(codes) + 1, device=device)).sum())
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[16384, 65536], help="N rows")
    parser.add_argument("--codes", type=int, nargs="+", default=[1024, 2048], help="Q codewords")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    args = parse_args(parser, measure, argv)
    if args is None:
        return
    device = torch.device(args.device)
    name = device_name(device)
    header = f"{'N':>6} {'Q':>5} {'D':>4} {'cdist+argmin':>13} {'mmdgen':>9} {'speedup':>8} {'cdist mem':>10} " \
             f"{'mmdgen mem':>11} {'mem ratio':>9} {'same codes':>10}"
    print(f"nearest codeword, {args.dtype}, on {name}; median of {args.repeats}")
    print(header)
    print("-" * len(header))
    rows = []
    for n in args.sizes:
        for q in args.codes:
            results = {}
            for method in METHODS:
                spec = {"method": method, "n": n, "q": q, "d": args.dim, "repeats": args.repeats,
                        "device": str(device), "dtype": args.dtype}
                results[method] = run_case(__file__, measure, spec, device)
            base, ours = results["cdist+argmin"], results["mmdgen"]
            same = "-" if "oom" in base or "oom" in ours else str(base["codes_checksum"] == ours["codes_checksum"])
            print(f"{n:>6} {q:>5} {args.dim:>4} {fmt_time(base):>13} {fmt_time(ours):>9} "
                  f"{ratio(base, ours, 'seconds'):>8} {fmt_mem(base):>10} {fmt_mem(ours):>11} "
                  f"{ratio(base, ours, 'peak_bytes'):>9} {same:>10}", flush=True)
            rows.append({"n": n, "q": q, "d": args.dim, "cdist_argmin": base, "mmdgen": ours, "same_codes": same})
    suffix = "" if args.dtype == "float32" else f"-{args.dtype}"
    out = args.out or RESULTS / f"vq-{device.type}{suffix}.json"
    write_json(out, {"device": name, "torch": torch.__version__, "dtype": args.dtype, "repeats": args.repeats,
                "rows": rows, "date": time.strftime("%Y-%m-%d")})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
