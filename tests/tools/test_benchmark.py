"""tools/benchmark.py: both sides time the same work, and the table and JSON say what was measured."""
import json

import pytest
import torch
from torch.overrides import TorchFunctionMode

from detection.benchmark.tasks import MEMORY_FORMATS, setup_infer, setup_train
from detection.benchmark.harness import Report, Side, SideResult, compare, ratio_phrase
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
    # Ours folds FrozenBN into the convolutions and sums in its own order: float32 rounding through R50-FPN
    # moves boxes of up to 160 px by ~1e-4 px (measured up to 7e-4); rtol 1e-4 and 1e-2 px are far below a
    # misplaced box.
    torch.testing.assert_close(ours["boxes"], theirs["boxes"], rtol=1e-4, atol=1e-2)


def conv_formats(fn, memory_format: str):
    """For every conv2d one call of `fn` makes: whether its input, weight and output are all contiguous in
    `memory_format`."""
    fmt = MEMORY_FORMATS[memory_format]
    seen = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if getattr(func, "__name__", "") == "conv2d":
                seen.append(all(t.is_contiguous(memory_format=fmt) for t in (args[0], args[1], out)))
            return out

    with Record():
        fn()
    return seen


@pytest.mark.parametrize("task, memory_format", [("infer", "contiguous"), ("infer", "channels_last"),
                                                 ("train", "channels_last")])
def test_both_sides_run_every_convolution_in_the_chosen_memory_format(task, memory_format):
    """Like for like: the config says the other format (model.channels_last), and still every convolution
    of both sides (the padded batch into the stem included) runs in the one chosen."""
    other = ["model.channels_last=" + ("false" if memory_format == "channels_last" else "true")]
    cpu = torch.device("cpu")
    counts = []
    for impl in ("ours", "torchvision"):
        if task == "infer":
            fn = setup_infer(impl, CONFIG, SMALL + other, None, (128, 160), 0, cpu, memory_format)
        else:
            fn = setup_train(impl, CONFIG, SMALL + other + ["input.min_size_train=[128]", "input.max_size_train=160"],
                             None, (128, 160), 1, 0, cpu, memory_format)
        seen = conv_formats(fn, memory_format)
        assert len(seen) > 50 and all(seen), (impl, seen.count(False), len(seen))
        counts.append(len(seen))
    assert counts[0] == counts[1]  # the same convolutions on both sides


def test_ratio_phrase_says_slower_below_one():
    assert ratio_phrase("ours", "torchvision", 1.21) == "ours is 1.21x faster than torchvision"
    assert ratio_phrase("ours", "torchvision", 0.8) == "ours is 0.80x (slower): torchvision is 1.25x faster"
    assert ratio_phrase("ours", "torchvision", 0.996) == "ours is 1.00x: as fast as torchvision, to two digits"
    slow = Report("t", {}, [SideResult("ours", [2.0]), SideResult("peer", [1.6])],
                  extra={"speedup_bound_at_ours_floor": 0.9})
    table = slow.table()
    assert "ours is 0.80x (slower): peer is 1.25x faster (ratio of medians)" in table
    assert "faster than" not in table
    assert "(at its dense floor alone, ours is 0.90x (slower): peer is 1.11x faster)" in table


def test_report_names_the_cpu_and_its_instruction_set():
    report = Report("t", {}, [SideResult("ours", [1.0]), SideResult("peer", [2.0])])
    info = report.as_dict()["machine"]
    assert info["cpu_model"] and info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert f"machine: {info['cpu_model']} ({info['cpu_capability']})" in report.table()


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


@pytest.mark.slow
def test_benchmark_tool_writes_its_table(tmp_path, capsys):
    out = tmp_path / "bench.json"
    # Without --memory-format, the config's model.channels_last decides, for both sides, and is recorded.
    result = run_tool(capsys, "benchmark.py", CONFIG, "model.channels_last=true", "--task", "infer", "--vs",
                      "torchvision", "--iters", "1", "--warmup", "0", "--image-size", "128x160", "--no-memory",
                      "--output", out)
    assert result.returncode == 0, result.stderr
    table = json.loads(out.read_text())
    assert ratio_phrase("ours", "torchvision", table["speedup"]) + " (ratio of medians)" in result.stdout
    assert "memory_format=channels_last" in result.stdout and table["settings"]["memory_format"] == "channels_last"
    assert table["machine"]["cpu_capability"] and "machine: " in result.stdout
    assert [s["name"] for s in table["sides"]] == ["ours", "torchvision"]
    assert table["settings"]["image_size"] == "128x160" and table["speedup"] > 0
    assert all(s["gflop"] > 1 for s in table["sides"])  # R50-FPN at 128x160: a few GFLOPs each
    assert all(s["images_per_s"] == pytest.approx(1 / s["median_s"]) for s in table["sides"])  # float64: an ulp


def test_eval_benchmark_checks_identical_numbers_first(tmp_path, capsys):
    out = tmp_path / "eval.json"
    result = run_tool(capsys, "benchmark.py", CONFIG, "--task", "eval", "--vs", "pycocotools", "--num-images", "30",
                      "--iters", "1", "--warmup", "0", "--no-memory", "--output", out)
    assert result.returncode == 0, result.stderr
    table = json.loads(out.read_text())
    assert [s["name"] for s in table["sides"]] == ["ours", "pycocotools"]
    from detection.benchmark.tasks import setup_eval
    ours, theirs = setup_eval("ours", 30, 0)(), setup_eval("pycocotools", 30, 0)()
    # The same 12 numbers (faster-coco-eval sums in another order: equal to 1e-12), and a non-trivial AP.
    assert list(ours) == pytest.approx(theirs, abs=1e-12) and 0.2 < theirs[0] < 1.0
    wrong = run_tool(capsys, "benchmark.py", CONFIG, "--task", "eval", "--vs", "torchvision", "--output", out)
    assert wrong.returncode == 2 and "--task eval compares with pycocotools, not torchvision" in wrong.stderr
    wrong = run_tool(capsys, "benchmark.py", CONFIG, "--task", "eval", "--memory-format", "channels_last",
                     "--output", out)
    assert wrong.returncode == 2 and "takes no --memory-format" in wrong.stderr


def test_data_benchmark_times_loader_step_and_training_together(tmp_path, capsys):
    from detection.data.synthetic import make_synthetic

    data = tmp_path / "shapes"
    make_synthetic(str(data), num_train=12, num_val=2, seed=0, crops_per_class=0)
    out = tmp_path / "data.json"
    result = run_tool(capsys, "benchmark.py", REPO / "configs" / "demo" / "frcnn_shapes.yaml", "--task", "data",
                      f"data.train.ann_file={data}/annotations/instances_train.json", f"data.train.img_dir={data}/train",
                      "data.num_workers=1", "solver.ims_per_batch=2", "--iters", "2", "--warmup", "1",
                      "--memory-format", "channels_last", "--output", out)
    assert result.returncode == 0, result.stderr
    assert "loader is" in result.stdout and "waiting_for_data_fraction" in result.stdout
    table = json.loads(out.read_text())
    assert [s["name"] for s in table["sides"]] == ["loader", "train step"]
    assert [s["iters"] for s in table["sides"]] == [2, 2] and table["speedup"] > 0
    assert table["settings"]["num_workers"] == 1 and 0 <= table["waiting_for_data_fraction"] <= 1
    assert table["settings"]["memory_format"] == "channels_last"  # --memory-format reaches the trainer's model
    assert table["training_s_per_step"] >= table["waiting_for_data_s_per_step"]
    wrong = run_tool(capsys, "benchmark.py", REPO / "configs" / "demo" / "frcnn_shapes.yaml", "--task", "data",
                     "--vs", "torchvision", "--output", out)
    assert wrong.returncode != 0 and "takes no --vs" in wrong.stderr


def test_dense_floor_replays_the_convolutions_and_matrix_products_of_a_call():
    from detection.benchmark.harness import dense_calls, dense_floor

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
