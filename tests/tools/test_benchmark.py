"""tools/benchmark.py: both sides time the same work, and the table and JSON say what was measured."""
import json

import pytest
import torch

from detection.benchmark import setup_infer
from engine.benchmark import Report, Side, SideResult, compare
from tests.conftest import REPO, run_tool

CONFIG = REPO / "configs" / "torchvision" / "frcnn_r50_fpn.yaml"
SMALL = ["input.min_size_test=128", "input.max_size_test=160"]


def test_both_sides_compute_the_same_detections():
    """The peer holds our weights: with the same image both give the same detections, so the timing
    compares implementations of one computation."""
    cpu = torch.device("cpu")
    ours = setup_infer("ours", CONFIG, SMALL, None, (128, 160), 0, cpu)()[0]
    theirs = setup_infer("torchvision", CONFIG, SMALL, None, (128, 160), 0, cpu)()[0]
    assert len(ours["boxes"]) == len(theirs["boxes"]) > 0  # test.score_thresh=0 without weights: a full load
    torch.testing.assert_close(ours["boxes"], theirs["boxes"], rtol=1e-4, atol=1e-2)


def test_compare_alternates_and_reports():
    calls = []
    sides = [Side("a", lambda: lambda: calls.append("a")), Side("b", lambda: lambda: calls.append("b"), flops=2e9)]
    report = compare("demo", sides, iters=3, warmup=1, device=torch.device("cpu"), measure_memory=False)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then AB, BA, AB
    assert [len(s.times) for s in report.sides] == [3, 3]
    assert report.as_dict()["sides"][1]["gflop"] == 2.0
    fast = Report("t", {}, [SideResult("ours", [1.0, 1.0, 1.2]), SideResult("peer", [2.0, 3.0, 2.5])])
    assert fast.ratio() == 2.5
    assert "ours is 2.50x faster than peer" in fast.table()


def test_benchmark_tool_writes_its_table(tmp_path, capsys):
    out = tmp_path / "bench.json"
    result = run_tool(capsys, "benchmark.py", CONFIG, "--task", "infer", "--vs", "torchvision", "--iters", "1",
                      "--warmup", "0", "--image-size", "128x160", "--no-memory", "--output", out)
    assert result.returncode == 0, result.stderr
    assert "ours is" in result.stdout and "faster than torchvision" in result.stdout
    table = json.loads(out.read_text())
    assert [s["name"] for s in table["sides"]] == ["ours", "torchvision"]
    assert table["settings"]["image_size"] == "128x160" and table["speedup"] > 0
    assert all(s["gflop"] > 1 for s in table["sides"])  # R50-FPN at 128x160: a few GFLOPs each
    assert all(s["images_per_s"] == pytest.approx(1 / s["median_s"]) for s in table["sides"])


def test_eval_benchmark_checks_identical_numbers_first(tmp_path, capsys):
    out = tmp_path / "eval.json"
    result = run_tool(capsys, "benchmark.py", CONFIG, "--task", "eval", "--vs", "pycocotools", "--num-images", "30",
                      "--iters", "1", "--warmup", "0", "--no-memory", "--output", out)
    assert result.returncode == 0, result.stderr
    table = json.loads(out.read_text())
    assert [s["name"] for s in table["sides"]] == ["ours", "pycocotools"]
    from detection.benchmark import setup_eval
    ours, theirs = setup_eval("ours", 30, 0)(), setup_eval("pycocotools", 30, 0)()
    # The same 12 numbers (faster-coco-eval sums in another order: equal to 1e-12), and a non-trivial AP.
    assert list(ours) == pytest.approx(theirs, abs=1e-12) and 0.2 < theirs[0] < 1.0
    wrong = run_tool(capsys, "benchmark.py", CONFIG, "--task", "eval", "--vs", "torchvision", "--output", out)
    assert wrong.returncode == 2 and "--task eval compares with pycocotools, not torchvision" in wrong.stderr


def test_data_benchmark_times_loader_step_and_training_together(tmp_path, capsys):
    from detection.data.synthetic import make_synthetic

    data = tmp_path / "shapes"
    make_synthetic(str(data), num_train=12, num_val=2, seed=0, crops_per_class=0)
    out = tmp_path / "data.json"
    result = run_tool(capsys, "benchmark.py", REPO / "configs" / "demo" / "frcnn_shapes.yaml", "--task", "data",
                      f"data.train.ann_file={data}/annotations/instances_train.json", f"data.train.img_dir={data}/train",
                      "data.num_workers=1", "solver.ims_per_batch=2", "--iters", "2", "--warmup", "1",
                      "--output", out)
    assert result.returncode == 0, result.stderr
    assert "loader is" in result.stdout and "waiting_for_data_fraction" in result.stdout
    table = json.loads(out.read_text())
    assert [s["name"] for s in table["sides"]] == ["loader", "train step"]
    assert [s["iters"] for s in table["sides"]] == [2, 2] and table["speedup"] > 0
    assert table["settings"]["num_workers"] == 1 and 0 <= table["waiting_for_data_fraction"] <= 1
    assert table["training_s_per_step"] >= table["waiting_for_data_s_per_step"]
    wrong = run_tool(capsys, "benchmark.py", REPO / "configs" / "demo" / "frcnn_shapes.yaml", "--task", "data",
                     "--vs", "torchvision", "--output", out)
    assert wrong.returncode != 0 and "takes no --vs" in wrong.stderr


def test_dense_floor_replays_the_convolutions_and_matrix_products_of_a_call():
    from engine.benchmark import dense_calls, dense_floor

    conv, fc = torch.nn.Conv2d(3, 8, 3), torch.nn.Linear(8, 4)
    x = torch.rand(2, 3, 16, 16)

    def step():
        y = torch.relu(conv(x)).mean((2, 3))  # relu and mean are not dense: not replayed
        fc(y).sum().backward()

    calls = dense_calls(step)
    assert [c[0].__name__ for c in calls] == ["conv2d", "linear"]
    assert calls[0][1][0][1] == (2, 3, 16, 16) and calls[0][1][1][-1] is True  # shapes and requires_grad kept
    assert 0 < dense_floor(step, torch.device("cpu"), iters=1) < 5
    assert conv.weight.grad is not None  # the recorded call itself ran
    assert [c[3] for c in calls] == [True, True]  # both recorded by autograd: replayed with backward
    with torch.no_grad():  # inference: parameters want gradients, the calls do not record any
        assert [c[3] for c in dense_calls(lambda: fc(torch.relu(conv(x)).mean((2, 3))))] == [False, False]
