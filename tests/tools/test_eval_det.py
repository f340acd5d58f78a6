import json

import pytest

from tests.conftest import run_tool

METRICS = ["AP", "AP50", "AP75", "APs", "APm", "APl"]


def eval_det(capsys, *args):
    return run_tool(capsys, "eval_det.py", *args)


def write_config(tmp_path, ann_file):
    # A config outside the repo cannot `_base_` the repo's configs by a relative path; it needs only these.
    path = tmp_path / "eval.yaml"
    path.write_text(f"data:\n  val:\n    ann_file: {ann_file}\noutput_dir: {tmp_path / 'out'}\n")
    return path


def test_eval_det_results_file(shared_data, tmp_path, capsys):
    ann_file = shared_data / "tiny_coco" / "annotations" / "instances_val2017.json"
    gt = json.loads(ann_file.read_text())
    # Perfect boxes for the first 10 images only: evaluated over all 50, so AP is well below 100.
    first = {img["id"] for img in gt["images"][:10]}
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0, "bbox": a["bbox"]}
               for a in gt["annotations"] if not a["iscrowd"] and a["image_id"] in first]
    (tmp_path / "r.json").write_text(json.dumps(results))
    # The override comes after --results: the form the usage line shows.
    result = eval_det(capsys, write_config(tmp_path, ann_file), "--results", tmp_path / "r.json",
                      "test.evaluator_backend=faster_coco_eval")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == ["bbox"] and list(metrics["bbox"]) == METRICS
    assert 5 < metrics["bbox"]["AP"] < 50  # percent, not a fraction
    assert "evaluator_backend: faster_coco_eval" in (out / "config.yaml").read_text()
    assert json.loads((out / "eval" / "results.json").read_text()) == results
    assert (out / "eval" / "per_category_bbox.txt").is_file() and (out / "eval" / "summary_bbox.txt").is_file()
    lines = result.stdout.splitlines()
    assert sum(l.startswith(" Average Precision  (AP) @[ IoU=") for l in lines) == 6
    assert any(l.split()[:1] == ["person"] for l in lines)  # the per-category table
    assert f"bbox AP {metrics['bbox']['AP']:.3f}" in result.stdout


def test_eval_det_missing_ann_file(tmp_path, capsys):
    (tmp_path / "r.json").write_text("[]")
    missing = tmp_path / "no" / "instances_val2017.json"
    result = eval_det(capsys, write_config(tmp_path, missing), "--results", tmp_path / "r.json")
    assert result.returncode == 2
    assert str(missing) in result.stderr and "data.val.ann_file" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args", [["--results", "r.json", "--weights", "w.pth"], []])
def test_eval_det_needs_results_or_weights(tmp_path, args, capsys):
    result = eval_det(capsys, write_config(tmp_path, "x.json"), *args)
    assert result.returncode == 2 and "usage:" in result.stderr and "--results" in result.stderr  # argparse's exit
