"""Which images go into which batch, and with which augmentation seed.

Training draws from an endless stream: a new seeded permutation per pass over the data, split across
processes by rank. Batches are grouped by aspect ratio (landscape with landscape, portrait with portrait),
so padding to the batch's largest image wastes little.

Seeding: every sample in the stream carries its own augmentation seed, derived from the batch sampler's
seed and the sample's position in the stream (`sample_seed`). Which DataLoader worker decodes a sample,
and how many workers there are, therefore changes nothing, and a resumed run continues with exactly the
batches it would have seen.
"""
import itertools
from typing import Iterator, List, Sequence, Tuple

import torch
from torch.utils.data import Sampler

from engine.data.samplers import sample_seed
from engine.distributed import shard
from engine.errors import ConfigError, DatasetError


class TrainingSampler(Sampler):
    """Endless indices of `size` items: a seeded permutation per epoch (or 0..size-1 repeated when not
    `shuffle`), every `world_size`-th one starting at `rank`, so ranks never share an index in an epoch."""

    def __init__(self, size: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        if size <= 0:
            raise DatasetError(f"TrainingSampler needs a non-empty dataset, got size {size}: the training set has "
                               "no images (or none left after filtering those without annotations)")
        if not 0 <= rank < world_size:
            raise ValueError(f"TrainingSampler: rank {rank} is not in [0, world_size={world_size})")
        self.size, self.seed, self.shuffle, self.rank, self.world_size = size, seed, shuffle, rank, world_size

    def _stream(self) -> Iterator[int]:
        for epoch in itertools.count():
            if self.shuffle:
                g = torch.Generator().manual_seed(sample_seed(self.seed, epoch))
                yield from torch.randperm(self.size, generator=g).tolist()
            else:
                yield from range(self.size)

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(self._stream(), self.rank, None, self.world_size)


class AspectRatioGroupedBatchSampler(Sampler):
    """Batches of `batch_size` (index, augmentation seed) pairs whose images are all landscape or all
    portrait, drawn in the order of the endless `sampler`.

    landscape: per dataset index, whether width >= height. seed: the augmentation seeds' root (give each
    rank its own). start_batch: batches to skip, for a resumed run (only indices are drawn, nothing is
    decoded).
    """

    def __init__(self, sampler, landscape: Sequence[bool], batch_size: int, seed: int, start_batch: int = 0):
        if batch_size <= 0:
            raise ConfigError(f"AspectRatioGroupedBatchSampler: batch_size (solver.ims_per_batch per process) must be "
                              f"positive, got {batch_size}")
        self.sampler, self.landscape, self.batch_size = sampler, [bool(x) for x in landscape], batch_size
        self.seed, self.start_batch = seed, start_batch

    def _batches(self) -> Iterator[List[Tuple[int, int]]]:
        buckets = {True: [], False: []}
        for position, index in enumerate(self.sampler):
            bucket = buckets[self.landscape[index]]
            bucket.append((index, sample_seed(self.seed, position)))
            if len(bucket) == self.batch_size:
                yield bucket[:]
                bucket.clear()

    def __iter__(self):
        return itertools.islice(self._batches(), self.start_batch, None)


class InferenceSampler(Sampler):
    """Each of `size` indices once; rank r of `world_size` gets one contiguous share (the shares differ
    by at most one), so gathered results come back in dataset order."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1):
        self.indices = shard(size, rank, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)
