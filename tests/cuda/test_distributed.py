"""tools/train_cls.py under torchrun on every visible GPU (NCCL, SyncBN as torch's nn.SyncBatchNorm) takes
the steps one process takes on the same total batch: the GPU counterpart of
tests/tools/test_torchrun.py's test_classification_on_two_processes_trains_as_one (2 CPU processes, gloo)."""
import json
import os

import pytest
import torch

from detection.data.synthetic import make_crops
from tests.tools.test_torchrun import assert_trains_as_one, single, small_cls_cfg, torchrun

pytestmark = pytest.mark.slow

# NVIDIA_TF32_OVERRIDE=0: cuBLAS and cuDNN compute float32 in float32, never TF32 (cuDNN's convolutions
# default to TF32 in torch), in every process of both runs, so that they differ by float32 rounding only.
# One CPU thread per process as in the CPU test.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "NVIDIA_TF32_OVERRIDE": "0"}
# The process group engine.distributed joins for the device.
BACKENDS = {"cuda": "nccl", "cpu": "gloo"}
# FIRST (step 1's forward pass: loss and BN running statistics): the CPU test's argument, on cuDNN. The two
# runs differ only in the order of float32 sums: SyncBN adds per-GPU sums, the loss is a mean of per-rank
# means, and cuDNN picks its convolution algorithm per batch shape (implicit GEMM, Winograd, FFT), so a
# batch of 8 and shares of it are convolved by different algorithms, whose rounding can be an order of
# magnitude above a direct convolution's. The CPU bound, 2e-5 (ten times the 2-process CPU job's measured
# 1.6e-6), is raised five-fold to 1e-4. It still fails for what it is there for: per-process statistics
# instead of synchronised ones (SyncBN not working) moved this model's first loss by 9.9e-3 relative and
# its running statistics by up to 68% (measured on the CPU, model.backbone.norm=BN in the 2-process job
# against SyncBN's 2.9e-7 and 8e-7): 100 times the bound.
# LATER (what a gradient has moved) stays the CPU test's 5e-2: the same ReLU flips, which do not depend on
# the device, and the bugs it is there for change an update by 100%.
FIRST = 1e-4


def test_ddp_with_syncbn_on_every_gpu_trains_as_one_process(tmp_path, cuda):
    """One process per visible GPU (torch.cuda.device_count()) joined by NCCL, each with its share of the
    batch (the total a multiple of the GPU count, near 8), SyncBN (model.backbone.norm=SyncBN, converted to
    torch's nn.SyncBatchNorm on CUDA), against one process on one GPU with the whole batch: the same losses
    and step-1 weights, EMA and BN statistics within FIRST and LATER, and the distributed evaluation counts
    what one process counts on the final weights.

    With a single GPU the job is still started by torchrun, as one process; torchrun sets WORLD_SIZE=1,
    for which engine.distributed joins no process group (no NCCL, no DDP, SyncBN is plain BN), so the test
    then checks only that a torchrun launch on a GPU trains as a plain one."""
    nproc = torch.cuda.device_count()
    batch = nproc * max(1, 8 // nproc)
    root = tmp_path / "data"
    make_crops(str(root), "train", 8, seed=0, crop_size=32)
    make_crops(str(root), "val", 4, seed=1, crop_size=32)
    cfg = small_cls_cfg(root, ims_per_batch=batch)
    device = f"device={cuda}"
    many, one = tmp_path / "many", tmp_path / "one"
    result = torchrun("train_cls.py", cfg, f"output_dir={many}", "solver.checkpoint_period=1", device, nproc=nproc,
                      env=ENV)
    assert result.returncode == 0, result.stderr
    log = (many / "log.txt").read_text()
    split = (f"{batch} images per batch, {batch // nproc} in each of {nproc} processes ({BACKENDS[cuda.type]})"
             if nproc > 1 else f"{batch} images per batch (1 process)")
    assert split in log and f"device {cuda}" in log, log
    result = single("train_cls.py", cfg, f"output_dir={one}", "solver.checkpoint_period=1", device, env=ENV)
    assert result.returncode == 0, result.stderr

    assert_trains_as_one(many, one, FIRST)
    # The distributed evaluation counts what one process counts on the weights the job ended with (in a
    # process of its own: float32 without TF32, as the job's; TF32 could flip a near-tie of two logits).
    alone = tmp_path / "alone"
    result = single("train_cls.py", cfg, f"output_dir={alone}", f"model.weights={many / 'model_final.pth'}",
                    "--eval-only", device, env=ENV)
    assert result.returncode == 0, result.stderr
    assert json.loads((many / "metrics.json").read_text()) == json.loads((alone / "metrics.json").read_text())
