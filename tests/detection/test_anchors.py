"""Anchors: parity with torchvision's AnchorGenerator, the two stride modes, cell anchors, config errors."""
import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList

from detection.anchors import AnchorGenerator, cell_anchors
from engine.errors import ConfigError

SIZES = ((32,), (64,), (128,), (256,), (512,))
RATIOS = ((0.5, 1.0, 2.0),) * 5
STRIDES = [4, 8, 16, 32, 64]
# An 800 x 1216 padded batch (a multiple of 32, not of 64): P2..P5 divide exactly, P6 is 13 x 19 after
# the stride-2 max-pool of a 25 x 38 P5, so 800 // 13 = 61 != 64 on the y axis.
PADDED = (800, 1216)
FEATURE_SHAPES = [(200, 304), (100, 152), (50, 76), (25, 38), (13, 19)]


def _torchvision_anchors(feature_shapes, padded, batch=2):
    tv = TVAnchorGenerator(SIZES, RATIOS)
    images = ImageList(torch.zeros(batch, 3, *padded), [tuple(padded)] * batch)
    maps = [torch.zeros(batch, 1, h, w) for h, w in feature_shapes]
    return tv, tv(images, maps)


def test_padded_image_mode_equals_torchvision_on_a_non_multiple_of_64():
    _, theirs = _torchvision_anchors(FEATURE_SHAPES, PADDED)
    ours = AnchorGenerator(SIZES, RATIOS, STRIDES, stride_mode="padded_image")(FEATURE_SHAPES, PADDED)
    assert [len(a) for a in ours] == [h * w * 3 for h, w in FEATURE_SHAPES]
    for image_anchors in theirs:  # torchvision repeats the same anchors for every image
        assert torch.equal(torch.cat(ours), image_anchors)
    # The comparison covers the case where the two modes differ: P6's y stride is 61.
    p6 = ours[4].reshape(13, 19, 3, 4)
    assert p6[1, 0, 0, 1] - p6[0, 0, 0, 1] == 61
    assert p6[0, 1, 0, 0] - p6[0, 0, 0, 0] == 64


def test_padded_image_mode_equals_torchvision_on_small_odd_sizes():
    padded = (96, 160)
    shapes = [(24, 40), (12, 20), (6, 10), (3, 5), (2, 3)]
    _, theirs = _torchvision_anchors(shapes, padded, batch=1)
    ours = AnchorGenerator(SIZES, RATIOS, STRIDES, stride_mode="padded_image")(shapes, padded)
    assert torch.equal(torch.cat(ours), theirs[0])


def test_backbone_mode_uses_nominal_strides():
    gen = AnchorGenerator(SIZES, RATIOS, STRIDES, stride_mode="backbone")
    ours = gen(FEATURE_SHAPES, PADDED)
    for level, ((h, w), stride) in enumerate(zip(FEATURE_SHAPES, STRIDES)):
        base = cell_anchors(SIZES[level], RATIOS[level])
        ys, xs = torch.meshgrid(torch.arange(h) * stride, torch.arange(w) * stride, indexing="ij")
        shifts = torch.stack([xs, ys, xs, ys], dim=-1).reshape(-1, 1, 4).float()
        assert torch.equal(ours[level], (shifts + base[None]).reshape(-1, 4))
    padded = AnchorGenerator(SIZES, RATIOS, STRIDES, stride_mode="padded_image")(FEATURE_SHAPES, PADDED)
    for level in range(4):
        assert torch.equal(ours[level], padded[level])
    assert not torch.equal(ours[4], padded[4])  # P6: 64, not 800 // 13 = 61


def test_anchors_are_ordered_y_x_anchor():
    gen = AnchorGenerator(((32,),), ((0.5, 1.0, 2.0),), [16], stride_mode="backbone")
    (anchors,) = gen([(2, 3)], (32, 48))
    base = cell_anchors((32,), (0.5, 1.0, 2.0))
    a = anchors.reshape(2, 3, 3, 4)
    assert torch.equal(a[1, 2], base + torch.tensor([32.0, 16.0, 32.0, 16.0]))
    assert torch.equal(a[0, 1], base + torch.tensor([16.0, 0.0, 16.0, 0.0]))


def test_cell_anchors_order_and_rounding_equal_torchvision():
    sizes, ratios = (32, 64, 100), (0.5, 1.0, 2.0, 3.0)
    expected = TVAnchorGenerator().generate_anchors(list(sizes), list(ratios))
    ours = cell_anchors(sizes, ratios)
    assert ours.shape == (12, 4) and torch.equal(ours, expected)
    # Ratio-major, size-minor; ratio = height / width at constant area; rounded to integers.
    assert torch.equal(ours, ours.round())
    assert torch.equal(ours[1], torch.tensor([-45.0, -23.0, 45.0, 23.0]))  # ratio 0.5, size 64: w=90.5, h=45.3
    assert torch.equal(ours[3], torch.tensor([-16.0, -16.0, 16.0, 16.0]))  # ratio 1, size 32
    assert torch.equal(ours[7], torch.tensor([-23.0, -45.0, 23.0, 45.0]))  # ratio 2, size 64


def test_mismatched_level_counts_raise_config_error():
    with pytest.raises(ConfigError, match=r"5 levels.*\(3\).*\(5\)"):
        AnchorGenerator(SIZES, RATIOS[:3], STRIDES)
    with pytest.raises(ConfigError, match="same length"):
        AnchorGenerator(SIZES, RATIOS, STRIDES[:4])


def test_unknown_stride_mode_raises_config_error():
    with pytest.raises(ConfigError, match="backbone, padded_image"):
        AnchorGenerator(SIZES, RATIOS, STRIDES, stride_mode="image")


def test_anchors_follow_the_buffers_dtype():
    gen = AnchorGenerator(SIZES, RATIOS, STRIDES).to(torch.float64)
    assert all(a.dtype == torch.float64 for a in gen(FEATURE_SHAPES, PADDED))
