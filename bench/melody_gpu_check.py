"""MusicGen-melody on a GPU, in two parts.

1. Equality: a random transformers ``MusicgenMelodyForConditionalGeneration`` at the published melody widths
   (decoder 1536 x 24 heads, ffn 6144, 4 x 2048 codes; T5-base widths; the 32 kHz EnCodec; 2 decoder and 2 T5
   layers; tests/test_melody.py builds it), saved and read by our loader. Greedy codes with guidance 3 and a
   44.1 kHz stereo melody: transformers' ``generate`` on CUDA against ours with the Triton kernels (eager, and the
   step captured in a CUDA graph) and with the PyTorch path. The CUDA-graph run must equal its eager run exactly
   (the script exits non-zero otherwise); agreement with transformers is reported (fp32 on both sides, with
   sharpened heads: expected equal, but the two compute attention differently).
2. Speed at the full published melody size (48 layers of 1536, random weights; the same T5, EnCodec and chroma):
   10 s at batch 1 with guidance, top-k 250 sampling, against a text-only LM of the same size (cross-attention):
   what the 235 + L prefix positions cost per step, and the prefix prefill. CUDA-graph decode; median of 3 after
   a warm-up run.

Writes bench/results/melody_gpu_check-<device>.json and .txt.

    python bench/melody_gpu_check.py
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "bench"), str(ROOT)]
from harness import RESULTS, device_name, write_json  # noqa: E402

from mmdgen.generate import Generator, Sampling  # noqa: E402
from mmdgen.model.lm import MusicLM  # noqa: E402
from mmdgen.pretrained import load_music_model  # noqa: E402
from tests.test_melody import TEXTS, _melody_model, _save, _tones  # noqa: E402

FRAMES = 50  # 1 s at 50 frames/s for the equality check
SPEED_FRAMES = 500  # 10 s
MELODY_RATE = 44100


def their_codes(model, tokenizer, features, melody: torch.Tensor, device: torch.device) -> torch.Tensor:
    captured = []
    real_decode = model.audio_encoder.decode

    def capture(codes, *args, **kwargs):
        captured.append(codes[0])
        return real_decode(codes, *args, **kwargs)

    inputs = tokenizer(TEXTS, padding=True, return_tensors="pt").to(device)
    chroma = features(melody, sampling_rate=MELODY_RATE, return_tensors="pt").input_features
    model.audio_encoder.decode = capture
    try:
        with torch.no_grad():
            model.generate(**inputs, input_features=chroma.expand(len(TEXTS), -1, -1).to(device), do_sample=False,
                           guidance_scale=3.0, max_new_tokens=FRAMES + 3)
    finally:
        model.audio_encoder.decode = real_decode
    return captured[0]


def equality(parts, ours, melody: torch.Tensor, device: torch.device) -> tuple[dict, bool]:
    model, tokenizer, features = parts
    theirs = their_codes(model.to(device), tokenizer, features, melody, device).cpu()
    sampling = Sampling(guidance_scale=3.0, temperature=0.0)
    codes = {}
    for label, backend, graph in (("triton eager", "triton", False), ("triton cuda-graph", "triton", True),
                                  ("torch eager", "torch", False)):
        generator = Generator(ours.lm, ours.text, ours.codec, backend=backend, cuda_graph=graph, chroma=ours.chroma)
        start = time.perf_counter()
        codes[label] = generator.generate_codes(TEXTS, duration=FRAMES / 50, sampling=sampling, melody=melody,
                                                melody_sample_rate=MELODY_RATE).cpu()
        print(f"equality: {label} in {time.perf_counter() - start:.2f} s", flush=True)
    row = {label: {"equal to transformers": bool(torch.equal(value, theirs)),
                   "agreement with transformers": float((value == theirs).float().mean())}
           for label, value in codes.items()}
    graph_equal = bool(torch.equal(codes["triton cuda-graph"], codes["triton eager"]))
    row["triton cuda-graph"]["equal to triton eager"] = graph_equal
    row["distinct codes"] = len(set(theirs.flatten().tolist()))
    return row, graph_equal


def _median_generation(generator: Generator, melody: torch.Tensor | None) -> dict:
    kwargs = dict(duration=SPEED_FRAMES / 50, sampling=Sampling(guidance_scale=3.0, top_k=250), seed=0)
    if melody is not None:
        kwargs.update(melody=melody, melody_sample_rate=MELODY_RATE)
    generator.generate_codes(TEXTS[:1], **kwargs)  # warm-up: Triton compiles, the graph is captured
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        generator.generate_codes(TEXTS[:1], **kwargs)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    steps = SPEED_FRAMES + 3
    seconds = statistics.median(times)
    return {"seconds": round(seconds, 3), "steps": steps, "ms per step": round(1000 * seconds / steps, 3),
            "real-time factor": round(SPEED_FRAMES / 50 / seconds, 2)}


def speed(small, melody: torch.Tensor, device: torch.device) -> dict:
    full = dataclasses.replace(small.lm.cfg, layers=48)
    rows = {}
    for label, cfg in (("melody (prefix, 48 x 1536)", full),
                       ("text only (cross-attention, 48 x 1536)", dataclasses.replace(
                           full, conditioning="cross", melody_dim=None, melody_frames=None))):
        torch.manual_seed(0)
        with torch.device(device):
            lm = MusicLM(cfg).eval()
        generator = Generator(lm, small.text, small.codec, cuda_graph=True,
                              chroma=small.chroma if cfg.melody_dim else None)
        rows[label] = _median_generation(generator, melody if cfg.melody_dim else None)
        rows[label]["parameters"] = sum(p.numel() for p in lm.parameters())
        print(f"speed: {label}: {rows[label]}", flush=True)
        del lm, generator
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    device = torch.device("cuda")
    parts = _melody_model("published")
    with tempfile.TemporaryDirectory() as folder:
        _save(parts, folder)
        ours = load_music_model(folder, device=device)
    melody = _tones(["A4", "C4", "G4", "E4"], 0.5, MELODY_RATE, channels=2)
    equal_row, graph_equal = equality(parts, ours, melody, device)
    print(f"equality: {equal_row}", flush=True)
    del parts
    speed_rows = speed(ours, melody, device)
    payload = {"device": device_name(device), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
               "equality (1 s, greedy, guidance 3, melody; published widths, 2 layers)": equal_row,
               "speed (10 s, batch 1, guidance 3, top-k 250, CUDA graph; 48 layers, random weights)": speed_rows,
               "passed": graph_equal}
    path = RESULTS / f"melody_gpu_check-{device.type}.json"
    write_json(path, payload)
    lines = [f"MusicGen-melody on {payload['device']} (torch {torch.__version__})", "equality, 1 s greedy:"]
    lines += [f"  {label}: {value}" for label, value in equal_row.items()]
    lines.append("speed, 10 s, batch 1, CUDA graph:")
    lines += [f"  {label}: {value}" for label, value in speed_rows.items()]
    path.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not graph_equal:
        raise SystemExit("the CUDA-graph melody decode differs from its eager decode")


if __name__ == "__main__":
    main()
