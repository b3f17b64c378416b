"""Codec training step cost with the independence loss off, on every step, and on the authors' schedule
(every ``--every`` steps on a macro-batch of the last ``--every`` steps' batches, re-encoded), side by side.

For each preset (tiny, paper) a few optimiser steps of the full trainer (balanced L1 + mel + adversarial
+ feature matching, commitment, and the delay-aligned independence loss when on) on synthetic clips:
median seconds per step (for the schedule: a whole period divided by its steps), steps/s and peak memory.
Prints a table and writes ``bench/results/train_codec-<device>.json``.

    python bench/train_codec.py
    python bench/train_codec.py --presets tiny --batch-size 16 --crop-seconds 1.0

``--demo``: the step as ``mmdgen demo`` runs it (tiny, batch 8 of 1 s crops from 10 s FLAC clips, adversarial
off, MMD weight 3 every 8 steps), batches loaded from disk inside the timing, at one and two threads: the
baseline (the mel loss on torchaudio's MelSpectrogram, each clip decoded whole and then cropped) beside the
current code. Writes ``bench/results/train_codec-<device>-demo.{json,txt}``.

    python bench/train_codec.py --demo
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


class TorchaudioMelLoss(torch.nn.Module):
    """The baseline: the mel loss as first written, on torchaudio's MelSpectrogram (the same values)."""

    def __init__(self, sample_rate: int, n_ffts=(64, 128, 256, 512, 1024), floor: float = 1e-5):
        super().__init__()
        import warnings

        import torchaudio

        self.floor = floor
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.mels = torch.nn.ModuleList(
                torchaudio.transforms.MelSpectrogram(sample_rate=sample_rate, n_fft=n, win_length=n, hop_length=n // 4,
                                                     n_mels=64, normalized=True, center=False, power=1.0)
                for n in n_ffts)

    def forward(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        terms = []
        for mel in self.mels:
            log_fake = torch.log(mel(fake.float()).clamp_min(self.floor))
            log_real = torch.log(mel(real.float()).clamp_min(self.floor))
            terms.append(torch.nn.functional.l1_loss(log_fake, log_real)
                         + torch.nn.functional.mse_loss(log_fake, log_real))
        return torch.stack(terms).mean()


def _whole_file_crop(self, path, index):
    """The baseline's loading: the clip decoded whole, then cropped."""
    from mmdgen.data.audio import read_audio

    audio = read_audio(path, self.sample_rate)
    spare = audio.shape[-1] - self.crop
    start = int(np.random.default_rng([self.seed, self.epoch, index]).integers(spare + 1)) if spare > 0 else 0
    return audio[:, start: start + self.crop]


def measure_demo(spec: dict) -> dict:
    import soundfile

    from mmdgen.data.audio import AudioDataset
    from mmdgen.train.codec import CodecTrainConfig, CodecTrainer

    torch.set_num_threads(spec["threads"])
    if spec["path"] == "baseline":
        AudioDataset._read_crop = _whole_file_crop
    with tempfile.TemporaryDirectory() as folder:
        rng = np.random.default_rng(0)
        for i in range(32):  # the corpus's clips: 10 s FLAC at 32 kHz
            soundfile.write(f"{folder}/clip{i}.flac", (0.2 * rng.standard_normal(320000)).astype(np.float32), 32000)
        cfg = CodecTrainConfig(data=folder, out=f"{folder}/run", preset="tiny", batch_size=8, crop_seconds=1.0,
                               mmd_weight=3.0, mmd_delay=True, mmd_every=8, mmd_batches=8, adversarial=False,
                               device="cpu", steps=10**6)
        trainer = CodecTrainer(cfg, progress=False)
        if spec["path"] == "baseline":
            trainer.mel = TorchaudioMelLoss(32000)
        batches = trainer._batches()

        def period() -> None:  # one independence-loss step and the seven until the next, batches read from disk
            for _ in range(8):
                trainer.train_step([next(batches)])
                trainer.step += 1

        period()
        result = time_and_peak(period, spec["repeats"], torch.device("cpu"))
        result["seconds"] /= 8
        result["times"] = [t / 8 for t in result["times"]]
        result["steps_per_second"] = 1 / result["seconds"]
        return result


def demo_main(args) -> None:
    name = device_name(torch.device("cpu")).rsplit(",", 1)[0]
    lines = [f"codec training step as `mmdgen demo` runs it (tiny, batch 8 x 1 s from 10 s FLAC clips, adversarial "
             f"off, MMD weight 3 every 8 steps; loading included) on {name}; median of {args.repeats} periods of 8 "
             "steps", f"{'threads':<8} {'baseline':>10} {'now':>10} {'speed-up':>9} {'steps/s before':>15} "
             f"{'steps/s now':>12}"]
    lines.append("-" * len(lines[-1]))
    print("\n".join(lines), flush=True)
    rows = []
    for threads in (1, 2):
        results = {}
        for path in ("baseline", "now"):
            spec = {"case": "demo", "path": path, "threads": threads, "repeats": args.repeats}
            results[path] = run_case(__file__, measure_demo, spec, torch.device("cpu"))
        base, now = results["baseline"], results["now"]
        lines.append(f"{threads:<8} {fmt_time(base):>10} {fmt_time(now):>10} {ratio(base, now, 'seconds'):>9} "
                     f"{base['steps_per_second']:>15.2f} {now['steps_per_second']:>12.2f}")
        print(lines[-1], flush=True)
        rows.append({"threads": threads, "baseline": base, "now": now})
    out = args.out or RESULTS / "train_codec-cpu-demo.json"
    write_json(out, {"device": name, "torch": torch.__version__, "case": "demo", "rows": rows,
                     "date": time.strftime("%Y-%m-%d")})
    from mmdgen.files import write_text_atomic

    write_text_atomic(out.with_suffix(".txt"), "\n".join(lines) + "\n")
    print(f"wrote {out} and {out.with_suffix('.txt')}")


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
    parser.add_argument("--demo", action="store_true", help="the demo's step, baseline beside now, 1 and 2 threads")
    args = parse_args(parser, lambda spec: measure_demo(spec) if spec.get("case") == "demo" else measure(spec), argv)
    if args is None:
        return
    if args.demo:
        demo_main(args)
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
