"""Training stream (per-epoch permutations, sharding), aspect-ratio grouping, inference shards."""
import itertools

import pytest

from detection.data.samplers import AspectRatioGroupedBatchSampler, InferenceSampler, TrainingSampler


def _take(iterable, n):
    return list(itertools.islice(iterable, n))


def test_training_stream_is_a_new_permutation_per_epoch_and_seeded():
    e1, e2 = _take(TrainingSampler(10, seed=0), 10), _take(TrainingSampler(10, seed=0), 20)[10:]
    assert sorted(e1) == sorted(e2) == list(range(10)) and e1 != e2
    assert _take(TrainingSampler(10, seed=0), 30) == _take(TrainingSampler(10, seed=0), 30)
    assert _take(TrainingSampler(10, seed=0), 10) != _take(TrainingSampler(10, seed=1), 10)
    assert _take(TrainingSampler(4, seed=0, shuffle=False), 6) == [0, 1, 2, 3, 0, 1]


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_share_each_epoch_without_overlap(world_size):
    size = 12
    shards = [_take(TrainingSampler(size, seed=5, rank=r, world_size=world_size), size // world_size)
              for r in range(world_size)]
    assert sorted(sum(shards, [])) == list(range(size))


def test_grouped_batches_share_an_orientation_and_are_deterministic():
    landscape = [i % 3 != 0 for i in range(30)]
    first = _take(AspectRatioGroupedBatchSampler(TrainingSampler(30, seed=1), landscape, 4, seed=1), 12)
    for batch in first:
        assert len(batch) == 4 and len({landscape[i] for i, _ in batch}) == 1
    assert {landscape[i] for batch in first for i, _ in batch} == {True, False}
    seeds = [s for batch in first for _, s in batch]
    assert len(set(seeds)) == len(seeds)
    again = _take(AspectRatioGroupedBatchSampler(TrainingSampler(30, seed=1), landscape, 4, seed=1), 12)
    assert again == first
    other = _take(AspectRatioGroupedBatchSampler(TrainingSampler(30, seed=2), landscape, 4, seed=2), 12)
    assert other != first


def test_grouped_batches_resume_where_they_stopped():
    landscape = [i % 3 != 0 for i in range(30)]
    first = _take(AspectRatioGroupedBatchSampler(TrainingSampler(30, seed=1), landscape, 4, seed=1), 12)
    resumed = AspectRatioGroupedBatchSampler(TrainingSampler(30, seed=1), landscape, 4, seed=1, start_batch=5)
    assert _take(resumed, 7) == first[5:]


def test_one_orientation_only_and_bad_batch_size():
    batches = _take(AspectRatioGroupedBatchSampler(TrainingSampler(5, seed=0), [False] * 5, 2, seed=0), 5)
    assert sorted(i for b in batches for i, _ in b) == sorted(list(range(5)) * 2)
    with pytest.raises(ValueError, match="batch_size"):
        AspectRatioGroupedBatchSampler(TrainingSampler(5, seed=0), [True] * 5, 0, seed=0)
    with pytest.raises(ValueError, match="non-empty"):
        TrainingSampler(0, seed=0)


@pytest.mark.parametrize("size, world_size", [(11, 3), (2, 4), (0, 2), (8, 1)])
def test_inference_sampler_covers_every_index_once_in_contiguous_shares(size, world_size):
    shares = [list(InferenceSampler(size, r, world_size)) for r in range(world_size)]
    assert sum(shares, []) == list(range(size))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert [len(InferenceSampler(size, r, world_size)) for r in range(world_size)] == list(map(len, shares))
