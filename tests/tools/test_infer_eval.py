"""tools/infer.py and tools/eval_det.py --weights end to end, on a small detector and synthetic images."""
import json

import pytest
import torch
import yaml
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from backbones.weights import save_weights
from detection import build_detector
from detection.data.synthetic import CATEGORIES, make_coco_split
from tests.conftest import REPO, run_tool

SMALL = {
    "model": {"backbone": {"depth": 18, "norm": "BN", "freeze_at": 0, "weights": None},
              "fpn": {"out_channels": 32}, "roi_heads": {"fc_dim": 64}, "num_classes": 3},
    "input": {"min_size_test": 128, "max_size_test": 128},
    "test": {"score_thresh": 0.0},
    "device": "cpu",
}


@pytest.fixture(scope="module")
def small_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("det")
    ann = make_coco_split(str(root), "val", 4, seed=3, image_size=(128, 128))
    cfg = dict(SMALL, _base_=str(REPO / "configs/_base_/models/faster_rcnn_fpn.yaml"),
               data={"val": {"ann_file": str(ann), "img_dir": str(root / "val")},
                     "categories": [{"id": c["id"], "name": c["name"]} for c in CATEGORIES]},
               output_dir=str(root / "out"))
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    torch.manual_seed(0)
    model = build_detector(str(root / "cfg.yaml"))
    with torch.no_grad():  # spread the random classifier's scores so detections survive
        model.roi_heads.predictor.cls_score.weight.mul_(50)
    save_weights(str(root / "w.pth"), model.state_dict())
    return root


def test_eval_det_weights_matches_pycocotools(small_setup, capsys):
    root = small_setup
    result = run_tool(capsys, "eval_det.py", root / "cfg.yaml", "--weights", root / "w.pth")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((root / "out" / "metrics.json").read_text())
    assert set(metrics["bbox"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    gt = COCO(str(root / "val" / ".." / "annotations" / "instances_val.json"))
    dets = json.loads((root / "out" / "eval" / "results.json").read_text())
    assert dets and {d["category_id"] for d in dets} <= {1, 2, 3}
    ev = COCOeval(gt, gt.loadRes(dets), "bbox")
    ev.evaluate(), ev.accumulate(), ev.summarize()
    # eval_det runs this pycocotools code on these detections: equal but for float64 ulps of the percent
    assert metrics["bbox"]["AP"] == pytest.approx(100 * ev.stats[0], abs=1e-9)
    assert (root / "out" / "config.yaml").is_file()


def test_infer_names_bad_files_and_goes_on(small_setup, tmp_path, capsys):
    root = small_setup
    good = sorted((root / "val").glob("*.png"))[0]
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "out"
    result = run_tool(capsys, "infer.py", root / "cfg.yaml", "--weights", root / "w.pth", "--input", good,
                      tmp_path / "missing.png", corrupt, "--output", out, "test.score_thresh=0.0")
    assert result.returncode == 1
    assert "missing.png" in result.stderr and "corrupt.jpg" in result.stderr and "Traceback" not in result.stderr
    results = json.loads((out / "results.json").read_text())
    assert results and all(r["file_name"] == good.name for r in results)
    assert set(results[0]) == {"file_name", "category_id", "bbox", "score"}
    assert (out / f"{good.stem}.png").is_file()


def test_weights_that_do_not_fit_are_named(small_setup, tmp_path, capsys):
    root = small_setup
    result = run_tool(capsys, "infer.py", root / "cfg.yaml", "--weights", root / "w.pth", "--input",
                      sorted((root / "val").glob("*.png"))[0], "--output", tmp_path, "model.num_classes=5")
    assert result.returncode == 2
    assert "roi_heads.predictor.cls_score.weight: file (4, 64) vs model (6, 64)" in result.stderr


# ---------------------------------------------------------------------------------------------------
# A whole detector (--weights) is all these tools need; one that does not cover the model is refused.

R50_SMALL = ["model.backbone.depth=18", "model.fpn.out_channels=32", "model.roi_heads.fc_dim=64",
             "input.min_size_test=128", "input.max_size_test=128", "test.score_thresh=0.0", "device=cpu"]
BOX_HEAD_CUT = ["roi_heads.box_head.fc1.weight", "roi_heads.box_head.fc1.bias", "roi_heads.box_head.fc2.weight"]


def test_shipped_config_runs_a_detector_without_its_imagenet_file(small_setup, tmp_path, monkeypatch, capsys):
    """configs/frcnn_r50.yaml names ${PRETRAINED:-pretrained}/resnet50.pth, which only training reads."""
    from detection.build import build_detector as build
    from engine.errors import CheckpointError

    monkeypatch.setenv("PRETRAINED", str(tmp_path / "nowhere"))
    config = REPO / "configs" / "frcnn_r50.yaml"
    with pytest.raises(CheckpointError, match="resnet50.pth not found"):  # the file is named, and missing
        build(config, R50_SMALL)
    save_weights(str(tmp_path / "det.pth"), build(config, R50_SMALL + ["model.backbone.weights=null"]).state_dict())
    image = sorted((small_setup / "val").glob("*.png"))[0]
    result = run_tool(capsys, "infer.py", config, "--weights", tmp_path / "det.pth", "--input", image,
                      "--output", tmp_path / "out", "--no-vis", *R50_SMALL)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "out" / "results.json").read_text())


def test_eval_det_weights_without_the_backbone_file(small_setup, tmp_path, capsys):
    root = small_setup
    result = run_tool(capsys, "eval_det.py", root / "cfg.yaml", "--weights", root / "w.pth",
                      f"model.backbone.weights={tmp_path / 'missing' / 'resnet18.pth'}", f"output_dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "metrics.json").is_file()


@pytest.fixture(scope="module")
def cut_weights(small_setup):
    """w.pth without 3 tensors of its box head."""
    state = torch.load(small_setup / "w.pth", weights_only=True)["model"]
    path = small_setup / "cut.pth"
    save_weights(str(path), {k: v for k, v in state.items() if k not in BOX_HEAD_CUT})
    return path


@pytest.mark.parametrize("tool, args", [
    ("infer.py", ["--input", "IMAGE", "--output", "OUT"]),
    ("eval_det.py", ["output_dir=OUT"]),
    ("export.py", ["--format", "torchscript", "--output", "OUT/model.pt"]),
    ("benchmark.py", ["--task", "infer", "--iters", "1", "--warmup", "0", "--no-memory", "--image-size", "64x64",
                      "--output", "OUT/bench.json"]),
])
def test_incomplete_weights_are_one_error_line(small_setup, cut_weights, tmp_path, capsys, tool, args):
    image = sorted((small_setup / "val").glob("*.png"))[0]
    args = [str(image) if a == "IMAGE" else a.replace("OUT", str(tmp_path / "out")) for a in args]
    result = run_tool(capsys, tool, small_setup / "cfg.yaml", "--weights", cut_weights, *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [f"error: --weights={cut_weights} does not cover the model: 3 of the model's tensors are not in "
                     f"it: {', '.join(BOX_HEAD_CUT)}. A detector used as it is needs all of its tensors from the file "
                     "(left at random initialisation they would give meaningless detections): use its run's "
                     "complete checkpoint (model_final.pth), or, to train from this file, give it as model.weights "
                     "to tools/train_det.py"], result.stderr
    assert not (tmp_path / "out" / "results.json").exists()


def test_missing_weights_file_names_the_option(small_setup, tmp_path, capsys):
    result = run_tool(capsys, "infer.py", small_setup / "cfg.yaml", "--weights", tmp_path / "nope.pth", "--input",
                      tmp_path, "--output", tmp_path / "out")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: --weights={tmp_path / 'nope.pth'} not found"]
