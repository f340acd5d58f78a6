"""Broken results files given to tools/eval_det.py --results: exit status 2 and one `error:` line naming
the entry and the field, never a traceback from inside pycocotools."""
import json

import pytest
from pycocotools import mask as mask_utils
import numpy as np

from tests.conftest import run_tool

GT = {
    "images": [{"id": 1, "width": 40, "height": 30, "file_name": "a.png"},
               {"id": 2, "width": 40, "height": 30, "file_name": "b.png"}],
    "categories": [{"id": 1, "name": "circle"}, {"id": 3, "name": "square"}],
    "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 8], "area": 80, "iscrowd": 0},
                    {"id": 2, "image_id": 2, "category_id": 3, "bbox": [5, 5, 20, 10], "area": 200, "iscrowd": 0}],
}
GOOD = {"image_id": 1, "category_id": 1, "score": 0.9, "bbox": [2, 3, 10, 8]}


def rle(height, width):
    encoded = mask_utils.encode(np.asfortranarray(np.ones((height, width), dtype=np.uint8)))
    return {"size": encoded["size"], "counts": encoded["counts"].decode("ascii")}


def eval_det(capsys, tmp_path, results_text):
    ann = tmp_path / "gt.json"
    ann.write_text(json.dumps(GT))
    config = tmp_path / "eval.yaml"
    config.write_text(f"data:\n  val:\n    ann_file: {ann}\noutput_dir: {tmp_path / 'out'}\n")
    results = tmp_path / "results.json"
    results.write_text(results_text)
    return run_tool(capsys, "eval_det.py", config, "--results", results), results


def test_good_results_file_is_evaluated(tmp_path, capsys):
    result, _ = eval_det(capsys, tmp_path, json.dumps([GOOD, dict(GOOD, image_id=2, category_id=3,
                                                                   bbox=[5, 5, 20, 10])]))
    assert result.returncode == 0, result.stderr
    # every detection is exact: AP 1.0 up to pycocotools' tp / (tp + fp + eps), an ulp, x 100
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["bbox"]["AP"] == pytest.approx(100)


@pytest.mark.parametrize("entry, message", [
    (dict(GOOD, image_id=7), "entry 1: image_id 7 is not in the ground truth ({gt})"),
    (dict(GOOD, category_id=9), "category_id 9 (first at entry 1) not in the ground truth ({gt}), whose 2 "
                                "category ids are 1, 3"),
    ({k: v for k, v in GOOD.items() if k != "score"}, "entry 1: missing 'score'"),
    (dict(GOOD, score=float("nan")), "entry 1: score must be a finite number, got nan"),
    (dict(GOOD, score="high"), "entry 1: score must be a finite number, got 'high'"),
    (dict(GOOD, bbox=[2, 3, -10, 8]), "entry 1: bbox [2, 3, -10, 8] has a negative width or height"),
    (dict(GOOD, bbox=[2, 3, 10]), "entry 1: bbox must be [x, y, width, height] (4 numbers), got [2, 3, 10]"),
    (dict(GOOD, bbox=[2, 3, 10, None]), "entry 1: bbox must be 4 finite numbers, got [2, 3, 10, None]"),
    (dict(GOOD, image_id="1"), "entry 1: image_id must be an integer, got '1'"),
    ({k: v for k, v in GOOD.items() if k != "bbox"}, "entry 1: missing 'bbox' (and no 'segmentation')"),
    ("not a dict", "entry 1: a detection is a dict, got str"),
])
def test_broken_entry(tmp_path, capsys, entry, message):
    result, results = eval_det(capsys, tmp_path, json.dumps([GOOD, entry]))
    assert result.returncode == 2
    # Entry errors read "FILE entry I: ..."; unknown categories are gathered over the file: "FILE: ...".
    separator = ": " if message.startswith("category_id") else " "
    expected = f"error: {results}{separator}" + message.format(gt=tmp_path / "gt.json")
    assert expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_segmentation_of_the_wrong_size(tmp_path, capsys):
    entries = [dict(GOOD, segmentation=rle(30, 40)), dict(GOOD, segmentation=rle(40, 30))]
    result, results = eval_det(capsys, tmp_path, json.dumps(entries))
    assert result.returncode == 2
    assert (f"error: {results} entry 1: segmentation size [40, 30] is not the size [height, width] = [30, 40] "
            "of image 1; masks must be pasted at the original resolution") in result.stderr
    assert "Traceback" not in result.stderr


def test_segmentation_that_is_not_rle(tmp_path, capsys):
    result, results = eval_det(capsys, tmp_path, json.dumps([dict(GOOD, segmentation=[[1, 2, 3, 4, 5, 6]])]))
    assert result.returncode == 2
    assert f"error: {results} entry 0: segmentation must be compressed RLE" in result.stderr


def test_empty_list(tmp_path, capsys):
    result, results = eval_det(capsys, tmp_path, "[]")
    assert result.returncode == 2
    assert f"error: {results}: the results list is empty (no detections)" in result.stderr
    assert not (tmp_path / "out" / "metrics.json").exists()


@pytest.mark.parametrize("text, found", [('{"image_id": 1}', "dict"), ("42", "int"), ('"x"', "str")])
def test_not_a_list(tmp_path, capsys, text, found):
    result, results = eval_det(capsys, tmp_path, text)
    assert result.returncode == 2
    assert f"error: {results}: COCO results must be a list of detections " in result.stderr
    assert f"got a {found}" in result.stderr


@pytest.mark.parametrize("text", ["[{\"image_id\": 1,", "", "\x00\x01"])
def test_not_json(tmp_path, capsys, text):
    result, results = eval_det(capsys, tmp_path, text)
    assert result.returncode == 2
    assert result.stderr.count("error: ") == 1 and str(results) in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("change, message", [
    (lambda gt: gt["images"].append(dict(gt["images"][0])), "duplicate image id 1"),
    (lambda gt: gt["categories"].append(dict(gt["categories"][0])), "duplicate category id 1"),
    (lambda gt: gt["annotations"][0].update(image_id=[1]), "annotation"),
    (lambda gt: gt["images"][0].update(height=-30), "image 1 has height -30"),
])
def test_broken_ground_truth_is_named_before_evaluation(tmp_path, change, message):
    """The evaluation's ground truth gets the training loader's structure checks (keys, types, unique ids)."""
    from detection.evaluation.coco_eval import load_coco_gt
    from engine.errors import DatasetError

    gt = json.loads(json.dumps(GT))
    change(gt)
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    with pytest.raises(DatasetError, match=message) as info:
        load_coco_gt(path)
    assert str(path) in str(info.value)
