"""tools/train_cls.py end to end on synthetic crops: training with the classification options,
--eval-only, errors without tracebacks, and backbone.pth converted for torchvision."""
import json
import subprocess
import sys

import pytest
import torch
import torchvision
import yaml

from backbones.build import build_classifier
from backbones.weights import load_state_dict, read_weights
from detection.data.synthetic import make_crops
from engine.config import load_config
from tests.conftest import REPO, run_tool


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cls")
    make_crops(str(root), "train", 8, seed=0, crop_size=32)
    make_crops(str(root), "val", 4, seed=1, crop_size=32)
    cfg = {"model": {"name": "classifier", "num_classes": 3, "backbone": {"depth": 18}},
           "input": {"size": 32},
           "data": {"num_workers": 0, "train": {"root": str(root / "crops/train")},
                    "val": {"root": str(root / "crops/val")}},
           "solver": {"ims_per_batch": 8, "epochs": 1, "base_lr": 0.01, "reference_batch_size": 16,
                      "label_smoothing": 0.1, "log_period": 1, "checkpoint_period": 0},
           "device": "cpu"}
    path = root / "cls.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = root / "out"
    # A real `python tools/train_cls.py`: the command line end to end (the other tests run tools in-process).
    result = subprocess.run([sys.executable, "tools/train_cls.py", str(path), f"output_dir={out}"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return path, out, result


def test_cli_trains_with_the_options(cli_run):
    _, out, result = cli_run
    assert "top-1" in result.stdout and f"wrote {out}/metrics.json" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"top1", "top5"}
    assert "learning rate 0.005 = solver.base_lr 0.01 x ims_per_batch 8 / reference_batch_size 16" in \
        (out / "log.txt").read_text()
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["lr"] for l in lines if "loss" in l] == pytest.approx([0.005] * 3)  # float64 products: an ulp
    saved = load_config(out / "config.yaml").solver
    assert (saved.label_smoothing, saved.reference_batch_size) == (0.1, 16)


def test_eval_only_writes_the_same_metrics(cli_run, capsys):
    path, out, _ = cli_run
    trained = json.loads((out / "metrics.json").read_text())
    (out / "metrics.json").unlink()
    result = run_tool(capsys, "train_cls.py", path, f"output_dir={out}", "--eval-only")  # evaluates model_final.pth
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "metrics.json").read_text()) == trained
    assert f"top-1 {trained['top1']:.2f}%" in result.stdout


def test_errors_are_one_line_and_exit_2(cli_run, capsys, tmp_path):
    path, _, _ = cli_run
    result = run_tool(capsys, "train_cls.py", path, f"output_dir={tmp_path / 'a'}", "data.train.root=null")
    assert result.returncode == 2 and result.stderr.startswith("error: config key 'data.train.root' is not set")
    result = run_tool(capsys, "train_cls.py", path, f"output_dir={tmp_path / 'b'}", "--resume")
    assert result.returncode == 2 and "nothing to resume" in result.stderr
    result = run_tool(capsys, "train_cls.py", path, f"output_dir={tmp_path / 'c'}", "--eval-only")
    assert result.returncode == 2 and "--eval-only needs weights" in result.stderr
    result = run_tool(capsys, "train_cls.py", path, "solver.labelsmoothing=0.1")
    assert result.returncode == 2 and "did you mean 'solver.label_smoothing'" in result.stderr
    assert "Traceback" not in result.stderr


def test_backbone_converts_to_torchvision(cli_run, capsys, tmp_path):
    path, out, _ = cli_run
    result = run_tool(capsys, "convert_weights.py", "--to", "torchvision", out / "backbone.pth", tmp_path / "tv.pth")
    assert result.returncode == 0, result.stderr
    tv = torchvision.models.resnet18(num_classes=3)
    tv.load_state_dict(torch.load(tmp_path / "tv.pth", weights_only=True), strict=True)
    ours = build_classifier(load_config(path))
    report = load_state_dict(ours, read_weights(str(out / "backbone.pth")))
    assert not report.missing and not report.unexpected
    x = torch.randn(2, 3, 64, 64)
    # Ours folds BN into the convolutions, torchvision applies it after: float32 rounding through 18 layers,
    # measured at most 1.6e-6 on logits of size ~1 (the default code path); 1e-5 is six times that.
    with torch.no_grad():
        torch.testing.assert_close(tv.eval()(x), ours.eval()(x), rtol=0, atol=1e-5)


def test_short_run_of_a_shipped_config_with_the_batch_given(cli_run, capsys, tmp_path):
    """configs/cls_r18.yaml (256 images on 8 processes, lr steps at epochs 30, 60, 80) on small crops with
    `solver.epochs=2 solver.ims_per_batch=8`: 8 images per step on one process, not 8 / 8 = 1, at the lr
    0.1 x 8 / 256 that reference_batch_size gives; the steps past the 2 epochs are dropped with one warning,
    and the console states batch, lr and length."""
    path, _, _ = cli_run
    small = yaml.safe_load(path.read_text())
    cfg = tmp_path / "cls_r18_small.yaml"
    cfg.write_text(yaml.safe_dump({"_base_": str(REPO / "configs/cls_r18.yaml"), "input": small["input"],
                                   "data": small["data"], "model": {"num_classes": 3}, "device": "cpu"}))
    out = tmp_path / "out"
    result = run_tool(capsys, "train_cls.py", cfg, f"output_dir={out}", "solver.epochs=2", "solver.ims_per_batch=8")
    assert result.returncode == 0, result.stderr
    warned = [line for line in result.stderr.splitlines() if "WARNING" in line and "solver.steps" in line]
    assert len(warned) == 1 and "epochs [30, 60, 80] are at or past the end of this run (2 epochs)" in warned[0]
    # 24 training images: 3 iterations of 8 per epoch
    assert "8 images per batch (1 process), lr 0.003125, 2 epochs of 3 iterations, no lr steps" in result.stderr
    lrs = [json.loads(l)["lr"] for l in (out / "metrics.jsonl").read_text().splitlines() if "loss" in l]
    assert lrs == pytest.approx([0.003125] * len(lrs)) and len(lrs) >= 2  # float64 0.1 x 8 / 256: an ulp
    ran = load_config(out / "config.yaml").solver
    assert (ran.ims_per_batch, ran.epochs, ran.steps, ran.reference_world_size) == (8, 2, [], 1)
