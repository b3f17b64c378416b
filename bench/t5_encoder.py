"""T5 text encoder: mmdgen's own module against transformers' T5EncoderModel, one forward pass.

t5-base widths as in every published MusicGen (d_model 768, 12 heads of 64, d_ff 3072, 12 layers, vocab
32128, relu FFN), random weights (seeded, the same in both), a batch of 8 padded captions of typical caption
lengths in T5 tokens. Median time of one inference pass over repeats, each case in its own process on CPU
(no memory column: building the shared random weights dominates each process's peak). The last column is
mmdgen's largest absolute difference from transformers' fp32 eager output (the reference maths). Prints a
table and writes ``bench/results/t5_encoder-<device>.json`` and the table as ``.txt``.

    python bench/t5_encoder.py                                  # fp32 and bf16, 5 repeats
    python bench/t5_encoder.py --dtypes float32 --repeats 3 --layers 2
"""

from __future__ import annotations

import argparse
import time

import torch
from harness import RESULTS, device_name, fmt_time, parse_args, ratio, run_case, time_and_peak, write_json

METHODS = ("transformers", "mmdgen")
# T5 token counts of 8 MusicGen-style captions ("an upbeat electronic dance track with ..."), </s> included
LENGTHS = (14, 22, 9, 31, 18, 26, 12, 40)


def _transformers_encoder(layers: int, attention: str):
    import transformers

    config = transformers.T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=layers,
                                   num_heads=12, feed_forward_proj="relu", attn_implementation=attention)
    torch.manual_seed(0)
    return transformers.T5EncoderModel(config).eval()


def _batch(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.zeros(len(LENGTHS), max(LENGTHS), dtype=torch.int64)
    mask = torch.zeros(len(LENGTHS), max(LENGTHS), dtype=torch.bool)
    for row, length in enumerate(LENGTHS):
        ids[row, : length - 1] = torch.randint(3, 32128, (length - 1,), generator=generator)
        ids[row, length - 1] = 1
        mask[row, :length] = True
    return ids.to(device), mask.to(device)


def measure(spec: dict) -> dict:
    from mmdgen.model.text.t5 import T5Config, T5Encoder, load_t5_weights

    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    ids, mask = _batch(device)
    reference = _transformers_encoder(spec["layers"], "sdpa")  # sdpa: transformers' default attention
    if spec["method"] == "transformers":
        model = reference.to(device, dtype)
        run = lambda: model(input_ids=ids, attention_mask=mask.long()).last_hidden_state  # noqa: E731
    else:
        model = T5Encoder(T5Config.from_dict(reference.config.to_dict(), "bench config")).eval()
        load_t5_weights(model, reference.state_dict(), "bench weights")
        model = model.to(device, dtype)
        del reference
        run = lambda: model(ids, mask)  # noqa: E731
    with torch.inference_mode():
        states = run()  # warm-up
        result = time_and_peak(run, spec["repeats"], device)
        if spec["method"] == "mmdgen":
            eager = _transformers_encoder(spec["layers"], "eager").to(device)
            expected = eager(input_ids=ids, attention_mask=mask.long()).last_hidden_state
            result["max_abs_diff_vs_fp32_eager"] = float((states.float() - expected).abs().max())
            result["reference_max_abs"] = float(expected.abs().max())
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], default=["float32", "bfloat16"])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=5)
    args = parse_args(parser, measure, argv)
    if args is None:
        return
    device = torch.device(args.device)
    name = device_name(device)
    lines = [f"T5 encoder forward, t5-base widths, {args.layers} layers, batch {len(LENGTHS)} captions of "
             f"{min(LENGTHS)}-{max(LENGTHS)} tokens, on {name}; median of {args.repeats}"]
    header = f"{'dtype':>9} {'transformers':>12} {'mmdgen':>9} {'speedup':>8} {'max |diff| vs fp32 eager':>24}"
    lines += [header, "-" * len(header)]
    print("\n".join(lines), flush=True)
    rows = []
    for dtype in args.dtypes:
        results = {}
        for method in METHODS:
            spec = {"method": method, "layers": args.layers, "repeats": args.repeats, "device": str(device),
                    "dtype": dtype}
            results[method] = run_case(__file__, measure, spec, device)
        theirs, ours = results["transformers"], results["mmdgen"]
        diff = "-" if "oom" in ours else (f"{ours['max_abs_diff_vs_fp32_eager']:.2e} "
                                          f"(of {ours['reference_max_abs']:.2f})")
        line = f"{dtype:>9} {fmt_time(theirs):>12} {fmt_time(ours):>9} {ratio(theirs, ours, 'seconds'):>8} {diff:>24}"
        print(line, flush=True)
        lines.append(line)
        rows.append({"dtype": dtype, "transformers": theirs, "mmdgen": ours})
    out = args.out or RESULTS / f"t5_encoder-{device.type}.json"
    write_json(out, {"device": name, "torch": torch.__version__, "layers": args.layers, "lengths": list(LENGTHS),
                     "repeats": args.repeats, "rows": rows, "date": time.strftime("%Y-%m-%d")})
    from mmdgen.files import write_text_atomic

    write_text_atomic(out.with_suffix(".txt"), "\n".join(lines) + f"\nwrote {out}\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
