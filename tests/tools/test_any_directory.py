"""Every tool works from any working directory: run from an empty folder, with the repository's configs
given by absolute path, a tool finds its own files (configs a tool or converter reads, the package itself)
relative to the repository, never to the folder it was started in."""
import json
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, run_tool, shapes_splits

TOOLS = sorted(p.name for p in (REPO / "tools").glob("*.py"))
DEMO = str(REPO / "configs/demo/mrcnn_shapes.yaml")


@pytest.mark.parametrize("name", TOOLS)
def test_help_from_another_directory(tmp_path, capsys, name):
    result = run_tool(capsys, name, "--help", cwd=tmp_path)
    assert result.returncode == 0 and "usage:" in result.stdout, result.stderr


@pytest.mark.parametrize("name", TOOLS)
def test_tools_stay_thin(name):
    """Argument parsing plus library calls: anything longer belongs in a package, where it can be imported."""
    assert len((REPO / "tools" / name).read_text().splitlines()) <= 120


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """Synthetic shapes and the demo Mask R-CNN's initial weights, as files outside the repository."""
    from detection.build import build_detector

    root = shapes_splits(tmp_path_factory.mktemp("shapes"), 2, 2, (64, 64))
    data = [f"data.{s}.ann_file={root}/annotations/instances_{s}.json" for s in ("train", "val")] + \
           [f"data.{s}.img_dir={root}/{s}" for s in ("train", "val")] + ["data.num_workers=0"]
    torch.manual_seed(0)
    weights = root / "mrcnn.pth"
    torch.save(build_detector(DEMO, data).state_dict(), weights)
    return root, data, weights


def test_a_detector_tool_chain_from_another_directory(tmp_path, capsys, demo_run):
    root, data, weights = demo_run
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    out = tmp_path / "out"
    r = run_tool(capsys, "train_det.py", DEMO, *data, "solver.max_iter=1", "solver.ims_per_batch=2",
                 "solver.warmup_iters=0", f"output_dir={out}/train", "model.backbone.weights=", cwd=cwd)
    assert r.returncode == 0, r.stderr
    assert (out / "train" / "model_final.pth").is_file()
    r = run_tool(capsys, "infer.py", DEMO, "--weights", weights, "--input", root / "val", "--output", out / "infer",
                 "--no-vis", cwd=cwd)
    assert r.returncode == 0, r.stderr
    assert len({d["file_name"] for d in json.loads((out / "infer" / "results.json").read_text())}) <= 2
    r = run_tool(capsys, "eval_det.py", DEMO, *data, "--weights", weights, f"output_dir={out}/eval", cwd=cwd)
    assert r.returncode == 0, r.stderr
    assert (out / "eval" / "metrics.json").is_file()
    r = run_tool(capsys, "model_stats.py", str(REPO / "configs/demo/cls_shapes.yaml"), cwd=cwd)
    assert r.returncode == 0 and "params" in r.stdout.lower(), r.stderr
    assert list(cwd.iterdir()) == []  # nothing written where the tools were started
