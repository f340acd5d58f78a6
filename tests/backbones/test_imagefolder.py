"""ImageFolder: class discovery, labels, transforms, the errors and skipping for bad data, and its seeded
training order (engine/data/samplers.py)."""
import itertools
import logging

import cv2
import numpy as np
import pytest
import torch

from backbones.classification.imagefolder import ImageFolder, build_cls_transform
from engine.data.samplers import EpochBatchSampler, seed_compose
from engine.errors import DatasetError


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imencode(".png", array)[1].tofile(str(path))


def _tree(root, spec):
    """spec: {class_name: number of 20x30 colour PNGs}."""
    for name, count in spec.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            _png(root / name / f"{i}.png", np.full((20, 30, 3), 40 * i, np.uint8))
    return root


def test_classes_are_sorted_folders_and_labels_their_positions(tmp_path):
    root = _tree(tmp_path / "train", {"dog": 2, "cat": 1, "zebra": 1})
    _png(root / "cat" / "nested" / "deep.PNG", np.zeros((8, 8, 3), np.uint8))  # subfolders, any case
    (root / "cat" / "readme.txt").write_text("not a sample")
    (root / "cat" / "._0.png").write_bytes(b"macOS resource fork, not an image")
    (root / ".ipynb_checkpoints").mkdir()
    (root / "labels.csv").write_text("files beside the class folders are not classes")
    ds = ImageFolder(root)
    assert ds.classes == ["cat", "dog", "zebra"]
    assert ds.class_to_idx == {"cat": 0, "dog": 1, "zebra": 2}
    assert len(ds) == 5
    assert [(p.split("/")[-1], label) for p, label in ds.samples] == [
        ("0.png", 0), ("deep.PNG", 0), ("0.png", 1), ("1.png", 1), ("0.png", 2)]
    assert ds.targets == [0, 0, 1, 1, 2]
    image, label = ds[3]
    assert label == 1 and isinstance(label, int)
    assert image.shape == (3, 224, 224) and image.dtype == torch.float32


def test_given_class_names_set_the_labels(tmp_path):
    root = _tree(tmp_path / "val", {"a": 1, "b": 1})
    ds = ImageFolder(root, class_names=["b", "a"])
    assert ds.classes == ["b", "a"]
    assert {p.split("/")[-2]: label for p, label in ds.samples} == {"b": 0, "a": 1}


def test_class_mismatch_lists_missing_and_extra(tmp_path):
    root = _tree(tmp_path / "val", {"cat": 1, "emu": 1})
    with pytest.raises(DatasetError) as info:
        ImageFolder(root, class_names=["cat", "dog"])
    message = str(info.value)
    assert str(root) in message and "missing: ['dog']" in message and "extra: ['emu']" in message


def test_empty_class_folder_is_named(tmp_path):
    root = _tree(tmp_path / "train", {"cat": 1, "dog": 0})
    (root / "dog" / "notes.txt").write_text("no images here")
    with pytest.raises(DatasetError, match=r"train/dog: class folder has no images"):
        ImageFolder(root)


def test_missing_root(tmp_path):
    with pytest.raises(DatasetError, match="nowhere.*does not exist"):
        ImageFolder(tmp_path / "nowhere")


def test_root_without_class_folders(tmp_path):
    _png(tmp_path / "flat" / "0.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(DatasetError, match="flat: no class folders"):
        ImageFolder(tmp_path / "flat")


def test_index_out_of_range(tmp_path):
    ds = ImageFolder(_tree(tmp_path / "t", {"a": 2}))
    with pytest.raises(IndexError):
        ds[2]
    assert ds[-1][1] == 0


@pytest.mark.parametrize("bad", ["empty", "text", "truncated"])
def test_bad_image_raises_naming_the_file(tmp_path, bad):
    root = _tree(tmp_path / "t", {"a": 1, "b": 1})
    path = root / "a" / "bad.jpg"
    if bad == "empty":
        path.write_bytes(b"")
    elif bad == "text":
        path.write_text("hello")
    else:
        data = cv2.imencode(".jpg", np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8))[1]
        path.write_bytes(data.tobytes()[:300])
    ds = ImageFolder(root)
    index = [p for p, _ in ds.samples].index(str(path))
    with pytest.raises(DatasetError, match="a/bad.jpg"):
        ds[index]


def test_skip_bad_images_counts_warns_and_returns_next(tmp_path, caplog):
    root = _tree(tmp_path / "t", {"a": 1, "b": 1})
    (root / "a" / "1.png").write_bytes(b"")
    ds = ImageFolder(root, skip_bad_images=True)
    assert [p.split("/")[-1] for p, _ in ds.samples] == ["0.png", "1.png", "0.png"]
    with caplog.at_level(logging.WARNING, logger="backbones.classification.imagefolder"):
        image, label = ds[1]
    assert label == 1  # sample 2, the next readable one
    assert ds.num_skipped == 1
    assert "a/1.png" in caplog.text
    ds[1]
    assert ds.num_skipped == 1  # counted once per file, not per access


def test_skip_bad_images_wraps_around_and_fails_when_nothing_is_readable(tmp_path):
    root = _tree(tmp_path / "t", {"a": 1, "b": 1})
    (root / "b" / "0.png").write_text("broken")
    ds = ImageFolder(root, skip_bad_images=True)
    assert ds[1][1] == 0  # the last sample is bad: wraps to index 0
    (root / "a" / "0.png").write_text("broken too")
    with pytest.raises(DatasetError, match="none of the 2 images"):
        ds[0]


def test_unusual_pngs_decode_to_rgb_tensors(tmp_path):
    root = tmp_path / "t"
    _png(root / "grey" / "0.png", np.full((40, 50), 128, np.uint8))
    _png(root / "rgba" / "0.png", np.full((40, 50, 4), 128, np.uint8))
    _png(root / "deep" / "0.png", np.full((40, 50, 3), 257 * 128, np.uint16))
    identity = build_cls_transform(train=False, size=40, resize=40, mean=(0, 0, 0), std=(1, 1, 1))
    ds = ImageFolder(root, transform=identity)
    for i in range(3):
        image, _ = ds[i]
        assert image.shape == (3, 40, 40)
        # 8-bit 128 (16-bit 257 x 128 scales to it exactly); float32 128 / 255 in the transform: an ulp at most
        torch.testing.assert_close(image, torch.full((3, 40, 40), 128 / 255))


def test_train_transform_output():
    image = np.random.default_rng(0).integers(0, 256, (300, 200, 3), dtype=np.uint8)
    out = build_cls_transform(train=True, size=96)(image=image)["image"]
    assert out.shape == (3, 96, 96) and out.dtype == torch.float32


def test_eval_transform_normalises_and_centre_crops():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    image = np.zeros((100, 300, 3), np.uint8)
    image[:] = np.round(np.array(mean) * 255).astype(np.uint8)
    image[:, :100] = 255  # only the left third is bright: a centre crop must not see it
    out = build_cls_transform(train=False, size=224)(image=image)["image"]
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    assert out.abs().max() < 0.02


def test_eval_resize_keeps_the_256_to_224_ratio():
    ops = build_cls_transform(train=False, size=112).transforms
    assert ops[0].max_size == 128
    assert build_cls_transform(train=False).transforms[0].max_size == 256
    assert build_cls_transform(train=False, size=112, resize=200).transforms[0].max_size == 200


def test_seeded_items_fix_the_augmentation(tmp_path):
    root = tmp_path / "t"
    _png(root / "a" / "0.png", np.random.default_rng(0).integers(0, 256, (40, 50, 3), np.uint8))
    ds = ImageFolder(root, transform=build_cls_transform(True, 24))
    first, label = ds[(0, 7)]
    ds[(0, 8)]
    assert label == 0 and torch.equal(ds[(0, 7)][0], first)  # the seed alone decides, not the history
    assert not torch.equal(ds[(0, 8)][0], first)


def test_each_transform_gets_its_own_seed():
    compose = build_cls_transform(True, 24)
    seed_compose(compose, 5)
    crop, flip = compose.transforms[:2]
    # One shared seed would make the flip's draw the crop's first draw.
    assert crop.seed != flip.seed and crop.py_random.random() != flip.py_random.random()


def test_epoch_batches_cover_each_epoch_and_resume_exactly():
    sampler = EpochBatchSampler(10, 3, seed=0)
    assert sampler.batches_per_epoch == 3  # the 10th item sits each epoch out
    stream = list(itertools.islice(iter(sampler), 9))
    epochs = [[i for batch in stream[e * 3:(e + 1) * 3] for i, _ in batch] for e in range(3)]
    assert all(len(set(e)) == 9 and set(e) <= set(range(10)) for e in epochs)
    assert epochs[0] != epochs[1]  # a new order every epoch
    seeds = [s for batch in stream for _, s in batch]
    assert len(set(seeds)) == len(seeds)  # every sample its own augmentation seed
    assert list(itertools.islice(iter(EpochBatchSampler(10, 3, seed=0, start_batch=4)), 5)) == stream[4:9]
    assert list(itertools.islice(iter(EpochBatchSampler(10, 3, seed=1)), 3)) != stream[:3]
    with pytest.raises(ValueError, match="4 items do not fill one batch of 5"):
        EpochBatchSampler(4, 5, seed=0)
