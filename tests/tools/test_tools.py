import json
import subprocess
import sys

import pytest
import torch
import torchvision

from tests.conftest import REPO, randomize_norms, run_tool
from tests.parity.test_detectron2_weights import detectron2_r50_fpn, write_pkl


def test_model_stats_resnet50_matches_paper(capsys):
    result = run_tool(capsys, "model_stats.py", "resnet50")
    assert result.returncode == 0, result.stderr
    total = [l for l in result.stdout.splitlines() if l.startswith("total")][0].split()
    assert total[1] == "25,557,032"
    # Table 1: 3.8 x 10^9 multiply-adds. Our exact count is 4.09 G: the stride in the 3x3 (torchvision's)
    # costs 6% over the paper's stride in the 1x1, and the paper rounds to 0.1 G; 10% covers both.
    assert float(total[3]) == pytest.approx(3.8, rel=0.1)


def test_model_stats_config_and_fpn_rows(capsys):
    result = run_tool(capsys, "model_stats.py", "configs/backbones/r50_fpn.yaml", "model.backbone.depth=101",
                      "--input-size", "256", "320")
    assert result.returncode == 0, result.stderr
    rows = {l.split()[0]: l.split() for l in result.stdout.splitlines()[2:]}
    assert {"bottom_up.res4", "lateral_convs", "output_convs"} <= set(rows)
    assert float(rows["output_convs"][2]) > 0


def test_model_stats_unknown_name(capsys):
    result = run_tool(capsys, "model_stats.py", "resnet51")
    assert result.returncode == 2 and "unknown model 'resnet51'" in result.stderr
    assert "Traceback" not in result.stderr


def test_convert_weights_cli(tmp_path, capsys):
    tv = randomize_norms(torchvision.models.resnet34()).eval()
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    result = run_tool(capsys, "convert_weights.py", "--from", "torchvision", tmp_path / "tv.pth", tmp_path / "ours.pth")
    assert result.returncode == 0, result.stderr
    import backbones
    from backbones.weights import load_state_dict, read_weights
    ours = backbones.resnet34().eval()
    report = load_state_dict(ours, read_weights(str(tmp_path / "ours.pth")))
    assert not report.missing and not report.unexpected
    x = torch.randn(1, 3, 96, 96)
    from backbones.norms import unfolded_norms
    # torchvision's arithmetic: BN after the convolution, the same kernels (measured: the same bits); 1e-5
    # leaves room for rounding through 34 layers, none for a wrong mapping
    with torch.no_grad(), unfolded_norms(ours):
        assert torch.allclose(ours(x), tv(x), rtol=1e-5, atol=1e-5)


def test_convert_weights_cli_bad_file(tmp_path, capsys):
    (tmp_path / "bad.pth").write_text("not weights")
    result = run_tool(capsys, "convert_weights.py", "--from", "torchvision", tmp_path / "bad.pth", tmp_path / "o.pth")
    assert result.returncode == 2 and "bad.pth" in result.stderr and "Traceback" not in result.stderr


def convert_elsewhere(tmp_path, *args):
    """`python tools/convert_weights.py ARGS` in a process of its own whose working directory is not the
    repository (the files named by absolute paths), as a user runs it from their own folder."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    return subprocess.run([sys.executable, str(REPO / "tools" / "convert_weights.py"), *map(str, args)],
                          cwd=elsewhere, capture_output=True, text=True, timeout=600)


def test_convert_weights_from_detectron2_in_another_directory(tmp_path):
    """The conversion's fit check builds the model of configs/detectron2/*.yaml, found from the repository."""
    write_pkl(tmp_path / "model_final.pkl", {"model": detectron2_r50_fpn(mask=False)})
    result = convert_elsewhere(tmp_path, "--from", "detectron2", tmp_path / "model_final.pkl", tmp_path / "ours.pth")
    assert result.returncode == 0, result.stderr
    assert "Faster R-CNN R50-FPN (80 classes)" in result.stdout and (tmp_path / "ours.pth").is_file()


def test_convert_weights_from_torchvision_detector_in_another_directory_with_check(tmp_path):
    """--check builds our detector from configs/torchvision/*.yaml, found from the repository."""
    torch.manual_seed(0)
    tv = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3)
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    result = convert_elsewhere(tmp_path, "--from", "torchvision", tmp_path / "tv.pth", tmp_path / "ours.pth", "--check")
    assert result.returncode == 0, result.stderr
    assert "--check against torchvision's fasterrcnn_resnet50_fpn:" in result.stdout
    assert (tmp_path / "ours.pth").is_file()


@pytest.mark.slow
def test_demo_pipeline_on_a_tiny_run(tmp_path, capsys):
    """`make demo` end to end, shortened: data, training, evaluation, drawings, loss curve, the table."""
    result = run_tool(capsys, "demo.py", "--output", tmp_path, "--train-images", "16", "--val-images", "4",
                      "--train-crops", "4", "--val-crops", "2", "--cls", "solver.ims_per_batch=4", "--cls",
                      "solver.epochs=1", "--cls", "solver.warmup_iters=1", "--cls", "data.num_workers=0",
                      "solver.max_iter=2", "solver.warmup_iters=1", "solver.checkpoint_period=0",
                      "data.num_workers=0")
    assert result.returncode == 0, result.stderr
    det = tmp_path / "det"
    for name in ("metrics.json", "loss_curve.png", "model_final.pth", "config.yaml", "vis/results.json"):
        assert (det / name).is_file(), name
    assert len(list((det / "vis").glob("*.png"))) == 4
    assert "bbox (COCO, %)" in result.stdout and "segm (COCO, %)" in result.stdout
    assert "demo finished in" in result.stdout and "ResNet-18 on synthetic crops" in result.stdout
    assert (tmp_path / "cls" / "backbone.pth").is_file() and "backbone.pth: loaded" in result.stderr
    assert list(json.loads((det / "metrics.json").read_text())) == ["bbox", "segm"]
    assert len(list((tmp_path / "data" / "train").glob("*.png"))) == 16
