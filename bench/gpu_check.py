"""The decode loop's CUDA-only paths against the eager loop, on a GPU: ``Generator(cuda_graph=True)`` (the step
captured once in a CUDA graph and replayed) must give exactly the codes of the eager loop with the same Triton
kernels (float, and with int8 weights through the int8 kernel), and the PyTorch path the same codes too. Cases: top-k + top-p sampling with guidance continuing an audio
prompt (prefill, forced cells), and greedy without guidance; random tiny LM, codec and learned text encoder.

Exits non-zero when a CUDA-graph run differs from its eager run. Writes bench/results/gpu_check-<device>.json.

    python bench/gpu_check.py
"""

from __future__ import annotations

import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from harness import RESULTS, device_name, write_json  # noqa: E402

from mmdgen.generate import Generator, Sampling  # noqa: E402
from mmdgen.model.quantize import quantize_lm  # noqa: E402
from tests.tiny_parts import tiny_parts  # noqa: E402

TEXTS = ["a calm jig on flute", "a fast reel on fiddle with drums"]


def _compare(codes, reference) -> dict:
    if isinstance(codes, str) or isinstance(reference, str):
        return {"error": codes if isinstance(codes, str) else reference}
    return {"equal": bool(torch.equal(codes, reference)), "agreement": float((codes == reference).float().mean())}


def main() -> None:
    device = torch.device("cuda")
    with tempfile.TemporaryDirectory() as folder:
        lm, text, codec = tiny_parts(Path(folder), TEXTS)
    lm, codec = lm.to(device), codec.to(device)
    int8 = quantize_lm(copy.deepcopy(lm), "int8")  # the int8 Triton kernel inside the decode step
    prompt = torch.randn(1, 1, 3200, generator=torch.Generator().manual_seed(1)).to(device) * 0.1  # 5 frames
    cases = {"sampled, guidance 3, top-k 20, top-p 0.9, audio prompt": (Sampling(guidance_scale=3.0, top_k=20,
                                                                                  top_p=0.9), prompt),
             "greedy, no guidance": (Sampling(guidance_scale=None, temperature=0.0), None)}
    results, failed = {}, False
    for name, (sampling, prompt_audio) in cases.items():
        codes = {}
        for label, backend, graph, model in (("torch eager", "torch", False, lm), ("triton eager", "triton", False, lm),
                                             ("triton cuda-graph", "triton", True, lm),
                                             ("torch cuda-graph", "torch", True, lm),
                                             ("int8 triton eager", "triton", False, int8),
                                             ("int8 triton cuda-graph", "triton", True, int8)):
            start = time.perf_counter()
            try:
                codes[label] = Generator(model, text, codec, backend=backend, cuda_graph=graph).generate_codes(
                    TEXTS, duration=1.0, sampling=sampling, seed=4, prompt_audio=prompt_audio)
                torch.cuda.synchronize()
            except Exception as error:  # recorded, and the check fails: the other paths still run
                codes[label] = f"{type(error).__name__}: {error}"[:2000]
            print(f"{name}: {label} in {time.perf_counter() - start:.2f} s", flush=True)
        row = {label: _compare(value, codes["triton eager"]) for label, value in codes.items()}
        row["torch cuda-graph"]["torch_eager"] = _compare(codes["torch cuda-graph"], codes["torch eager"])
        row["int8 triton cuda-graph"]["int8_eager"] = _compare(codes["int8 triton cuda-graph"],
                                                               codes["int8 triton eager"])
        failed |= not row["triton cuda-graph"].get("equal")
        failed |= not row["torch cuda-graph"]["torch_eager"].get("equal")
        failed |= not row["int8 triton cuda-graph"]["int8_eager"].get("equal")
        results[name] = row
        print(f"{name}: {json.dumps(row)}", flush=True)
    payload = {"device": device_name(device), "torch": torch.__version__, "cases": results, "passed": not failed,
               "date": time.strftime("%Y-%m-%d")}
    write_json(RESULTS / f"gpu_check-{device.type}.json", payload)
    if failed:
        raise SystemExit("a CUDA-graph decode differs from its eager decode")
    print("cuda-graph decode == eager decode: passed")


if __name__ == "__main__":
    main()
