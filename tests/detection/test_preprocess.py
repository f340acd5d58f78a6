"""Pre-processing against torchvision's GeneralizedRCNNTransform; pixel formats; input validation; the one
resize of the loader, the model and export."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from detection.build import build_preprocessor
from detection.data.mapper import build_det_transform, transform_from_config
from detection.preprocess import Preprocessor, check_targets
from detection.resize import detectron2_resized_size, resized_size
from engine.config import Config
from engine.errors import ConfigError

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# Detectron2's ImageNet statistics: BGR order, 0-255 pixels.
D2_MEAN, D2_STD = [103.53, 116.28, 123.675], [57.375, 57.12, 58.395]


def images(seed=0, sizes=((180, 270), (240, 300))):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) for h, w in sizes]


def ours(min_size=200, max_size=320, **kw):
    kw = {"pixel_mean": MEAN, "pixel_std": STD, **kw}
    return Preprocessor(min_size_train=(min_size,), max_size_train=max_size, min_size_test=min_size,
                        max_size_test=max_size, size_divisibility=32, **kw).eval()


def theirs(min_size=200, max_size=320, mean=MEAN, std=STD):
    return GeneralizedRCNNTransform(min_size, max_size, mean, std, size_divisible=32).eval()


# The equalities with torchvision's GeneralizedRCNNTransform are bitwise on purpose: both normalise with the
# same tensor ops and resize with the same F.interpolate call on the same shapes, in one process, so every
# pixel takes the same kernel path whatever the CPU or thread count.


def test_eval_output_equals_torchvision():
    imgs = images()
    batch, targets, original = ours()(imgs)
    expected, _ = theirs()(imgs)
    # 180 x 270 is scaled up by 200/180; 240 x 300 down by 200/240; the batch pads to multiples of 32.
    assert batch.image_sizes == expected.image_sizes == [(200, 300), (200, 250)]
    assert batch.tensor.shape == (2, 3, 224, 320)
    assert torch.equal(batch.tensor, expected.tensors)
    assert targets is None and original == [(180, 270), (240, 300)]


def test_max_size_caps_the_longer_side_like_torchvision():
    imgs = images(1, sizes=((100, 400), (97, 131)))
    batch, _, _ = ours(min_size=200, max_size=320)(imgs)
    expected, _ = theirs(200, 320)(imgs)
    assert batch.image_sizes == expected.image_sizes
    assert batch.image_sizes[0] == (80, 320)
    assert torch.equal(batch.tensor, expected.tensors)


def test_training_resize_draws_sizes_like_torchvision_and_scales_boxes():
    imgs = images(2)
    boxes = [torch.tensor([[10.0, 20.0, 100.0, 150.0], [0.0, 0.0, 270.0, 180.0]]),
             torch.tensor([[5.5, 6.5, 50.25, 99.75]])]
    targets = [{"boxes": b, "labels": torch.ones(len(b), dtype=torch.long)} for b in boxes]
    pre = Preprocessor(MEAN, STD, min_size_train=(128, 160, 192, 224), max_size_train=320).train()
    tv = GeneralizedRCNNTransform((128, 160, 192, 224), 320, MEAN, STD).train()
    sizes = set()
    for seed in range(4):
        torch.manual_seed(seed)
        batch, ours_t, _ = pre(imgs, [dict(t) for t in targets])
        torch.manual_seed(seed)
        expected, tv_t = tv(imgs, [dict(t) for t in targets])
        assert batch.image_sizes == expected.image_sizes
        assert torch.equal(batch.tensor, expected.tensors)
        for a, b in zip(ours_t, tv_t):
            assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["labels"], b["labels"])
        sizes.add(tuple(batch.image_sizes))
    assert len(sizes) > 1, "the seeds should draw different sizes"
    assert torch.equal(targets[0]["boxes"], boxes[0]), "the caller's targets must not be modified"


def test_uint8_equals_float_over_255():
    g = torch.Generator().manual_seed(3)
    raw = [torch.randint(0, 256, (3, 150, 210), generator=g, dtype=torch.uint8),
           torch.randint(0, 256, (3, 190, 170), generator=g, dtype=torch.uint8)]
    pre = ours()
    a, _, _ = pre(raw)
    b, _, _ = pre([r.float() / 255 for r in raw])
    assert torch.equal(a.tensor, b.tensor) and a.image_sizes == b.image_sizes
    c, _ = theirs()([r.float() / 255 for r in raw])
    assert torch.equal(a.tensor, c.tensors)


def test_bgr_255_detectron2_style():
    imgs = images(4)
    cfg = Config.from_dict({"input": {"format": "BGR", "pixel_scale": 255.0, "pixel_mean": D2_MEAN,
                                      "pixel_std": D2_STD, "min_size_test": 200, "max_size_test": 320}})
    pre = build_preprocessor(cfg).eval()
    batch, _, _ = pre(imgs)
    # Flipping the channels and scaling to 0-255 beforehand, then normalising the usual way, is the same.
    expected, _ = theirs(mean=D2_MEAN, std=D2_STD)([img.flip(0) * 255 for img in imgs])
    assert torch.equal(batch.tensor, expected.tensors)
    # Without the flip the red and blue channels would differ.
    unflipped, _ = theirs(mean=D2_MEAN, std=D2_STD)([img * 255 for img in imgs])
    assert not torch.allclose(batch.tensor, unflipped.tensors, atol=1e-2)  # they differ by whole levels


def test_padding_is_zero_after_normalisation():
    batch, _, _ = ours()(images(5))
    h, w = batch.image_sizes[1]
    assert batch.tensor[1, :, h:, :].abs().sum() == 0 and batch.tensor[1, :, :, w:].abs().sum() == 0


def test_postprocess_maps_boxes_back_like_torchvision():
    imgs = images(6)
    batch, _, original = ours()(imgs)
    g = torch.Generator().manual_seed(7)
    dets = []
    for h, w in batch.image_sizes:
        xy = torch.rand(20, 2, generator=g) * torch.tensor([w / 2, h / 2])
        dets.append({"boxes": torch.cat([xy, xy + 30], 1), "scores": torch.rand(20, generator=g),
                     "labels": torch.randint(1, 5, (20,), generator=g)})
    mapped = Preprocessor.postprocess([dict(d) for d in dets], batch.image_sizes, original)
    expected = theirs().postprocess([dict(d) for d in dets], batch.image_sizes, original)
    for a, b, d in zip(mapped, expected, dets):
        assert torch.equal(a["boxes"], b["boxes"])
        assert torch.equal(a["scores"], d["scores"]) and torch.equal(a["labels"], d["labels"])
    # 180 x 270 was resized to 200 x 300: boxes shrink by 0.9 on both axes (float32 180 / 200 against the
    # literal 0.9: an ulp at most, within the float32 default).
    torch.testing.assert_close(mapped[0]["boxes"], dets[0]["boxes"] * 0.9)


@pytest.mark.parametrize("bad,match", [
    ([torch.rand(3, 20, 20), torch.rand(20, 20)], r"image 1: expected a \(3, H, W\).*\(20, 20\)"),
    ([torch.rand(4, 20, 20)], r"image 0: expected a \(3, H, W\).*\(4, 20, 20\)"),
    ([torch.rand(3, 20, 20), torch.rand(3, 20, 20), [[0.0]]], r"image 2: .*list"),
    ([torch.rand(3, 0, 20)], r"image 0 is empty"),
    ([], r"non-empty list"),
    (torch.rand(3, 20, 20), r"non-empty list.*Tensor"),
])
def test_bad_images_raise_value_error_naming_the_image(bad, match):
    with pytest.raises(ValueError, match=match):
        ours()(bad)


def _target(boxes):
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    return {"boxes": boxes, "labels": torch.ones(len(boxes), dtype=torch.long)}


def test_degenerate_training_boxes_raise_value_error_naming_target_and_box():
    targets = [_target([[0, 0, 10, 10]]), _target([[0, 0, 5, 5], [1, 1, 8, 9], [4, 2, 4, 9]])]
    with pytest.raises(ValueError, match=r"target 1: box 2 \[4.0, 2.0, 4.0, 9.0\] has zero or negative"):
        check_targets(targets, 2)
    with pytest.raises(ValueError, match=r"target 0: box 0 .*negative"):
        check_targets([_target([[5, 5, 10, 3]])], 1)
    check_targets([_target([]), _target([[0, 0, 1, 1]])], 2)  # no boxes at all is fine


def test_malformed_targets_raise_value_error():
    with pytest.raises(ValueError, match="training mode needs targets"):
        check_targets(None, 1)
    with pytest.raises(ValueError, match="2 images but 1 targets"):
        check_targets([_target([])], 2)
    with pytest.raises(ValueError, match=r"target 0: 'boxes' must be .*\(3,\)"):
        check_targets([{"boxes": torch.zeros(3), "labels": torch.zeros(3)}], 1)
    with pytest.raises(ValueError, match=r"target 0: 'labels' must be a tensor of shape \(2,\)"):
        check_targets([{"boxes": torch.tensor([[0.0, 0, 1, 1], [0, 0, 2, 2]]), "labels": torch.ones(3)}], 1)


def test_detector_in_training_checks_targets_before_running():
    from detection import build_detector
    cfg = Config.from_dict({"model": {"name": "faster_rcnn", "num_classes": 3,
                                      "backbone": {"depth": 18}, "fpn": {"out_channels": 16}}})
    model = build_detector(cfg).train()
    with pytest.raises(ValueError, match=r"target 0: box 1 .*zero or negative"):
        model([torch.rand(3, 64, 64)], [_target([[0, 0, 10, 10], [3, 3, 3, 3]])])


def test_bad_configuration_raises_config_error():
    with pytest.raises(ConfigError, match="RGB, BGR"):
        Preprocessor(MEAN, STD, input_format="RGBA")
    with pytest.raises(ConfigError, match="3 values"):
        Preprocessor(MEAN[:2], STD)


def test_training_without_model_resize_keeps_sizes_and_boxes():
    # The trainer's data pipeline resizes with albumentations; the model then only normalises and pads.
    pre = Preprocessor((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), min_size_train=(64,), max_size_train=64,
                       resize_in_training=False).train()
    images = [torch.rand(3, 50, 70), torch.rand(3, 61, 40)]
    boxes = torch.tensor([[1.0, 2.0, 30.0, 40.0]])
    batch, targets, _ = pre(images, [{"boxes": boxes, "labels": torch.tensor([1])}] * 2)
    assert batch.image_sizes == [(50, 70), (61, 40)] and batch.tensor.shape == (2, 3, 64, 96)
    assert torch.equal(targets[0]["boxes"], boxes)
    torch.testing.assert_close(batch.tensor[1, :, :61, :40], (images[1] - 0.5) / 0.25)  # the same two float32 ops
    pre.eval()  # evaluation still resizes, to min_size_test
    assert pre(images)[0].image_sizes[0] != (50, 70)


# One resize (detection/resize.py) for the data loader, the model and the exported graph.

SHAPES = [(180, 270), (240, 300), (100, 400), (97, 131), (427, 640), (640, 427), (333, 500), (1, 5000)]


@pytest.mark.parametrize("min_size, max_size", [(200, 320), (800, 1333), (37, 50)])
def test_one_size_rule_for_ints_traced_tensors_and_f_interpolate(min_size, max_size):
    for h, w in SHAPES:
        size = resized_size(h, w, float(min_size), float(max_size))
        traced = resized_size(torch.tensor(h), torch.tensor(w), float(min_size), float(max_size))
        assert tuple(int(s) for s in traced) == size, (h, w)
        if h == 1:  # a side that would round to 0 (where F.interpolate raises) is 1, as the loader's always was
            assert size[0] == 1
            continue
        # torchvision's way: F.interpolate rounds the size it computes from the scale factor
        scale = min(min_size / min(h, w), max_size / max(h, w))
        out = F.interpolate(torch.zeros(1, 1, h, w), scale_factor=scale, recompute_scale_factor=True)
        assert size == tuple(out.shape[-2:]), (h, w)


def test_loader_and_model_resize_alike_in_pil_mode():
    g = torch.Generator().manual_seed(8)
    image = torch.randint(0, 256, (3, 61, 90), generator=g, dtype=torch.uint8)
    loader = build_det_transform(False, min_size_test=40, max_size_test=1000, resize_mode="pil")
    resized, _, _ = loader(image.permute(1, 2, 0).numpy(), np.zeros((0, 4), np.float32), [])
    model = Preprocessor(D2_MEAN, D2_STD, "BGR", 255.0, min_size_test=40, max_size_test=1000, resize_mode="pil").eval()
    assert torch.equal(torch.from_numpy(resized).permute(2, 0, 1), model.resize(image))
    assert resized.shape[:2] == detectron2_resized_size(61, 90, 40, 1000) == (40, 59)  # 59.02: rounded


def test_unknown_resize_mode_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="unknown input.resize_mode 'cubic'; valid: interpolate, pil"):
        Preprocessor(MEAN, STD, resize_mode="cubic")
    with pytest.raises(ConfigError, match="valid: interpolate, pil"):
        build_det_transform(False, resize_mode="cubic")


def test_input_train_resize_decides_at_construction_who_resizes_training_images():
    def built(**keys):
        return Config.from_dict({"input": {"min_size_train": [64], "max_size_train": 64, **keys}})

    images = [torch.rand(3, 50, 70)]
    targets = [{"boxes": torch.tensor([[1.0, 2.0, 30.0, 40.0]]), "labels": torch.tensor([1])}]
    # The default, as the trainer runs: the loader's mapper resizes, the model does not.
    loader_cfg = built()
    assert [type(t).__name__ for t in transform_from_config(loader_cfg, train=True).compose.transforms] == [
        "ResizeShortestEdge", "HorizontalFlip"]
    assert build_preprocessor(loader_cfg).train()(images, targets)[0].image_sizes == [(50, 70)]
    # torchvision's contract: the model resizes, the loader only flips.
    model_cfg = built(train_resize="model")
    assert [type(t).__name__ for t in transform_from_config(model_cfg, train=True).compose.transforms] == [
        "HorizontalFlip"]
    assert build_preprocessor(model_cfg).train()(images, targets)[0].image_sizes == [(45, 64)]
    with pytest.raises(ConfigError, match="input.lsj_size needs input.train_resize=loader"):
        transform_from_config(built(train_resize="model", lsj_size=64), train=True)
