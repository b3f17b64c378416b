"""From a checkpoint folder to the first audio: mmdgen's loader vs transformers' ``from_pretrained`` + ``generate``.

A random ``MusicgenForConditionalGeneration`` at MusicGen-small's size (24 x 1024 decoder, 16 heads, 4 x 2048
codes; T5-base widths and depth (12 x 768, vocabulary 32128); the 32 kHz EnCodec) is saved once with
``save_pretrained`` (one safetensors file, as the published folder holds it), with a word-level T5 tokenizer.
Then each side runs in a fresh process (the OS file cache is warm for both after the first read; each case is
run ``--repeats`` times and the median kept):
- ours: ``mmdgen.pretrained.load_music_model(folder)`` (weights straight into modules built on the meta device)
  then ``Generator.generate([text], duration)`` (T5, the decode loop, the codec's decode);
- transformers: ``MusicgenForConditionalGeneration.from_pretrained(folder)`` + ``AutoTokenizer`` then
  ``model.generate(..., max_new_tokens=frames + 3)`` (its decode of the codes included).
Both sample top-k 250 with guidance 3. Reported: load seconds, generate seconds, their sum (time to first
audio), and the peak resident memory the process reached above what it held after importing torch (the
weights' fp32 size is printed beside it). Writes bench/results/load-<device>.json and the table as .txt.

    python bench/load.py                  # 1 s of audio
    python bench/load.py --duration 0.5 --repeats 1
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from harness import RESULTS, device_name, isolated, parse_args, proc_bytes, write_json

TEXT = "an upbeat pop song with a catchy melody"


def build_folder(folder: Path, layers: int, t5_layers: int) -> int:
    """A random MusicGen-small-sized checkpoint saved to ``folder``; returns its parameter count."""
    import transformers

    from mmdgen.model.text import word_level_t5_tokenizer

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    tokenizer = word_level_t5_tokenizer([TEXT])
    text = transformers.T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=t5_layers,
                                 num_heads=12)
    audio = transformers.EncodecConfig(target_bandwidths=[2.2], sampling_rate=32000, audio_channels=1,
                                       hidden_size=128, num_filters=64, upsampling_ratios=[8, 5, 4, 4],
                                       num_lstm_layers=2, codebook_size=2048, use_causal_conv=False,
                                       use_conv_shortcut=False)
    decoder = transformers.MusicgenDecoderConfig(vocab_size=2048, hidden_size=1024, num_hidden_layers=layers,
                                                 num_attention_heads=16, ffn_dim=4096, num_codebooks=4,
                                                 pad_token_id=2048, bos_token_id=2048, decoder_start_token_id=2048)
    config = transformers.MusicgenConfig(text_encoder=text.to_dict(), audio_encoder=audio.to_dict(),
                                         decoder=decoder.to_dict())
    model = transformers.MusicgenForConditionalGeneration(config).eval()
    with torch.no_grad():
        for layer in model.audio_encoder.quantizer.layers:
            layer.codebook.embed.copy_(torch.randn_like(layer.codebook.embed))
    model.generation_config.update(decoder_start_token_id=2048, pad_token_id=2048, bos_token_id=2048)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def measure(spec: dict) -> dict:
    """One side in this (fresh) process: load, then generate ``duration`` seconds; times and peak memory."""
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    base = proc_bytes("/proc/self/status", "VmRSS")
    frames = int(round(spec["duration"] * 50))
    start = time.perf_counter()
    if spec["impl"] == "ours":
        from mmdgen.generate import Generator, Sampling
        from mmdgen.pretrained import load_music_model

        parts = load_music_model(spec["folder"])
        generator = Generator(parts.lm, parts.text, parts.codec)
        loaded = time.perf_counter()
        audio = generator.generate([TEXT], spec["duration"], Sampling(guidance_scale=3.0, top_k=250), seed=0)
    else:
        import transformers

        transformers.logging.set_verbosity_error()
        model = transformers.MusicgenForConditionalGeneration.from_pretrained(spec["folder"]).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(spec["folder"])
        loaded = time.perf_counter()
        torch.manual_seed(0)
        with torch.no_grad():
            audio = model.generate(**tokenizer([TEXT], return_tensors="pt"), do_sample=True, top_k=250,
                                   guidance_scale=3.0, max_new_tokens=frames + 3)
    done = time.perf_counter()
    if audio.shape[-1] < frames * 640 or not torch.isfinite(audio).all():
        raise AssertionError(f"{spec['impl']}: audio {tuple(audio.shape)} for {frames} frames")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"load_seconds": loaded - start, "generate_seconds": done - loaded, "first_audio_seconds": done - start,
            "peak_bytes": peak}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=1.0, help="seconds of audio to generate")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=24, help="decoder layers (24: MusicGen-small)")
    parser.add_argument("--t5-layers", type=int, default=12, help="T5 encoder layers (12: T5-base)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: one per core)")
    args = parse_args(parser, measure, argv)
    if args is None:
        return
    device = torch.device("cpu")  # both sides load to the CPU; the GPU path is the same loader plus .to(device)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "musicgen-small-random"
        parameters = build_folder(folder, args.layers, args.t5_layers)
        size = sum(f.stat().st_size for f in folder.iterdir())
        results = {}
        for impl in ("transformers", "ours"):
            runs = [isolated(__file__, {"impl": impl, "folder": str(folder), "duration": args.duration,
                                        "threads": args.threads}) for _ in range(args.repeats)]
            results[impl] = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
            results[impl]["runs"] = runs
    name = device_name(device)
    lines = [f"Folder to first audio ({args.duration:g} s, top-k 250, guidance 3), MusicGen-small-sized random "
             f"checkpoint ({parameters / 1e6:.0f} M parameters, {size / 2**30:.2f} GiB on disk), on {name}; "
             f"median of {args.repeats} fresh processes",
             f"{'impl':<13} {'load s':>8} {'generate s':>11} {'first audio s':>14} {'peak RSS':>10}"]
    for impl, r in results.items():
        lines.append(f"{impl:<13} {r['load_seconds']:>8.2f} {r['generate_seconds']:>11.2f} "
                     f"{r['first_audio_seconds']:>14.2f} {r['peak_bytes'] / 2**30:>8.2f} GiB")
    ours, theirs = results["ours"], results["transformers"]
    lines.append(f"ours vs transformers: load {theirs['load_seconds'] / ours['load_seconds']:.2f}x faster, first "
                 f"audio {theirs['first_audio_seconds'] / ours['first_audio_seconds']:.2f}x faster, peak memory "
                 f"{theirs['peak_bytes'] / ours['peak_bytes']:.2f}x less (fp32 weights: {4 * parameters / 2**30:.2f} "
                 "GiB)")
    print("\n".join(lines))
    out = args.out or RESULTS / f"load-{device.type}.json"
    write_json(out, {"device": name, "torch": torch.__version__, "duration": args.duration, "repeats": args.repeats,
                     "parameters": parameters, "folder_bytes": size, "layers": args.layers,
                     "t5_layers": args.t5_layers, "results": results, "date": time.strftime("%Y-%m-%d")})
    from mmdgen.files import write_text_atomic

    write_text_atomic(out.with_suffix(".txt"), "\n".join(lines) + f"\nwrote {out}\n")


if __name__ == "__main__":
    main()
