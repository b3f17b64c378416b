"""Where the MMD's CPU (PyTorch) path spends its time: per phase, and the rates of its building blocks.

For each thread count: GFLOP/s of one tile product (``tile x F`` by ``F x tile``) through MKL (``addmm``)
and through oneDNN (what ``mmdgen.kernels.mmd`` uses for fp32 on CPU), GB/s of each elementwise pass
over one ``tile x tile`` fp32 tile (read + write bytes), then one forward and one forward+backward
``_torch_pass`` at N x F under torch.profiler, its self time split into tile products, exponentials and
the other elementwise passes and reductions. Prints a table and writes
``bench/results/mmd-cpu-profile-<cpu>.json``. Times are medians over repeats.

    python bench/mmd_cpu_profile.py                     # N=4096, F=512, tile 512, 1 and 2 threads
    python bench/mmd_cpu_profile.py --threads 2 --n 16384
"""

from __future__ import annotations

import argparse
import re
import time

import torch
from harness import RESULTS, cpu_model, median_seconds, positive_int, write_json
from torch.profiler import ProfilerActivity, profile

from mmdgen.kernels import mmd

PHASES = {"products": ("mkldnn::_linear_pointwise", "aten::addmm", "aten::addmm_", "aten::mm"),
          "exponentials": ("aten::exp_",)}


def product_rates(tile: int, f: int, repeats: int) -> dict:
    a, c = torch.randn(tile, f), torch.randn(tile, f)
    bias = torch.randn(tile)
    flops = 2 * tile * tile * f
    mkl = median_seconds(lambda: torch.addmm(bias[None, :], a, c.T), repeats)
    onednn = median_seconds(lambda: torch.ops.mkldnn._linear_pointwise(a, c, bias, "none", [], ""), repeats)
    return {"mkl_gflops": flops / mkl / 1e9, "onednn_gflops": flops / onednn / 1e9}


def elementwise_rates(tile: int, repeats: int) -> dict:
    """GB/s of each pass the tile loop makes (bytes read + written over the seconds)."""
    d2 = torch.rand(tile, tile) * 100
    argument = -0.1 * d2  # exponents in [-10, 0], as for most pairs of a wide bandwidth
    e, w, square = torch.exp(argument), torch.rand(tile, tile), torch.empty(tile, tile)
    size = d2.numel() * 4
    # no pass feeds its output back into an exponential, so repeats see the same values
    passes = {"mul (out=)": (lambda: torch.mul(d2, -0.1, out=e), 2), "clamp_": (lambda: e.clamp_(min=-80.0), 2),
              "exp (out=)": (lambda: torch.exp(argument, out=e), 2), "sum": (lambda: e.sum(), 1),
              "square (out=)": (lambda: torch.mul(e, e, out=square), 2),
              "add_ (alpha)": (lambda: w.add_(e, alpha=0.2), 3),
              "sum(dim=0)": (lambda: w.sum(dim=0), 1)}
    out = {}
    for name, (fn, touches) in passes.items():
        seconds = median_seconds(fn, repeats)
        out[name] = {"us": seconds * 1e6, "gb_per_s": touches * size / seconds / 1e9}
    return out


def phase_split(n: int, f: int, with_grad: bool) -> dict:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, f, generator=gen), torch.randn(n, f, generator=gen)
    gammas = mmd._gammas(mmd.DEFAULT_BANDWIDTHS)

    def run():
        mmd._torch_pass(x, y, gammas, 1e-7, -1e-7, with_grad, mmd.SINGLE_PROCESS)

    wall = median_seconds(run, 2)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    split = {"products": 0.0, "exponentials": 0.0, "other elementwise": 0.0}
    for event in prof.key_averages():
        phase = next((p for p, names in PHASES.items() if event.key in names), "other elementwise")
        split[phase] += event.self_cpu_time_total / 1e6
    return {"wall_seconds": wall, "profiled_seconds": split}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=positive_int, default=4096)
    parser.add_argument("--f", type=positive_int, default=512)
    parser.add_argument("--threads", type=positive_int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=positive_int, default=15)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    tile = mmd.TORCH_TILE
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        row = {"threads": threads, "products": product_rates(tile, args.f, args.repeats),
               "elementwise": elementwise_rates(tile, args.repeats),
               "forward": phase_split(args.n, args.f, False), "forward+backward": phase_split(args.n, args.f, True)}
        rows.append(row)
        p = row["products"]
        print(f"{threads} thread(s): tile product {tile}x{args.f}x{tile}: MKL {p['mkl_gflops']:.0f} GFLOP/s, "
              f"oneDNN {p['onednn_gflops']:.0f} GFLOP/s")
        print("  elementwise over a " + f"{tile}x{tile} fp32 tile: " + ", ".join(
            f"{k} {v['us']:.0f} us ({v['gb_per_s']:.0f} GB/s)" for k, v in row["elementwise"].items()))
        for mode in ("forward", "forward+backward"):
            split = row[mode]["profiled_seconds"]
            total = sum(split.values())
            print(f"  N={args.n} F={args.f} {mode:<17} {row[mode]['wall_seconds']:.3f}s: " + ", ".join(
                f"{k} {v:.3f}s ({100 * v / total:.0f}%)" for k, v in split.items()), flush=True)
    name = cpu_model()
    slug = re.sub(r"[^a-z0-9]+", "-", name.split("(")[0].lower()).strip("-")
    out = args.out or RESULTS / f"mmd-cpu-profile-{slug}.json"
    write_json(out, {"device": name, "torch": torch.__version__, "n": args.n, "f": args.f, "tile": tile,
                     "onednn_products": mmd.onednn_matmul_usable(torch.float32, torch.device("cpu")),
                     "rows": rows, "date": time.strftime("%Y-%m-%d")})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
