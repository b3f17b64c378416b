"""What every trainer shares: process setup (torchrun), mixed precision, atomic checkpoints with exact
resume, a non-finite guard, a JSONL metrics log (and TensorBoard when installed), and a progress bar.

A checkpoint is a folder: ``config.json`` and one ``<name>.safetensors`` per model (weights only, the
model directory users load), plus ``training_state.pt`` beside them (optimisers, step, data position,
every RNG) saved with tensors and plain containers only and read back with ``weights_only=True``.
It is written to a temporary folder and swapped in by renames, so a crash never leaves half of one, and
it is never written with a NaN or an infinity in it (a ValueError names the tensor; the previous one stays).

``config.json`` holds every training setting (``train``) and the models' configurations. Its paths are
relative to the run folder, and ``train.out`` records where the run folder was: a resumed run finds its
inputs again whether the run folder moved alone or together with them. A resumed run must share every
setting but those of ``FREE`` (the length, the bookkeeping, the skip limit, the optimiser's settings),
whose changes it logs, one line each.

A step whose losses (or gradient norm) are not finite is skipped without changing any state; more than
``max_nonfinite`` such steps in a row stop the run with a RuntimeError.

A sharded run (a trainer setting ``sharded``: FSDP2) checkpoints its model and optimisers through
``torch.distributed.checkpoint`` instead: every rank writes its shards into the checkpoint folder (``.metadata``
and ``*.distcp`` beside ``config.json`` and ``training_state.pt``; a filesystem all ranks share), swapped into
place as a whole by rank 0. Such a checkpoint loads onto any number of processes, one included. A run may resume on
another number of processes when the global batch (``batch_size x grad_accum x processes``) stays the same: the
data position carries over in items of the global batch, so the run sees the items it would have seen.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pickle
import random
import shutil
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import numpy as np
import torch
import torch.distributed as dist

from mmdgen.choices import Precision
from mmdgen.files import (check_finite, load_weights, read_jsonl, replace_folder, save_weights,
                          write_folder_atomic, write_text_atomic)
from mmdgen.train.sampler import ShardedSampler

log = logging.getLogger(__name__)

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


def _global_batch(train: dict, world: int) -> int | None:
    """Items per optimiser step over all processes, from a config's training settings."""
    if not isinstance(train.get("batch_size"), int) or not isinstance(train.get("grad_accum"), int):
        return None
    return train["batch_size"] * train["grad_accum"] * world


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", getattr(model, "_orig_mod", model))


def named_tensors(value, prefix: str = ""):
    """(dotted name, tensor) for every tensor inside nested dicts, lists and tuples."""
    if isinstance(value, torch.Tensor):
        yield prefix, value
    elif isinstance(value, (dict, list, tuple)):
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            yield from named_tensors(item, f"{prefix}.{key}" if prefix else str(key))


def save_checkpoint(folder: Path, config: dict, models: dict[str, torch.nn.Module], state: dict) -> None:
    """Atomically (re)place ``folder`` with the config, each model's weights and the training state.

    ValueError naming the file and the tensor, with nothing written (``folder`` keeps the previous checkpoint),
    when a weight or a tensor of the training state is not finite."""
    folder = Path(folder)
    for name, model in models.items():
        check_finite(folder / f"{name}.safetensors", _unwrap(model), f"the {name}")
    check_finite(folder / STATE_FILE, dict(named_tensors(state)), "the training state")

    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        for name, model in models.items():
            save_weights(tmp / f"{name}.safetensors", _unwrap(model), f"the {name}")
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


def _load_optimizer(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """The checkpoint's moments and step counts, under the settings (lr, betas, weight decay...) the optimiser
    was built with now: those come from the current configuration, which may change them on resume."""
    settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, setting in zip(optimizer.param_groups, settings):
        group.update(setting)


def sharded_state(model: torch.nn.Module, optimizers: dict[str, torch.optim.Optimizer]) -> dict:
    """The model's and the optimisers' state dicts as torch.distributed.checkpoint takes them: each rank its shards
    (DTensors) under FSDP, whole tensors in a single process; keys are the model's parameter names."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model),
            "optimizers": {name: get_optimizer_state_dict(model, optimizer) for name, optimizer in optimizers.items()}}


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def first_nonfinite(tensors: dict) -> str | None:
    """The name of the first tensor (this rank's shard of it) inside nested containers that holds a NaN or an
    infinity, or None."""
    for name, tensor in named_tensors(tensors):
        local = _local(tensor)
        if (local.is_floating_point() or local.is_complex()) and not bool(local.isfinite().all()):
            return name
    return None


def _barrier(process: Process) -> None:
    if process.world > 1:
        dist.barrier()


@contextmanager
def _single_process_is_meant():
    """torch.distributed.checkpoint warns at each save and load without a process group: one process is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def save_sharded_checkpoint(folder: Path, config: dict, model: torch.nn.Module,
                            optimizers: dict[str, torch.optim.Optimizer], state: dict, process: Process) -> None:
    """Every rank: its shards of the model and the optimisers into a temporary folder, which rank 0 completes with
    the config and the training state and swaps into place (``folder`` keeps the previous checkpoint until then).
    ValueError on every rank, with nothing written, when a tensor is not finite on some rank."""
    import torch.distributed.checkpoint as dcp

    folder = Path(folder)
    tensors = sharded_state(model, optimizers)
    bad = first_nonfinite(tensors)
    names = [bad] if process.world == 1 else [None] * process.world
    if process.world > 1:
        dist.all_gather_object(names, bad)
    bad = next((name for name in names if name), None)
    if bad:
        raise ValueError(f"{folder}: not written: tensor {bad} of the sharded model or its optimiser holds non-finite "
                         "values (NaN or infinity); expected finite values only")
    if process.main:
        check_finite(folder / STATE_FILE, dict(named_tensors(state)), "the training state")
    tmp = folder.with_name(folder.name + ".tmp")
    if process.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(process)
    with _single_process_is_meant():
        dcp.save(tensors, checkpoint_id=tmp)
    _barrier(process)
    if process.main:
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        torch.save(state, tmp / STATE_FILE)
        replace_folder(tmp, folder)
    _barrier(process)


def load_sharded_checkpoint(folder: Path, model: torch.nn.Module, optimizers: dict[str, torch.optim.Optimizer]
                            ) -> None:
    """The model's and the optimisers' state from ``save_sharded_checkpoint``'s folder, resharded onto however many
    processes run now; the optimisers keep the settings (lr, betas...) they were built with."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    if not (Path(folder) / ".metadata").exists():
        raise ValueError(f"{folder}: no torch.distributed.checkpoint files (.metadata); the checkpoint of a sharded "
                         "run holds them")
    tensors = sharded_state(model, optimizers)
    with _single_process_is_meant():
        dcp.load(tensors, checkpoint_id=folder)
    set_model_state_dict(model, tensors["model"])
    for name, optimizer in optimizers.items():
        settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        set_optimizer_state_dict(model, optimizer, tensors["optimizers"][name])
        for group, setting in zip(optimizer.param_groups, settings):
            group.update(setting)


def _get(config: dict, keys: tuple[str, ...]):
    for key in keys:
        if not isinstance(config, dict):
            return None
        config = config.get(key)
    return config


def _set(config: dict, keys: tuple[str, ...], value) -> None:
    for key in keys[:-1]:
        config = config[key]
    config[keys[-1]] = value


class NonFiniteGuard:
    """Decides whether a step is applied: skipped when one of its metrics is not finite. ``stop_if_exhausted``
    raises once more than ``limit`` steps in a row were skipped (a good step resets that count; ``total`` keeps
    counting).

    ``any_rank(flag)`` tells whether ``flag`` holds on some rank, so that every rank skips the same steps;
    ``checkpoint`` is the checkpoint folder the error points to."""

    def __init__(self, limit: int, checkpoint: Path, any_rank=lambda flag: flag):
        self.limit, self.checkpoint, self.any_rank = limit, Path(checkpoint), any_rank
        self.in_a_row, self.total, self.bad = 0, 0, []

    def check(self, metrics: dict[str, float]) -> bool:
        """True when the step's metrics are finite on every rank (apply it); False when it must be skipped."""
        self.bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
        if not self.any_rank(bool(self.bad)):
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.total += 1
        return False

    @property
    def exhausted(self) -> bool:
        return self.in_a_row > self.limit

    def stop_if_exhausted(self, step: int) -> None:
        """RuntimeError when more than ``limit`` steps in a row, up to ``step``, were skipped."""
        if not self.exhausted:
            return
        saved = checkpoint_folder(self.checkpoint)
        where = f"{saved} holds the state before them" if saved else "no checkpoint was written yet"
        raise RuntimeError(f"step {step}: non-finite {', '.join(self.bad) or 'values on another rank'}; "
                           f"{self.in_a_row} step{'s' * (self.in_a_row > 1)} in a row skipped, more than "
                           f"max_nonfinite={self.limit} (--max-nonfinite) allows; {where}. Resume with a lower "
                           "--lr or a higher --max-nonfinite, or check the data.")


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
        """Drop lines past ``step`` (written after the checkpoint a resumed run restarts from) and a torn final
        line; ValueError naming the file and the line for any other line that is not a JSON record."""
        if self.enabled and self.path.exists():
            self._drop_torn_line()
            kept = [record for record in read_jsonl(self.path, required=("step",)) if record["step"] <= step]
            write_text_atomic(self.path, "".join(json.dumps(record) + "\n" for record in kept))

    def _drop_torn_line(self) -> None:
        """A run killed while appending leaves a final line without its newline, cut short."""
        data = self.path.read_bytes()
        if not data or data.endswith(b"\n"):
            return
        head, _, last = data.rpartition(b"\n")
        try:
            json.loads(last)
            return  # whole, only its newline missing
        except ValueError:
            log.warning("%s: dropped a torn final line (the run stopped while writing it): %r", self.path, last[:80])
        write_text_atomic(self.path, (head + b"\n").decode() if head else "")


class Trainer:
    """The loop every trainer runs: resumable data order, steps with gradient accumulation, logging,
    validation, atomic checkpoints with exact resume, the final export.

    A subclass builds its models, optimisers and datasets, then calls ``_start(train_data, collate)``;
    it defines ``train_step(micro_batches) -> metrics``, ``validate() -> metrics`` (or ``{}``),
    ``checkpoint_models()``, ``optimizers()``, ``export()``, its models' configuration
    (``checkpoint_config()``, and ``checkpoint_paths()`` for the paths inside it), and any state beyond the
    shared one (``extra_state`` / ``load_extra_state``). Its config is a ``LoopConfig`` (``mmdgen.train.config``).

    A ``train_step`` skips a step (``self.guard.check(metrics)`` false) without changing any state: parameters,
    buffers, optimisers and whatever else the step touched are as they were before it.
    """

    label = "train"

    def __init__(self, cfg, process: Process | None, progress: bool):
        cfg.check()
        self.cfg, self.progress = cfg, progress
        self.process = process or setup_process(cfg.device)
        self.out = Path(cfg.out)
        self.run_folder = self.out.resolve()
        seed_everything(cfg.seed)
        self.guard = NonFiniteGuard(cfg.max_nonfinite, self.out / "checkpoint", self.any_rank)
        self.step, self.epoch, self.consumed = 0, 0, 0
        # the module whose state (and its optimisers') checkpoints go through torch.distributed.checkpoint; then
        # every rank validates and exports, as the model's forward and its full state need them all
        self.sharded: torch.nn.Module | None = None

    def _start(self, train_data, collate) -> None:
        self.train_data, self.collate = train_data, collate
        self.sampler = ShardedSampler.for_current_process(len(train_data), seed=self.cfg.seed)
        if self.sampler.per_rank < self.cfg.batch_size * self.cfg.grad_accum:
            raise ValueError(f"{self.sampler.per_rank} training items per rank cannot fill one step of "
                             f"{self.cfg.grad_accum} x {self.cfg.batch_size}")
        self.log = MetricLog(self.out, enabled=self.process.main)
        self._resume()
        self.log.truncate_after(self.step)

    # -- what subclasses provide ---------------------------------------------------------------------

    def checkpoint_models(self) -> dict[str, torch.nn.Module]:
        raise NotImplementedError

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        raise NotImplementedError

    def checkpoint_config(self) -> dict:
        """The configuration of the models (beside the training settings, which the loop adds as "train")."""
        raise NotImplementedError

    def checkpoint_paths(self) -> list[tuple[str, ...]]:
        """The keys (a tuple per nesting level) of the paths inside ``checkpoint_config()``."""
        return []

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

    def _path_keys(self) -> list[tuple[str, ...]]:
        return [("train", name) for name in self.cfg.PATHS] + self.checkpoint_paths()

    def saved_config(self) -> dict:
        """What a checkpoint's config.json holds: every training setting ("train") and the models'
        configuration, as JSON; paths relative to the run folder, and ``train.out`` the run folder itself."""
        config = json.loads(json.dumps({"train": dataclasses.asdict(self.cfg), **self.checkpoint_config()}))
        for keys in self._path_keys():
            path = _get(config, keys)
            if path:
                _set(config, keys, os.path.relpath(Path(path).resolve(), self.run_folder))
        config["train"]["out"] = str(self.run_folder)
        return config

    def _check_configuration(self, folder: Path, saved: dict, saved_world: int) -> None:
        """ValueError naming the settings that differ from the checkpoint's, but those a resume may change.

        A path matches when it names the same place relative to the run folder (the run folder moved together
        with its inputs, or nothing moved) or the same absolute place (the run folder moved alone). Checkpoints
        older than ``train.out`` stored paths as given, relative to the working directory. On another number of
        processes, the batch size and the accumulation may change with the global batch kept."""
        expected = self.saved_config()
        saved_run = Path(saved.get("train", {}).get("out") or Path.cwd())
        for keys in self._path_keys():
            old, new = _get(saved, keys), _get(expected, keys)
            if isinstance(old, str) and old and new and old != new and \
                    (saved_run / old).resolve() == (self.run_folder / new).resolve():
                _set(saved, keys, new)
        free = self.cfg.FREE
        if saved_world != self.process.world:
            saved_global = _global_batch(saved.get("train", {}), saved_world)
            now = _global_batch(expected["train"], self.process.world)
            if saved_global != now:
                raise ValueError(f"{folder} was written by {saved_world} processes with a global batch of "
                                 f"{saved_global} items; on {self.process.world}, batch_size x grad_accum x processes "
                                 f"must stay {saved_global} (it is {now}) to resume; or use another --out to start "
                                 "afresh")
            free = free + ("batch_size", "grad_accum")
        saved_train = {k: v for k, v in saved.get("train", {}).items() if k not in free}
        expected_train = {k: v for k, v in expected["train"].items() if k not in free}
        differing = sorted(k for k in set(saved_train) | set(expected_train)
                           if saved_train.get(k) != expected_train.get(k))
        differing += sorted(k for k in set(saved) | set(expected) if k != "train" and saved.get(k) != expected.get(k))
        if differing:
            raise ValueError(f"{folder} was written by a run with another configuration (differs in "
                             f"{', '.join(differing)}); use another --out to start afresh")

    def _log_changes(self, folder: Path, saved_train: dict) -> None:
        """One line per setting a resumed run changed (among those it may change)."""
        current = self.saved_config()["train"]
        for name in self.cfg.FREE:
            if name in saved_train and saved_train[name] != current[name]:
                log.warning("%s: resuming at step %d with %s changed: %s -> %s", folder, self.step, name,
                            saved_train[name], current[name])

    def _resume(self) -> None:
        folder = checkpoint_folder(self.out / "checkpoint")
        if folder is None:
            return
        saved = json.loads((folder / "config.json").read_text())
        state = load_state(folder)
        saved_world = state.get("world", self.process.world)  # older checkpoints: the same processes
        self._check_configuration(folder, saved, saved_world)
        if self.sharded is not None:
            load_sharded_checkpoint(folder, self.sharded, self.optimizers())
        else:
            for name, model in self.checkpoint_models().items():
                load_weights(folder / f"{name}.safetensors", _unwrap(model), f"the checkpoint's {name}")
            for name, optimizer in self.optimizers().items():
                _load_optimizer(optimizer, state["optimizers"][name])
        self.step, self.epoch = state["step"], state["epoch"]
        # the data position in items of the global batch, shared out among the processes of this run
        self.consumed = state["consumed"] * saved_world // self.process.world
        # checkpoints older than the count of steps skipped in a row hold the total only
        self.guard.total, self.guard.in_a_row = state["skipped"], state.get("skipped_in_a_row", 0)
        set_rng_state(state["rng"][min(self.process.rank, len(state["rng"]) - 1)])
        self.load_extra_state(state["extra"])
        if self.process.main:
            self._log_changes(folder, saved["train"])

    def any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` holds on some rank; every rank gets the same answer (one all-reduce under DDP), so
        that they skip the same steps (a rank skipping a backward would leave the others waiting in it)."""
        if self.process.world == 1:
            return flag
        value = torch.tensor([float(flag)], device=self.process.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def _gather(self, value):
        """Every rank's ``value`` (a list with one entry per rank)."""
        if self.process.world == 1:
            return [value]
        values = [None] * self.process.world
        dist.all_gather_object(values, value)
        return values

    def _save(self) -> None:
        rngs, extra = self._gather(rng_state()), self.extra_state()
        state = {"step": self.step, "epoch": self.epoch, "consumed": self.consumed, "skipped": self.guard.total,
                 "skipped_in_a_row": self.guard.in_a_row, "world": self.process.world, "rng": rngs, "extra": extra}
        if self.sharded is not None:
            save_sharded_checkpoint(self.out / "checkpoint", self.saved_config(), self.sharded, self.optimizers(),
                                    state, self.process)
            return
        if not self.process.main:
            return
        state["optimizers"] = {name: opt.state_dict() for name, opt in self.optimizers().items()}
        save_checkpoint(self.out / "checkpoint", self.saved_config(), self.checkpoint_models(), state)

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
        last = {}
        # closed on the way out of an error too, so that the message starts on a line of its own
        with tqdm(total=cfg.steps, initial=self.step, desc=self.label, unit="step",
                  disable=not (self.progress and self.process.main)) as bar:
            while self.step < cfg.steps:
                metrics = self.train_step([next(batches) for _ in range(cfg.grad_accum)])
                self.step += 1
                rate = (self.step - start_step) / (time.perf_counter() - start_time)
                bar.update(1)
                bar.set_postfix(**self.progress_fields(metrics), steps_s=f"{rate:.2f}")
                if self.step % cfg.log_every == 0 or self.step == cfg.steps or self.guard.exhausted:
                    self.log.write("train", self.step, {**metrics, "steps_per_s": rate,
                                                        "skipped_total": self.guard.total})
                self.guard.stop_if_exhausted(self.step)  # before a checkpoint: the last one stays in place
                if (self.process.main or self.sharded is not None) and (self.step % cfg.valid_every == 0 or
                                                                        self.step == cfg.steps):
                    last = self.validate()
                    if last and self.process.main:
                        self.log.write("valid", self.step, last)
                        bar.write(f"step {self.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in last.items()
                                                                     if isinstance(v, (int, float))))
                if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                    self._save()
        broken = sorted(k for k, v in last.items() if isinstance(v, float) and not math.isfinite(v))
        if broken:  # finite weights that compute nothing finite (a diverged run): no model to hand over
            raise RuntimeError(f"step {self.step}: the model's validation {', '.join(broken)} is not finite, so no "
                               f"model was exported from {self.out / 'checkpoint'}; the run diverged: start afresh "
                               "with another --out and a lower --lr")
        if self.process.main or self.sharded is not None:
            self.export()  # sharded: every rank, to gather the full weights
        _barrier(self.process)  # no rank leaves (and tears its process group down) while another still works
        return last
