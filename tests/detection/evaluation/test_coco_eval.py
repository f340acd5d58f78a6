"""COCO evaluation against a direct pycocotools run on real ground truth (tiny_coco val2017: 50 images,
382 annotations of which 5 are crowd RLE, 48 of the 80 categories present)."""
import contextlib
import copy
import io
import json
import logging
import math
import random
import sys

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detection.evaluation import (
    check_categories,
    evaluate_coco,
    format_per_category,
    iou_types_of,
    load_coco_gt,
    load_results,
    write_eval_outputs,
)
from engine import ConfigError, DatasetError, load_config
from tests.conftest import REPO

BACKENDS = ["pycocotools", "faster_coco_eval"]
# Both backends compute the same float64 precisions and recalls; faster-coco-eval (C++) accumulates and
# averages them in its own order, so a mean over 10 IoUs x 101 recall points x the classes agrees to a few
# float64 ulps (measured 6e-17). 1e-9, of a fraction or of a percent, is far below the 0.001 the summary
# prints, and far above any order of float64 sums.
EVAL_ATOL = 1e-9


@pytest.fixture
def gt_path(shared_data):
    return shared_data / "tiny_coco" / "annotations" / "instances_val2017.json"


@pytest.fixture
def gt(gt_path):
    return load_coco_gt(gt_path)


def perfect_boxes(gt):
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0, "bbox": list(a["bbox"])}
            for a in gt.dataset["annotations"] if not a["iscrowd"]]


def noisy_boxes(gt, seed=0):
    """0-3 jittered copies of each box (some with a wrong class), plus boxes anywhere, random scores."""
    rng = random.Random(seed)
    cat_ids = sorted(gt.cats)
    dets = []
    for a in gt.dataset["annotations"]:
        x, y, w, h = a["bbox"]
        for _ in range(rng.randint(0, 3)):
            cat = a["category_id"] if rng.random() < 0.8 else rng.choice(cat_ids)
            box = [x + rng.gauss(0, 0.15) * w, y + rng.gauss(0, 0.15) * h,
                   w * math.exp(rng.gauss(0, 0.2)), h * math.exp(rng.gauss(0, 0.2))]
            dets.append({"image_id": a["image_id"], "category_id": cat, "score": rng.random(), "bbox": box})
    for img in gt.dataset["images"]:
        for _ in range(rng.randint(0, 5)):
            w, h = rng.uniform(5, 200), rng.uniform(5, 200)
            box = [rng.uniform(0, img["width"] - w), rng.uniform(0, img["height"] - h), w, h]
            dets.append({"image_id": img["id"], "category_id": rng.choice(cat_ids), "score": rng.random(), "bbox": box})
    return dets


def noisy_masks(gt, seed=0):
    """Ground-truth polygons shifted by up to 20% of their box, random scores, some with a wrong class.
    Their boxes are the shifted ground-truth boxes, whose area is well above the mask's."""
    rng = random.Random(seed)
    cat_ids = sorted(gt.cats)
    dets = []
    for a in gt.dataset["annotations"]:
        if a["iscrowd"]:
            continue
        x, y, w, h = a["bbox"]
        img = gt.imgs[a["image_id"]]
        for _ in range(rng.randint(0, 2)):
            dx, dy = rng.uniform(-0.2, 0.2) * w, rng.uniform(-0.2, 0.2) * h
            polygons = [[v + (dx if i % 2 == 0 else dy) for i, v in enumerate(p)] for p in a["segmentation"]]
            rle = mask_utils.merge(mask_utils.frPyObjects(polygons, img["height"], img["width"]))
            cat = a["category_id"] if rng.random() < 0.8 else rng.choice(cat_ids)
            dets.append({"image_id": a["image_id"], "category_id": cat, "score": rng.random(),
                         "bbox": [x + dx, y + dy, w, h],
                         "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})
    return dets


def perfect_masks(gt):
    out = []
    for a in gt.dataset["annotations"]:
        if a["iscrowd"]:
            continue
        img = gt.imgs[a["image_id"]]
        rle = mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], img["height"], img["width"]))
        out.append({"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0, "bbox": list(a["bbox"]),
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})
    return out


def reference(gt_path, dets, iou_type="bbox", img_ids=None):
    """pycocotools as its README uses it: COCO(file), loadRes, COCOeval, summarize."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(gt_path))
        dets = copy.deepcopy(dets)
        if iou_type == "segm":
            for d in dets:
                d.pop("bbox", None)  # mask area, not box area, decides small/medium/large
        ev = COCOeval(coco, coco.loadRes(dets), iou_type)
        if img_ids is not None:
            ev.params.imgIds = img_ids
        ev.evaluate()
        ev.accumulate()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        ev.summarize()
    return ev, out.getvalue().rstrip("\n")


# -- numbers -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_perfect_boxes_give_ap_100(gt, backend):
    report = evaluate_coco(gt, perfect_boxes(gt), "bbox", backend)
    assert report.metrics == {k: 100.0 for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")}
    # AR@1 < 1: most images hold several objects of a class; AR@100 is 1.
    # pycocotools' value; faster-coco-eval's other averaging order moves it by float64 ulps (1e-16).
    assert report.stats[6] == pytest.approx(0.6941180135380044, abs=1e-12) and report.stats[8] == 1.0
    present = {a["category_id"] for a in gt.dataset["annotations"]}
    assert len(present) == 48
    for cat_id, cat in gt.cats.items():
        ap = report.per_category[cat["name"]]
        # precision is tp / (tp + fp + eps) in pycocotools, so a class can come out at 99.99999999999997
        assert ap == pytest.approx(100.0, abs=EVAL_ATOL) if cat_id in present else math.isnan(ap)


@pytest.mark.parametrize("backend", BACKENDS)
def test_noisy_boxes_equal_pycocotools(gt, gt_path, backend):
    dets = noisy_boxes(gt)
    ref, ref_summary = reference(gt_path, dets)
    report = evaluate_coco(gt, dets, "bbox", backend)
    assert 0.05 < ref.stats[0] < 0.5  # a score that can differ, not 0 or 1
    np.testing.assert_allclose(report.stats, ref.stats, rtol=0, atol=EVAL_ATOL)
    assert report.metrics["AP"] == pytest.approx(ref.stats[0] * 100, abs=EVAL_ATOL)
    assert report.metrics["APl"] == pytest.approx(ref.stats[5] * 100, abs=EVAL_ATOL)
    assert report.summary == ref_summary and len(report.summary.splitlines()) == 12


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_category_equals_precision_array(gt, gt_path, backend):
    dets = noisy_boxes(gt, seed=1)
    ref, _ = reference(gt_path, dets)
    report = evaluate_coco(gt, dets, "bbox", backend)
    precision = ref.eval["precision"]
    assert list(report.per_category) == [gt.cats[c]["name"] for c in sorted(gt.cats)]
    for k, cat_id in enumerate(ref.params.catIds):
        p = precision[:, :, k, 0, 2]  # area all, maxDets 100
        p = p[p > -1]
        ours = report.per_category[gt.cats[cat_id]["name"]]
        if p.size:
            assert ours == pytest.approx(p.mean() * 100, abs=EVAL_ATOL)
        else:
            assert math.isnan(ours)
    # the mean over categories with ground truth is AP itself (each has the same 10 x 101 entries), up to
    # the order of the float64 sums
    assert np.nanmean(list(report.per_category.values())) == pytest.approx(report.metrics["AP"], abs=EVAL_ATOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_dets_100_per_image_and_category(gt, backend):
    # A class with one instance in the whole set: 100 higher-scored false positives of that class in
    # the same image push the true detection to rank 101, past maxDets=100, so its AP is 0; with 99 it
    # is ranked 100th: recall 1 at precision 1/100, AP 1%.
    counts = {}
    for a in gt.dataset["annotations"]:
        counts.setdefault(a["category_id"], []).append(a)
    ann = next(anns[0] for _, anns in sorted(counts.items()) if len(anns) == 1 and not anns[0]["iscrowd"])
    name = gt.cats[ann["category_id"]]["name"]
    for n_fp, expected in ((100, 0.0), (99, 1.0)):
        dets = [d for d in perfect_boxes(gt) if d["category_id"] != ann["category_id"]]
        dets.append({"image_id": ann["image_id"], "category_id": ann["category_id"], "score": 0.5, "bbox": ann["bbox"]})
        dets += [{"image_id": ann["image_id"], "category_id": ann["category_id"], "score": 0.9,
                  "bbox": [-1000.0 - 10 * i, -1000.0, 5.0, 5.0]} for i in range(n_fp)]
        report = evaluate_coco(gt, dets, "bbox", backend)
        # precision 1/100 (or 0) at every recall point, in percent: float64, within an ulp or so of 1.0
        assert report.per_category[name] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_results_give_zero_with_warning(gt, backend, caplog):
    with caplog.at_level(logging.WARNING):
        report = evaluate_coco(gt, [], "bbox", backend)
    assert report.metrics == {k: 0.0 for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")}
    assert report.stats == [0.0] * 12
    assert "no detections" in caplog.text and "382 ground-truth annotations" in caplog.text
    assert len(report.summary.splitlines()) == 12 and all(l.endswith("= 0.000") for l in report.summary.splitlines())


@pytest.mark.parametrize("backend", BACKENDS)
def test_results_for_some_images(gt, gt_path, backend):
    some = sorted(gt.imgs)[:10]
    dets = [d for d in perfect_boxes(gt) if d["image_id"] in some]
    # Every ground-truth image counts: the other 40 images are images without detections.
    report = evaluate_coco(gt, dets, "bbox", backend)
    ref, _ = reference(gt_path, dets)
    assert 0 < report.metrics["AP"] < 100
    np.testing.assert_allclose(report.stats, ref.stats, rtol=0, atol=EVAL_ATOL)
    # Restricted to those images they are perfect.
    assert evaluate_coco(gt, dets, "bbox", backend, img_ids=some).metrics["AP"] == 100.0
    with pytest.raises(DatasetError, match=r"img_ids \[999\] are not in the ground truth"):
        evaluate_coco(gt, dets, "bbox", backend, img_ids=[some[0], 999])


@pytest.mark.parametrize("backend", BACKENDS)
def test_perfect_masks_give_ap_100(gt, gt_path, backend):
    before = copy.deepcopy(gt.dataset)
    dets = perfect_masks(gt)
    report = evaluate_coco(gt, dets, "segm", backend)
    assert report.metrics == {k: 100.0 for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")}
    np.testing.assert_allclose(report.stats, reference(gt_path, dets, "segm")[0].stats, rtol=0, atol=EVAL_ATOL)
    # COCOeval turns the polygons of the annotations it evaluates into RLE; ours must not touch the caller's.
    assert gt.dataset == before


@pytest.mark.parametrize("backend", BACKENDS)
def test_noisy_masks_equal_pycocotools(gt, gt_path, backend):
    dets = noisy_masks(gt)
    ref, ref_summary = reference(gt_path, dets, "segm")
    report = evaluate_coco(gt, dets, "segm", backend)
    assert 0.01 < ref.stats[0] < 0.5
    np.testing.assert_allclose(report.stats, ref.stats, rtol=0, atol=EVAL_ATOL)
    assert report.summary == ref_summary


def test_masks_with_bytes_counts_and_iou_types(gt):
    dets = perfect_masks(gt)[:3]
    for d in dets:
        d["segmentation"]["counts"] = d["segmentation"]["counts"].encode()  # as mask.encode returns it
    loaded = load_results(dets, gt)
    assert all(isinstance(d["segmentation"]["counts"], str) for d in loaded)
    assert isinstance(dets[0]["segmentation"]["counts"], bytes)  # the input is left alone
    assert iou_types_of(loaded) == ["bbox", "segm"]
    assert iou_types_of([{k: v for k, v in d.items() if k != "bbox"} for d in loaded]) == ["segm"]
    assert iou_types_of(perfect_boxes(gt)) == iou_types_of([]) == ["bbox"]
    with pytest.raises(DatasetError, match=r"results entry 0: no 'segmentation', which segm evaluation needs"):
        evaluate_coco(gt, perfect_boxes(gt), "segm")


# -- what is refused -----------------------------------------------------------------------------------


def test_image_id_not_in_gt(gt, gt_path):
    dets = perfect_boxes(gt)[:20]
    dets[17]["image_id"] = 999
    with pytest.raises(DatasetError) as e:
        evaluate_coco(gt, dets)
    assert str(e.value) == f"results entry 17: image_id 999 is not in the ground truth ({gt_path})"


def test_category_id_not_in_gt(gt):
    dets = perfect_boxes(gt)[:10]
    dets[3]["category_id"] = 91
    dets[6]["category_id"] = 12
    with pytest.raises(DatasetError) as e:
        load_results(dets, gt)
    assert "results: category_id 12, 91 (first at entry 3) not in the ground truth" in str(e.value)
    assert "80 category ids are 1-11, 13-25, 27-28, 31-44, 46-65, 67, 70, 72-82, 84-90" in str(e.value)
    dets[3]["category_id"] = 0  # contiguous indices instead of dataset ids
    dets[6]["category_id"] = 5
    with pytest.raises(DatasetError, match="look like contiguous class labels, not dataset category ids"):
        load_results(dets, gt)


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("score"), "entry 2: missing 'score'"),
    (lambda d: d.pop("image_id"), "entry 2: missing 'image_id'"),
    (lambda d: d.update(score=float("nan")), "entry 2: score must be a finite number, got nan"),
    (lambda d: d.update(score="0.9"), "entry 2: score must be a finite number, got '0.9'"),
    (lambda d: d.update(image_id=397133.0), "entry 2: image_id must be an integer, got 397133.0"),
    (lambda d: d.update(bbox=[1.0, 2.0, -3.0, 4.0]), "entry 2: bbox [1.0, 2.0, -3.0, 4.0] has a negative width"),
    (lambda d: d.update(bbox=[1.0, float("nan"), 3.0, 4.0]), "entry 2: bbox must be 4 finite numbers, got [1.0, nan"),
    (lambda d: d.update(bbox=[1.0, 2.0, 3.0]), "entry 2: bbox must be [x, y, width, height] (4 numbers)"),
    (lambda d: d.pop("bbox"), "entry 2: missing 'bbox' (and no 'segmentation')"),
    (lambda d: d.update(segmentation=[[0, 0, 1, 1, 2, 0]]), "entry 2: segmentation must be compressed RLE"),
    (lambda d: d.update(segmentation={"size": [10, 10], "counts": "a"}),
     "entry 2: segmentation size [10, 10] is not the size [height, width] = [427, 640] of image 397133"),
    (lambda d: d.update(segmentation={"size": [427, 640], "counts": "a"}),
     "entry 0: no 'segmentation', but entry 2 has"),
])
def test_malformed_entry(gt, change, message):
    dets = [d for d in perfect_boxes(gt) if d["image_id"] == 397133][:4]  # a 427 x 640 image
    change(dets[2])
    with pytest.raises(DatasetError) as e:
        load_results(dets, gt)
    assert "results " + message in str(e.value)


def test_results_file_errors(gt, tmp_path):
    bad = tmp_path / "results.json"
    bad.write_text('[{"image_id": 1,')
    with pytest.raises(DatasetError, match=rf"{bad} is not valid JSON \(line 1, column 17"):
        evaluate_coco(gt, bad)
    bad.write_text('{"annotations": []}')
    with pytest.raises(DatasetError, match=rf"{bad}: COCO results must be a list of detections"):
        evaluate_coco(gt, bad)
    with pytest.raises(DatasetError, match=rf"results file not found: {tmp_path / 'nope.json'}"):
        evaluate_coco(gt, tmp_path / "nope.json")
    dets = perfect_boxes(gt)
    dets[1]["score"] = None
    bad.write_text(json.dumps(dets))
    with pytest.raises(DatasetError, match=rf"{bad} entry 1: score must be a finite number, got None"):
        evaluate_coco(gt, bad)
    dets[1]["score"] = 1.0
    bad.write_text(json.dumps(dets))
    assert evaluate_coco(gt, bad).metrics["AP"] == 100.0


def test_ground_truth_errors(gt_path, tmp_path):
    data = json.loads(gt_path.read_text())
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(dict(data, annotations=[])))
    with pytest.raises(DatasetError, match=rf"{path} has no annotations"):
        load_coco_gt(path)
    anns = copy.deepcopy(data["annotations"])
    anns[4]["id"] = 0
    path.write_text(json.dumps(dict(data, annotations=anns)))
    with pytest.raises(DatasetError, match=r"annotation 4 \(id 0\): 'id' must be an integer >= 1"):
        load_coco_gt(path)
    anns = copy.deepcopy(data["annotations"])
    del anns[7]["area"]
    path.write_text(json.dumps(dict(data, annotations=anns)))
    with pytest.raises(DatasetError, match=r"annotation 7 \(id \d+\): 'area' is missing"):
        load_coco_gt(path)
    with pytest.raises(DatasetError, match=r"ground-truth annotation file \(set by data.val.ann_file\) not found"):
        load_coco_gt(tmp_path / "missing.json", setting="data.val.ann_file")


def test_backend_errors(gt, monkeypatch):
    with pytest.raises(ConfigError, match="test.evaluator_backend must be one of pycocotools, faster_coco_eval"):
        evaluate_coco(gt, [], backend="detectron2")
    with pytest.raises(ConfigError, match="iou_type must be one of bbox, segm"):
        evaluate_coco(gt, [], iou_type="keypoints")
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # import now raises ImportError
    with pytest.raises(ConfigError, match="pip install faster-coco-eval"):
        evaluate_coco(gt, perfect_boxes(gt), backend="faster_coco_eval")


# -- categories and outputs ----------------------------------------------------------------------------


def test_coco_config_categories_match_gt(gt):
    cfg = load_config(REPO / "configs" / "_base_" / "datasets" / "coco.yaml")
    assert cfg.model.num_classes == len(cfg.data.categories) == 80
    assert cfg.data.val.ann_file == "datasets/coco/annotations/instances_val2017.json"
    assert [c["id"] for c in cfg.data.categories] == sorted(gt.cats)  # COCO order is id order
    assert check_categories(cfg.data.categories, gt) == [{"id": c["id"], "name": c["name"]} for c in
                                                          gt.dataset["categories"]]


def test_check_categories_errors(gt):
    with pytest.raises(ConfigError, match=r"'data.categories\[1\]' must be a mapping \{id: int, name: str\}"):
        check_categories([{"id": 1, "name": "person"}, {"id": 2, "nmae": "bicycle"}])
    with pytest.raises(ConfigError, match=r"'data.categories\[1\]': id must be an integer, got '2'"):
        check_categories([{"id": 1, "name": "person"}, {"id": "2", "name": "bicycle"}])
    with pytest.raises(ConfigError, match=r"'data.categories\[1\]': id 1 or name 'person' appears twice"):
        check_categories([{"id": 1, "name": "person"}, {"id": 1, "name": "person"}])
    with pytest.raises(ConfigError, match=r"does not match the categories of .*: \[\(1, 'person'\)\]"):
        check_categories([{"id": c["id"], "name": c["name"]} for c in gt.dataset["categories"][1:]], gt)
    assert check_categories([], gt) == []  # not set: nothing to compare


def test_write_eval_outputs(gt, tmp_path):
    dets = load_results(perfect_boxes(gt)[:30], gt)
    report = evaluate_coco(gt, dets)
    files = write_eval_outputs(tmp_path, dets, {"bbox": report.metrics}, {"bbox": report.per_category},
                               {"bbox": report.summary})
    names = sorted(str(p.relative_to(tmp_path)) for p in files)
    assert names == ["eval/per_category_bbox.json", "eval/per_category_bbox.txt", "eval/results.json",
                     "eval/summary_bbox.txt", "metrics.json"]
    assert json.loads((tmp_path / "eval" / "results.json").read_text()) == dets
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    # JSON writes a float64 by repr, which reads back exactly
    assert set(metrics) == {"bbox"} and metrics["bbox"]["AP"] == pytest.approx(report.metrics["AP"])
    per_category = json.loads((tmp_path / "eval" / "per_category_bbox.json").read_text())
    assert per_category["fire hydrant"] is None  # NaN (no ground truth) is written as null
    table = (tmp_path / "eval" / "per_category_bbox.txt").read_text().splitlines()
    assert table[0].split() == ["category", "AP"] and len(table) == 81
    assert len({len(line) for line in table}) == 1  # aligned
    assert table == format_per_category(report.per_category).splitlines()
    assert (tmp_path / "eval" / "summary_bbox.txt").read_text() == report.summary + "\n"
