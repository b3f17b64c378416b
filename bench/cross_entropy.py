"""LM output heads + cross-entropy: mmdgen's fused, chunked loss against the naive one, forward + backward.

For hidden states ``[N, C]`` (N = batch * steps), K heads ``[K, V, C]`` and targets ``[N, K]`` (10% of
them ignored): the naive loss forms the fp32 logits ``[N, K, V]`` with one einsum and takes
``F.cross_entropy`` per codebook (audiocraft's mean over K), autograd does the backward; mmdgen's
``linear_cross_entropy`` (PyTorch path on CPU, Triton kernel on CUDA) never holds more than one chunk
of logits. Median time of forward + backward over repeats and peak memory of both, side by side in one
run; prints a table and writes ``bench/results/cross_entropy-<device>.json`` and the table as ``.txt``.

    python bench/cross_entropy.py                       # N in 4096 16384, C in 256 1024, K = 4, V = 2048
    python bench/cross_entropy.py --sizes 4096 --dims 256 --repeats 3
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from harness import (RESULTS, device_name, fmt_mem, fmt_time, parse_args, ratio, run_case, time_and_peak,
                     write_json)

METHODS = ("naive", "mmdgen")
IGNORED = 0.1


def _inputs(n: int, c: int, k: int, v: int, device: torch.device, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, c, generator=gen).to(device, dtype).requires_grad_()
    weight = (torch.randn(k, v, c, generator=gen) / c ** 0.5).to(device, dtype).requires_grad_()
    targets = torch.randint(0, v, (n, k), generator=gen)
    targets[torch.rand(n, k, generator=gen) < IGNORED] = -100
    return hidden, weight, targets.to(device)


def _loss(method: str, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if method == "mmdgen":
        from mmdgen.kernels.cross_entropy import linear_cross_entropy

        return linear_cross_entropy(hidden, weight, targets)[0]
    logits = torch.einsum("nc,kvc->nkv", hidden, weight).float()  # [N, K, V]
    per = [F.cross_entropy(logits[:, k], targets[:, k], ignore_index=-100) for k in range(weight.shape[0])]
    return torch.stack(per).mean()


def _step(method: str, hidden, weight, targets) -> torch.Tensor:
    hidden.grad = weight.grad = None
    loss = _loss(method, hidden, weight, targets)
    loss.backward()
    return loss.detach()


def measure(spec: dict) -> dict:
    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    hidden, weight, targets = _inputs(spec["n"], spec["c"], spec["k"], spec["v"], device, dtype)
    small = hidden[:64].detach().requires_grad_()
    _step(spec["method"], small, weight, targets[:64])  # load (and on CUDA compile) kernels first
    result = time_and_peak(lambda: _step(spec["method"], hidden, weight, targets), spec["repeats"], device)
    result["loss"] = float(_step(spec["method"], hidden, weight, targets))
    result["grad_hidden_norm"] = float(hidden.grad.float().norm())
    result["grad_weight_norm"] = float(weight.grad.float().norm())
    return result


def _same(a: dict, b: dict) -> str:
    if "oom" in a or "oom" in b:
        return "-"
    close = all(abs(a[key] - b[key]) <= 1e-4 * abs(b[key]) for key in ("loss", "grad_hidden_norm", "grad_weight_norm"))
    return str(close)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384], help="N rows (batch * steps)")
    parser.add_argument("--dims", type=int, nargs="+", default=[256, 1024], help="C model dimension")
    parser.add_argument("--heads", type=int, default=4, help="K codebooks")
    parser.add_argument("--classes", type=int, default=2048, help="V per codebook")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    args = parse_args(parser, measure, argv)
    if args is None:
        return
    device = torch.device(args.device)
    name = device_name(device)
    backend = "triton" if device.type == "cuda" else "torch"
    lines = [f"heads + cross-entropy, forward + backward, K={args.heads}, V={args.classes}, {args.dtype}, "
             f"mmdgen {backend} path, on {name}; median of {args.repeats}"]
    header = (f"{'N':>6} {'C':>5} {'naive':>9} {'mmdgen':>9} {'speedup':>8} {'naive mem':>10} {'mmdgen mem':>11} "
              f"{'mem ratio':>9} {'same loss+grads':>15}")
    lines += [header, "-" * len(header)]
    print("\n".join(lines), flush=True)
    rows = []
    for n in args.sizes:
        for c in args.dims:
            results = {}
            for method in METHODS:
                spec = {"method": method, "n": n, "c": c, "k": args.heads, "v": args.classes,
                        "repeats": args.repeats, "device": str(device), "dtype": args.dtype}
                results[method] = run_case(__file__, measure, spec, device)
            naive, ours = results["naive"], results["mmdgen"]
            same = _same(ours, naive)
            line = (f"{n:>6} {c:>5} {fmt_time(naive):>9} {fmt_time(ours):>9} {ratio(naive, ours, 'seconds'):>8} "
                    f"{fmt_mem(naive):>10} {fmt_mem(ours):>11} {ratio(naive, ours, 'peak_bytes'):>9} {same:>15}")
            print(line, flush=True)
            lines.append(line)
            rows.append({"n": n, "c": c, "k": args.heads, "v": args.classes, "naive": naive, "mmdgen": ours,
                         "same_loss_and_grads": same})
    suffix = "" if args.dtype == "float32" else f"-{args.dtype}"
    out = args.out or RESULTS / f"cross_entropy-{device.type}{suffix}.json"
    write_json(out, {"device": name, "torch": torch.__version__, "dtype": args.dtype, "backend": backend,
                     "heads": args.heads, "classes": args.classes, "ignored_fraction": IGNORED,
                     "repeats": args.repeats, "rows": rows, "date": time.strftime("%Y-%m-%d")})
    from mmdgen.files import write_text_atomic

    write_text_atomic(out.with_suffix(".txt"), "\n".join(lines) + f"\nwrote {out}\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
