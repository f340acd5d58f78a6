"""Which images go into which training batch, and with which augmentation seed, for data read in epochs
(ImageFolder classification).

The stream is endless: epoch e is a permutation of the dataset seeded by (seed, e), cut into
`len(dataset) // batch_size` full batches (the remainder sits that epoch out, as with DataLoader's
`drop_last`), so an epoch is always the same number of iterations. Every sample carries its own
augmentation seed from (seed, epoch, position), so which DataLoader worker decodes it, and how many workers
there are, changes nothing, and a run resumed at iteration k gets exactly the batches k, k + 1, ... of
the uninterrupted run.
"""
import itertools
from typing import Iterator, List, Tuple

import numpy as np
import torch
from torch.utils.data import Sampler

from engine.errors import ConfigError


def sample_seed(*entropy: int) -> int:
    """A 32-bit seed from integers such as (seed, epoch) or (seed, epoch, position); SeedSequence spreads
    neighbouring inputs far apart, unlike `seed + position`."""
    return int(np.random.SeedSequence(list(entropy)).generate_state(1)[0])


def seed_compose(compose, seed: int):
    """Make an albumentations Compose's next random choices a function of `seed` alone. Each transform gets
    its own seed derived from it: `Compose.set_random_seed` hands all of them the same one, which would tie,
    say, the horizontal flip to the crop's area."""
    compose.set_random_seed(seed)
    for k, transform in enumerate(compose.transforms):
        transform.set_random_seed(sample_seed(seed, k))


class EpochBatchSampler(Sampler):
    """Endless batches of `batch_size` (index, augmentation seed) pairs over `size` items, epoch after
    epoch; `start_batch` skips the batches a resumed run has trained on (only indices are drawn, nothing is
    decoded).

    With `world_size` processes, `batch_size` is the total and process `rank` gets its contiguous slice of
    each batch: together the processes train on exactly the batches, and augmentations, of a
    single-process run with the same seed."""

    def __init__(self, size: int, batch_size: int, seed: int, start_batch: int = 0, rank: int = 0,
                 world_size: int = 1):
        if batch_size <= 0:
            raise ConfigError(f"EpochBatchSampler: batch_size (solver.ims_per_batch) must be positive, "
                              f"got {batch_size}")
        if size < batch_size:
            raise ConfigError(f"EpochBatchSampler: {size} items do not fill one batch of {batch_size}; lower "
                              "solver.ims_per_batch or use more data")
        if batch_size % world_size:
            raise ConfigError(f"EpochBatchSampler: batch_size {batch_size} is not divisible by {world_size} "
                              "processes; set solver.ims_per_batch to a multiple of the process count")
        self.size, self.batch_size, self.seed, self.start_batch = size, batch_size, seed, start_batch
        self.batches_per_epoch = size // batch_size
        per = batch_size // world_size
        self.slice = range(rank * per, (rank + 1) * per)

    def epoch_order(self, epoch: int) -> List[int]:
        g = torch.Generator().manual_seed(sample_seed(self.seed, epoch))
        return torch.randperm(self.size, generator=g).tolist()

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        first_epoch, skip = divmod(self.start_batch, self.batches_per_epoch)
        for epoch in itertools.count(first_epoch):
            order = self.epoch_order(epoch)
            for b in range(skip, self.batches_per_epoch):
                positions = [b * self.batch_size + i for i in self.slice]
                yield [(order[i], sample_seed(self.seed, epoch, i)) for i in positions]
            skip = 0
