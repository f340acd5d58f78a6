import json
import os
import pickle
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from backbones.experiments.degradation import CIFAR_BATCHES, CIFAR_TEST_BATCH, augment, load_cifar, load_digits, run_degradation
from engine.errors import ConfigError
from tests.conftest import REPO


# These networks see 8-16 px images: a second thread gains nothing, and on a shared 2-core machine waiting
# for it made the tiny runs here up to 40x slower.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")


def run_tool(*args):
    return subprocess.run([sys.executable, str(REPO / "tools" / "degradation.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, timeout=300, env=ONE_THREAD)


def write_cifar_batch(path, n, seed, protocol=pickle.HIGHEST_PROTOCOL):
    """A batch in the official format: dict with bytes keys, N x 3072 uint8 rows (R, G, B planes)."""
    rng = np.random.default_rng(seed)
    batch = {b"batch_label": b"test batch", b"labels": [int(i % 10) for i in range(n)],
             b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=protocol)
    return batch


@pytest.mark.slow
def test_tiny_run_writes_figure_and_json(tmp_path):
    result = run_tool("--depths", "8", "14", "--epochs", "1", "--limit", "64", "--batch-size", "16",
                      "--device", "cpu", "--output", tmp_path)
    assert result.returncode == 0, result.stderr
    assert "plain-14" in result.stdout and "ResNet-8" in result.stdout
    assert (tmp_path / "degradation.png").stat().st_size > 10_000
    assert cv2.imread(str(tmp_path / "degradation.png")) is not None
    results = json.loads((tmp_path / "degradation.json").read_text())
    assert (results["train_images"], results["test_images"], results["epochs"]) == (64, 16, 1)
    nets = {(n["depth"], n["residual"]): n for n in results["networks"]}
    assert set(nets) == {(8, False), (14, False), (8, True), (14, True)}
    for net in nets.values():
        assert len(net["train_error"]) == len(net["test_error"]) == 1
        assert all(0 <= e <= 100 for e in net["train_error"] + net["test_error"])
        assert net["iterations_per_epoch"] == 4
    # Option-A shortcuts add no parameters: ResNet-n has exactly plain-n's (the paper's fair comparison).
    for depth in (8, 14):
        assert nets[(depth, False)]["parameters"] == nets[(depth, True)]["parameters"]
    assert nets[(14, False)]["parameters"] > nets[(8, False)]["parameters"]


def test_same_seed_same_errors(tmp_path):
    data = load_digits(size=8)
    runs = [run_degradation(data, depths=[8], epochs=1, batch_size=16, limit=48, device="cpu", seed=3)
            for _ in range(2)]
    timeless = [[{k: v for k, v in n.items() if k != "seconds"} for n in r["networks"]] for r in runs]
    assert timeless[0] == timeless[1]


def test_digits_split_is_stratified_and_fixed():
    data = load_digits(size=16)
    assert data.train.images.shape == (1437, 3, 16, 16) and data.train.images.dtype == torch.uint8
    assert len(data.test) == 360 and not data.flip
    assert torch.equal(data.train.images[:, 0], data.train.images[:, 2])  # grey replicated to 3 channels
    train_counts = torch.bincount(data.train.labels, minlength=10)
    test_counts = torch.bincount(data.test.labels, minlength=10)
    fraction = test_counts.float() / (train_counts + test_counts)
    assert ((fraction - 0.2).abs() < 0.01).all()  # stratified: 20% of every class in the test split
    assert torch.equal(load_digits(size=16).test.labels, data.test.labels)


def test_augment_is_a_shifted_crop():
    images = torch.randn(6, 3, 16, 16)
    out = augment(images, flip=False, generator=torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for x, y in zip(padded, out):
        assert any(torch.equal(x[:, dy:dy + 16, dx:dx + 16], y) for dy in range(5) for dx in range(5))


def test_cifar_pickle_batches(tmp_path):
    batches = [write_cifar_batch(tmp_path / name, 20, i) for i, name in enumerate(CIFAR_BATCHES)]
    # Protocol 2, as Python 3 writes it, stores bytes through _codecs.encode, and the official files name
    # numpy 1's numpy.core.multiarray: both must still load.
    test = write_cifar_batch(tmp_path / CIFAR_TEST_BATCH, 10, 9, protocol=2)
    path = tmp_path / CIFAR_TEST_BATCH
    path.write_bytes(path.read_bytes().replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    data = load_cifar(tmp_path)
    assert data.train.images.shape == (100, 3, 32, 32) and len(data.test) == 10 and data.flip
    # Row layout: 1024 red, then green, then blue values, each plane row-major.
    row = batches[1][b"data"][3]
    assert data.train.images[23, 1, 0, 5].item() == row[1024 + 5]
    assert data.train.images[23, 2, 31, 31].item() == row[3071]
    assert data.test.labels.tolist() == test[b"labels"]


def test_cifar_imagefolder(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 2)):
        for name in ("cat", "dog"):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                cv2.imwrite(str(folder / f"{i}.png"), rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    data = load_cifar(tmp_path)
    assert data.classes == ["cat", "dog"]
    assert data.train.images.shape == (12, 3, 32, 32) and data.test.labels.tolist() == [0, 0, 1, 1]
    results = run_degradation(data, depths=[8], epochs=1, batch_size=4, device="cpu")
    assert [n["name"] for n in results["networks"]] == ["plain-8", "ResNet-8"]


def test_bad_cifar_path(tmp_path):
    (tmp_path / "data_batch_1").write_bytes(b"")
    result = run_tool("--cifar", tmp_path, "--output", tmp_path / "out")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert str(tmp_path) in result.stderr and "data_batch_1" in result.stderr and "train/<class>" in result.stderr


def test_bad_settings():
    data = load_digits(size=8)
    with pytest.raises(ConfigError, match="--depths: 21 is not 6n\\+2"):
        run_degradation(data, depths=[20, 21], epochs=1)
    with pytest.raises(ConfigError, match="--batch-size must be between 2 and the 16 training images"):
        run_degradation(data, depths=[8], epochs=1, limit=16, batch_size=32)
