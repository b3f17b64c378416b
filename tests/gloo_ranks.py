"""Tests over several processes on this machine: ``spawn_gloo_ranks`` runs a worker in each, joined in one gloo
process group (as torchrun would: RANK, WORLD_SIZE and LOCAL_RANK set)."""

import gc
import os

import torch.distributed as dist
import torch.multiprocessing as mp

from mmdgen.cli import leave_now


def spawn_gloo_ranks(worker, world: int, init_file, *args) -> None:
    """``worker(rank, world, *args)`` in ``world`` processes, rendezvous through ``init_file`` (a path that does
    not exist yet). A worker's exception fails the call with its traceback."""
    mp.spawn(_rank, args=(worker, world, str(init_file), args), nprocs=world, join=True)


def _rank(rank: int, worker, world: int, init_file: str, args: tuple) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        worker(rank, world, *args)
    finally:
        gc.collect()  # collectives held by the worker's objects go before their process group
        dist.destroy_process_group()
    # After a good run the interpreter's exit can still abort (gloo, torch 2.14: "terminate called without an
    # active exception", SIGABRT, seen about once in 50 runs of two ranks, after both had destroyed their group):
    # the worker's results are written, so the process leaves without running the exit's destructors.
    leave_now(0)
