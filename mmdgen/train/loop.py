"""What every trainer shares: process setup (torchrun), mixed precision, atomic checkpoints with exact
resume, a non-finite guard, a JSONL metrics log (and TensorBoard when installed), and a progress bar.

A checkpoint is a folder: ``config.json`` and one ``<name>.safetensors`` per model (weights only, the
model directory users load), plus ``training_state.pt`` beside them (optimisers, step, data position,
every RNG) saved with tensors and plain containers only and read back with ``weights_only=True``.
It is written to a temporary folder and swapped in by renames, so a crash never leaves half of one.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

STATE_FILE = "training_state.pt"


@dataclass
class Process:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_process(device: str = "auto") -> Process:
    """Join the torchrun group when RANK/WORLD_SIZE are set (gloo on CPU, NCCL on CUDA)."""
    cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise ValueError(f"device must be auto, cpu or cuda[:n], got {device!r}")
    if cuda and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for but no CUDA device is available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        chosen = torch.device(device if device.startswith("cuda:") else f"cuda:{local}")
        torch.cuda.set_device(chosen)
    else:
        chosen = torch.device("cpu")
    return Process(rank, world, chosen)


def autocast(process: Process, precision: str):
    """bf16 autocast on CUDA when precision is "bf16" or "auto"; full precision otherwise."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32, got {precision!r}")
    if process.device.type == "cuda" and precision in ("auto", "bf16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every generator's state as tensors and plain values (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                      gauss],
            "python": random.getstate(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", getattr(model, "_orig_mod", model))


def save_checkpoint(folder: Path, config: dict, models: dict[str, torch.nn.Module], state: dict) -> None:
    """Atomically (re)place ``folder`` with the config, each model's weights and the training state."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    for name, model in models.items():
        weights = {k: v.detach().contiguous().cpu() for k, v in _unwrap(model).state_dict().items()}
        save_file(weights, str(tmp / f"{name}.safetensors"))
    torch.save(state, tmp / STATE_FILE)
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def checkpoint_folder(folder: Path) -> Path | None:
    """The complete checkpoint at ``folder`` (or the previous one if a swap was interrupted)."""
    for candidate in (Path(folder), Path(folder).with_name(Path(folder).name + ".old")):
        if (candidate / STATE_FILE).exists() and (candidate / "config.json").exists():
            return candidate
    return None


def load_weights(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    if not path.exists():
        raise ValueError(f"{path}: no such weights file")
    _unwrap(model).load_state_dict(load_file(str(path)))


def load_state(folder: Path) -> dict:
    return torch.load(Path(folder) / STATE_FILE, weights_only=True)


class NonFiniteGuard:
    """Counts steps skipped for non-finite losses; raises once more than ``limit`` were skipped."""

    def __init__(self, limit: int):
        self.limit, self.skipped = limit, 0

    def check(self, metrics: dict[str, float], step: int) -> bool:
        """True when the step's losses are finite (apply it); False when it must be skipped."""
        bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
        if not bad:
            return True
        self.skipped += 1
        if self.skipped > self.limit:
            raise RuntimeError(f"step {step}: non-finite {', '.join(bad)}; {self.skipped} steps skipped in all, "
                               f"more than the limit of {self.limit}. Lower the learning rate or check the data.")
        return False


class MetricLog:
    """Appends JSON lines to ``metrics.jsonl``; mirrors scalars to TensorBoard when it is installed."""

    def __init__(self, folder: Path, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(folder) / "metrics.jsonl"
        self.board = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.board = SummaryWriter(str(Path(folder) / "tensorboard"))
            except ImportError:
                self.board = None

    def write(self, kind: str, step: int, values: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"kind": kind, "step": step, "time": time.time(), **values}) + "\n")
        if self.board is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.board.add_scalar(f"{kind}/{key}", value, step)

    def truncate_after(self, step: int) -> None:
        """Drop lines past ``step`` (written after the checkpoint a resumed run restarts from)."""
        if self.enabled and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= step]
            self.path.write_text("".join(line + "\n" for line in kept))
