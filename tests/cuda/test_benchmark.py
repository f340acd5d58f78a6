"""tools/benchmark.py on the GPU (device=cuda) against torchvision: inference and training run, and the
JSON (as tests/tools/test_benchmark.py reads it on the CPU) holds each side's images per second and peak
memory (the CUDA allocator's high-water mark) and the ratio of the two sides' median times."""
import json

import pytest

from detection.benchmark.harness import ratio_phrase
from tests.conftest import REPO, run_tool

pytestmark = pytest.mark.slow

CONFIG = REPO / "configs" / "torchvision" / "frcnn_r50_fpn.yaml"


@pytest.mark.parametrize("task", ["infer", "train"])
def test_benchmark_tool_on_cuda_against_torchvision(task, tmp_path, capsys, cuda):
    out = tmp_path / "bench.json"
    result = run_tool(capsys, "benchmark.py", CONFIG, f"device={cuda}", "--task", task, "--vs", "torchvision",
                      "--iters", "3", "--warmup", "1", "--image-size", "256x320", "--batch", "2", "--output", out)
    assert result.returncode == 0, result.stderr
    table = json.loads(out.read_text())
    assert table["task"] == task and table["settings"]["device"] == str(cuda)
    assert table["settings"]["image_size"] == "256x320"
    sides = table["sides"]
    assert [s["name"] for s in sides] == ["ours", "torchvision"]
    images = 1 if task == "infer" else 2  # per call: one image, or a training batch of --batch
    for s in sides:
        assert s["iters"] == 3 and s["median_s"] > 0, s
        assert s["images_per_s"] == pytest.approx(images / s["median_s"]), s
        assert s["peak_memory_mb"] is not None and s["peak_memory_mb"] > 0, s
    assert table["speedup"] == pytest.approx(sides[1]["median_s"] / sides[0]["median_s"])
    assert ratio_phrase("ours", "torchvision", table["speedup"]) + " (ratio of medians)" in result.stdout
    gpu = table["machine"].get("gpu")  # the machine line names the GPU
    assert gpu and gpu in result.stdout, table["machine"]
