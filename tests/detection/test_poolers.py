"""FPN level assignment and multi-scale RoIAlign against torchvision.ops.poolers."""
import copy
import functools
import os
import pickle
from collections import OrderedDict

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign as TVMultiScaleRoIAlign
from torchvision.ops import roi_align
from torchvision.ops.poolers import LevelMapper

from backbones.base import ShapeSpec
from detection.poolers import MultiScaleRoIAlign, assign_levels
from engine.errors import ConfigError

NAMES = ["0", "1", "2", "3"]
# Against torchvision's MultiScaleRoIAlign: both call torchvision's roi_align kernel, each RoI on its level
# with the same power-of-two scale, and each output value is computed by one RoI alone, so regrouping the
# RoIs by level (or our threaded path, bitwise by the last test) changes no bit (measured difference 0).
# 1e-6 is a few u of features of size ~3: room for nothing but the same arithmetic.
SAME_KERNEL = dict(rtol=0, atol=1e-6)
SHAPES = {n: ShapeSpec(8, 2 ** (k + 2)) for k, n in enumerate(NAMES)}


def random_boxes(n, seed, height, width, min_size=1.0):
    g = torch.Generator().manual_seed(seed)
    x1 = torch.rand(n, generator=g) * width * 0.9
    y1 = torch.rand(n, generator=g) * height * 0.9
    w = torch.rand(n, generator=g) * (width - x1 - min_size) + min_size
    h = torch.rand(n, generator=g) * (height - y1 - min_size) + min_size
    return torch.stack([x1, y1, x1 + w, y1 + h], dim=1)


def test_assign_levels_equals_torchvision_level_mapper():
    # Random sizes from 1 to ~1400 px, then boxes of exactly the canonical sizes 224 * 2^k (including
    # offsets, where w*h is not an exact square) and just around them.
    boxes = [random_boxes(3000, 0, 1400, 1400)]
    exact = []
    for side in (14.0, 28.0, 56.0, 112.0, 224.0, 448.0, 896.0, 1792.0):
        for offset in (0.0, 3.3, 101.7):
            for s in (side, side - 1e-3, side + 1e-3, side * (1 - 1e-7)):
                exact.append([offset, offset, offset + s, offset + s])
        exact.append([0.0, 0.0, side * 2, side / 2])  # non-square, same area
    boxes.append(torch.tensor(exact))
    theirs = LevelMapper(2, 5, canonical_scale=224, canonical_level=4, eps=1e-6)(boxes)
    ours = assign_levels(torch.cat(boxes), 2, 5, canonical_box_size=224, canonical_level=4, eps=1e-6)
    assert ours.dtype == torch.int64
    assert torch.equal(ours, theirs)
    assert set(ours.tolist()) == {0, 1, 2, 3}
    # FPN Eq. 1 at the canonical size: a 224 x 224 box pools from P4 (index 2 when P2 is index 0).
    assert ours[len(boxes[0]) + 4 * 13] == 2


def test_assign_levels_eps_keeps_exact_canonical_boxes_on_their_level():
    box = torch.tensor([[0.0, 0.0, 112.0, 112.0], [0.0, 0.0, 56.0, 56.0]])
    assert assign_levels(box, 2, 5).tolist() == [1, 0]
    # Without eps, float error may push these down; with a large negative eps they surely drop a level.
    assert assign_levels(box, 2, 5, eps=-1e-3).tolist() == [0, 0]


def _features(seed, batch, height, width, channels=8):
    g = torch.Generator().manual_seed(seed)
    return OrderedDict((n, torch.randn(batch, channels, height // 2 ** (k + 2), width // 2 ** (k + 2), generator=g))
                       for k, n in enumerate(NAMES + ["pool"]))


def test_multiscale_roi_align_equals_torchvision_on_a_two_image_batch():
    height, width = 512, 576  # a padded batch; the images themselves are smaller
    features = _features(0, 2, height, width)
    image_sizes = [(500, 576), (512, 540)]
    large = torch.tensor([[2.0, 3.0, 500.0, 490.0], [10.5, 0.0, 530.0, 470.0], [0.0, 0.0, 300.0, 200.0]])
    boxes = [torch.cat([random_boxes(117, 1, *image_sizes[0]), large]),
             torch.cat([large, random_boxes(77, 2, *image_sizes[1], min_size=30.0)])]
    theirs = TVMultiScaleRoIAlign(NAMES, 7, 2)(features, boxes, image_sizes)
    ours = MultiScaleRoIAlign(SHAPES, 7, sampling_ratio=2)(features, boxes)
    assert ours.shape == (200, 8, 7, 7)
    torch.testing.assert_close(ours, theirs, **SAME_KERNEL)
    # The boxes spread over every level, so every level's scale is checked.
    levels = assign_levels(torch.cat(boxes), 2, 5)
    assert set(levels.tolist()) == {0, 1, 2, 3}


def test_an_image_with_zero_boxes():
    features = _features(3, 2, 128, 160)
    boxes = [torch.zeros(0, 4), random_boxes(30, 4, 128, 160)]
    pooler = MultiScaleRoIAlign(SHAPES, 7)
    out = pooler(features, boxes)
    theirs = TVMultiScaleRoIAlign(NAMES, 7, 2)(features, boxes, [(128, 160), (128, 160)])
    torch.testing.assert_close(out, theirs, **SAME_KERNEL)
    # The image index of each RoI follows its list position, so the second image's features are used.
    alone = pooler(OrderedDict((k, v[1:]) for k, v in features.items()), [boxes[1]])
    torch.testing.assert_close(out, alone, **SAME_KERNEL)
    empty = pooler(features, [torch.zeros(0, 4), torch.zeros(0, 4)])
    assert empty.shape == (0, 8, 7, 7)


@pytest.mark.parametrize("aligned", [False, True])
def test_aligned_is_passed_to_roi_align(aligned):
    features = _features(5, 1, 128, 128)
    boxes = random_boxes(40, 6, 128, 128)
    out = MultiScaleRoIAlign(SHAPES, 5, sampling_ratio=2, aligned=aligned)(features, [boxes])
    levels = assign_levels(boxes, 2, 5)
    rois = torch.cat([torch.zeros(len(boxes), 1), boxes], dim=1)
    expected = torch.zeros_like(out)
    for k, name in enumerate(NAMES):
        idx = levels == k
        expected[idx] = roi_align(features[name], rois[idx], 5, 1 / 2 ** (k + 2), 2, aligned=aligned)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)  # the same kernel calls on the same inputs
    other = roi_align(features["0"], rois[levels == 0], 5, 0.25, 2, aligned=not aligned)
    assert not torch.allclose(out[levels == 0], other)  # a half-pixel shift: far beyond rounding


def test_single_level_pools_without_level_assignment():
    shape = {"0": ShapeSpec(8, 4)}
    features = _features(7, 1, 64, 64)
    boxes = random_boxes(10, 8, 64, 64)
    out = MultiScaleRoIAlign(shape, 7)(features, [boxes])
    expected = roi_align(features["0"], [boxes], 7, 0.25, 2)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)  # the same kernel call on the same inputs


def test_non_consecutive_strides_raise_config_error():
    with pytest.raises(ConfigError, match=r"\[4, 16\]"):
        MultiScaleRoIAlign({"0": ShapeSpec(8, 4), "2": ShapeSpec(8, 16)}, 7)
    with pytest.raises(ConfigError, match="power-of-two"):
        MultiScaleRoIAlign({"0": ShapeSpec(8, 6), "1": ShapeSpec(8, 12)}, 7)


@pytest.mark.parametrize("images", [1, 2, 3])
def test_threaded_roi_align_gives_torchvisions_values_and_gradients_to_the_bit(images):
    """The threaded path (RoI blocks forward, one image per thread backward) against one torchvision call;
    `roi_align` takes it with 2+ threads and enough RoIs."""
    from detection import poolers

    threaded = functools.partial(poolers.roi_align, threads=poolers.RoIAlignThreads(2))
    feature = torch.randn(images, 16, 40, 56, requires_grad=True)
    boxes = random_boxes(150, images, 160, 224)
    rois = torch.cat([(torch.arange(150) % images).float()[:, None], boxes], 1)
    grad = torch.randn(150, 16, 7, 7)
    results = []
    for fn in (roi_align, threaded):
        out = fn(feature, rois, (7, 7), 0.25, 2, False)
        out.backward(grad)
        results.append((out.detach(), feature.grad))
        feature.grad = None
    assert type(threaded(feature, rois, (7, 7), 0.25, 2, False).grad_fn).__name__ == "_ThreadedRoIAlignBackward"
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    # Channels-last features and an image without RoIs.
    cl = feature.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    keep = rois[:, 0] != images - 1
    out = threaded(cl, rois[keep], (7, 7), 0.25, 2, False)
    out.sum().backward()
    expected = roi_align(feature.detach(), rois[keep], (7, 7), 0.25, 2, False)
    assert torch.equal(out, expected) and cl.grad.shape == feature.shape
    if images > 1:
        assert cl.grad[images - 1].abs().sum() == 0 and cl.grad[0].abs().sum() > 0


def test_bfloat16_autocast_takes_the_single_call():
    """Autocast is per thread: under CPU autocast, bfloat16 features with float32 RoIs go to the single
    call, where torchvision's autocast rule brings them to one dtype (in the pool's threads: a dtype error)."""
    from detection import poolers

    feature = torch.randn(1, 8, 20, 28).bfloat16()
    rois = torch.cat([torch.zeros(150, 1), random_boxes(150, 1, 80, 112)], 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = poolers.roi_align(feature, rois, (7, 7), 0.25, 2, False, threads=poolers.RoIAlignThreads(2))
        expected = roi_align(feature, rois, (7, 7), 0.25, 2, False)
    assert out.dtype == expected.dtype and torch.equal(out, expected)


def test_the_pooler_owns_its_threads_and_copies_without_them():
    """No process-wide pool: each MultiScaleRoIAlign makes its own on first use, with the count it was given
    (or torch's); a copy or a pickle carries the setting, never the threads, and a forked child (another
    process id) makes a pool of its own."""
    from detection import poolers

    assert not any(isinstance(v, poolers.ThreadPoolExecutor) for v in vars(poolers).values())
    features = _features(9, 2, 256, 256)
    boxes = [random_boxes(150, 10, 256, 256, min_size=60.0), random_boxes(120, 11, 256, 256, min_size=60.0)]
    single = MultiScaleRoIAlign(SHAPES, 7, threads=1)
    threaded = MultiScaleRoIAlign(SHAPES, 7, threads=2)
    assert single.threads.count() == 1 and threaded.threads.count() == 2
    assert MultiScaleRoIAlign(SHAPES, 7).threads.count() == torch.get_num_threads()
    assert single.threads._executor is None and threaded.threads._executor is None  # made on first use
    expected = single(features, boxes)
    assert single.threads._executor is None
    assert torch.equal(threaded(features, boxes), expected)  # the same kernel calls, split over threads
    pool = threaded.threads._executor
    assert pool is not None and threaded.threads._executor_size == 2
    for clone in (copy.deepcopy(threaded), pickle.loads(pickle.dumps(threaded))):
        assert clone.threads.threads == 2 and clone.threads._executor is None
        assert torch.equal(clone(features, boxes), expected) and clone.threads._executor is not pool
    assert threaded.threads._executor is pool  # reused while the process is the same
    threaded.threads._executor_pid = os.getpid() + 1  # as in a forked child: the parent's pool has no threads
    assert torch.equal(threaded(features, boxes), expected) and threaded.threads._executor is not pool
    assert threaded.threads._executor_pid == os.getpid()
