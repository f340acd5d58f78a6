"""engine.distributed and what builds on it, in 2 CPU processes joined by gloo: SyncBN equals one
process's BN over the whole batch (outputs and gradients), gather/broadcast/on_main, the sharding helpers,
the classification batch slices and the reference_world_size rule."""
import os

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from torch import nn

from backbones.norms import SyncBatchNorm2d
from engine import distributed as dist
from engine.config import Config
from engine.data.samplers import EpochBatchSampler
from engine.errors import ConfigError, TrainingError
from engine.solver import scale_to_world_size

WORLD = 2


def _worker(rank: int, init_file: str, out_dir: str):
    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        x = torch.randn(4, 3, 5, 5) * 3 + 1  # the whole batch; this rank trains on its half
        bn = SyncBatchNorm2d(3)
        with torch.no_grad():
            bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
            bn.bias.copy_(torch.tensor([0.0, -1.0, 0.3]))
        part = x[rank * 2:(rank + 1) * 2].clone().requires_grad_(True)
        y = bn(part)
        (y * torch.arange(y.numel()).view_as(y).float().sin()).sum().backward()
        # The gradients of the shared parameters are summed over the ranks, as DDP does (up to its mean).
        torch_dist.all_reduce(bn.weight.grad)
        torch_dist.all_reduce(bn.bias.grad)
        result = {"y": y.detach(), "x_grad": part.grad, "w_grad": bn.weight.grad, "b_grad": bn.bias.grad,
                  "running_mean": bn.running_mean, "running_var": bn.running_var,
                  "gathered": dist.gather_to_main({"rank": rank}), "broadcast": dist.broadcast_from_main(rank + 10),
                  "shard": list(dist.shard(5))}
        try:
            dist.on_main(lambda: 1 / 0)
        except ZeroDivisionError:
            result["on_main"] = "ZeroDivisionError"
        except TrainingError as e:
            result["on_main"] = str(e)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch_dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("gloo")
    mp.spawn(_worker, args=(str(root / "init"), str(root)), nprocs=WORLD, join=True)
    return [torch.load(root / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def assert_rounding_close(got, want, terms=4 * 5 * 5):
    """Equal up to the order of float32 sums: each rank sums its 50 values of a channel and the ranks add
    their sums, where one process sums all 100 at once. A sum of n terms is off by at most about n u of the
    terms' size (u = 2**-24), so the tolerance is 100 u of the largest value compared, on every CPU; the
    AVX-512, AVX2, default and oneDNN SSE4.1 code paths measure at most 5e-7 of that value, a twelfth."""
    torch.testing.assert_close(got, want, rtol=0, atol=terms * 2**-24 * want.abs().max().item())


def test_sync_bn_over_two_processes_is_bn_over_the_whole_batch(two_ranks):
    torch.manual_seed(0)
    x = (torch.randn(4, 3, 5, 5) * 3 + 1).requires_grad_(True)
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        bn.bias.copy_(torch.tensor([0.0, -1.0, 0.3]))
    y = bn(x)
    # each rank weighted its half of the output the same way
    half = torch.arange(y[:2].numel()).view_as(y[:2]).float().sin()
    weight = torch.cat([half] * WORLD)
    (y * weight).sum().backward()
    got_y = torch.cat([two_ranks[r]["y"] for r in range(WORLD)])
    got_x_grad = torch.cat([two_ranks[r]["x_grad"] for r in range(WORLD)])
    assert_rounding_close(got_y, y.detach())
    assert_rounding_close(got_x_grad, x.grad)
    for r in range(WORLD):
        assert_rounding_close(two_ranks[r]["w_grad"], bn.weight.grad)
        assert_rounding_close(two_ranks[r]["b_grad"], bn.bias.grad)
        assert_rounding_close(two_ranks[r]["running_mean"], bn.running_mean)
        assert_rounding_close(two_ranks[r]["running_var"], bn.running_var)


def test_collectives_and_errors_on_rank_0(two_ranks):
    assert two_ranks[0]["gathered"] == [{"rank": 0}, {"rank": 1}] and two_ranks[1]["gathered"] is None
    assert [r["broadcast"] for r in two_ranks] == [10, 10]
    assert [r["shard"] for r in two_ranks] == [[0, 1, 2], [3, 4]]
    # rank 0 raises its own error; the other rank learns of it instead of waiting for a result
    assert two_ranks[0]["on_main"] == "ZeroDivisionError"
    assert "rank 0 failed (ZeroDivisionError: division by zero)" in two_ranks[1]["on_main"]


def test_single_process_helpers_are_the_identity():
    assert (dist.world_size(), dist.rank(), dist.is_main(), dist.rank_prefix()) == (1, 0, True, "")
    assert dist.gather_to_main(3) == [3] and dist.broadcast_from_main(4) == 4 and dist.on_main(lambda: 5) == 5
    model = nn.Linear(2, 2)
    assert dist.wrap_model(model, torch.device("cpu")) is model
    assert isinstance(SyncBatchNorm2d(3).train()(torch.randn(2, 3, 4, 4)), torch.Tensor)


def test_shards_cover_everything_once_in_order():
    for size in (0, 1, 7, 10):
        for world in (1, 2, 3, 4):
            shares = [list(dist.shard(size, r, world)) for r in range(world)]
            assert sum(shares, []) == list(range(size))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1
    with pytest.raises(ValueError):
        dist.shard(4, 2, 2)


def test_classification_ranks_split_the_single_process_batches():
    """Together the ranks train on exactly the batches (and augmentation seeds) of one process."""
    single = EpochBatchSampler(20, 8, seed=3, start_batch=1)
    ranks = [EpochBatchSampler(20, 8, seed=3, start_batch=1, rank=r, world_size=2) for r in range(2)]
    for whole, *parts in zip(*(iter(s) for s in [single, *ranks]), range(7)):
        assert parts[0] + parts[1] == whole and len(parts[0]) == 4
    with pytest.raises(ValueError, match="not divisible"):
        EpochBatchSampler(20, 8, seed=3, rank=0, world_size=3)


def solver_cfg(**solver):
    base = {"ims_per_batch": 16, "base_lr": 0.02, "max_iter": 90000, "steps": [60000, 80000], "warmup_iters": 1000,
            "checkpoint_period": 5000, "reference_world_size": 8}
    return Config.from_dict({"solver": {**base, **solver}, "test": {"eval_period": 10000}})


def test_reference_world_size_keeps_the_images_per_process():
    cfg = solver_cfg()
    scale_to_world_size(cfg, 2)
    s = cfg.solver
    assert (s.ims_per_batch, s.base_lr, s.max_iter, list(s.steps)) == (4, 0.005, 360000, [240000, 320000])
    assert (s.warmup_iters, s.checkpoint_period, cfg.test.eval_period, s.reference_world_size) == (4000, 20000, 40000, 2)
    scale_to_world_size(cfg, 2)  # already scaled: the config.yaml written by a run reruns unchanged
    assert (s.ims_per_batch, s.max_iter) == (4, 360000)
    # with reference_batch_size, lr already follows the batch; classification counts epochs, not iterations
    cls = solver_cfg(reference_batch_size=256, base_lr=0.1, ims_per_batch=256, steps=[30, 60])
    scale_to_world_size(cls, 4, epochs=True)
    assert (cls.solver.ims_per_batch, cls.solver.base_lr, list(cls.solver.steps), cls.solver.max_iter) == \
        (128, 0.1, [30, 60], 90000)
    off = solver_cfg(reference_world_size=0)
    scale_to_world_size(off, 4)
    assert off.solver.ims_per_batch == 16
    with pytest.raises(ConfigError, match="ims_per_batch=16 is written for solver.reference_world_size=3"):
        scale_to_world_size(solver_cfg(reference_world_size=3), 2)


def test_detection_batch_must_divide_between_processes():
    from detection.data.build import build_detection_train_loader

    cfg = Config.from_dict({"solver": {"ims_per_batch": 4}})
    with pytest.raises(ConfigError, match="ims_per_batch=4 is not divisible by the 3 processes"):
        build_detection_train_loader(cfg, rank=0, world_size=3)
