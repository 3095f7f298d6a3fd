"""Deterministic, resumable, shardable data order.

The order of epoch ``e`` is a permutation that depends only on ``(seed, e)``. Step ``j`` of an
epoch uses the *global batch* ``perm[j*G : (j+1)*G]`` with ``G = batch_size * world_size``, and
rank ``r`` takes the contiguous slice ``[r*batch_size : (r+1)*batch_size]`` of it. Hence

* a single process with ``batch_size = G`` sees, at every step, exactly the concatenation of
  the ranks' batches (so one process and ``world_size`` processes train on the same examples);
* the ranks' shards of an epoch are disjoint;
* restarting at step ``j`` of an epoch needs no iteration over the skipped batches;
* the last ``len(dataset) % G`` examples of each permutation are dropped, so that every step
  has a full global batch (a new permutation every epoch means no example is always left out).
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

# Purposes of the seeds derived from the user's seed, so that no two streams coincide.
ORDER, SPLIT, NOISE, EVAL_NOISE, WORKERS = range(5)


def derived_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed mixed from ``seed`` and ``keys`` (e.g. a purpose and an epoch).

    NumPy's SeedSequence hashes the inputs, so nearby seeds give unrelated streams (a plain
    ``seed + epoch`` would make epoch 1 of seed 0 equal epoch 0 of seed 1).
    """
    state = np.random.SeedSequence([seed, *keys]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class ShardedBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices for one rank, in the order described in the module docstring.

    Use it as a DataLoader's ``batch_sampler``; call :meth:`set_epoch` before iterating.

    Args:
        num_examples: the dataset size N.
        batch_size: examples per batch *per rank* (the global batch is ``batch_size *
            world_size``).
        seed: the run's seed (a non-negative int); epoch ``e`` uses ``derived_seed(seed, ORDER,
            e)``.
        rank, world_size: this process's rank and the number of processes.
        shuffle: False keeps the dataset order (evaluation); the sharding is the same.
    """

    def __init__(self, num_examples: int, batch_size: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True):
        if batch_size < 1:
            raise ValueError(f"ShardedBatchSampler: batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"ShardedBatchSampler: rank must be in [0, world_size={world_size}),"
                             f" got {rank}")
        global_batch = batch_size * world_size
        if num_examples < global_batch:
            raise ValueError(f"ShardedBatchSampler: the dataset has {num_examples} examples, fewer "
                             f"than one global batch (batch_size {batch_size} x world_size "
                             f"{world_size} = {global_batch})")
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.epoch = 0
        self.start = 0

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        """Full global batches per epoch (the remainder of each permutation is dropped)."""
        return self.num_examples // self.global_batch_size

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Iterate over epoch ``epoch`` from its step ``start`` (0 <= start <= steps_per_epoch)."""
        if not 0 <= start <= self.steps_per_epoch:
            raise ValueError(f"set_epoch: start must be in [0, {self.steps_per_epoch}], "
                             f"got {start}")
        self.epoch, self.start = epoch, start

    def permutation(self, epoch: int) -> torch.Tensor:
        """The (N,) int64 order of epoch ``epoch``, the same on every rank."""
        if not self.shuffle:
            return torch.arange(self.num_examples)
        generator = torch.Generator().manual_seed(derived_seed(self.seed, ORDER, epoch))
        return torch.randperm(self.num_examples, generator=generator)

    def __iter__(self) -> Iterator[list[int]]:
        order = self.permutation(self.epoch)
        g, b = self.global_batch_size, self.batch_size
        for step in range(self.start, self.steps_per_epoch):
            offset = step * g + self.rank * b
            yield order[offset:offset + b].tolist()

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start
