"""Codec training step cost with the independence loss off, on every step, and on the authors' schedule
(every ``--every`` steps on a macro-batch of the last ``--every`` steps' batches, re-encoded), side by side.

For each preset (tiny, paper) a few optimiser steps of the full trainer (balanced L1 + mel + adversarial
+ feature matching, commitment, and the delay-aligned independence loss when on) on synthetic clips:
median seconds per step (for the schedule: a whole period divided by its steps), steps/s and peak memory.
Prints a table and writes ``bench/results/train_codec-<device>.json``.

    python bench/train_codec.py
    python bench/train_codec.py --presets tiny --batch-size 16 --crop-seconds 1.0
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
from harness import (RESULTS, device_name, fmt_mem, fmt_time, parse_args, ratio, run_case, time_and_peak,
                     write_json)


def measure(spec: dict) -> dict:
    import soundfile

    from mmdgen.train.codec import CodecTrainConfig, CodecTrainer

    with tempfile.TemporaryDirectory() as folder:
        rng = np.random.default_rng(0)
        samples = int(spec["crop_seconds"] * 32000)
        for i in range(spec["batch_size"]):
            soundfile.write(f"{folder}/clip{i}.wav", (0.2 * rng.standard_normal(samples)).astype(np.float32), 32000)
        every = spec["every"]
        cfg = CodecTrainConfig(data=folder, out=f"{folder}/run", preset=spec["preset"], batch_size=spec["batch_size"],
                               crop_seconds=spec["crop_seconds"], mmd_weight=spec["mmd_weight"], mmd_delay=True,
                               mmd_every=every, mmd_batches=every, adversarial=spec["adversarial"],
                               device=spec["device"], steps=10**6)
        trainer = CodecTrainer(cfg, progress=False)
        batches = trainer._batches()
        batch = next(batches)

        def period() -> None:  # one independence-loss step and the steps until the next
            for _ in range(every):
                trainer.train_step([batch])
                trainer.step += 1

        period()  # k-means initialisation, the macro-batch history and warm-up outside the timing
        result = time_and_peak(period, spec["repeats"], torch.device(spec["device"]))
        result["seconds"] /= every
        result["times"] = [t / every for t in result["times"]]
        return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "paper"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--crop-seconds", type=float, default=1.0)
    parser.add_argument("--mmd-weight", type=float, default=1e4)
    parser.add_argument("--adversarial", action=argparse.BooleanOptionalAction, default=True,
                        help="train the discriminator too (the paper's recipe; most of the CPU time)")
    parser.add_argument("--every", type=int, default=8, help="the schedule's period and macro-batch (authors: 32)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parse_args(parser, measure, argv)
    if args is None:
        return
    device = torch.device(args.device)
    name = device_name(device)
    print(f"codec training step, batch {args.batch_size} x {args.crop_seconds} s, adversarial "
          f"{'on' if args.adversarial else 'off'}, on {name}; median of {args.repeats}")
    header = (f"{'preset':<7} {'no MMD':>9} {'with MMD':>9} {'overhead':>9} {f'every {args.every}':>9} {'overhead':>9} "
              f"{'mem no MMD':>11} {'mem MMD':>9} {f'mem every {args.every}':>13}")
    print(header)
    print("-" * len(header))
    rows = []
    for preset in args.presets:
        results = {}
        for label, weight, every in (("off", 0.0, 1), ("on", args.mmd_weight, 1),
                                     ("schedule", args.mmd_weight, args.every)):
            spec = {"preset": preset, "batch_size": args.batch_size, "crop_seconds": args.crop_seconds,
                    "mmd_weight": weight, "every": every, "repeats": args.repeats, "device": str(device),
                    "adversarial": args.adversarial}
            results[label] = run_case(__file__, measure, spec, device)
        off, on, schedule = results["off"], results["on"], results["schedule"]
        print(f"{preset:<7} {fmt_time(off):>9} {fmt_time(on):>9} {ratio(on, off, 'seconds'):>9} "
              f"{fmt_time(schedule):>9} {ratio(schedule, off, 'seconds'):>9} {fmt_mem(off):>11} {fmt_mem(on):>9} "
              f"{fmt_mem(schedule):>13}", flush=True)
        rows.append({"preset": preset, "mmd_off": off, "mmd_on": on, f"mmd_every_{args.every}": schedule})
    out = args.out or RESULTS / f"train_codec-{device.type}.json"
    write_json(out, {"device": name, "torch": torch.__version__, "batch_size": args.batch_size,
                     "crop_seconds": args.crop_seconds, "mmd_weight": args.mmd_weight, "every": args.every,
                     "adversarial": args.adversarial, "rows": rows,
                     "date": time.strftime("%Y-%m-%d")})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
