"""The int8 LM against the fp32 LM at MusicGen-small size (random weights): quality and the speed of a decode step.

One random ``MusicLM(lm_config(--preset))`` (delay pattern, 4 x 2048 codes), its heads optionally sharpened by
``--head-gain`` (a random LM's next-code distributions are nearly uniform; a trained one's are peaked), and a
copy quantised by ``quantize_lm`` (``mmdgen.model.quantize``) in each ``--modes`` mode. Text: random states
``[1, 16, text_dim]`` (the null condition for guidance: an all-False mask).

Quality, on the codes the fp32 LM samples (``--frames`` frames, guidance 3, top-k 250, seed 0), by teacher
forcing (every model sees the same inputs, conditional rows): per codebook, the mean NLL of those codes under
each model, the mean KL(fp32 || int8) of the next-code distributions, and how often the greedy (argmax) code
is the fp32 one. Free running: greedy decoding with guidance by each model, the share of codes equal to
the fp32 LM's and the first step where they differ (one different code changes every later input).

Speed: ``mmdgen.generate.loop.decode`` at batch 1 with guidance (2 rows), top-k 250: the median over
``--repeats`` runs of the loop's time divided by its steps (``--frames`` + 3), eager and, unless
``--no-compile``, with ``compile=True`` (the first run compiles and is not timed). Prints a table and writes
``bench/results/int8_lm-cpu.json`` and the text as ``.txt``. On a shared machine the numbers are preliminary.

    python bench/int8_lm.py                                   # small, 20 frames, int8 and int8-dynamic
    python bench/int8_lm.py --preset tiny --frames 10 --repeats 2
    python bench/int8_lm.py --kv-caches model bfloat16        # and each model over a bf16 KV cache
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from harness import RESULTS, device_name, write_json

from mmdgen.generate.loop import DecodeRuntime, Sampling, decode
from mmdgen.model.lm import MusicLM, lm_config
from mmdgen.model.patterns import make_pattern
from mmdgen.model.quantize import quantize_lm
from mmdgen.train.lm import IGNORE, teacher_forcing

TEXT_STEPS = 16
KV_LABELS = {"bfloat16": "bf16", "float16": "fp16"}


def conditioning(lm: MusicLM, guided: bool):
    """Random text states for one prompt; with guidance the null condition (all masked) as the second row."""
    states = torch.randn(1, TEXT_STEPS, lm.cfg.text_dim, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(1, TEXT_STEPS, dtype=torch.bool)
    if guided:
        states, mask = torch.cat([states, torch.zeros_like(states)]), torch.cat([mask, torch.zeros_like(mask)])
    return states, mask


def generate(lm: MusicLM, frames: int, sampling: Sampling, compile: bool = False,
             kv_cache: str = "model") -> torch.Tensor:
    pattern = make_pattern(lm.cfg.pattern, lm.cfg.num_codebooks, lm.cfg.delays)
    with torch.no_grad():
        memory = lm.cross_memory(*conditioning(lm, sampling.guidance_scale is not None))
        return decode(lm, memory, 1, frames, pattern, sampling, generator=torch.Generator().manual_seed(0),
                      runtime=DecodeRuntime(compile=compile, kv_cache=kv_cache))


@torch.no_grad()
def teacher_forced(lm: MusicLM, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probabilities [K, cells, V] of the next codes at the valid cells, targets [K, cells])."""
    pattern = make_pattern(lm.cfg.pattern, lm.cfg.num_codebooks, lm.cfg.delays)
    inputs, targets = teacher_forcing(codes, pattern, lm.cfg.special_token)
    logits = lm(inputs, *conditioning(lm, guided=False))[0]  # [K, S, V]
    valid = targets[0] != IGNORE  # the same cells in every codebook row count: K * frames in all
    k = lm.cfg.num_codebooks
    return (F.log_softmax(logits.float(), dim=-1)[valid].view(k, -1, logits.shape[-1]),
            targets[0][valid].view(k, -1))


def nll(logp: torch.Tensor, targets: torch.Tensor) -> list[float]:
    """Mean negative log-likelihood of the targets per codebook."""
    return (-logp.gather(-1, targets[..., None])[..., 0]).mean(dim=1).tolist()


def quality(reference: MusicLM, lm: MusicLM, codes: torch.Tensor, frames: int, kv_cache: str) -> dict:
    ref_logp, targets = teacher_forced(reference, codes)
    logp, _ = teacher_forced(lm, codes)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean(dim=1)
    greedy = (logp.argmax(-1) == ref_logp.argmax(-1)).float().mean(dim=1)
    greedy_sampling = Sampling(guidance_scale=3.0, temperature=0.0)
    free_ref = generate(reference, frames, greedy_sampling)
    free = generate(lm, frames, greedy_sampling, kv_cache=kv_cache)
    differ = (free_ref != free).any(dim=1)[0].nonzero()
    return {"nll": nll(logp, targets), "kl": kl.tolist(),
            "greedy_agreement": greedy.tolist(), "free_running_agreement": float((free_ref == free).float().mean()),
            "first_different_frame": int(differ[0]) if len(differ) else None}


def step_seconds(lm: MusicLM, frames: int, repeats: int, compile: bool, kv_cache: str) -> dict:
    sampling = Sampling()  # guidance 3, top-k 250
    generate(lm, frames, sampling, compile=compile, kv_cache=kv_cache)  # warm-up (compiles the step)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        generate(lm, frames, sampling, compile=compile, kv_cache=kv_cache)
        times.append((time.perf_counter() - start) / (frames + lm.cfg.num_codebooks - 1))
    return {"median_s": statistics.median(times), "times": times}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=["int8", "int8-dynamic"])
    parser.add_argument("--kv-caches", nargs="+", default=["model"], choices=["model", "bfloat16", "float16"],
                        help="the KV cache's dtype per row (model: the LM's; a 16-bit cache changes the free-running "
                             "codes and the step times, not the teacher-forced columns, which use no cache)")
    parser.add_argument("--head-gain", type=float, default=1.0, help="multiply the heads' weights (sharper logits)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=str, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    reference = MusicLM(lm_config(args.preset)).eval()
    with torch.no_grad():
        for head in reference.heads:
            head.weight.mul_(args.head_gain)
    models = {"fp32": reference}
    models.update({mode: quantize_lm(copy.deepcopy(reference), mode) for mode in args.modes})
    name = device_name(torch.device("cpu"))
    lines = [f"int8 LM ({args.preset}, random weights, head gain {args.head_gain:g}) on {name}, torch "
             f"{torch.__version__}: {args.frames} frames; step times: batch 1 with guidance, median of {args.repeats}"]
    sampled = generate(reference, args.frames, Sampling())
    rows = {}
    header = (f"{'model':<21} {'step eager':>10} {'compiled':>9}  {'NLL per codebook':<27} {'KL(fp32||q) mean':>16} "
              f"{'greedy agree':>12} {'free-run':>8} {'1st diff':>8}")
    lines += [header, "-" * len(header)]
    print("\n".join(lines), flush=True)
    for (mode, lm), kv_cache in itertools.product(models.items(), args.kv_caches):
        label = mode if kv_cache == "model" else f"{mode} kv {KV_LABELS[kv_cache]}"
        row = {"kv_cache": kv_cache, "eager": step_seconds(lm, args.frames, args.repeats, False, kv_cache)}
        if not args.no_compile:
            row["compiled"] = step_seconds(lm, args.frames, args.repeats, True, kv_cache)
        if lm is not reference or kv_cache != "model":
            row["quality"] = quality(reference, lm, sampled, args.frames, kv_cache)
        rows[label] = row
        q = row.get("quality")
        row["nll"] = q["nll"] if q else nll(*teacher_forced(reference, sampled))
        compiled = f"{1e3 * row['compiled']['median_s']:>7.1f}ms" if "compiled" in row else f"{'-':>9}"
        line = (f"{label:<21} {1e3 * row['eager']['median_s']:>8.1f}ms {compiled}  "
                f"{' '.join(f'{v:.4f}' for v in row['nll']):<27} "
                + (f"{statistics.mean(q['kl']):>16.2e} {statistics.mean(q['greedy_agreement']):>12.3f} "
                   f"{q['free_running_agreement']:>8.3f} {str(q['first_different_frame']):>8}" if q else ""))
        print(line, flush=True)
        lines.append(line)
    out = Path(args.out) if args.out else RESULTS / "int8_lm-cpu.json"
    write_json(out, {"device": name, "torch": torch.__version__, "preset": args.preset, "frames": args.frames,
                     "head_gain": args.head_gain, "repeats": args.repeats, "rows": rows,
                     "date": time.strftime("%Y-%m-%d")})
    from mmdgen.files import write_text_atomic

    write_text_atomic(out.with_suffix(".txt"), "\n".join(lines) + f"\nwrote {out}\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
