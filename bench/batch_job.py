"""A prompts-file job of mixed durations: clips per hour of mmdgen's continuous batching, mmdgen's duration-bucketed
batches and transformers' MusicGen at the same batch size, on the same random weights (bench/generate.py's models:
a tiny T5, a tiny EnCodec at 50 frames/s, a decoder of the size asked for over 4 x 2048 codes).

The job: ``--prompts`` clips (default 64), captions cycled, durations drawn once from a fixed seed as whole seconds
in [5, 30], times ``--scale`` (a smoke run: ``--scale 0.1``), in that (random) order, as a prompts file holds
them. Every side goes from text to one 16-bit wav per clip, the codec's decode included; timed is the whole job
after the model is built and one short warm-up generation has run:
- ours-continuous: ``generate_batch(..., batch_size=B, scheduling="continuous")``: B rows, each refilled as soon as
  its clip ends;
- ours-bucketed: ``generate_batch(..., batch_size=B, scheduling="bucketed")``: batches of consecutive prompts of
  equal duration (on a file of mixed durations most batches hold one clip);
- transformers: batches of B consecutive prompts, each ``model.generate`` run to the longest clip of its batch
  (``max_new_tokens`` = its frames + 3), every clip cut to its own length (what a transformers user writes).
Sampling: guidance ``--guidance`` (3), top-k ``--top-k`` (250), fp32. Per side: wall seconds (median of
``--repeats``), clips per hour, audio seconds per wall second, and the speed against transformers.

``--processes N`` (CPU) measures instead how to spread the job over N processes: N single-thread processes, each
taking every N-th clip as ``torchrun --nproc-per-node N`` ranks do (wall time from the first start to the last
end), against one process of N threads (continuous batching in both).

Each case runs in its own subprocess. Prints a table and writes ``bench/results/batch_job-<device>.json`` and the
table as ``.txt``.

    python bench/batch_job.py                                    # tiny, 64 prompts of 5-30 s, batch 8
    python bench/batch_job.py --models 40M --scale 0.2           # 1-6 s clips
    python bench/batch_job.py --prompts 16 --scale 0.1 --repeats 1   # smoke run
    python bench/batch_job.py --processes 2                      # 2 one-thread processes vs one 2-thread one
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from generate import CAPTIONS, FRAME_RATE, MODELS, build_ours, build_transformers
from harness import RESULTS, device_name, parse_args, synchronize, write_json

IMPLS = ("transformers", "ours-bucketed", "ours-continuous")
SHORTEST, LONGEST = 5, 30  # seconds, before --scale


def durations(count: int, scale: float) -> list[float]:
    """The job's clip lengths: whole seconds in [SHORTEST, LONGEST] from a fixed seed, scaled, on the frame grid."""
    draw = random.Random(0)
    return [max(round(draw.randint(SHORTEST, LONGEST) * scale * FRAME_RATE), 1) / FRAME_RATE for _ in range(count)]


def requests(spec: dict):
    from mmdgen.generate.batch import Request

    return [Request(f"{i:03d}", CAPTIONS[i % len(CAPTIONS)], duration, seed=i)
            for i, duration in enumerate(durations(spec["prompts"], spec["scale"]))]


def _sampling(spec: dict):
    from mmdgen.generate import Sampling

    return Sampling(guidance_scale=spec["guidance"], top_k=spec["top_k"])


def _ours(spec: dict, device: torch.device):
    model, tokenizer = build_transformers(spec["model"])
    return build_ours(model, tokenizer, "delay", device)


def _run_ours(generator, spec: dict, out: Path, rank: int = 0, world: int = 1) -> dict:
    from mmdgen.generate.batch import generate_batch

    return generate_batch(generator, requests(spec), out, _sampling(spec), batch_size=spec["batch"], progress=False,
                          scheduling=spec["impl"].removeprefix("ours-"), rank=rank, world=world)


def _transformers_job(model, tokenizer, spec: dict, out: Path, device: torch.device) -> None:
    from mmdgen.files import write_audio

    jobs, batch = requests(spec), spec["batch"]
    rate = model.audio_encoder.config.sampling_rate
    for first in range(0, len(jobs), batch):
        group = jobs[first: first + batch]
        frames = max(round(r.duration * FRAME_RATE) for r in group)
        inputs = tokenizer([r.text for r in group], padding=True, return_tensors="pt").to(device)
        audio = model.generate(**inputs, max_new_tokens=frames + 3, do_sample=True, top_k=spec["top_k"],
                               guidance_scale=spec["guidance"])
        for request, clip in zip(group, audio):
            write_audio(out / f"{request.id}.wav", clip[:, : round(request.duration * rate)].cpu(), rate)


def measure_job(spec: dict) -> dict:
    """One side's whole job, ``repeats`` times into fresh folders (after a one-clip warm-up)."""
    device = torch.device(spec["device"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    warm_up = dict(spec, prompts=1, scale=0.05)
    if spec["impl"] == "transformers":
        model, tokenizer = build_transformers(spec["model"])
        model = model.to(device)

        def run(spec, out):
            with torch.no_grad():
                _transformers_job(model, tokenizer, spec, out, device)
    else:
        generator = _ours(spec, device)

        def run(spec, out):
            _run_ours(generator, spec, out)
    times = []
    with tempfile.TemporaryDirectory() as folder:
        run(warm_up, Path(folder) / "warm-up")
        for repeat in range(spec["repeats"]):
            synchronize(device)
            start = time.perf_counter()
            run(spec, Path(folder) / f"run{repeat}")
            synchronize(device)
            times.append(time.perf_counter() - start)
            written = len(list((Path(folder) / f"run{repeat}").glob("*.wav")))
            if written != spec["prompts"]:
                raise AssertionError(f"{spec['impl']} wrote {written} clips, expected {spec['prompts']}")
    return _rates(spec, statistics.median(times), times=times, threads=torch.get_num_threads())


def measure_rank(spec: dict) -> dict:
    """One rank of a shared job (``--processes``): its share, with wall-clock start and end times."""
    torch.set_num_threads(spec["threads"])
    generator = _ours(spec, torch.device("cpu"))
    with tempfile.TemporaryDirectory() as folder:
        _run_ours(generator, dict(spec, prompts=1, scale=0.05), Path(folder))  # warm-up
    while time.time() < spec["start_at"]:  # every rank starts the job at the same moment, after its set-up
        time.sleep(0.01)
    start = time.time()
    report = _run_ours(generator, spec, Path(spec["out"]), spec["rank"], spec["world"])
    return {"start": start, "end": time.time(), "generated": report["generated"], "threads": torch.get_num_threads()}


def measure(spec: dict) -> dict:
    return measure_rank(spec) if spec["kind"] == "rank" else measure_job(spec)


def _rates(spec: dict, seconds: float, **extra) -> dict:
    audio = sum(durations(spec["prompts"], spec["scale"]))
    return dict(extra, seconds=seconds, clips_per_hour=spec["prompts"] * 3600 / seconds, audio_seconds=audio,
                rtf=audio / seconds)


def _child(spec: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"a case failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def processes_case(spec: dict, count: int, setup_seconds: float) -> dict:
    """``count`` one-thread ranks sharing the job (wall: first start to last end)."""
    with tempfile.TemporaryDirectory() as folder:
        start_at = time.time() + setup_seconds
        ranks = [_child(dict(spec, kind="rank", rank=r, world=count, threads=1, out=folder, start_at=start_at))
                 for r in range(count)]
        results = [_result(proc) for proc in ranks]
        written = len(list(Path(folder).glob("*.wav")))
    if written != spec["prompts"] or sum(r["generated"] for r in results) != spec["prompts"]:
        raise AssertionError(f"{count} ranks wrote {written} clips, expected {spec['prompts']} (each once)")
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    return _rates(spec, wall, ranks=results)


HEADER = f"{'model':6} {'impl':26} {'B':>2} {'clips':>5} {'seconds':>9} {'clips/hour':>11} {'RTF':>7} " \
         f"{'vs transformers':>15}"


def _row(size: str, impl: str, spec: dict, result: dict, baseline: dict | None) -> str:
    speed = f"{result['clips_per_hour'] / baseline['clips_per_hour']:.2f}x" if baseline else "-"
    return (f"{size:6} {impl:26} {spec['batch']:>2} {spec['prompts']:>5} {result['seconds']:>9.1f} "
            f"{result['clips_per_hour']:>11.0f} {result['rtf']:>6.2f}x {speed:>15}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny"], choices=list(MODELS))
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--scale", type=float, default=1.0, help="durations times this (5-30 s at 1)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1, help="whole jobs per side (median)")
    parser.add_argument("--top-k", type=int, default=250)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads per case (0: torch's default)")
    parser.add_argument("--processes", type=int, default=0,
                        help="instead: N one-thread processes sharing the job vs one N-thread process (CPU)")
    parser.add_argument("--setup-seconds", type=float, default=60.0,
                        help="--processes: time the ranks get to build their model before they start together")
    args = parse_args(parser, measure, argv)
    if args is None:
        return
    device = torch.device(args.device)
    lengths = durations(args.prompts, args.scale)
    base = {"prompts": args.prompts, "scale": args.scale, "batch": args.batch, "guidance": args.guidance or None,
            "top_k": args.top_k, "device": str(device), "repeats": args.repeats}
    title = (f"prompts-file job: {args.prompts} clips of {min(lengths):g}-{max(lengths):g} s "
             f"({sum(lengths):.0f} s of audio, {args.scale:g} x 5-30 s), batch {args.batch}, guidance "
             f"{base['guidance']}, top-k {args.top_k} sampling, fp32, text to wav files, on {device_name(device)}")
    payload = {"device": device_name(device), "torch": torch.__version__, "durations": lengths, **base,
               "date": time.strftime("%Y-%m-%d")}
    lines = [title]
    print(title, flush=True)
    if args.processes:
        lines += _processes(args, base, payload)
        name = f"batch_job-processes{args.processes}-{device.type}"
    else:
        lines += _sides(args, base, payload)
        name = f"batch_job-{device.type}"
    out = args.out or RESULTS / f"{name}.json"
    write_json(out, payload)
    from mmdgen.files import write_text_atomic

    write_text_atomic(out.with_suffix(".txt"), "\n".join(lines) + f"\nwrote {out}\n")
    print(f"wrote {out}")


def _sides(args, base: dict, payload: dict) -> list[str]:
    lines = [HEADER, "-" * len(HEADER)]
    print("\n".join(lines), flush=True)
    payload["rows"] = []
    for size in args.models:
        results = {}
        for impl in [impl for impl in IMPLS if impl in args.impls]:  # transformers first: the baseline
            spec = dict(base, kind="job", model=size, impl=impl, threads=args.threads)
            results[impl] = _result(_child(spec))
            line = _row(size, impl, spec, results[impl], results.get("transformers"))
            print(line, flush=True)
            lines.append(line)
            payload["rows"].append({"model": size, "impl": impl, "result": results[impl]})
    return lines


def _processes(args, base: dict, payload: dict) -> list[str]:
    count = args.processes
    lines = [HEADER, "-" * len(HEADER)]
    print("\n".join(lines), flush=True)
    payload["rows"] = []
    for size in args.models:
        spec = dict(base, model=size, impl="ours-continuous")
        cases = {f"ours-continuous {count}x1 thread": processes_case(spec, count, args.setup_seconds),
                 f"ours-continuous 1x{count} threads": _result(_child(dict(spec, kind="job", threads=count)))}
        for impl, result in cases.items():
            line = _row(size, impl, spec, result, None)
            print(line, flush=True)
            lines.append(line)
            payload["rows"].append({"model": size, "impl": impl, "result": result})
    return lines


if __name__ == "__main__":
    main()
