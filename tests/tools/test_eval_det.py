import importlib.util
import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

METRICS = ["AP", "AP50", "AP75", "APs", "APm", "APl"]


def eval_det(*args):
    return subprocess.run([sys.executable, str(REPO / "tools" / "eval_det.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)


def write_config(tmp_path, ann_file):
    # A config outside the repo cannot `_base_` the repo's configs by a relative path; it needs only these.
    path = tmp_path / "eval.yaml"
    path.write_text(f"data:\n  val:\n    ann_file: {ann_file}\noutput_dir: {tmp_path / 'out'}\n")
    return path


def test_eval_det_results_file(shared_data, tmp_path):
    ann_file = shared_data / "tiny_coco" / "annotations" / "instances_val2017.json"
    gt = json.loads(ann_file.read_text())
    # Perfect boxes for the first 10 images only: evaluated over all 50, so AP is well below 100.
    first = {img["id"] for img in gt["images"][:10]}
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0, "bbox": a["bbox"]}
               for a in gt["annotations"] if not a["iscrowd"] and a["image_id"] in first]
    (tmp_path / "r.json").write_text(json.dumps(results))
    # The override comes after --results: the form the usage line shows.
    result = eval_det(write_config(tmp_path, ann_file), "--results", tmp_path / "r.json",
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


def test_eval_det_missing_ann_file(tmp_path):
    (tmp_path / "r.json").write_text("[]")
    missing = tmp_path / "no" / "instances_val2017.json"
    result = eval_det(write_config(tmp_path, missing), "--results", tmp_path / "r.json")
    assert result.returncode == 2
    assert str(missing) in result.stderr and "data.val.ann_file" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args", [["--results", "r.json", "--weights", "w.pth"], []])
def test_eval_det_needs_results_or_weights(tmp_path, args, capsys):
    # In-process: argparse's own exit, and a subprocess would spend seconds importing torch.
    spec = importlib.util.spec_from_file_location("eval_det", REPO / "tools" / "eval_det.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    with pytest.raises(SystemExit) as e:
        tool.main([str(write_config(tmp_path, "x.json")), *args])
    assert e.value.code == 2 and "--results" in capsys.readouterr().err
