"""Batched matcher against torchvision's per-image Matcher; the balanced sampler's counts and randomness."""
import pytest
import torch
from torchvision.models.detection._utils import Matcher as TVMatcher
from torchvision.ops import box_iou

from detection.matcher import BACKGROUND, FOREGROUND, IGNORE, Matcher
from detection.sampler import sample_balanced
from detection.structures import batched_box_iou, pad_boxes
from engine.errors import ConfigError

SETTINGS = [((0.3, 0.7), True), ((0.5, 0.5), False), ((0.3, 0.7), False), ((0.5, 0.5), True)]


def random_boxes(n, seed, size=200.0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * size
    wh = torch.rand(n, 2, generator=g) * size / 2 + 4
    return torch.cat([xy, xy + wh], dim=1)


def padded_iou(per_image, garbage=0.95):
    """(B, M, N) from per-image (M_i, N) IoU, with padded rows full of high values that must be ignored."""
    m = max([1] + [len(x) for x in per_image])
    n = per_image[0].shape[1]
    iou = torch.full((len(per_image), m, n), garbage)
    valid = torch.zeros(len(per_image), m, dtype=torch.bool)
    for i, x in enumerate(per_image):
        iou[i, : len(x)] = x
        valid[i, : len(x)] = True
    return iou, valid


def assert_same_as_torchvision(per_image, thresholds, low_quality):
    iou, valid = padded_iou(per_image)
    matched, labels = Matcher(thresholds, allow_low_quality_matches=low_quality)(iou, valid)
    assert matched.shape == labels.shape == (len(per_image), iou.shape[2])
    tv = TVMatcher(thresholds[1], thresholds[0], allow_low_quality_matches=low_quality)
    for i, x in enumerate(per_image):
        if len(x) == 0:  # torchvision refuses images without ground truth; everything is background
            assert (labels[i] == BACKGROUND).all()
            continue
        theirs = tv(x.clone())
        fg = theirs >= 0
        assert torch.equal(labels[i] == FOREGROUND, fg), f"image {i}: foreground differs"
        assert torch.equal(labels[i] == BACKGROUND, theirs == tv.BELOW_LOW_THRESHOLD), f"image {i}: background"
        assert torch.equal(labels[i] == IGNORE, theirs == tv.BETWEEN_THRESHOLDS), f"image {i}: ignored"
        assert torch.equal(matched[i][fg], theirs[fg]), f"image {i}: matched ground truth differs"
    return matched, labels


@pytest.mark.parametrize("thresholds,low_quality", SETTINGS)
def test_equals_torchvision_on_random_boxes(thresholds, low_quality):
    preds = random_boxes(400, 0)
    gts = [random_boxes(5, 1), random_boxes(0, 2), random_boxes(2, 3), random_boxes(9, 4)]
    per_image = [box_iou(g, preds) for g in gts]
    _, labels = assert_same_as_torchvision(per_image, thresholds, low_quality)
    assert {FOREGROUND, BACKGROUND} <= set(labels.unique().tolist())


@pytest.mark.parametrize("thresholds,low_quality", SETTINGS)
def test_equals_torchvision_on_quantised_iou_with_many_ties(thresholds, low_quality):
    g = torch.Generator().manual_seed(5)
    # IoU in steps of 0.1: ties within a prediction's column and within a ground truth's row everywhere,
    # and values exactly at the thresholds.
    per_image = [torch.randint(0, 9, (m, 60), generator=g).float() / 10 for m in (3, 1, 0, 6)]
    assert_same_as_torchvision(per_image, thresholds, low_quality)


def test_through_batched_box_iou_and_pad_boxes():
    preds = random_boxes(300, 6)
    gts = [random_boxes(4, 7), random_boxes(0, 8), random_boxes(7, 9)]
    gt, valid = pad_boxes(gts)
    assert gt.shape == (3, 7, 4) and valid.sum(1).tolist() == [4, 0, 7]
    # vmap runs box_iou's own elementwise ops (+, -, *, /, min, max: correctly rounded at every SIMD width),
    # so the IoUs, and the labels compared bitwise below, are torchvision's on every CPU
    iou = batched_box_iou(gt, preds.expand(3, -1, -1))
    matched, labels = Matcher((0.3, 0.7), True)(iou, valid)
    tv = TVMatcher(0.7, 0.3, True)
    for i, g_i in enumerate(gts):
        if len(g_i) == 0:
            assert (labels[i] == BACKGROUND).all()
            continue
        theirs = tv(box_iou(g_i, preds))
        assert torch.equal(labels[i] == FOREGROUND, theirs >= 0)
        assert torch.equal(matched[i][theirs >= 0], theirs[theirs >= 0])


def test_low_quality_ties_all_become_foreground():
    # gt 0 peaks at 0.4 on predictions 1, 2 and 3 (a three-way tie); gt 1 peaks at 0.6 on prediction 2,
    # so prediction 2 is claimed by both and goes to its best, gt 1; predictions 0 and 4 stay background.
    iou = torch.tensor([[[0.1, 0.4, 0.4, 0.4, 0.0],
                         [0.2, 0.0, 0.6, 0.1, 0.0],
                         [0.9, 0.9, 0.9, 0.9, 0.9]]])  # padding
    valid = torch.tensor([[True, True, False]])
    matched, labels = Matcher((0.3, 0.7), allow_low_quality_matches=True)(iou, valid)
    assert labels[0].tolist() == [BACKGROUND, FOREGROUND, FOREGROUND, FOREGROUND, BACKGROUND]
    assert matched[0, 1:4].tolist() == [0, 1, 0]
    _, plain = Matcher((0.3, 0.7))(iou, valid)
    assert plain[0].tolist() == [BACKGROUND, IGNORE, IGNORE, IGNORE, BACKGROUND]
    assert_same_as_torchvision([iou[0, :2]], (0.3, 0.7), True)


def test_thresholds_are_inclusive_at_high_and_exclusive_at_low():
    iou = torch.tensor([[[0.3, 0.7, 0.2999, 0.6999]]])
    _, labels = Matcher((0.3, 0.7))(iou, torch.ones(1, 1, dtype=torch.bool))
    assert labels[0].tolist() == [IGNORE, FOREGROUND, BACKGROUND, IGNORE]


def test_images_without_ground_truth_are_all_background():
    iou = torch.rand(2, 3, 50)
    valid = torch.zeros(2, 3, dtype=torch.bool)
    for low_quality in (False, True):
        _, labels = Matcher((0.3, 0.7), low_quality)(iou, valid)
        assert (labels == BACKGROUND).all()


def test_bad_thresholds_raise_config_error():
    with pytest.raises(ConfigError, match=r"\[0.7, 0.3\]"):
        Matcher((0.7, 0.3))
    with pytest.raises(ConfigError):
        Matcher((-0.1, 0.5))


def labels_with(counts, n, seed):
    """(B, n) labels with the given (fg, bg) counts per image, the rest ignored, in random positions."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for fg, bg in counts:
        row = torch.full((n,), IGNORE)
        row[:fg] = FOREGROUND
        row[fg:fg + bg] = BACKGROUND
        rows.append(row[torch.randperm(n, generator=g)])
    return torch.stack(rows)


def test_sample_counts_respect_quota_and_fraction():
    # (fg, bg): plenty of both; fewer positives than the quota; no positives; too few of either.
    labels = labels_with([(100, 500), (10, 500), (0, 500), (5, 20)], 1000, 0)
    fg, bg = sample_balanced(labels, per_image=256, positive_fraction=0.25,
                             generator=torch.Generator().manual_seed(0))
    assert fg.sum(1).tolist() == [64, 10, 0, 5]
    assert bg.sum(1).tolist() == [192, 246, 256, 20]
    assert not (fg & bg).any()
    assert (labels[fg] == FOREGROUND).all() and (labels[bg] == BACKGROUND).all()


def test_sample_fraction_rounds_down_like_torchvision():
    labels = labels_with([(50, 50)], 100, 1)
    fg, bg = sample_balanced(labels, per_image=10, positive_fraction=0.33)
    assert fg.sum().item() == int(10 * 0.33) == 3 and bg.sum().item() == 7


def test_sampling_is_deterministic_with_a_seeded_generator_and_random_without():
    labels = labels_with([(300, 600), (40, 900)], 1000, 2)
    a = sample_balanced(labels, 128, 0.5, generator=torch.Generator().manual_seed(7))
    b = sample_balanced(labels, 128, 0.5, generator=torch.Generator().manual_seed(7))
    c = sample_balanced(labels, 128, 0.5, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])


def test_sampling_is_uniform_over_candidates():
    labels = labels_with([(40, 0)], 40, 3)
    g = torch.Generator().manual_seed(0)
    hits = sum(sample_balanced(labels, 20, 0.5, generator=g)[0].float() for _ in range(400))
    # Each of the 40 positives is drawn with probability 10/40: 100 of 400 draws, give or take ~9.
    assert hits[labels == FOREGROUND].min() > 60 and hits[labels == FOREGROUND].max() < 140
