"""LM training step: where its time goes (text encoder, data, LM forward, loss, backward, optimiser), tokens/s and
peak memory per model size and memory saver; and the fused output-heads + cross-entropy on and off.

Table 1, the step split. Each case runs ``LMTrainer.train_step`` itself (a frozen T5 encoder of t5-base widths with
random weights, the delay pattern, AdamW) on a synthetic token folder of 4 x 2048 codes, with timers at hooks:

    data          the loader's batch (crops, collate, to the device), caption dropout, teacher forcing, zero_grad
    text          the text conditioner's forward: the cached T5 states (the trainer's default for a frozen
                  encoder: a lookup) or, in the "T5 every step" rows, the T5 encoder itself
    LM forward    the embeddings, the decoder layers and the final norm (under FSDP: the parameter all-gathers)
    loss fwd      the output heads and the cross-entropy; the fused kernel computes its gradients here already
    metrics       the trainer's read of the losses (a device sync; with several processes an all-reduce)
    loss bwd      backward through the loss to the final norm's output
    LM backward   backward through the layers (recomputing them under activation checkpointing; under FSDP the
                  gradient reduce-scatters) down to the embeddings' output
    optimiser     the embeddings' gradient, the loss all-reduce, gradient clipping and the AdamW step

The marks are wall-clock times taken in module and tensor hooks (on CUDA after a synchronize), so the phases are
contiguous and add up to the step; each must fire exactly once a step. Columns: tokens/s (batch x K x frames /
step time), the process's peak memory above its start (on CPU: resident memory, so it includes the T5 weights the
trainer keeps in host memory, about 0.4 GiB; on CUDA: allocated memory) and the split in ms and % of the step;
``T5/step`` is the T5 encoder run alone on the same captions (what every step would add without the cache).
Sizes: ``mini`` at its usual crop (16 x 150 frames) and ``small`` (MusicGen small's widths) at 30 s (1 x 1500
frames), each with and without activation checkpointing, and with the plain cross-entropy; mini also with the T5
run every step; FSDP (mini, CPU only): two gloo processes, each one rank of a
global batch of 2 x the batch (on a CPU the two ranks share the cores and talk through gloo: it measures FSDP's
overhead, not a gain; threads are split between them). Medians over ``--repeats`` steps after one warm-up step;
the small size takes tens of seconds a step on a laptop-class CPU, so it runs ``--small-repeats`` (1) step.

Table 2, fused cross-entropy on and off (``--ce-presets``): median seconds per step, codes/s and the step's
added peak memory for each preset at ``--ce-batch-size`` x ``--ce-frames`` (learned text encoder).

Prints both tables and writes ``bench/results/train_lm-<device>.json`` (the device named in it).

    python bench/train_lm.py                       # both tables (about 15 minutes on 2 CPU cores)
    python bench/train_lm.py --quick               # tiny preset, 20 frames, one repeat: a smoke run (< 1 minute)
    python bench/train_lm.py --tables split --sizes mini --no-fsdp
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from harness import (RESULTS, device_name, fmt_mem, fmt_time, parse_args, proc_bytes, ratio, run_case, synchronize,
                     time_and_peak, write_json)

CODEBOOKS = 4
PHASES = ("data", "text", "lm_forward", "loss_forward", "metrics", "loss_backward", "lm_backward", "optimizer")
# mark -> the phase that ends there, in the order they fire within one step
MARKS = (("model_called", "data"), ("text_start", "lm_forward"), ("text_end", "text"), ("hidden_end", "lm_forward"),
         ("forward_end", "loss_forward"), ("backward_start", "metrics"), ("hidden_grad", "loss_backward"),
         ("embedding_grad", "lm_backward"), ("step_end", "optimizer"))
CAPTIONS = ("an upbeat electronic dance track with a driving kick and bright synth stabs",
            "a calm acoustic guitar ballad with soft strings", "epic orchestral score with brass and timpani",
            "lo-fi hip hop beat with a dusty piano loop", "a fast irish reel on fiddle and bodhran")
SIZES = {"tiny": {"batch_size": 2, "frames": 20}, "mini": {"batch_size": 16, "frames": 150},
         "small": {"batch_size": 1, "frames": 1500}}


# -- fixtures: tokens and a T5 folder --------------------------------------------------------------------------------

def synthetic_tokens(folder: str, clips: int, frames: int, codebook_size: int) -> None:
    from mmdgen.data.tokenize import write_token_folder

    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(0, codebook_size, (CODEBOOKS, clips * frames), generator=generator, dtype=torch.int64)
    records = [{"id": f"clip{i}", "split": "train", "caption": CAPTIONS[i % len(CAPTIONS)],
                "offset": i * frames, "frames": frames} for i in range(clips)]
    header = {"format": 1, "codec": {"config": {}, "weights_sha256": "synthetic"}, "num_codebooks": CODEBOOKS,
              "codebook_size": codebook_size, "frame_rate": 50.0, "sample_rate": 32000, "manifest": "synthetic",
              "splits": {"train": clips * frames}, "clips": records}
    write_token_folder(folder, header, {"train": codes.to(torch.int16)})


def t5_base_folder(folder: str | Path, layers: int = 12) -> str:
    """A t5-base-wide encoder with random weights (transformers' format) and a word-level tokenizer over CAPTIONS:
    the published MusicGen's text encoder at its real cost, nothing downloaded."""
    import transformers

    from mmdgen.model.text import word_level_t5_tokenizer

    torch.manual_seed(0)
    model = transformers.T5EncoderModel(transformers.T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072,
                                                              num_layers=layers, num_heads=12,
                                                              feed_forward_proj="relu"))
    model.save_pretrained(folder)
    word_level_t5_tokenizer(list(CAPTIONS)).save_pretrained(folder)
    return str(folder)


# -- the step split ----------------------------------------------------------------------------------------------------

class StepClock:
    """Wall-clock marks inside one training step, set by hooks on the trainer's modules and tensors (CUDA synchronized
    first, so that a mark falls where the device's work before it ends). Each mark must fire once a step."""

    def __init__(self, trainer, device: torch.device):
        self.device, self.marks, self.counts = device, {}, {}
        model = trainer.model
        # first and last of the model's hooks: FSDP's parameter all-gathers and reshards fall inside the forward
        model.register_forward_pre_hook(lambda module, args: self.mark("model_called"), prepend=True)
        model.text.register_forward_pre_hook(lambda module, args: self.mark("text_start"))
        model.text.register_forward_hook(lambda module, args, out: self.mark("text_end"))
        trainer.lm.norm.register_forward_hook(self._hidden_done)
        trainer.lm.embeddings[0].register_forward_hook(self._embedded)
        model.register_forward_hook(self._forward_done)

    def mark(self, name: str) -> None:
        synchronize(self.device)
        self.marks[name] = time.perf_counter()
        self.counts[name] = self.counts.get(name, 0) + 1

    def _embedded(self, module, args, embedded) -> None:  # its gradient comes last, before the embedding's own
        embedded.register_hook(lambda grad: self.mark("embedding_grad"))

    def _hidden_done(self, module, args, hidden) -> None:
        self.mark("hidden_end")
        hidden.register_hook(lambda grad: self.mark("hidden_grad"))

    def _forward_done(self, module, args, out) -> None:
        self.mark("forward_end")
        out[0].register_hook(lambda grad: self.mark("backward_start"))  # the loss: its gradient comes first

    def step(self, trainer, batches) -> dict:
        """One training step from the batch's loading on: its seconds and the phases' seconds."""
        self.marks, self.counts = {}, {}
        self.mark("start")
        trainer.train_step([next(batches)])
        self.mark("step_end")
        wrong = {name: self.counts.get(name, 0) for name, _ in MARKS if self.counts.get(name, 0) != 1}
        if wrong:
            raise RuntimeError(f"bench/train_lm.py: each mark must fire once a step; fired {wrong}")
        phases, previous = dict.fromkeys(PHASES, 0.0), self.marks["start"]
        for name, phase in MARKS:
            phases[phase] += self.marks[name] - previous
            previous = self.marks[name]
        return {"seconds": self.marks["step_end"] - self.marks["start"], "phases": phases}


def split_cfg(spec: dict, folder: str, rank_batch: int):
    from mmdgen.train.lm import LMTrainConfig

    return LMTrainConfig(tokens=f"{folder}/tokens", out=f"{folder}/run", preset=spec["preset"], text="t5",
                         text_path=spec["t5"], text_cache=spec["text_cache"], batch_size=rank_batch,
                         crop_frames=spec["frames"], fused_ce=spec["fused"], device=spec["device"],
                         activation_checkpointing=spec["checkpointing"], fsdp=spec["processes"] > 1,
                         steps=10**6, valid_every=10**6, valid_clips=0)


def measure_split(spec: dict, folder: str, start_bytes: int) -> dict:
    """Warm-up step, then ``repeats`` timed steps of one process (a rank under FSDP): medians, peak memory."""
    from mmdgen.train.lm import LMTrainer

    device = torch.device(spec["device"])
    trainer = LMTrainer(split_cfg(spec, folder, spec["batch_size"]), progress=False)
    clock, batches = StepClock(trainer, device), trainer._batches()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    clock.step(trainer, batches)  # warm-up (allocates the optimiser state)
    steps = [clock.step(trainer, batches) for _ in range(spec["repeats"])]
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start_bytes
    seconds = statistics.median(s["seconds"] for s in steps)
    result = {"seconds": seconds, "times": [s["seconds"] for s in steps], "peak_bytes": peak,
              "phases": {p: statistics.median(s["phases"][p] for s in steps) for p in PHASES},
              "tokens_per_s": spec["batch_size"] * spec["processes"] * CODEBOOKS * spec["frames"] / seconds}
    result["t5_per_step"] = t5_seconds(trainer, device, spec["repeats"])
    return result


@torch.no_grad()
def t5_seconds(trainer, device: torch.device, repeats: int) -> float:
    """Median seconds of the T5 encoder on one batch's captions (on the step's device)."""
    t5 = trainer.text.to(device)
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(trainer.cfg.batch_size)]
    t5(captions)
    times = []
    for _ in range(max(repeats, 3)):
        synchronize(device)
        start = time.perf_counter()
        t5(captions)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _fsdp_rank(rank: int, spec: dict, folder: str, init_file: str, threads: int) -> None:
    import gc

    import torch.distributed as dist

    import mmdgen.train.lm  # noqa: F401 (the imports' memory is not the case's)

    torch.set_num_threads(threads)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(spec["processes"]), LOCAL_RANK=str(rank))
    start_bytes = proc_bytes("/proc/self/status", "VmRSS")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=spec["processes"])
    try:
        result = measure_split(spec, folder, start_bytes)
        Path(folder, f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()
    finally:
        gc.collect()  # the sharded model's collectives gone before the process group (else an abort at exit)
        dist.destroy_process_group()


def measure(spec: dict) -> dict:
    """One case in this (fresh) process: the step split, or the fused-CE comparison."""
    if spec["table"] == "ce":
        return measure_ce(spec)
    import mmdgen.train.lm  # noqa: F401 (the imports' memory is not the case's)

    start_bytes = proc_bytes("/proc/self/status", "VmRSS")
    with tempfile.TemporaryDirectory() as folder:
        synthetic_tokens(f"{folder}/tokens", spec["batch_size"] * spec["processes"], spec["frames"], 2048)
        if spec["processes"] == 1:
            return measure_split(spec, folder, start_bytes)
        import torch.multiprocessing as mp

        threads = max(1, torch.get_num_threads() // spec["processes"])
        mp.spawn(_fsdp_rank, args=(spec, folder, f"{folder}/init", threads), nprocs=spec["processes"], join=True)
        ranks = [json.loads(Path(folder, f"rank{r}.json").read_text()) for r in range(spec["processes"])]
        slowest = max(ranks, key=lambda r: r["seconds"])  # the step ends when the slowest rank's does
        return {**slowest, "peak_bytes": max(r["peak_bytes"] for r in ranks), "threads_per_rank": threads,
                "rank_seconds": [r["seconds"] for r in ranks]}


def split_cases(args) -> list[dict]:
    """The cases of table 1: per size, activation checkpointing off and on (fused CE, cached T5); plain CE; the T5
    run every step (sizes with a batch of more than one caption, where it costs most); FSDP on two CPU processes
    (tiny and mini: two ranks of the small size at 1500 frames would need about twice the memory of one)."""
    cases = []
    for size in args.sizes:
        shape = SIZES[size]
        base = {"table": "split", "preset": size, **shape, "fused": True, "checkpointing": False, "text_cache": True,
                "processes": 1, "repeats": args.small_repeats if size == "small" else args.repeats}
        cases += [{**base, "label": "fused CE"}, {**base, "label": "+ act. ckpt", "checkpointing": True},
                  {**base, "label": "plain CE", "fused": False}]
        if size != "small":
            cases.append({**base, "label": "T5 every step", "text_cache": False})
        if args.fsdp and size != "small" and not args.device.startswith("cuda"):  # two ranks need two GPUs
            cases += [{**base, "label": "FSDP x2", "processes": 2},
                      {**base, "label": "FSDP x2 + ckpt", "processes": 2, "checkpointing": True}]
    return cases


def fmt_split(result: dict) -> str:
    if "oom" in result:
        return "OOM"
    total = result["seconds"]
    return "  ".join(f"{1e3 * result['phases'][p]:>7.1f} {100 * result['phases'][p] / total:>3.0f}%" for p in PHASES)


def run_split(args, device: torch.device) -> list[dict]:
    cases = split_cases(args)
    labels = {"data": "data", "text": "text", "lm_forward": "LM fwd", "loss_forward": "loss fwd",
              "metrics": "metrics", "loss_backward": "loss bwd", "lm_backward": "LM bwd", "optimizer": "optim"}
    print("\nTable 1: one training step split into phases, ms and % of the step (T5 text encoder; medians)")
    header = (f"{'size':<6} {'case':<15} {'B x T':>9} {'step':>8} {'tokens/s':>9} {'peak':>9} {'T5/step':>8}  "
              + "  ".join(f"{labels[p]:>12}" for p in PHASES))
    print(header)
    print("-" * len(header))
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        t5 = t5_base_folder(folder, args.t5_layers)
        for case in cases:
            spec = {**case, "device": str(device), "t5": t5}
            result = run_case(__file__, measure, spec, device)
            shape = f"{case['batch_size'] * case['processes']}x{case['frames']}"
            rate = "-" if "oom" in result else f"{result['tokens_per_s']:.0f}"
            t5_ms = "-" if "oom" in result else f"{1e3 * result['t5_per_step']:.0f}ms"
            print(f"{case['preset']:<6} {case['label']:<15} {shape:>9} {fmt_time(result):>8} {rate:>9} "
                  f"{fmt_mem(result):>9} {t5_ms:>8}  {fmt_split(result)}", flush=True)
            rows.append({**{k: v for k, v in spec.items() if k != "t5"}, **result})
    return rows


# -- fused cross-entropy on and off ----------------------------------------------------------------------------------

def measure_ce(spec: dict) -> dict:
    from mmdgen.train.lm import LMTrainConfig, LMTrainer

    with tempfile.TemporaryDirectory() as folder:
        synthetic_tokens(f"{folder}/tokens", spec["batch_size"], spec["frames"], spec["codebook_size"])
        cfg = LMTrainConfig(tokens=f"{folder}/tokens", out=f"{folder}/run", preset=spec["preset"],
                            batch_size=spec["batch_size"], crop_frames=spec["frames"], fused_ce=spec["fused"],
                            device=spec["device"], steps=10**6, valid_every=10**6)
        trainer = LMTrainer(cfg, progress=False)
        batches = trainer._batches()
        trainer.train_step([next(batches)])  # warm-up outside the timing
        batch = next(batches)
        result = time_and_peak(lambda: trainer.train_step([batch]), spec["repeats"], torch.device(spec["device"]))
        if "seconds" in result:
            result["codes_per_s"] = spec["batch_size"] * CODEBOOKS * spec["frames"] / result["seconds"]
        return result


def run_ce(args, device: torch.device) -> list[dict]:
    print(f"\nTable 2: fused CE on and off, batch {args.ce_batch_size} x {args.ce_frames} frames x {CODEBOOKS} "
          f"codebooks of 2048 (learned text encoder); median of {args.repeats}")
    header = (f"{'preset':<7} {'plain CE':>9} {'fused CE':>9} {'speedup':>8} {'codes/s fused':>14} "
              f"{'mem plain':>10} {'mem fused':>10} {'mem ratio':>10}")
    print(header)
    print("-" * len(header))
    rows = []
    for preset in args.ce_presets:
        results = {}
        for label, fused in (("plain", False), ("fused", True)):
            spec = {"table": "ce", "preset": preset, "batch_size": args.ce_batch_size, "frames": args.ce_frames,
                    "codebook_size": 2048, "fused": fused, "repeats": args.repeats, "device": str(device)}
            results[label] = run_case(__file__, measure, spec, device)
        plain, fused = results["plain"], results["fused"]
        rate = "-" if "codes_per_s" not in fused else f"{fused['codes_per_s']:.0f}"
        print(f"{preset:<7} {fmt_time(plain):>9} {fmt_time(fused):>9} {ratio(plain, fused, 'seconds'):>8} "
              f"{rate:>14} {fmt_mem(plain):>10} {fmt_mem(fused):>10} {ratio(plain, fused, 'peak_bytes'):>10}",
              flush=True)
        rows.append({"preset": preset, "batch_size": args.ce_batch_size, "frames": args.ce_frames,
                     "plain_ce": plain, "fused_ce": fused})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tables", nargs="+", choices=["split", "ce"], default=["split", "ce"])
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["mini", "small"],
                        help="table 1's sizes: tiny (2 x 20 frames), mini (16 x 150), small (1 x 1500)")
    parser.add_argument("--no-fsdp", dest="fsdp", action="store_false", help="table 1 without the FSDP rows")
    parser.add_argument("--t5-layers", type=int, default=12, help="the T5 encoder's layers (t5-base: 12)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--small-repeats", type=int, default=1, help="timed steps of the small size (table 1)")
    parser.add_argument("--ce-presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--ce-batch-size", type=int, default=8)
    parser.add_argument("--ce-frames", type=int, default=250, help="frames per crop (50 per second)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: table 1 for tiny (2 x 20 frames, 2-layer T5), one repeat, no FSDP, no table 2")
    args = parse_args(parser, measure, argv)
    if args is None:
        return
    if args.quick:
        args.tables, args.sizes, args.t5_layers, args.repeats, args.fsdp = ["split"], ["tiny"], 2, 1, False
    device = torch.device(args.device)
    name = device_name(device)
    print(f"LM training step on {name}")
    payload = {"device": name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
               "t5_layers": args.t5_layers, "repeats": args.repeats, "small_repeats": args.small_repeats}
    if "split" in args.tables:
        payload["split"] = run_split(args, device)
    if "ce" in args.tables:
        payload["fused_ce"] = run_ce(args, device)
    out = args.out or RESULTS / f"train_lm-{device.type}.json"
    write_json(out, payload)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
