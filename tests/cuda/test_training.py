"""Detection training on the GPU with tools/train_det.py: mixed precision (float16 with gradient scaling,
bfloat16 without) on real COCO images, and a run killed with SIGKILL and resumed that ends bit for bit
with the uninterrupted run's weights, with deterministic algorithms on."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from tests.conftest import REPO, run_tool, shapes_splits
from tests.detection.test_train import coco128_cfg, final_weights, write_cfg

pytestmark = pytest.mark.slow


def logged(out):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_mixed_precision_training_on_coco128(shared_data, tmp_path, capsys, cuda, dtype):
    """20 iterations with solver.amp on 8 landscape coco128 images (train = val, as in the CPU overfitting
    test of tests/detection/test_train.py, from scratch with AdamW), all 8 in every batch: every logged loss
    term is finite and the loss falls, the mean over the last 4 iterations below 0.6 of the mean over the
    first 4 (each iteration sees the same images, flipped or not, so the curve is smooth: from scratch the
    classifier starts at ln(81) = 4.4 and learns within a few steps that almost every RoI is background;
    measured with CPU autocast: 5.4 to 1.6, a ratio of 0.30, in float16 and in bfloat16).
    float16 trains with the GradScaler, whose state the checkpoint keeps; bfloat16 needs none."""
    coco128_cfg(shared_data / "coco128", tmp_path, landscape=True, ims_per_batch=8, max_iter=20, checkpoint_period=0,
                log_period=1, warmup_iters=5)
    out = tmp_path / "out"
    result = run_tool(capsys, "train_det.py", tmp_path / "cfg.yaml", f"output_dir={out}", f"device={cuda}",
                      "solver.amp=true", f"solver.amp_dtype={dtype}")
    assert result.returncode == 0, result.stderr
    assert f"device {cuda}" in (out / "log.txt").read_text()
    records = logged(out)
    assert [r["iter"] for r in records] == list(range(20))
    for r in records:
        terms = {k: v for k, v in r.items() if k.startswith("loss")}
        assert len(terms) == 5 and all(math.isfinite(v) for v in terms.values()), r
    losses = [r["loss"] for r in records]
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.6 * first, f"the loss did not fall: {[round(v, 3) for v in losses]}"
    scaler = torch.load(out / "model_final.pth", weights_only=True)["scaler"]
    if dtype == "float16":
        assert 0 < scaler["scale"] < math.inf, scaler
    else:
        assert scaler == {}, "bfloat16 has float32's range: no gradient scaling"


# The environment of the runs, less CUBLAS_WORKSPACE_CONFIG: `deterministic=true` (engine.device) sets the
# cuBLAS workspace that deterministic cuBLAS needs, before the process touches the GPU.
ENV = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}


def train(*args, stderr=None):
    """`python tools/train_det.py ARGS`; with `stderr` (a file) started, not waited for."""
    cmd = [sys.executable, "tools/train_det.py", *map(str, args)]
    if stderr is not None:  # a file, not a pipe: nothing has to read it for the run to go on
        return subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=stderr)
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)


def test_killed_run_resumes_bitwise_with_deterministic_algorithms(tmp_path, cuda):
    """A run killed with SIGKILL (no handler, no last checkpoint of its own) after its checkpoint at some
    iteration k, then resumed with --resume, ends with bitwise the weights of a run that was never
    interrupted, and logs bitwise the same losses: the checkpoint restores weights, optimizer and the CUDA
    random streams (RPN and RoI sampling), the loader restarts at iteration k, and with `deterministic=true`
    (torch.use_deterministic_algorithms, deterministic cuDNN and cuBLAS; torchvision's RoIAlign then takes
    its deterministic implementation, compiled on first use) every kernel sums in a fixed order."""
    shapes = shapes_splits(tmp_path / "shapes", 8, 4, (128, 128))
    cfg = write_cfg(shapes, tmp_path / "cfg.yaml")
    common = [f"device={cuda}", "deterministic=true", "solver.max_iter=24", "solver.checkpoint_period=4",
              "test.eval_period=0", "solver.log_period=1"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    result = train(cfg, f"output_dir={full}", *common)
    assert result.returncode == 0, result.stderr
    assert f"device {cuda}" in (full / "log.txt").read_text()
    assert yaml.safe_load((full / "config.yaml").read_text())["deterministic"] is True

    # Killed once it has saved a checkpoint and gone on past it (iterations to redo after the resume).
    def past_a_checkpoint():
        metrics = cut / "metrics.jsonl"
        return (cut / "last_checkpoint").is_file() and len(metrics.read_text().splitlines()) >= 7

    with open(tmp_path / "cut.err", "w") as err:
        proc = train(cfg, f"output_dir={cut}", *common, stderr=err)
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and proc.poll() is None and not past_a_checkpoint():
                time.sleep(0.05)
            alive, reached = proc.poll() is None, past_a_checkpoint()
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert alive and reached, ("the run ended before it could be killed" if not alive else "no checkpoint in "
                               "300 s") + ": " + (tmp_path / "cut.err").read_text()[-3000:]
    assert proc.returncode == -signal.SIGKILL
    assert not (cut / "model_final.pth").exists()
    kept = (cut / "last_checkpoint").read_text().strip()
    k = torch.load(cut / kept, weights_only=True)["iteration"]
    assert 4 <= k < 24

    result = train(cfg, f"output_dir={cut}", *common, "--resume")
    assert result.returncode == 0, result.stderr
    assert f"resumed from {cut / kept} at iteration {k}" in (cut / "log.txt").read_text()
    expected, got = final_weights(full), final_weights(cut)
    assert got.keys() == expected.keys()
    differ = [key for key in expected if not torch.equal(got[key], expected[key])]
    assert not differ, f"{len(differ)} of {len(expected)} tensors differ, first {differ[:5]}"
    assert [(r["iter"], r["loss"]) for r in logged(cut)] == [(r["iter"], r["loss"]) for r in logged(full)]
