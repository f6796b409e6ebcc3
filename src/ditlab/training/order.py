"""Which examples each rank reads at each step, as a pure function of (seed, epoch, step).

Every epoch is a fresh permutation seeded by (seed, epoch); step b of the epoch takes the b-th
slice of `global_batch` indices and rank r its r-th part. The data position of a run is thus
its step count, and resuming starts the loader mid-epoch without replaying anything."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from ditlab.errors import UserError
from ditlab.runtime.seeds import DATA_ORDER, derive_seed


def epoch_permutation(num_items: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(derive_seed(DATA_ORDER, seed, epoch))
    return torch.randperm(num_items, generator=g)


class RankBatchSampler(Sampler[list[int]]):
    """Batches of one rank for one epoch, starting at batch `start` (drops the last partial batch)."""

    def __init__(self, num_items: int, global_batch: int, rank: int, world_size: int, seed: int, epoch: int,
                 start: int = 0):
        if global_batch % world_size:
            raise UserError(f"--global-batch-size {global_batch} is not divisible by the {world_size} processes")
        self.local = global_batch // world_size
        self.global_batch, self.rank, self.start = global_batch, rank, start
        self.steps = num_items // global_batch
        self.perm = epoch_permutation(num_items, seed, epoch)

    def __len__(self) -> int:
        return self.steps - self.start

    def __iter__(self) -> Iterator[list[int]]:
        for b in range(self.start, self.steps):
            lo = b * self.global_batch + self.rank * self.local
            yield self.perm[lo : lo + self.local].tolist()
