"""Fine-tuning on a CUDA device (run by hand on a GPU machine; tests/test_finetune.py runs the same paths on the CPU):

    TRITON_INTERPRET=0 python tests/cuda_finetune_check.py OUT.json

1. ``train lm --init`` of a random transformers MusicGen (tiny widths), on tokens of its codec, with every memory
   option at once: bf16 autocast, ``--activation-checkpointing``, ``--optimizer-state bf16``, ``--fsdp`` in one
   process (checkpoints through torch.distributed.checkpoint), the T5 states cached, the fused kernels on the
   device; stopped at step 2 and resumed: how far its weights end from the uninterrupted run's (CUDA's atomic adds
   make them close, not equal).
2. MusicGen-small's LM (24 x 1024, random weights), a batch of 4 x 10 s under bf16 autocast: the peak memory of
   a forward and backward pass with and without activation checkpointing, and AdamW's state in fp32 and in bf16.
Writes the numbers to OUT.json and prints them.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmdgen.data.tokenize import FORMAT_VERSION, codec_with_identity, write_token_folder  # noqa: E402
from mmdgen.losses.lm import codebook_losses  # noqa: E402
from mmdgen.model.lm import MusicLM, lm_config  # noqa: E402
from mmdgen.model.patterns import make_pattern  # noqa: E402
from mmdgen.pretrained import export_model, load_music_lm  # noqa: E402
from mmdgen.train.lm import LMTrainConfig, LMTrainer, teacher_forcing  # noqa: E402
from mmdgen.train.optim import adamw  # noqa: E402
from tests.test_export import SAMPLE_RATE, TEXTS, make_t5_folder, t5_lm_dir  # noqa: E402


def finetune(root: Path, device: str) -> dict:
    source = t5_lm_dir(root / "mmdgen" / "model", make_t5_folder(root / "t5"))
    export_model(source, root / "musicgen", "transformers")
    # the token folder `data tokenize` writes, from tones made here (the device's image has no soundfile to read
    # audio files with)
    codec, identity, location = codec_with_identity(root / "musicgen", device)
    t = torch.arange(SAMPLE_RATE, device=device) / SAMPLE_RATE
    tones = torch.stack([0.3 * torch.sin(2 * torch.pi * (20 + 9 * i) * t) for i in range(10)])[:, None]
    with torch.no_grad():
        codes = codec.encode(tones).cpu().to(torch.int16)  # [10, 4, 50]
    splits = ["train"] * 8 + ["valid"] * 2
    records = [{"id": f"clip{i}", "split": split, "caption": TEXTS[i % 2], "offset": 50 * (i % 8), "frames": 50}
               for i, split in enumerate(splits)]
    header = {"format": FORMAT_VERSION, "codec": identity, "codec_dir": str(location), "num_codebooks": 4,
              "codebook_size": 32, "frame_rate": 50, "sample_rate": SAMPLE_RATE, "manifest": "",
              "splits": {"train": 400, "valid": 100}, "clips": records}
    write_token_folder(root / "tokens", header, {"train": torch.cat(list(codes[:8]), dim=-1),
                                                 "valid": torch.cat(list(codes[8:]), dim=-1)})

    def run(out: str, steps: int) -> dict:
        cfg = LMTrainConfig(tokens=str(root / "tokens"), out=str(root / out), init=str(root / "musicgen"),
                            steps=steps, batch_size=2, crop_frames=20, warmup_steps=1, lr=1e-2, ckpt_every=2,
                            log_every=1, valid_every=100, device=device, precision="bf16",
                            activation_checkpointing=True, optimizer_state="bf16", fsdp=True)
        return LMTrainer(cfg, progress=False).train()

    report = run("straight", 4)
    run("resumed", 2)
    run("resumed", 4)
    a, b = (load_music_lm(root / name / "model")[0].state_dict() for name in ("straight", "resumed"))
    losses = [json.loads(line).get("loss") for line in (root / "straight" / "metrics.jsonl").read_text().splitlines()]
    return {"valid_nll": report["nll"], "train_losses": losses,
            "resume_max_abs_weight_difference": max(float((a[k] - b[k]).abs().max()) for k in a),
            "checkpoint_files": sorted(p.name for p in (root / "straight" / "checkpoint").iterdir())}


def memory(device: str) -> dict:
    torch.manual_seed(0)
    lm = MusicLM(lm_config("small", text_dim=768)).to(device).train()
    pattern = make_pattern("delay", 4)
    codes = torch.randint(0, 2048, (4, 4, 500), device=device)
    inputs, targets = teacher_forcing(codes, pattern, 2048)
    states, mask = torch.randn(4, 20, 768, device=device), torch.ones(4, 20, dtype=torch.bool, device=device)
    result = {"parameters": sum(p.numel() for p in lm.parameters())}
    for checkpointing in (False, True):
        lm.activation_checkpointing = checkpointing
        lm.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = codebook_losses(lm, lm.hidden(inputs, states, mask), targets)
        loss.backward()
        torch.cuda.synchronize()
        result[f"peak_gib_above_weights_checkpointing_{checkpointing}"] = (
            torch.cuda.max_memory_allocated() - base) / 2**30
    for dtype in ("fp32", "bf16"):
        optimizer = adamw([{"params": list(lm.parameters()), "weight_decay": 0.1}], 1e-4, (0.9, 0.95), dtype)
        optimizer.step()
        result[f"optimizer_state_gib_{dtype}"] = sum(t.numel() * t.element_size() for s in optimizer.state.values()
                                                     for t in s.values() if t.dim()) / 2**30
        del optimizer
    return result


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as folder:
        results["finetune"] = finetune(Path(folder), device)
    if device == "cuda":
        results["memory"] = memory(device)
    text = json.dumps(results, indent=1)
    print(text)
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(text)


if __name__ == "__main__":
    main()
