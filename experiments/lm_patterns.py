"""Delay vs flattening at our scale: tiny LMs on the codes of codecs trained with and without the
independence loss; validation NLL per codebook, and the decoding steps each pattern needs for 10 s.

For each codec: tokenize the corpus (once, kept under ``<out>/tokens-<name>``), train one tiny LM per
pattern with the same seed, data order and steps, and report the validation NLL (nats per code) per
codebook from the trainer's last validation. The delay pattern predicts the K codes of one step
independently given the past; flattening predicts them one at a time (the exact joint) at K times the
steps. The paper's claim at this scale: the gap between the two shrinks when the codec's codebooks are
made independent. Writes ``<out>/results.json`` and a Markdown table to stdout.

    python experiments/lm_patterns.py --corpus runs/corpus --codecs base=runs/codec-mmd/mmd-0/model \\
        mmd=runs/codec-mmd/mmd-10-every8x8/model --steps 1500 --out runs/lm-patterns
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mmdgen.data.tokenize import tokenize_corpus
from mmdgen.model.patterns import decoding_steps
from mmdgen.train.lm import LMTrainConfig, LMTrainer


def parse_codecs(values: list[str]) -> dict[str, Path]:
    codecs = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--codecs takes name=path pairs, got {value!r}")
        codecs[name] = Path(path)
    return codecs


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, required=True, help="a corpus folder (mmdgen data build)")
    parser.add_argument("--codecs", nargs="+", required=True, help="name=codec-directory pairs")
    parser.add_argument("--patterns", nargs="+", default=["delay", "flatten"])
    parser.add_argument("--out", type=Path, default=Path("runs/lm-patterns"))
    parser.add_argument("--preset", default="mini", help="LM preset (tiny, mini, small)")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--crop-frames", type=int, default=150)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    results = []
    for name, codec_dir in parse_codecs(args.codecs).items():
        tokens = args.out / f"tokens-{name}"
        if not (tokens / "tokens.json").exists():
            tokenize_corpus(codec_dir, args.corpus / "manifest.jsonl", tokens)
        for pattern in args.patterns:
            cfg = LMTrainConfig(tokens=str(tokens), out=str(args.out / f"lm-{name}-{pattern}"), pattern=pattern,
                                preset=args.preset, steps=args.steps, batch_size=args.batch_size,
                                crop_frames=args.crop_frames, lr=args.lr, seed=args.seed,
                                valid_every=max(args.steps // 5, 1),
                                ckpt_every=max(args.steps // 5, 1), valid_clips=10**6)
            report = LMTrainer(cfg).train()
            k = sum(key.startswith("nll_k") for key in report)
            results.append({"codec": name, "codec_dir": str(codec_dir), "pattern": pattern,
                            "decoding_steps_10s": decoding_steps(pattern, k, 500), **report})
            (args.out / "results.json").write_text(json.dumps({"config": {k_: str(v) for k_, v in vars(args).items()},
                                                               "results": results}, indent=1))
    k = sum(key.startswith("nll_k") for key in results[0])
    print("| codec | pattern | steps for 10 s | " + " | ".join(f"NLL k{i}" for i in range(k)) + " | mean NLL |")
    print("|---|---|---:|" + "---:|" * (k + 1))
    for r in results:
        print(f"| {r['codec']} | {r['pattern']} | {r['decoding_steps_10s']} | "
              + " | ".join(f"{r[f'nll_k{i}']:.3f}" for i in range(k)) + f" | {r['nll']:.3f} |")


if __name__ == "__main__":
    main()
