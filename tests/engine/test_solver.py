"""engine.solver's reading of a config for the run at hand: lr steps past the end of a short run are dropped
with one warning, and the batch, lr and lengths follow `solver.reference_world_size`, the command line
(taken literally) and the linear scaling rule."""
import logging

import pytest

from engine.config import Config, load_config, overridden
from engine.errors import ConfigError
from engine.solver import check_steps, scale_to_world_size, solver_summary
from tests.conftest import REPO

COCO_1X = {"ims_per_batch": 16, "base_lr": 0.02, "max_iter": 90000, "steps": [60000, 80000], "warmup_iters": 1000,
           "checkpoint_period": 5000, "reference_world_size": 8}


def coco_cfg(*overrides, **solver):
    """The 1x schedule's solver (16 images on 8 processes), with `overrides` as on a command line."""
    return Config.from_dict({"solver": {**COCO_1X, **solver}, "test": {"eval_period": 10000}}, list(overrides))


def solver_values(cfg):
    """Compared exactly: every scale in these tests is a power of two, which rescales a float exactly."""
    s = cfg.solver
    return s.ims_per_batch, s.base_lr, s.max_iter, list(s.steps), s.warmup_iters, s.checkpoint_period, \
        cfg.test.eval_period


def warnings_of(caplog):
    return [r for r in caplog.records if r.levelno >= logging.WARNING]


# ---- lr steps past the end of the run ----

def test_steps_past_the_end_are_dropped_with_one_warning_naming_them(caplog):
    s = coco_cfg().solver
    with caplog.at_level(logging.INFO, logger="engine"):
        assert check_steps(s, 3) == []
    assert s.steps == []  # what runs, and what config.yaml then holds
    [warning] = warnings_of(caplog)
    assert "[60000, 80000]" in warning.getMessage() and "(3 iterations)" in warning.getMessage()

    caplog.clear()
    s = Config.from_dict({"solver": {"steps": [30, 60, 80]}}).solver
    assert check_steps(s, 60, "epochs") == [30]  # a step at the end never acts: dropped as well
    [warning] = warnings_of(caplog)
    assert "epochs [60, 80]" in warning.getMessage() and "(60 epochs)" in warning.getMessage()

    caplog.clear()
    assert check_steps(s, 60, "epochs") == [30]  # steps inside the run: kept, nothing said
    assert not warnings_of(caplog)


def test_cosine_schedule_drops_its_unused_steps_silently(caplog):
    s = Config.from_dict({"solver": {"steps": [30, 60], "lr_scheduler": "cosine"}}).solver
    assert check_steps(s, 8, "epochs") == []
    assert not warnings_of(caplog)


@pytest.mark.parametrize("steps", [[80000, 60000], [0, 10], [-5]])
def test_steps_that_do_not_increase_or_are_not_positive_stay_an_error(steps):
    # -5 never reaches check_steps through a config (the schema's minimum is 0), but a solver built in code can
    s = Config.from_dict({"solver": {"steps": [1]}}).solver
    s.steps = steps
    with pytest.raises(ConfigError, match=r"solver.steps must be increasing positive iterations, got"):
        check_steps(s, 100)


# ---- batch, lr and lengths ----

@pytest.mark.parametrize("world, expected", [
    (8, (16, 0.02, 90000, [60000, 80000], 1000, 5000, 10000)),
    (2, (4, 0.005, 360000, [240000, 320000], 4000, 20000, 40000)),
    (1, (2, 0.0025, 720000, [480000, 640000], 8000, 40000, 80000)),
])
def test_without_overrides_the_images_per_process_stay(world, expected):
    cfg = coco_cfg()
    scale_to_world_size(cfg, world)
    assert solver_values(cfg) == expected
    assert cfg.solver.reference_world_size == world


@pytest.mark.parametrize("world", [1, 2, 8])
def test_ims_per_batch_on_the_command_line_is_the_batch_of_the_run(world):
    """solver.ims_per_batch=8 is 8 images per step on any number of processes; lr and lengths follow the
    linear scaling rule from the 16 the file was written for."""
    cfg = coco_cfg("solver.ims_per_batch=8")
    scale_to_world_size(cfg, world)
    assert solver_values(cfg) == (8, 0.01, 180000, [120000, 160000], 2000, 10000, 20000)
    scale_to_world_size(cfg, world)  # a second call (the same config trained again) changes nothing
    assert solver_values(cfg) == (8, 0.01, 180000, [120000, 160000], 2000, 10000, 20000)


def test_values_given_on_the_command_line_are_kept(caplog):
    cfg = coco_cfg("solver.ims_per_batch=2", "solver.max_iter=3", "solver.base_lr=0.05", "test.eval_period=1")
    with caplog.at_level(logging.INFO, logger="engine"):
        scale_to_world_size(cfg, 1)
    assert solver_values(cfg) == (2, 0.05, 3, [480000, 640000], 8000, 40000, 1)
    assert "as given: solver.base_lr, solver.max_iter, test.eval_period" in caplog.text
    # max_iter alone on one process: 3 iterations of the config's 2 images per process
    cfg = coco_cfg("solver.max_iter=3")
    scale_to_world_size(cfg, 1)
    assert solver_values(cfg) == (2, 0.0025, 3, [480000, 640000], 8000, 40000, 80000)


def test_reference_batch_size_keeps_base_lr_and_epochs_stay():
    cls = coco_cfg("solver.ims_per_batch=16", reference_batch_size=256, base_lr=0.1, ims_per_batch=256,
                   steps=[30, 60, 80], warmup_iters=0, checkpoint_period=5004)
    scale_to_world_size(cls, 1, epochs=True)
    s = cls.solver
    # 16 images per step, not 256 / 8 = 32 (nor 2); an epoch is 16x as many iterations, which is where the
    # checkpoint period goes; the lr used follows the batch through reference_batch_size
    assert (s.ims_per_batch, s.base_lr, list(s.steps), s.checkpoint_period, s.max_iter) == (16, 0.1, [30, 60, 80],
                                                                                            80064, 90000)
    assert "lr 0.00625" in solver_summary(s, 1, "8 epochs", "epochs")


def test_reference_world_size_zero_takes_the_config_as_written():
    cfg = coco_cfg("solver.ims_per_batch=6", reference_world_size=0)
    scale_to_world_size(cfg, 3)
    assert solver_values(cfg) == (6, 0.02, 90000, [60000, 80000], 1000, 5000, 10000)


def test_batches_that_cannot_be_split_name_the_key_and_a_value_that_works():
    with pytest.raises(ConfigError, match=r"solver.ims_per_batch=3 is not divisible by the 2 processes .* set "
                                          r"solver.ims_per_batch=2$"):
        scale_to_world_size(coco_cfg("solver.ims_per_batch=3"), 2)
    with pytest.raises(ConfigError, match=r"solver.ims_per_batch=6 is not divisible by the 4 processes .* set "
                                          r"solver.ims_per_batch=4$"):
        scale_to_world_size(coco_cfg(reference_world_size=0, ims_per_batch=6), 4)
    # 12 images on 8 processes is no whole number per process: the total batch, or the config as written
    with pytest.raises(ConfigError, match=r"solver.ims_per_batch=12 is written for solver.reference_world_size=8 "
                                          r".* solver.ims_per_batch=2, or solver.reference_world_size=0 to take "
                                          r"the config as written$"):
        scale_to_world_size(coco_cfg(ims_per_batch=12), 2)


def test_shipped_configs_do_what_the_command_line_says(monkeypatch):
    monkeypatch.setenv("DATASETS", "/data")
    det = load_config(REPO / "configs/frcnn_r50.yaml", ["solver.ims_per_batch=2"])
    assert overridden(det) == {"solver.ims_per_batch": 16}
    scale_to_world_size(det, 1)
    assert solver_values(det)[:5] == (2, 0.0025, 720000, [480000, 640000], 8000)
    cls = load_config(REPO / "configs/cls_r18.yaml", ["solver.ims_per_batch=16", "solver.epochs=8"])
    scale_to_world_size(cls, 1, epochs=True)
    assert cls.solver.ims_per_batch == 16
    assert check_steps(cls.solver, cls.solver.epochs, "epochs") == []


def test_summary_names_batch_lr_length_and_steps():
    s = coco_cfg().solver
    assert solver_summary(s, 8, "90000 iterations", backend="nccl") == (
        "16 images per batch, 2 in each of 8 processes (nccl), lr 0.02 after 1000 warm-up iterations, "
        "90000 iterations, x0.1 at iterations [60000, 80000]")
    s.steps, s.warmup_iters = [], 0
    assert solver_summary(s, 1, "3 iterations") == "16 images per batch (1 process), lr 0.02, 3 iterations, " \
                                                   "no lr steps"
