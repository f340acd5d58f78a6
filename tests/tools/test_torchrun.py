"""tools/train_det.py and tools/train_cls.py under torchrun: 2 CPU processes joined by gloo.

A short detection run completes; its checkpoint loads in a single process, whose evaluation writes the
same metrics.json and results as the distributed evaluation; 2-process classification with SyncBN ends
with the single-process weights; SIGTERM stops both processes at the same iteration with one checkpoint;
a process that dies ends the run with a message and leaves the checkpoints loadable."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from detection.data.synthetic import make_coco_split, make_crops
from tests.conftest import REPO
from tests.detection.test_train import write_cfg

# One thread per process, in the distributed and the single-process runs alike, so that they compute
# the same floating-point sums.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(tool, *args, nproc=2, **popen):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           f"tools/{tool}", *map(str, args)]
    if popen:
        return subprocess.Popen(cmd, cwd=REPO, env=ENV, text=True, **popen)
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)


def single(tool, *args):
    return subprocess.run([sys.executable, f"tools/{tool}", *map(str, args)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def det_cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp_shapes")
    make_coco_split(str(root), "train", 8, seed=0, image_size=(128, 128))
    make_coco_split(str(root), "val", 4, seed=1, image_size=(128, 128))
    return write_cfg(root, root / "cfg.yaml")


def test_detection_trains_on_two_processes_and_evaluates_as_one(det_cfg, tmp_path):
    out = tmp_path / "ddp"
    result = torchrun("train_det.py", det_cfg, f"output_dir={out}", "test.eval_period=0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("wrote") == 1  # rank 0 reports
    log = (out / "log.txt").read_text()
    assert "2 images per batch, 1 in each of 2 processes (gloo)" in log
    assert "rank 1" not in log  # only rank 0 writes the log
    iters = [json.loads(l)["iter"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert iters == [0, 1, 3, 5, 6]  # every log_period (2) once, and the final evaluation
    state = torch.load(out / "model_final.pth", weights_only=True)
    assert len(state["rng_ranks"]) == 2 and not any(k.startswith("module.") for k in state["model"])
    # The checkpoint in a single process, evaluated there: the distributed evaluation's numbers.
    alone = tmp_path / "alone"
    result = single("train_det.py", det_cfg, f"output_dir={alone}", f"model.weights={out / 'model_final.pth'}",
                    "--eval-only")
    assert result.returncode == 0, result.stderr
    assert (alone / "metrics.json").read_text() == (out / "metrics.json").read_text()
    assert json.loads((alone / "eval/results.json").read_text()) == json.loads((out / "eval/results.json").read_text())
    assert json.loads((out / "eval/results.json").read_text()), "the comparison needs detections"


def small_cls_cfg(root, **solver):
    cfg = {"model": {"name": "classifier", "num_classes": 3, "backbone": {"depth": 18, "norm": "SyncBN"}},
           "input": {"size": 32},
           "data": {"num_workers": 0, "train": {"root": str(root / "crops/train")},
                    "val": {"root": str(root / "crops/val")}},
           "solver": {"ims_per_batch": 8, "epochs": 1, "base_lr": 0.01, "log_period": 1, "checkpoint_period": 0,
                      "ema": True, "ema_decay": 0.5, **solver},
           "device": "cpu"}
    path = root / "cls.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_classification_on_two_processes_trains_as_one(tmp_path):
    """The ranks split each batch, DDP averages their gradients and SyncBN their statistics, so two
    processes take the step one process takes, up to the order of floating-point sums. Later steps are
    compared more loosely: a max-pool or ReLU that flips on a rounding difference changes a gradient
    locally by its own size."""
    make_crops(str(tmp_path), "train", 8, seed=0, crop_size=32)
    make_crops(str(tmp_path), "val", 4, seed=1, crop_size=32)
    cfg = small_cls_cfg(tmp_path)
    two = torchrun("train_cls.py", cfg, f"output_dir={tmp_path / 'two'}", "solver.checkpoint_period=1")
    assert two.returncode == 0, two.stderr
    one = single("train_cls.py", cfg, f"output_dir={tmp_path / 'one'}", "solver.checkpoint_period=1")
    assert one.returncode == 0, one.stderr
    first = [torch.load(tmp_path / run / "model_0000001.pth", weights_only=True) for run in ("two", "one")]
    for key in ("model", "ema"):
        for name, value in first[1][key].items():
            if value.is_floating_point():
                torch.testing.assert_close(first[0][key][name], value, rtol=1e-4, atol=1e-5, msg=f"{key} {name}")
    losses = [[r["loss"] for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())
               if "loss" in r] for run in ("two", "one")]
    assert len(losses[0]) == 3 and losses[0] == pytest.approx(losses[1], rel=1e-3)
    metrics = [json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("two", "one")]
    assert metrics[0] == pytest.approx(metrics[1])
    assert (tmp_path / "two" / "backbone.pth").is_file()


def wait_for(predicate, proc, seconds=300):
    deadline = time.time() + seconds
    while time.time() < deadline and proc.poll() is None and not predicate():
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before the event the test waits for"


def worker_pids(launcher: int):
    """{rank: pid} of torchrun's worker processes."""
    pids = {}
    for pid in Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split():
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = next(int(v[5:]) for v in environ if v.startswith(b"RANK="))
        pids[rank] = int(pid)
    return pids


def test_sigterm_stops_every_process_at_the_same_iteration(det_cfg, tmp_path):
    out = tmp_path / "out"
    proc = torchrun("train_det.py", det_cfg, f"output_dir={out}", "solver.max_iter=500", "solver.checkpoint_period=0",
                    "test.eval_period=0", "solver.log_period=1", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics = out / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2, proc)
    os.kill(worker_pids(proc.pid)[1], signal.SIGTERM)  # one rank only: the other must stop with it
    _, stderr = proc.communicate(timeout=300)
    stops = sorted(line for line in stderr.splitlines() if line.startswith("stopped: "))
    assert len(stops) == 2, stderr
    done = {int(line.split(" at iteration ")[1].split()[0]) for line in stops}
    assert len(done) == 1, stops  # the same iteration on both ranks
    name = f"model_{done.pop():07d}.pth"
    assert (out / "last_checkpoint").read_text().strip() == name
    assert torch.load(out / name, weights_only=True)["iteration"] == int(name[6:13])


def test_a_process_that_dies_ends_the_run_with_a_message(det_cfg, tmp_path):
    out = tmp_path / "out"
    proc = torchrun("train_det.py", det_cfg, f"output_dir={out}", "solver.max_iter=500", "solver.checkpoint_period=2",
                    "test.eval_period=0", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for((out / "last_checkpoint").is_file, proc)
    os.kill(worker_pids(proc.pid)[1], signal.SIGKILL)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "error: rank 0: iteration" in stderr and "another process of the distributed run stopped answering" \
        in stderr, stderr
    assert "exitcode  : -9" in stderr  # torchrun's summary names the process that was killed
    kept = (out / "last_checkpoint").read_text().strip()
    assert kept in stderr and torch.load(out / kept, weights_only=True)["iteration"] >= 2
