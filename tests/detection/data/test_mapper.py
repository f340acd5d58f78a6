"""Albumentations transforms against the model's own resize (sizes and boxes), flips, large-scale jitter
and per-sample seeding."""
import numpy as np
import pytest
import torch

from detection.data.mapper import build_det_transform
from detection.preprocess import Preprocessor, scale_boxes
from engine.errors import ConfigError


def _image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("size, max_size, shape", [
    (64, 1000, (50, 70)), (64, 80, (50, 120)), (37, 50, (61, 40)), (800, 1333, (480, 640)), (800, 1333, (427, 640)),
    (800, 1333, (333, 500)), (600, 1000, (375, 500))])
def test_resize_equals_the_models_resize(size, max_size, shape):
    boxes = np.array([[3.0, 4.0, 20.0, 30.0], [0.0, 0.0, shape[1], shape[0]]], np.float32)
    image, out_boxes, labels = build_det_transform(False, min_size_test=size, max_size_test=max_size)(
        _image(*shape), boxes, [1, 2])
    pre = Preprocessor((0, 0, 0), (1, 1, 1), min_size_test=size, max_size_test=max_size).eval()
    model_sized = pre.resize(torch.rand(3, *shape))
    assert image.shape == (*model_sized.shape[-2:], 3) and image.dtype == np.uint8
    expected = scale_boxes(torch.from_numpy(boxes), shape, image.shape[:2])
    # albumentations divides by the old size and multiplies by the new one, scale_boxes multiplies by the
    # ratio: a few float32 roundings of coordinates up to 1333 px, inside the default 1.3e-6 relative.
    torch.testing.assert_close(torch.from_numpy(out_boxes), expected)
    assert out_boxes.dtype == np.float32 and labels.dtype == np.int64 and labels.tolist() == [1, 2]


def test_resize_is_one_bilinear_interpolation_like_the_models():
    # Upscaling a smooth image: the pixels agree with F.interpolate up to OpenCV's fixed-point rounding.
    y, x = np.mgrid[0:30, 0:40]
    image = np.stack([x * 6, y * 8, (x + y) * 3], -1).astype(np.uint8)
    out, _, _ = build_det_transform(False, min_size_test=60, max_size_test=1000)(image, np.zeros((0, 4)), [])
    model = Preprocessor((0, 0, 0), (1, 1, 1), min_size_test=60, max_size_test=1000).eval()
    reference = model.resize(torch.from_numpy(image).permute(2, 0, 1).float()).permute(1, 2, 0)
    assert (torch.from_numpy(out).float() - reference).abs().max() <= 1.0


def test_training_sizes_come_from_min_size_train_and_flip_mirrors_boxes():
    t = build_det_transform(True, min_size_train=(40, 60), max_size_train=1000, flip_prob=1.0)
    boxes = np.array([[10.0, 5.0, 30.0, 15.0]], np.float32)
    shorter = set()
    for seed in range(20):
        image, out, _ = t(_image(50, 100), boxes, [1], seed=seed)
        h, w = image.shape[:2]
        shorter.add(h)
        s = h / 50
        # float32 boxes against float64 arithmetic: an ulp or two (1e-7 relative); 1e-5 leaves room
        np.testing.assert_allclose(out[0], [w - 30 * s, 5 * s, w - 10 * s, 15 * s], rtol=1e-5)
    assert shorter == {40, 60}


def test_flip_probability_and_no_flip_at_test():
    boxes = np.array([[10.0, 5.0, 30.0, 15.0]], np.float32)
    t = build_det_transform(True, min_size_train=(50,), max_size_train=1000, flip_prob=0.5)
    flipped = [t(_image(50, 100), boxes, [1], seed=s)[1][0, 0] == 70.0 for s in range(200)]
    assert 60 < sum(flipped) < 140
    never = build_det_transform(True, min_size_train=(50,), max_size_train=1000, flip_prob=0.0)
    assert all(never(_image(50, 100), boxes, [1], seed=s)[1][0, 0] == 10.0 for s in range(20))
    test = build_det_transform(False, min_size_test=50)
    # no resize at test time here; albumentations' normalise / denormalise rounds by ~u of 30 px (2e-6)
    assert all(np.allclose(test(_image(50, 100), boxes, [1], seed=s)[1], boxes) for s in range(20))


def test_same_seed_same_augmentation():
    t = build_det_transform(True, min_size_train=(40, 50, 60), max_size_train=1000)
    a = [t(_image(50, 100), [[1, 1, 20, 20]], [1], seed=s)[1].tolist() for s in range(8)]
    b = [t(_image(50, 100), [[1, 1, 20, 20]], [1], seed=s)[1].tolist() for s in range(8)]
    assert a == b and len({str(x) for x in a}) > 1


def test_large_scale_jitter_gives_square_crops_with_boxes_inside():
    lsj = {"size": 64, "min_scale": 0.5, "max_scale": 2.0}
    t = build_det_transform(True, flip_prob=0.0, lsj=lsj)
    boxes = np.array([[10, 10, 40, 30], [60, 20, 99, 49]], np.float32)
    kept = []
    for seed in range(20):
        image, out, labels = t(_image(50, 100), boxes, [1, 2], seed=seed)
        assert image.shape == (64, 64, 3) and len(out) == len(labels)
        assert (out >= 0).all() and (out <= 64).all() and (out[:, 2:] > out[:, :2]).all()
        assert ((out[:, 2] - out[:, 0]) * (out[:, 3] - out[:, 1]) >= 1.0).all()
        kept.append(tuple(labels.tolist()))
    assert {(1, 2)} < set(kept) and any(len(k) < 2 for k in kept)  # crops lose boxes; labels go with them


def test_large_scale_jitter_scale_range_and_padding():
    t = build_det_transform(True, flip_prob=0.0, lsj={"size": 100, "min_scale": 0.2, "max_scale": 0.5})
    image = np.full((50, 100, 3), 200, np.uint8)
    for seed in range(10):
        out, boxes, _ = t(image, [[0, 0, 100, 50]], [1], seed=seed)
        filled_w = int((out[0, :, 0] > 0).sum())
        assert 20 <= filled_w <= 50 and out[-1, -1, 0] == 0  # scaled image at the top left, zero padding
        # the scaled image covers a whole number of pixels, the box its exact float extent: within 1 px
        np.testing.assert_allclose(boxes[0], [0, 0, filled_w, filled_w / 2], atol=1)


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="flip_prob"):
        build_det_transform(True, flip_prob=1.5)
    with pytest.raises(ConfigError, match="min_scale <= max_scale"):
        build_det_transform(True, lsj={"size": 64, "min_scale": 2.0, "max_scale": 1.0})
    with pytest.raises(ConfigError, match=r"unknown keys \['scale'\]"):
        build_det_transform(True, lsj={"size": 64, "scale": 2.0})
