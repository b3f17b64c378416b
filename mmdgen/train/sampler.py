"""The training loop's data order: this rank's share of a seeded permutation per epoch, resumable anywhere."""

from __future__ import annotations

import torch


class ShardedSampler(torch.utils.data.Sampler):
    """This rank's share of a seeded permutation per epoch, resumable at any position.

    The permutation wraps around so every rank gets the same count. The trainer owns the position:
    ``set_position(epoch, consumed)`` makes the next iteration start after ``consumed`` of this rank's
    indices of that epoch (what a resumed run has not seen yet).
    """

    def __init__(self, size: int, rank: int = 0, world: int = 1, shuffle: bool = True, seed: int = 0):
        if size < 1:
            raise ValueError(f"cannot sample from an empty dataset (size {size})")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside a world of {world}")
        self.size, self.rank, self.world, self.shuffle, self.seed = size, rank, world, shuffle, seed
        self.epoch, self.consumed = 0, 0

    @classmethod
    def for_current_process(cls, size: int, shuffle: bool = True, seed: int = 0) -> "ShardedSampler":
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(size, dist.get_rank(), dist.get_world_size(), shuffle, seed)
        return cls(size, shuffle=shuffle, seed=seed)

    @property
    def per_rank(self) -> int:
        return -(-self.size // self.world)

    def set_position(self, epoch: int, consumed: int = 0) -> None:
        if not 0 <= consumed <= self.per_rank:
            raise ValueError(f"consumed must be within 0..{self.per_rank}, got {consumed}")
        self.epoch, self.consumed = epoch, consumed

    def indices(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        wrapped = [order[i % self.size] for i in range(self.per_rank * self.world)]
        return wrapped[self.rank:: self.world][self.consumed:]

    def __len__(self) -> int:
        return self.per_rank - self.consumed

    def __iter__(self):
        return iter(self.indices())
