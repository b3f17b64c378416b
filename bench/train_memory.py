"""Memory per device to train each published MusicGen size on 30-s crops, per memory saver, from figures measured per
layer on this machine.

Measured: one forward and backward pass (the trainer's: delay pattern, fused output heads + cross-entropy, cached
T5 states of ``TEXT_TOKENS`` tokens) of 1- and 2-layer LMs at each published width (its heads and FFN, 4 x 2048
codes, T5's 768-wide states), at two crop lengths (``--frames``), in fp32 and under bf16 autocast, with activation
checkpointing off and on. A ``TorchDispatchMode`` counts the bytes of every tensor storage the pass allocates and
when each is freed (device independent: the same tensors would live on a GPU): ``activations``, the bytes alive at
the end of the forward (saved for the backward, autocast's bf16 weight copies included); leaving the weights'
gradients out, the most alive until the backward reaches the layers (``loss_peak``) and from there on
(``layers_peak``: every layer's activations, the top layer's recomputed ones under checkpointing, its backward's
temporaries). Each is fitted as ``a + b T + L (c + d T)`` (L layers, T frames) from the four (L, T) points: ``c + d
T`` is one layer's cost, ``a + b T`` the rest's (embeddings, heads and loss, text projection).

Computed for the real layer counts at 1500 frames (30 s at 50 Hz), batch 1, per device (``per_device``,
``pass_peak``): weights 4 B and AdamW moments 8 B (bf16: 4 B) per parameter, plus the larger of the pass's peak
(at the loss, at the top layer with its gradient, at the bottom layer with every gradient, or at the end) and the
optimiser step's (every gradient, 4 B, and fp32 AdamW's foreach temporary, 4 B: torch's default on CUDA makes one
for all the weights at once; bf16 moments go one tensor at a time). FSDP over N (with activation checkpointing and
bf16 moments): weights, moments and finished gradients / N, plus two layers' gathered weights (the current one and
the prefetched one) and the root unit's weights and gradient whole (embeddings, heads, text projection: FSDP2
keeps the root gathered from forward to backward). A second line gives the crops of 1500 frames that fit an 80 GB
device (the per-frame terms grow with the crops).

Check: 2 layers of the small width at 1500 frames, fp32: the counted pass's peak against the prediction
extrapolated from the short crops (checkpointing off and on), and two real training steps in a fresh process, their
peak resident memory against the formula (the process's memory: tensors, but also the BLAS library's workspaces).

Prints the tables and writes ``bench/results/train_memory-cpu.json``.

    python bench/train_memory.py                    # about 10 minutes on 2 CPU cores
    python bench/train_memory.py --frames 100 200 --sizes small --no-check
"""

from __future__ import annotations

import argparse
import os
import time
import weakref
from contextlib import nullcontext

import torch
from harness import RESULTS, device_name, parse_args, proc_bytes, run_case, write_json
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

GiB = 2**30
TEXT_DIM, TEXT_TOKENS, CODEBOOKS, CODES = 768, 20, 4, 2048
TARGET_FRAMES = 1500  # 30 s at 50 frames/s
# the published sizes: (dim, layers, heads, ffn_dim)
SIZES = {"small": (1024, 24, 16, 4096), "medium": (1536, 48, 24, 6144), "large": (2048, 48, 32, 8192)}
PRECISIONS = ("fp32", "bf16")  # bf16: autocast, the weights and the moments' computation in fp32
DEVICE_GIB = 78  # an 80 GB H100 has 81559 MiB (79.6 GiB), less the CUDA context and the allocator's slack
SAVERS = ("none", "act. ckpt", "bf16 optim", "ckpt + bf16 optim", "FSDP x2", "FSDP x4", "FSDP x8")


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the tensor storages the ops under it allocate while they are alive, and their peak.

    An op's output on an input's storage (a view, an in-place op) is no allocation; a storage is counted once, at its
    full size, until it is freed. The log of allocations and frees gives the peak without some of them afterwards
    (``peak_without``: the pass's peak leaving its gradients out)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[int, int]] = {}  # pointer -> (allocation number, bytes)
        self.log: list[tuple[int, int]] = []  # (allocation number, +bytes allocated or -bytes freed)
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._allocated(tensor.untyped_storage(), inputs)
        return out

    def _allocated(self, storage, inputs: set[int]) -> None:
        pointer, size = storage.data_ptr(), storage.nbytes()
        if pointer in inputs or pointer in self.live or size == 0:
            return
        number = len(self.log)
        self.live[pointer] = (number, size)
        self.log.append((number, size))
        self.now += size
        self.peak = max(self.peak, self.now)
        weakref.finalize(storage, self._freed, pointer)

    def _freed(self, pointer: int) -> None:
        number, size = self.live.pop(pointer)
        self.log.append((number, -size))
        self.now -= size

    def mark(self) -> int:
        """A point in the log (``peak_without``'s bounds)."""
        return len(self.log)

    def peak_without(self, pointers: set[int], start: int = 0, end: int | None = None) -> int:
        """The peak between two marks of the storages alive, leaving out those now at ``pointers``."""
        left_out = {self.live[p][0] for p in pointers if p in self.live}
        now = peak = 0
        for index, (number, change) in enumerate(self.log[:end]):
            if number not in left_out:
                now += change
                if index >= start:
                    peak = max(peak, now)
        return peak


def build_lm(size: str, layers: int, checkpointing: bool):
    from mmdgen.model.lm import LMConfig, MusicLM

    dim, _, heads, ffn = SIZES[size]
    torch.manual_seed(0)
    lm = MusicLM(LMConfig(dim=dim, layers=layers, heads=heads, ffn_dim=ffn, text_dim=TEXT_DIM,
                          num_codebooks=CODEBOOKS, codebook_size=CODES))
    lm.activation_checkpointing = checkpointing
    return lm


def training_batch(frames: int) -> tuple[torch.Tensor, ...]:
    """One crop's (inputs, targets) laid out by the delay pattern, and T5-like states with their mask."""
    from mmdgen.model.patterns import make_pattern
    from mmdgen.train.lm import teacher_forcing

    generator = torch.Generator().manual_seed(1)
    codes = torch.randint(0, CODES, (1, CODEBOOKS, frames), generator=generator)
    inputs, targets = teacher_forcing(codes, make_pattern("delay", CODEBOOKS, None), CODES)
    states = torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=generator)
    return inputs, targets, states, torch.ones(1, TEXT_TOKENS, dtype=torch.bool)


def loss_of(lm, batch, precision: str) -> torch.Tensor:
    from mmdgen.losses.lm import codebook_losses

    inputs, targets, states, mask = batch
    context = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    with context:
        hidden = lm.hidden(inputs, states, mask)
        return codebook_losses(lm, hidden, targets, fused=True, backend="torch")[0]


def pass_bytes(spec: dict) -> dict:
    """The counted bytes of one forward and backward pass: alive at the forward's end (``activations``), at most
    (``peak``), and leaving the weights' gradients out, at most until the backward reaches the layers (``loss_peak``:
    the forward, the loss and the heads) and from there on (``layers_peak``); and the model's parameter count."""
    lm = build_lm(spec["size"], spec["layers"], spec["checkpointing"])
    batch = training_batch(spec["frames"])
    counter, layers_start = LiveBytes(), []
    # the backward reaches the layers when the final norm's output gets its gradient
    lm.norm.register_forward_hook(lambda module, args, out: out.register_hook(
        lambda grad: layers_start.append(counter.mark())) and None)
    with counter:
        loss = loss_of(lm, batch, spec["precision"])
        activations = counter.now
        loss.backward()
    grads = {p.grad.untyped_storage().data_ptr() for p in lm.parameters() if p.grad is not None}
    if not grads or not grads <= set(counter.live) or len(layers_start) != 1:
        raise RuntimeError("bench/train_memory.py: the counter missed the backward pass's gradients or the layers")
    return {"activations": activations, "peak": counter.peak, "params": sum(p.numel() for p in lm.parameters()),
            "loss_peak": counter.peak_without(grads, end=layers_start[0]),
            "layers_peak": counter.peak_without(grads, start=layers_start[0])}


def fit(points: dict[tuple[int, int], float], frames: tuple[int, int]) -> dict:
    """``value(L, T) = a + b T + L (c + d T)`` through the points at L in (1, 2), T in ``frames``."""
    t1, t2 = frames
    layer = {t: points[2, t] - points[1, t] for t in frames}
    rest = {t: points[1, t] - layer[t] for t in frames}
    d, b = (layer[t2] - layer[t1]) / (t2 - t1), (rest[t2] - rest[t1]) / (t2 - t1)
    return {"layer": layer[t1] - d * t1, "layer_per_frame": d, "rest": rest[t1] - b * t1, "rest_per_frame": b}


def at(coefficients: dict, layers: int, frames: int, items: int = 1) -> float:
    """The fitted value for ``layers`` layers and ``items`` crops of ``frames`` frames (the per-frame terms grow
    with the items, the constant ones, autocast's weight copies and the loss's head gradient, do not)."""
    c, tokens = coefficients, items * frames
    return c["rest"] + c["rest_per_frame"] * tokens + layers * (c["layer"] + c["layer_per_frame"] * tokens)


def parameters(size: str, layers: int) -> dict:
    """Parameter counts: per layer, the rest (the FSDP root unit), in all."""
    one, two = (sum(p.numel() for p in build_lm(size, n, False).parameters()) for n in (1, 2))
    return {"layer": two - one, "rest": 2 * one - two, "total": 2 * one - two + layers * (two - one)}


def pass_peak(figures: dict, params: dict, checkpointing: bool, layers: int, frames: int, items: int = 1,
              devices: int = 1) -> float:
    """A forward and backward pass's peak, from the fitted peaks without the weights' gradients: ``loss_peak`` (the
    forward and the loss's backward) and ``layers_peak`` (at the top layer: every layer's activations, under
    activation checkpointing the top layer's recomputed, its backward's temporaries). Going down, the backward frees
    a layer's activations and makes its gradient (4 B a weight; under FSDP reduce-scattered to 1/N once done), so
    the peak is at the loss, at the top layer (``layers_peak(L)`` and its gradient), at the bottom one
    (``layers_peak(1)`` and every layer's gradient) or at the end (every gradient)."""
    loss, layer = (figures[name][checkpointing] for name in ("loss_peak", "layers_peak"))
    grad = 4 * params["layer"]
    top = at(layer, layers, frames, items) + grad
    bottom = at(layer, 1, frames, items) + grad + (layers - 1) * grad / devices
    return max(at(loss, layers, frames, items), top, bottom, 4 * params["total"] / devices)


def per_device(params: dict, figures: dict, layers: int, saver: str, items: int = 1) -> float:
    """Bytes per device of one saver (``SAVERS``) for ``items`` crops of 1500 frames.

    Weights (4 B) and AdamW moments (8 B, bf16: 4 B) per parameter, plus the larger of the pass's peak and the
    optimiser step's (every gradient, 4 B, and fp32 AdamW's foreach temporary, 4 B). FSDP over N (with activation
    checkpointing and bf16 moments): weights and moments / N, the pass's peak with its finished gradients / N, two
    layers' gathered weights (the current one, the prefetched one) and the root unit's weights and gradient whole."""
    fsdp = saver.startswith("FSDP")
    checkpointing = "ckpt" in saver or fsdp
    moments = 4 if "bf16" in saver or fsdp else 8
    total, devices = params["total"], int(saver.split("x")[1]) if fsdp else 1
    peak = pass_peak(figures, params, checkpointing, layers, TARGET_FRAMES, items, devices)
    if fsdp:
        peak += 4 * 2 * params["layer"] + 8 * params["rest"]
    optimiser_step = (4 * total + (4 * total if moments == 8 else 0)) / devices
    return (4 + moments) * total / devices + max(peak, optimiser_step)


def items_on(device_bytes: float, params: dict, figures: dict, layers: int, saver: str, most: int = 4096) -> int:
    """How many crops of 1500 frames a device of ``device_bytes`` trains at once with one saver (0: not one)."""
    items = 0
    while items < most and per_device(params, figures, layers, saver, items + 1) <= device_bytes:
        items += 1
    return items


def measure(spec: dict) -> dict:
    """The check's child process: two real training steps."""
    return real_steps(spec)


def real_steps(spec: dict) -> dict:
    """Two full steps (AdamW fp32) of the check's model: the process's peak resident memory above its start."""
    import resource

    from mmdgen.train.optim import adamw

    start = proc_bytes("/proc/self/status", "VmRSS")
    lm = build_lm(spec["size"], spec["layers"], spec["checkpointing"])
    batch = training_batch(spec["frames"])
    optimizer = adamw([{"params": list(lm.parameters()), "weight_decay": 0.1}], 1e-4, (0.9, 0.95), "fp32")
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        loss_of(lm, batch, spec["precision"]).backward()
        optimizer.step()
    return {"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start,
            "params": sum(p.numel() for p in lm.parameters())}


def measure_figures(size: str, precision: str, frames: tuple[int, int]) -> tuple[dict, dict]:
    """Counted passes at 1-2 layers x ``frames``, activation checkpointing off and on, and the fitted figures."""
    points = {ckpt: {(n, t): pass_bytes({"size": size, "layers": n, "frames": t, "checkpointing": ckpt,
                                         "precision": precision}) for n in (1, 2) for t in frames}
              for ckpt in (False, True)}
    figures = {name: {ckpt: fit({k: v[name] for k, v in points[ckpt].items()}, frames) for ckpt in points}
               for name in ("activations", "loss_peak", "layers_peak")}
    measured = {f"{'ckpt' if ckpt else 'none'}/L{n}_T{t}": value for ckpt in points for (n, t), value in
                points[ckpt].items()}
    return measured, figures


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=list(SIZES))
    parser.add_argument("--frames", nargs=2, type=int, default=[150, 300], help="the two measured crop lengths")
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="skip the check at 1500 frames (2 layers of the small width)")
    args = parse_args(parser, measure, argv)
    if args is None:
        return
    device = torch.device("cpu")
    frames = tuple(args.frames)
    print(f"training memory from per-layer figures counted on {device_name(device)}; fits over 1-2 layers x "
          f"{frames[0]}/{frames[1]} frames")
    measured, figures = {}, {}
    for size in args.sizes:
        for precision in PRECISIONS:
            key = f"{size}/{precision}"
            measured[key], figures[key] = measure_figures(size, precision, frames)
            for ckpt in (False, True):
                print(f"{key + ('/ckpt' if ckpt else '/none'):<18} " + "; ".join(
                    f"{name.replace('_', ' ')}: per layer {c['layer'] / 2**20:5.1f} MiB + "
                    f"{c['layer_per_frame'] / 2**10:5.1f} KiB/frame, rest {c['rest'] / 2**20:5.1f} MiB + "
                    f"{c['rest_per_frame'] / 2**10:5.1f} KiB/frame" for name, c in
                    ((n, figures[key][n][ckpt]) for n in ("activations", "layers_peak"))), flush=True)
    tables = {}
    for precision in PRECISIONS:
        print(f"\nGiB per device, batch 1 x {TARGET_FRAMES} frames, {precision} "
              f"{'autocast' if precision == 'bf16' else 'weights and activations'}, AdamW; second line: crops of "
              f"{TARGET_FRAMES} frames that fit {DEVICE_GIB} GiB (an 80 GB H100)")
        header = f"{'size':<7} {'params':>7} " + " ".join(f"{s:>17}" for s in SAVERS)
        print(header)
        print("-" * len(header))
        for size in args.sizes:
            layers = SIZES[size][1]
            params = parameters(size, layers)
            fitted = figures[f"{size}/{precision}"]
            row = {saver: per_device(params, fitted, layers, saver) / GiB for saver in SAVERS}
            items = {saver: items_on(DEVICE_GIB * GiB, params, fitted, layers, saver) for saver in SAVERS}
            tables.setdefault(precision, {})[size] = {"params": params, "gib_per_device": row,
                                                      f"items_on_{DEVICE_GIB}_gib": items}
            print(f"{size:<7} {params['total'] / 1e9:6.2f}B " + " ".join(f"{row[s]:>17.1f}" for s in SAVERS))
            print(f"{'':<7} {'crops':>7} " + " ".join(f"{items[s]:>17}" for s in SAVERS))
    payload = {"device": device_name(device), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
               "frames_measured": frames, "target_frames": TARGET_FRAMES, "text_tokens": TEXT_TOKENS,
               "device_gib": DEVICE_GIB, "measured": measured, "figures": figures, "tables": tables}
    if args.check and "small" in args.sizes:
        payload["check"] = check(figures["small/fp32"], device)
    out = args.out or RESULTS / "train_memory-cpu.json"
    write_json(out, payload)
    print(f"wrote {out}")


def check(figures: dict, device: torch.device) -> dict:
    """2 layers of the small width at 1500 frames, fp32: the counted pass's peak against ``pass_peak`` (extrapolated
    from the short crops), activation checkpointing off and on; and two real training steps (AdamW fp32, no saver)
    in a fresh process, their peak resident memory against the formula (no foreach temporary: on a CPU torch's
    AdamW goes one tensor at a time)."""
    spec = {"size": "small", "layers": 2, "frames": TARGET_FRAMES, "precision": "fp32"}
    params = parameters("small", 2)
    result = {}
    for ckpt in (False, True):
        counted = pass_bytes({**spec, "checkpointing": ckpt})["peak"]
        predicted = pass_peak(figures, params, ckpt, 2, TARGET_FRAMES)
        result["ckpt" if ckpt else "none"] = {"counted_peak": counted, "predicted_peak": predicted,
                                              "error": predicted / counted - 1}
    # glibc keeps freed blocks below its (growing) mmap threshold for reuse: fixed at 128 KiB, freed tensors go back
    # to the system and the resident memory follows the live tensors (plus BLAS workspaces and the like)
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    try:
        real = run_case(__file__, measure, {**spec, "kind": "steps", "checkpointing": False}, device)
    finally:
        del os.environ["MALLOC_MMAP_THRESHOLD_"]
    total = params["total"]
    predicted = 12 * total + max(pass_peak(figures, params, False, 2, TARGET_FRAMES), 4 * total)
    result["real"] = {"peak_rss": real["peak_rss"], "predicted": predicted, "error": predicted / real["peak_rss"] - 1}
    print(f"\ncheck, small width, 2 layers, {TARGET_FRAMES} frames, fp32: pass peak counted "
          + ", ".join(f"{k} {v['counted_peak'] / GiB:.3f} GiB (predicted {100 * v['error']:+.1f}%)"
                      for k, v in result.items() if k != "real")
          + f"; two real steps {real['peak_rss'] / GiB:.3f} GiB resident (predicted {predicted / GiB:.3f} GiB, "
          f"{100 * result['real']['error']:+.1f}%)")
    return result


if __name__ == "__main__":
    main()
