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
