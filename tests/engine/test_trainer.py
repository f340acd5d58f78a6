"""The shared training loop and its checkpoints, on a toy model (the detection trainer's end-to-end runs
are in tests/detection/test_train.py)."""
import json
import logging
import random

import numpy as np
import pytest
import torch

from engine.checkpoint import LAST_CHECKPOINT, Checkpointer, load_checkpoint_file
from engine.config import Config
from engine.errors import CheckpointError, TrainingError
from engine.events import MetricsWriter, setup_logging
from engine.trainer import Trainer, flat_metrics


def toy_cfg(**solver):
    return Config.from_dict({"solver": {"base_lr": 0.1, "max_iter": 6, "log_period": 2, "checkpoint_period": 4,
                                        "warmup_iters": 0, **solver}, "test": {"eval_period": 0}})


def toy_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    while True:
        x = torch.randn(4, 3, generator=g)
        yield x, x.sum(1, keepdim=True)


def mse_step(model, batch):
    x, y = batch
    return {"loss_mse": torch.nn.functional.mse_loss(model(x), y)}


def make_trainer(tmp_path, cfg, data=None, step=mse_step, evaluate=None):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.solver.base_lr, momentum=0.9)
    writer = MetricsWriter(str(tmp_path), tensorboard=False)
    return Trainer(cfg, model, opt, data or toy_data(), step, Checkpointer(str(tmp_path)), writer,
                   torch.device("cpu"), cfg.solver.max_iter, evaluate=evaluate)


def test_loop_logs_checkpoints_and_learns(tmp_path):
    trainer = make_trainer(tmp_path, toy_cfg())
    trainer.train()
    trainer.writer.close()
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [l["iter"] for l in lines] == [0, 1, 3, 5]  # the first iteration, then every log_period
    assert {"iter", "lr", "loss", "loss_mse", "data_time", "time"} <= set(lines[0])
    assert lines[-1]["loss"] < lines[0]["loss"]
    assert (tmp_path / LAST_CHECKPOINT).read_text() == "model_0000004.pth"
    state = load_checkpoint_file(str(tmp_path / "model_0000004.pth"))
    assert state["iteration"] == 4 and "optimizer" in state and "rng" in state


def test_resume_continues_exactly(tmp_path):
    # A run stopped after its checkpoint at iteration 4 and resumed ends with the same weights as an
    # uninterrupted run: model, optimizer momentum and iteration come back from the checkpoint.
    full = make_trainer(tmp_path / "full", toy_cfg())
    full.train()
    stopped = make_trainer(tmp_path / "cut", toy_cfg(max_iter=4, checkpoint_period=2))
    stopped.train()
    stopped.save("model_0000004.pth", 4)
    resumed = make_trainer(tmp_path / "cut", toy_cfg())
    state = resumed.checkpointer.resume(resumed.model, resumed.optimizer)
    assert state["iteration"] == 4
    data = toy_data()
    for _ in range(4):
        next(data)  # the batches the first part consumed
    resumed.data = data
    resumed.train(start_iter=4)
    # Bitwise: the same code on the same batches from the same weights and momentum, in one process with
    # one thread count, so nothing may differ at all.
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_rng_states_are_restored(tmp_path):
    ckpt = Checkpointer(str(tmp_path))
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    ckpt.save("model_0000001.pth", torch.nn.Linear(1, 1), 1)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.resume(torch.nn.Linear(1, 1))
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def test_non_finite_loss_stops_with_iteration_and_losses(tmp_path):
    def nan_at_5(model, batch):
        losses = mse_step(model, batch)
        nan_at_5.calls += 1
        if nan_at_5.calls == 6:
            losses["loss_mse"] = losses["loss_mse"] * float("nan")
        return losses

    nan_at_5.calls = 0
    trainer = make_trainer(tmp_path, toy_cfg(max_iter=8), step=nan_at_5)
    with pytest.raises(TrainingError, match=r"iteration 5: loss is not finite \(loss_mse=nan\).*model_0000004.pth"):
        trainer.train()
    # The checkpoint before the failure is intact and still the one last_checkpoint names.
    assert (tmp_path / LAST_CHECKPOINT).read_text() == "model_0000004.pth"
    assert load_checkpoint_file(str(tmp_path / "model_0000004.pth"))["iteration"] == 4


def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    ckpt = Checkpointer(str(tmp_path))
    model = torch.nn.Linear(2, 1)
    ckpt.save("model_0000001.pth", model, 1)

    def dies_halfway(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save("model_0000002.pth", model, 2)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [LAST_CHECKPOINT, "model_0000001.pth",
                                                          "model_0000001.pth.sha256"]
    assert ckpt.last() == str(tmp_path / "model_0000001.pth")


def test_resume_errors(tmp_path):
    ckpt = Checkpointer(str(tmp_path))
    with pytest.raises(CheckpointError, match="nothing to resume"):
        ckpt.resume(torch.nn.Linear(2, 1))
    (tmp_path / LAST_CHECKPOINT).write_text("model_0000009.pth")
    with pytest.raises(CheckpointError, match="names 'model_0000009.pth', which is not a checkpoint file"):
        ckpt.last()
    ckpt.save("model_0000001.pth", torch.nn.Linear(2, 1), 1)
    with pytest.raises(CheckpointError, match="does not fit the configured model"):
        ckpt.resume(torch.nn.Linear(3, 1))
    (tmp_path / "model_0000001.pth").write_bytes(b"\x80\x04truncated")
    with pytest.raises(CheckpointError, match="checksum mismatch for checkpoint"):  # its .sha256 was recorded
        ckpt.resume(torch.nn.Linear(2, 1))
    (tmp_path / "model_0000001.pth.sha256").unlink()
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        ckpt.resume(torch.nn.Linear(2, 1))


def test_gradient_clipping_bounds_the_step(tmp_path):
    cfg = toy_cfg(max_iter=1, clip_grad_norm=1e-3)
    trainer = make_trainer(tmp_path, cfg)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    step = torch.cat([(p.detach() - b).flatten() for p, b in zip(trainer.model.parameters(), before)])
    # lr x clipped gradient norm, up to the float32 rounding of the update and of its norm (a few u): 1e-4
    # relative is ample (clip_grad_norm_'s max_norm / (norm + 1e-6) only makes the step smaller).
    assert 0 < step.norm() <= 0.1 * 1e-3 * 1.0001


@pytest.mark.parametrize("amp, amp_dtype, dtype, scaled", [(True, "bfloat16", torch.bfloat16, False),
                                                             (True, "float16", torch.float16, True),
                                                             (False, "float16", torch.float32, False)])
def test_autocast_dtype_and_gradient_scaling(tmp_path, amp, amp_dtype, dtype, scaled):
    """solver.amp_dtype is the dtype the step computes in; float16 (the CUDA default) gets a gradient scaler,
    bfloat16 (float32's range) none. On the CPU both autocast; on CUDA the same code (tests/cuda trains with both)."""
    seen = []

    def step(model, batch):
        out = model(batch[0])
        seen.append(out.dtype)
        return {"loss": (out.float() - batch[1]).pow(2).mean()}

    trainer = make_trainer(tmp_path, toy_cfg(max_iter=2, amp=amp, amp_dtype=amp_dtype), step=step)
    trainer.train()
    assert seen == [dtype, dtype] and trainer.scaler.is_enabled() == scaled
    if scaled:  # the scale survives in the checkpoint, for a bitwise resume
        saved = torch.load(trainer.save("model_0000002.pth", 2), weights_only=True)
        assert saved["scaler"]["scale"] == trainer.scaler.get_scale() > 0


def test_float16_resumes_a_checkpoint_saved_without_scaling(tmp_path, caplog):
    """A run switched to float16 AMP on resume, from a checkpoint of a bfloat16 run (an empty scaler
    state): the scale starts afresh, with a warning, and the run continues."""
    first = make_trainer(tmp_path, toy_cfg(max_iter=2, amp=True, amp_dtype="bfloat16"))
    first.train()
    path = first.save("model_0000002.pth", 2)
    resumed = make_trainer(tmp_path, toy_cfg(max_iter=4, amp=True, amp_dtype="float16"))
    state = resumed.checkpointer.resume(resumed.model, resumed.optimizer)
    with caplog.at_level(logging.WARNING, logger="engine"):
        resumed.restore(dict(state, path=path))
    assert "saved without float16 gradient scaling: the scale starts afresh at 65536" in caplog.text
    resumed.train(start_iter=2)
    assert resumed.scaler.is_enabled() and resumed.iteration == 3


def test_periodic_evaluation_is_logged(tmp_path):
    calls = []

    def evaluate(model):
        calls.append(model.training)
        return {"bbox": {"AP": 12.5}}

    trainer = make_trainer(tmp_path, toy_cfg(), evaluate=evaluate)
    trainer.cfg.test.eval_period = 2
    trainer.train()
    assert len(calls) == 2  # at 2 and 4; the final one is the caller's
    assert trainer.model.training
    evals = [h for h in trainer.writer.history if "bbox/AP" in h]
    assert [h["iter"] for h in evals] == [2, 4] and flat_metrics({"a": {"b": 1}}) == {"a/b": 1.0}


def test_each_run_logs_into_its_own_log_txt(tmp_path):
    """Two runs in one process (the demo: classifier, then detector): the second run's lines go to its
    own log.txt only."""
    root = logging.getLogger()
    before = root.handlers[:]
    try:
        setup_logging(tmp_path / "first")
        logging.getLogger("engine").info("first run")
        setup_logging(tmp_path / "second")
        logging.getLogger("engine").info("second run")
        first, second = ((tmp_path / d / "log.txt").read_text() for d in ("first", "second"))
        assert "first run" in first and "second run" not in first
        assert "second run" in second and "first run" not in second
    finally:
        for handler in root.handlers:
            if handler not in before:
                handler.close()
        root.handlers = before


def test_metrics_writer_drops_redone_iterations_on_resume(tmp_path):
    w = MetricsWriter(str(tmp_path), tensorboard=False)
    for it in range(6):
        w.write({"iter": it, "loss": 1.0})
    w.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"iter": 6, "lo')  # killed mid-line
    w = MetricsWriter(str(tmp_path), resume_from=4, tensorboard=False)
    w.write({"iter": 4, "loss": 0.5})
    w.close()
    its = [json.loads(l)["iter"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert its == [0, 1, 2, 3, 4]


def test_no_weight_decay_on_norm_and_bias():
    from engine.solver import build_optimizer

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.GroupNorm(2, 4),
                                torch.nn.Linear(4, 2))
    cfg = Config.from_dict({"solver": {"weight_decay": 0.01, "no_weight_decay_norm_bias": True}})
    decay, no_decay = build_optimizer(cfg, model).param_groups
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[3].weight)}
    assert len(no_decay["params"]) == 6  # conv and linear biases, BN and GN weights and biases
    cfg.solver.no_weight_decay_norm_bias = False
    assert len(build_optimizer(cfg, model).param_groups) == 1
