"""Masks in inference outputs and evaluation: RLE results that decode to the thresholded masks, bbox and
segm AP of a model's detections equal to pycocotools', masks drawn; with a stand-in model that returns
ground-truth-based detections, and end to end with a small Mask R-CNN."""
import json

import cv2
import numpy as np
import pytest
import torch
import yaml
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import detection.build
import detection.inference as inference
from detection.data.synthetic import CATEGORIES, make_coco_split
from detection.evaluation import evaluate_detector
from detection.inference import binary_masks, infer_files, to_coco_results
from engine.config import Config
from tests.conftest import REPO, run_tool

METRICS = ["AP", "AP50", "AP75", "APs", "APm", "APl"]


def _det(masks, labels=None, scores=None):
    n = len(masks)
    boxes = torch.tensor([[1.0, 2.0, 5.0, 7.0]] * n).reshape(-1, 4)
    return {"boxes": boxes, "scores": torch.linspace(0.9, 0.1, n) if scores is None else scores,
            "labels": torch.ones(n, dtype=torch.int64) if labels is None else labels, "masks": masks}


def test_results_segmentation_decodes_to_the_thresholded_masks():
    probs = torch.rand(3, 1, 23, 31, generator=torch.Generator().manual_seed(0))
    probs[1] = 0.5  # exactly at the threshold: inside ("at or above", test.mask_thresh)
    det = _det(probs)
    entries = to_coco_results(det, {1: 7}, binary_masks(det, 0.5), image_id=4)
    entries = json.loads(json.dumps(entries))  # what results.json holds
    assert [set(e) for e in entries] == [{"image_id", "category_id", "bbox", "score", "segmentation"}] * 3
    for k, e in enumerate(entries):
        assert e["segmentation"]["size"] == [23, 31] and isinstance(e["segmentation"]["counts"], str)
        np.testing.assert_array_equal(mask_utils.decode(e["segmentation"]), (probs[k, 0] >= 0.5).numpy())
    assert mask_utils.decode(entries[1]["segmentation"]).all()
    empty = _det(torch.zeros(0, 1, 5, 5))
    assert to_coco_results(empty, {1: 7}, binary_masks(empty, 0.5)) == []
    no_masks = {k: v for k, v in det.items() if k != "masks"}
    assert binary_masks(no_masks, 0.5) is None and "segmentation" not in to_coco_results(no_masks, {1: 7})[0]


class GroundTruthModel(torch.nn.Module):
    """Stand-in for a Mask R-CNN: for the images of `gt` in id order (predict_coco's order), returns their
    annotations as detections, with masks as (N, 1, H, W) probabilities; `noise` > 0 shifts masks, jitters
    boxes and scores and adds a spurious detection per image."""

    def __init__(self, gt: COCO, noise: float = 0.0):
        super().__init__()
        self.gt, self.noise, self.next = gt, noise, 0
        self.img_ids = sorted(gt.getImgIds())
        self.rng = np.random.default_rng(0)

    def forward(self, images):
        self.batches = getattr(self, "batches", []) + [len(images)]
        return [self.detect(image) for image in images]

    def detect(self, image):
        img_id = self.img_ids[self.next % len(self.img_ids)]
        self.next += 1
        anns = self.gt.loadAnns(self.gt.getAnnIds(imgIds=img_id, iscrowd=False))
        h, w = image.shape[1:]
        masks = np.stack([self.gt.annToMask(a) for a in anns]).astype(np.float32) * 0.8 if anns else np.zeros((0, h, w))
        boxes = np.array([[x, y, x + bw, y + bh] for x, y, bw, bh in (a["bbox"] for a in anns)]).reshape(-1, 4)
        labels = [a["category_id"] for a in anns]  # the synthetic ids are 1..3: labels and ids coincide
        scores = np.ones(len(anns))
        if self.noise:
            masks = np.roll(masks, self.rng.integers(-3, 4, 2), axis=(1, 2))
            boxes = boxes + self.rng.normal(0, self.noise, boxes.shape)
            scores = self.rng.uniform(0.2, 1.0, len(anns))
            masks = np.concatenate([masks, np.full((1, h, w), 0.6)])
            boxes = np.concatenate([boxes, [[0, 0, w / 2, h / 2]]])
            labels, scores = labels + [1], np.concatenate([scores, [0.5]])
        return {"boxes": torch.tensor(boxes, dtype=torch.float32), "scores": torch.tensor(scores, dtype=torch.float32),
                "labels": torch.tensor(labels, dtype=torch.int64), "masks": torch.tensor(masks, dtype=torch.float32)[:, None]}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    ann = make_coco_split(str(root), "val", 6, seed=5, image_size=(96, 128))
    return root, ann


def _cfg(root, ann, out, name="mask_rcnn"):
    return Config.from_dict({
        "model": {"name": name, "num_classes": 3}, "device": "cpu", "output_dir": str(out),
        "data": {"val": {"ann_file": str(ann), "img_dir": str(root / "val")},
                 "categories": [{"id": c["id"], "name": c["name"]} for c in CATEGORIES]}})


@pytest.mark.parametrize("noise", [0.0, 2.0])
def test_evaluate_detector_scores_boxes_and_masks_like_pycocotools(shapes, tmp_path, noise):
    root, ann = shapes
    gt = COCO(str(ann))
    reports = evaluate_detector(_cfg(root, ann, tmp_path), GroundTruthModel(gt, noise), torch.device("cpu"))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert list(metrics) == ["bbox", "segm"] and list(metrics["segm"]) == METRICS
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert all(isinstance(r["segmentation"]["counts"], str) for r in results)
    for iou_type in ("bbox", "segm"):
        dets = results if iou_type == "bbox" else [{k: v for k, v in r.items() if k != "bbox"} for r in results]
        ev = COCOeval(gt, gt.loadRes(dets), iou_type)
        ev.evaluate(), ev.accumulate(), ev.summarize()
        # The evaluator runs this pycocotools code on these detections in this process: equal but for the
        # float64 ulps of the percent (x 100); 1e-9 / 1e-12 only absorb those.
        assert metrics[iou_type]["AP"] == pytest.approx(100 * ev.stats[0], abs=1e-9)
        assert reports[iou_type].stats == pytest.approx(list(ev.stats), abs=1e-12)
        assert (tmp_path / "eval" / f"summary_{iou_type}.txt").is_file()
    if noise == 0:
        assert metrics["bbox"]["AP"] == metrics["segm"]["AP"] == 100
    else:
        assert 10 < metrics["segm"]["AP"] < 95


def test_evaluation_in_batches_gives_the_same_results(shapes, tmp_path):
    """test.ims_per_batch runs the model on several images at a time; every image keeps its own detections
    and the results file is the same as one image at a time."""
    root, ann = shapes
    gt = COCO(str(ann))
    written = {}
    for batch in (1, 4):
        cfg = _cfg(root, ann, tmp_path / str(batch))
        cfg.test.ims_per_batch = batch
        model = GroundTruthModel(gt, noise=2.0)
        evaluate_detector(cfg, model, torch.device("cpu"))
        assert model.batches == ([1] * 6 if batch == 1 else [4, 2])
        written[batch] = (tmp_path / str(batch) / "eval" / "results.json").read_text()
    assert written[4] == written[1] and json.loads(written[1])


def test_infer_files_writes_and_draws_masks(shapes, tmp_path, monkeypatch):
    root, ann = shapes
    gt = COCO(str(ann))
    model = GroundTruthModel(gt)
    monkeypatch.setattr(inference, "load_model", lambda cfg, weights: (model, torch.device("cpu")))
    first = root / "val" / gt.imgs[model.img_ids[0]]["file_name"]
    results, failures = infer_files(_cfg(root, ann, tmp_path / "cfg"), None, [str(first)], str(tmp_path / "out"))
    assert not failures and results
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written == results
    anns = gt.loadAnns(gt.getAnnIds(imgIds=model.img_ids[0]))
    for r, a in zip(written, anns):
        assert r["file_name"] == first.name
        np.testing.assert_array_equal(mask_utils.decode(r["segmentation"]), gt.annToMask(a))
    drawn = cv2.imread(str(tmp_path / "out" / f"{first.stem}.png"))[:, :, ::-1]
    image = cv2.imread(str(first))[:, :, ::-1]
    inside = gt.annToMask(anns[0]).astype(bool)
    assert (drawn[inside] != image[inside]).any(axis=-1).mean() > 0.5  # the mask is tinted


@pytest.mark.slow
def test_mask_rcnn_infer_and_eval_end_to_end(shapes, tmp_path, capsys):
    root, ann = shapes
    cfg = {"_base_": str(REPO / "configs/_base_/models/faster_rcnn_fpn.yaml"),
           "model": {"name": "mask_rcnn", "backbone": {"depth": 18, "norm": "BN", "freeze_at": 0, "weights": None},
                     "fpn": {"out_channels": 32}, "roi_heads": {"fc_dim": 64}, "num_classes": 3},
           "input": {"min_size_test": 96, "max_size_test": 128}, "test": {"score_thresh": 0.0}, "device": "cpu",
           "data": {"val": {"ann_file": str(ann), "img_dir": str(root / "val")},
                    "categories": [{"id": c["id"], "name": c["name"]} for c in CATEGORIES]},
           "output_dir": str(tmp_path / "out")}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    torch.manual_seed(0)
    from backbones.weights import save_weights
    model = detection.build.build_detector(str(tmp_path / "cfg.yaml"))
    with torch.no_grad():  # spread the random classifier's scores so detections survive
        model.roi_heads.predictor.cls_score.weight.mul_(50)
    save_weights(str(tmp_path / "w.pth"), model.state_dict())

    result = run_tool(capsys, "eval_det.py", tmp_path / "cfg.yaml", "--weights", tmp_path / "w.pth")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert list(metrics) == ["bbox", "segm"]
    gt = COCO(str(ann))
    dets = json.loads((tmp_path / "out" / "eval" / "results.json").read_text())
    assert dets and all(d["segmentation"]["size"] == [96, 128] for d in dets)
    ev = COCOeval(gt, gt.loadRes([{k: v for k, v in d.items() if k != "bbox"} for d in dets]), "segm")
    ev.evaluate(), ev.accumulate(), ev.summarize()
    assert metrics["segm"]["AP"] == pytest.approx(100 * ev.stats[0], abs=1e-9)  # the same pycocotools run

    image = sorted((root / "val").glob("*.png"))[0]
    result = run_tool(capsys, "infer.py", tmp_path / "cfg.yaml", "--weights", tmp_path / "w.pth", "--input", image,
                      "--output", tmp_path / "infer")
    assert result.returncode == 0, result.stderr
    results = json.loads((tmp_path / "infer" / "results.json").read_text())
    assert results and all(mask_utils.decode(r["segmentation"]).shape == (96, 128) for r in results)
    assert (tmp_path / "infer" / f"{image.stem}.png").is_file()
