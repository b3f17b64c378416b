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
import pickle
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import numpy as np
import torch
import torch.distributed as dist

from mmdgen.choices import Precision
from mmdgen.files import load_weights, read_jsonl, save_weights, write_folder_atomic
from mmdgen.train.sampler import ShardedSampler

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
    if precision not in get_args(Precision):
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
    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        for name, model in models.items():
            save_weights(tmp / f"{name}.safetensors", _unwrap(model))
        torch.save(state, tmp / STATE_FILE)

    write_folder_atomic(folder, write)


def checkpoint_folder(folder: Path) -> Path | None:
    """The complete checkpoint at ``folder`` (or the previous one if a swap was interrupted)."""
    for candidate in (Path(folder), Path(folder).with_name(Path(folder).name + ".old")):
        if (candidate / STATE_FILE).exists() and (candidate / "config.json").exists():
            return candidate
    return None


def load_state(folder: Path) -> dict:
    """The training state beside a checkpoint's weights; ValueError naming the file when it is truncated or holds
    anything but tensors and plain containers (nothing else is unpickled)."""
    path = Path(folder) / STATE_FILE
    try:
        state = torch.load(path, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path}: not a training state that loads with weights_only=True ({first}); restore it or "
                         "use another --out to start afresh") from error
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a training state (a dictionary), found a {type(state).__name__}")
    return state


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
            kept = [record for record in read_jsonl(self.path) if record["step"] <= step]
            self.path.write_text("".join(json.dumps(record) + "\n" for record in kept))


class Trainer:
    """The loop every trainer runs: resumable data order, steps with gradient accumulation, logging,
    validation, atomic checkpoints with exact resume, the final export.

    A subclass builds its models, optimisers and datasets, then calls ``_start(train_data, collate)``;
    it defines ``train_step(micro_batches) -> metrics``, ``validate() -> metrics`` (or ``{}``),
    ``checkpoint_models()``, ``optimizers()``, ``export()``, the identity of its configuration
    (``checkpoint_config()``), and any state beyond the shared one (``extra_state`` /
    ``load_extra_state``). Its config is a ``LoopConfig`` (``mmdgen.train.config``).
    """

    label = "train"

    def __init__(self, cfg, process: Process | None, progress: bool):
        cfg.check()
        self.cfg, self.progress = cfg, progress
        self.process = process or setup_process(cfg.device)
        self.out = Path(cfg.out)
        seed_everything(cfg.seed)
        self.guard = NonFiniteGuard(cfg.max_nonfinite)
        self.step, self.epoch, self.consumed = 0, 0, 0

    def _start(self, train_data, collate) -> None:
        self.train_data, self.collate = train_data, collate
        self.sampler = ShardedSampler.for_current_process(len(train_data), seed=self.cfg.seed)
        if self.sampler.per_rank < self.cfg.batch_size * self.cfg.grad_accum:
            raise ValueError(f"{self.sampler.per_rank} training items per rank cannot fill one step of "
                             f"{self.cfg.grad_accum} x {self.cfg.batch_size}")
        self.log = MetricLog(self.out, enabled=self.process.main)
        self._resume()

    # -- what subclasses provide ---------------------------------------------------------------------

    def checkpoint_models(self) -> dict[str, torch.nn.Module]:
        raise NotImplementedError

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        raise NotImplementedError

    def checkpoint_config(self) -> dict:
        raise NotImplementedError

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def to_device(self, batch):
        return batch

    def progress_fields(self, metrics: dict[str, float]) -> dict[str, str]:
        return {}

    def train_step(self, micro_batches: list) -> dict[str, float]:
        raise NotImplementedError

    def validate(self) -> dict:
        return {}

    def export(self) -> Path:
        raise NotImplementedError

    # -- checkpoints -----------------------------------------------------------------------------------

    def _resume(self) -> None:
        folder = checkpoint_folder(self.out / "checkpoint")
        if folder is None:
            return
        saved = json.loads((folder / "config.json").read_text())
        expected = json.loads(json.dumps(self.checkpoint_config()))
        if saved != expected:
            differing = sorted(k for k in set(saved.get("train", {})) | set(expected["train"])
                               if saved.get("train", {}).get(k) != expected["train"].get(k))
            differing += sorted(k for k in set(saved) | set(expected) if k != "train" and saved.get(k) != expected.get(k))
            raise ValueError(f"{folder} was written by a run with another configuration (differs in "
                             f"{', '.join(differing)}); use another --out to start afresh")
        for name, model in self.checkpoint_models().items():
            load_weights(folder / f"{name}.safetensors", _unwrap(model), f"the checkpoint's {name}")
        state = load_state(folder)
        for name, optimizer in self.optimizers().items():
            optimizer.load_state_dict(state["optimizers"][name])
        self.step, self.epoch, self.consumed = state["step"], state["epoch"], state["consumed"]
        self.guard.skipped = state["skipped"]
        set_rng_state(state["rng"][min(self.process.rank, len(state["rng"]) - 1)])
        self.load_extra_state(state["extra"])
        self.log.truncate_after(self.step)

    def _gather(self, value):
        """Every rank's ``value`` (a list with one entry per rank)."""
        if self.process.world == 1:
            return [value]
        values = [None] * self.process.world
        dist.all_gather_object(values, value)
        return values

    def _save(self) -> None:
        rngs, extra = self._gather(rng_state()), self.extra_state()
        if not self.process.main:
            return
        state = {"step": self.step, "epoch": self.epoch, "consumed": self.consumed, "skipped": self.guard.skipped,
                 "optimizers": {name: opt.state_dict() for name, opt in self.optimizers().items()},
                 "rng": rngs, "extra": extra}
        save_checkpoint(self.out / "checkpoint", self.checkpoint_config(), self.checkpoint_models(), state)

    # -- the loop --------------------------------------------------------------------------------------

    def _batches(self):
        """Micro-batches from the current data position, moving to the next epoch at the end of one."""
        while True:
            if hasattr(self.train_data, "set_epoch"):
                self.train_data.set_epoch(self.epoch)
            self.sampler.set_position(self.epoch, self.consumed)
            # its own generator: a loader drawing its worker seed from the global RNG would shift every later
            # random draw when a resumed run builds one mid-epoch
            loader = torch.utils.data.DataLoader(self.train_data, batch_size=self.cfg.batch_size,
                                                 sampler=self.sampler, collate_fn=self.collate, drop_last=True,
                                                 num_workers=self.cfg.workers,
                                                 generator=torch.Generator().manual_seed(self.cfg.seed + self.epoch))
            for batch in loader:
                self.consumed += self.cfg.batch_size
                yield self.to_device(batch)
            self.epoch, self.consumed = self.epoch + 1, 0

    def train(self) -> dict:
        from tqdm import tqdm

        cfg = self.cfg
        batches = self._batches()
        start_step, start_time = self.step, time.perf_counter()
        bar = tqdm(total=cfg.steps, initial=self.step, desc=self.label, unit="step",
                   disable=not (self.progress and self.process.main))
        last = {}
        while self.step < cfg.steps:
            metrics = self.train_step([next(batches) for _ in range(cfg.grad_accum)])
            self.step += 1
            rate = (self.step - start_step) / (time.perf_counter() - start_time)
            bar.update(1)
            bar.set_postfix(**self.progress_fields(metrics), steps_s=f"{rate:.2f}")
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                self.log.write("train", self.step, {**metrics, "steps_per_s": rate, "skipped_total": self.guard.skipped})
            if self.process.main and (self.step % cfg.valid_every == 0 or self.step == cfg.steps):
                last = self.validate()
                if last:
                    self.log.write("valid", self.step, last)
                    bar.write(f"step {self.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in last.items()
                                                                 if isinstance(v, (int, float))))
            if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                self._save()
        bar.close()
        if self.process.main:
            self.export()
        return last
