"""LM training step cost with the fused output-heads + cross-entropy on and off, side by side.

For each preset a few optimiser steps of the full trainer (learned text encoder, delay pattern, AdamW) on a
synthetic token folder of 4 x ``codebook_size`` codes: median seconds per step, codes per second
(batch x K x frames / step time) and peak memory. Off = the K heads' logits ``[B, K, S, V]`` in fp32 and
``F.cross_entropy``; on = ``mmdgen.kernels.cross_entropy`` (no logits tensor). Prints a table and writes
``bench/results/train_lm-<device>.json``.

    python bench/train_lm.py
    python bench/train_lm.py --presets tiny --batch-size 32 --frames 500
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from harness import (RESULTS, device_name, fmt_mem, fmt_time, parse_args, ratio, run_case, time_and_peak,
                     write_json)


def synthetic_tokens(folder: str, clips: int, frames: int, codebook_size: int) -> None:
    from mmdgen.data.tokenize import write_token_folder

    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(0, codebook_size, (4, clips * frames), generator=generator, dtype=torch.int64)
    records = [{"id": f"clip{i}", "split": "train", "caption": f"a piece number {i % 7} on instrument {i % 5}",
                "offset": i * frames, "frames": frames} for i in range(clips)]
    header = {"format": 1, "codec": {"config": {}, "weights_sha256": "synthetic"}, "num_codebooks": 4,
              "codebook_size": codebook_size, "frame_rate": 50.0, "sample_rate": 32000, "manifest": "synthetic",
              "splits": {"train": clips * frames}, "clips": records}
    write_token_folder(folder, header, {"train": codes.to(torch.int16)})


def measure(spec: dict) -> dict:
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
            result["codes_per_s"] = spec["batch_size"] * 4 * spec["frames"] / result["seconds"]
        return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--frames", type=int, default=250, help="frames per crop (50 per second)")
    parser.add_argument("--codebook-size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    args = parse_args(parser, measure, argv)
    if args is None:
        return
    device = torch.device(args.device)
    name = device_name(device)
    print(f"LM training step, batch {args.batch_size} x {args.frames} frames x 4 codebooks of {args.codebook_size}, "
          f"on {name}; median of {args.repeats}")
    header = (f"{'preset':<7} {'plain CE':>9} {'fused CE':>9} {'speedup':>8} {'codes/s fused':>14} "
              f"{'mem plain':>10} {'mem fused':>10} {'mem ratio':>10}")
    print(header)
    print("-" * len(header))
    rows = []
    for preset in args.presets:
        results = {}
        for label, fused in (("plain", False), ("fused", True)):
            spec = {"preset": preset, "batch_size": args.batch_size, "frames": args.frames,
                    "codebook_size": args.codebook_size, "fused": fused, "repeats": args.repeats,
                    "device": str(device)}
            results[label] = run_case(__file__, measure, spec, device)
        plain, fused = results["plain"], results["fused"]
        rate = "-" if "codes_per_s" not in fused else f"{fused['codes_per_s']:.0f}"
        print(f"{preset:<7} {fmt_time(plain):>9} {fmt_time(fused):>9} {ratio(plain, fused, 'seconds'):>8} "
              f"{rate:>14} {fmt_mem(plain):>10} {fmt_mem(fused):>10} {ratio(plain, fused, 'peak_bytes'):>10}",
              flush=True)
        rows.append({"preset": preset, "plain_ce": plain, "fused_ce": fused})
    out = args.out or RESULTS / f"train_lm-{device.type}.json"
    write_json(out, {"device": name, "torch": torch.__version__, "batch_size": args.batch_size,
                     "frames": args.frames, "codebook_size": args.codebook_size, "rows": rows,
                     "date": time.strftime("%Y-%m-%d")})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
