"""RPN and RoI heads: parity with torchvision's Faster R-CNN (same weights, same inputs) in evaluation and
training, then the training contract, empty cases and config switches on a small model."""
import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from backbones.norms import set_norm_folding
from backbones.weights import load_state_dict
from detection import build_detector
from detection.conversion import from_torchvision_detector
from engine.config import Config
from tests.conftest import REPO

TORCHVISION_CONFIG = REPO / "configs" / "torchvision" / "frcnn_r50_fpn.yaml"
# Small inputs on both sides so that ResNet-50 runs in well under a second on two cores; in training
# ours resizes inside the model, as torchvision does.
SIZE_OVERRIDES = ["input.min_size_test=200", "input.max_size_test=320",
                  "input.min_size_train=[200]", "input.max_size_train=320", "input.train_resize=model"]


def _freeze_norms(module, g):
    """torchvision builds plain BatchNorm2d without pretrained weights; its pretrained configuration (and
    ours) uses FrozenBatchNorm2d, whose arithmetic differs in the last bits. Swap them, with non-trivial
    statistics so that a wrong mapping of any of them shows."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            n = child.num_features
            frozen = FrozenBatchNorm2d(n)
            frozen.running_mean.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
            frozen.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            frozen.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.5)
            frozen.bias.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
            setattr(module, name, frozen)
        else:
            _freeze_norms(child, g)


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    tv = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None,
                                                              min_size=200, max_size=320)
    _freeze_norms(tv, torch.Generator().manual_seed(0))
    with torch.no_grad():
        # Spread the class scores (and the objectness) out, so that thresholds, NMS and ranking matter.
        tv.roi_heads.box_predictor.cls_score.weight.mul_(30)
        tv.rpn.head.cls_logits.weight.mul_(30)
    # Norms applied after the convolutions, as torchvision does, not folded into them: these tests pin
    # proposals and detections to torchvision's on purpose-made ties (objectness and class scores scaled by
    # 30 saturate), where a last-bit difference in the features reorders equal scores.
    ours = set_norm_folding(build_detector(TORCHVISION_CONFIG, SIZE_OVERRIDES), False)
    report = load_state_dict(ours, from_torchvision_detector(tv.state_dict()))
    assert not report.missing and not report.unexpected
    return tv.eval(), ours.eval()


def _images(seed=1):
    g = torch.Generator().manual_seed(seed)
    # 180 x 270 is scaled up to 200 x 300, 240 x 300 down to 200 x 250: both resize paths, unequal sizes.
    return [torch.rand(3, 180, 270, generator=g), torch.rand(3, 240, 300, generator=g)]


def _sorted_rows(boxes):
    return torch.tensor(sorted(boxes.tolist()))


# Parity tolerances. The features are the same bits on both sides (the same convolutions and FrozenBN
# arithmetic, unfolded, in one process). What may differ is the batched box arithmetic: decoding all images
# at once instead of one at a time can move an element between the SIMD body and the scalar tail of exp(),
# an ulp apart, and the ops' order may differ between torchvision versions. That is a few float32 roundings
# of coordinates up to 320 px (u x 320 px = 2e-5 px each), and of probabilities <= 1 (6e-8 each). Measured:
# identical on AVX-512, AVX2 and the default code path, one or two threads.
BOX_ATOL = 1e-4  # px: five roundings of a 320 px coordinate
SCORE_ATOL = 1e-6  # sixteen roundings of a probability


@pytest.fixture(scope="module")
@torch.no_grad()
def reference(pair):
    """torchvision's intermediate and final outputs on `_images()`, computed once for the module."""
    tv, _ = pair
    images = _images()
    image_list, _ = tv.transform(images)
    features = tv.backbone(image_list.tensors)
    proposals, _ = tv.rpn(image_list, features)
    detections, _ = tv.roi_heads(features, proposals, image_list.image_sizes)
    final = tv.transform.postprocess([dict(d) for d in detections], image_list.image_sizes,
                                     [tuple(img.shape[-2:]) for img in images])
    return {"images": images, "image_list": image_list, "features": features, "proposals": proposals,
            "detections": detections, "final": final}


@torch.no_grad()
def test_rpn_proposals_equal_torchvision(pair, reference):
    _, ours = pair
    batch, _, _ = ours.preprocessor(reference["images"])
    assert batch.image_sizes == reference["image_list"].image_sizes
    mine, losses = ours.rpn(batch, ours.backbone(batch.tensor))
    assert losses == {}
    for i, (a, b) in enumerate(zip(reference["proposals"], mine)):
        assert a.shape == b.shape and len(a) == 1000, f"image {i}"
        # Proposals whose objectness probabilities are equal in float32 may come in either order.
        same_place = (a == b).all(dim=1).float().mean().item()
        assert same_place > 0.99, f"image {i}: only {same_place:.3f} of the proposals in the same place"
        torch.testing.assert_close(_sorted_rows(b), _sorted_rows(a), rtol=0, atol=BOX_ATOL)


@torch.no_grad()
def test_roi_heads_detections_equal_torchvision_on_the_same_proposals(pair, reference):
    _, ours = pair
    sizes = torch.tensor(reference["image_list"].image_sizes, dtype=torch.float32)
    mine, losses = ours.roi_heads(reference["features"], reference["proposals"], sizes)
    assert losses == {}
    for i, (a, b) in enumerate(zip(reference["detections"], mine)):
        assert len(a["boxes"]) == len(b["boxes"]) > 10, f"image {i}"
        torch.testing.assert_close(b["boxes"], a["boxes"], rtol=0, atol=BOX_ATOL)
        torch.testing.assert_close(b["scores"], a["scores"], rtol=0, atol=SCORE_ATOL)
        assert torch.equal(b["labels"], a["labels"])


@torch.no_grad()
def test_detections_equal_torchvision(pair, reference):
    _, ours = pair
    images = reference["images"]
    mine = ours(images)
    for i, (a, b) in enumerate(zip(reference["final"], mine)):
        assert len(a["boxes"]) == len(b["boxes"]) == 100, f"image {i}"
        assert a["scores"].max() - a["scores"].min() > 0.1, "scores must spread for the test to mean something"
        # End to end, the proposals' BOX_ATOL carries into RoIAlign and the box head: the second decoding
        # (weights 10, 10, 5, 5) and the resize back (x 1.2) grow it to a few 1e-4 px, and the pooled
        # features' change reaches the scores through logits scaled by 30: ten times each.
        torch.testing.assert_close(b["boxes"], a["boxes"], rtol=0, atol=10 * BOX_ATOL)
        torch.testing.assert_close(b["scores"], a["scores"], rtol=0, atol=10 * SCORE_ATOL)
        assert torch.equal(b["labels"], a["labels"])
        # Boxes are in the input image's pixels, inside the image up to the float32 rounding of the
        # resize ratio (200 * (240 / 200) = 240.00002 here, as in torchvision).
        h, w = images[i].shape[-2:]
        assert b["boxes"][:, 0::2].max() <= w + 1e-3 and b["boxes"][:, 1::2].max() <= h + 1e-3
        assert b["boxes"].min() >= 0


def _crafted_boxes(n, seed, height, width):
    """Boxes partly outside the image (to be clipped) and some thinner than the minimum sizes."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * torch.tensor([width * 1.2, height * 1.2]) - 10
    wh = torch.rand(n, 2, generator=g) * 60 + 1
    boxes = torch.cat([xy, xy + wh], dim=1)
    boxes[::7, 2] = boxes[::7, 0] + 5e-4  # narrower than the RPN's 1e-3 and the detections' 1e-2
    boxes[3::11, 3] = boxes[3::11, 1] + 5e-3  # lower than 1e-2 only
    return boxes


@pytest.mark.parametrize("post_nms", [60, 1000])  # with 1000 the cap does not hide what comes before it
def test_proposal_selection_equals_torchvision_filter_proposals(post_nms):
    from torchvision.models.detection.image_list import ImageList
    from torchvision.models.detection.rpn import RegionProposalNetwork

    from detection.anchors import AnchorGenerator
    from detection.box_coder import BoxCoder
    from detection.matcher import Matcher
    from detection.rpn import RPN, ProposalSelection, RPNHead
    from detection.sampler import BalancedSampler
    from detection.structures import ImageBatch

    image_sizes = [(90, 120), (128, 100)]
    counts = [600, 150, 40]  # anchors per level; the first exceeds pre_nms_topk
    ours = RPN(in_features=list("abc"), head=RPNHead(in_channels=8, num_anchors=1),
               anchor_generator=AnchorGenerator([[32], [64], [128]], [[1.0]] * 3, [8, 16, 32]),
               matcher=Matcher((0.3, 0.7), allow_low_quality_matches=True), sampler=BalancedSampler(256, 0.5),
               box_coder=BoxCoder((1.0, 1.0, 1.0, 1.0)),
               selection=ProposalSelection(pre_nms_topk_test=100, post_nms_topk_test=post_nms, nms_thresh=0.6,
                                           min_box_size=1e-3, score_thresh=0.3)).eval()
    tv = RegionProposalNetwork(None, None, 0.7, 0.3, 256, 0.5, dict(training=100, testing=100),
                               dict(training=post_nms, testing=post_nms), 0.6, score_thresh=0.3).eval()
    proposals = torch.stack([_crafted_boxes(sum(counts), seed, 128, 120) for seed in (0, 1)])
    # Distinct logits, so that no two probabilities tie and the order is defined.
    g = torch.Generator().manual_seed(2)
    logits = torch.stack([torch.randperm(sum(counts), generator=g).float() / 100 - 3 for _ in range(2)])
    theirs, _ = tv.filter_proposals(proposals, logits, image_sizes, counts)
    batch = ImageBatch(torch.zeros(2, 3, 128, 128), image_sizes)
    mine = ours.select_proposals(list(proposals.split(counts, dim=1)), list(logits.split(counts, dim=1)), batch)
    for i, (a, b) in enumerate(zip(theirs, mine)):
        assert 10 < len(a) <= post_nms, f"image {i}: {len(a)} proposals; the crafted input should leave some"
        assert torch.equal(b, a), f"image {i}"


def test_detect_equals_torchvision_postprocess_detections():
    from torchvision.models.detection.roi_heads import RoIHeads as TVRoIHeads

    from backbones.base import ShapeSpec
    from detection.box_coder import BoxCoder
    from detection.matcher import Matcher
    from detection.poolers import MultiScaleRoIAlign
    from detection.roi_heads import BoxHead, BoxPredictor, RoIHeads
    from detection.sampler import BalancedSampler

    num_classes, image_sizes = 6, [(90, 120), (128, 100)]
    ours = RoIHeads(pooler=MultiScaleRoIAlign({"0": ShapeSpec(8, 4), "1": ShapeSpec(8, 8)}, 7),
                    box_head=BoxHead(8, 7, fc_dim=16), predictor=BoxPredictor(16, num_classes),
                    matcher=Matcher((0.5, 0.5)), sampler=BalancedSampler(512, 0.25),
                    box_coder=BoxCoder((10.0, 10.0, 5.0, 5.0)),
                    score_thresh=0.1, nms_thresh=0.4, detections_per_img=25).eval()
    tv = TVRoIHeads(None, None, None, 0.5, 0.5, 512, 0.25, (10.0, 10.0, 5.0, 5.0), 0.1, 0.4, 25).eval()
    proposals = [_crafted_boxes(40, 3, *image_sizes[0]), _crafted_boxes(30, 4, *image_sizes[1])]
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(70, num_classes + 1, generator=g) * 2
    deltas = torch.randn(70, (num_classes + 1) * 4, generator=g)
    boxes, scores, labels = tv.postprocess_detections(logits, deltas, proposals, image_sizes)
    mine = ours.detect(logits, deltas, proposals, torch.tensor(image_sizes, dtype=torch.float32))
    for i, det in enumerate(mine):
        assert 5 < len(boxes[i]) <= 25, f"image {i}"
        torch.testing.assert_close(det["boxes"], boxes[i], rtol=0, atol=BOX_ATOL)  # the scores: the same softmax
        assert torch.equal(det["scores"], scores[i]) and torch.equal(det["labels"], labels[i])


def test_training_losses_equal_torchvision_when_every_candidate_is_sampled(pair):
    """With sample sizes larger than the candidate counts both samplers take every foreground and
    background anchor and RoI, so the random draws no longer matter and the losses must agree."""
    tv, ours = pair
    images = _images(4)
    targets = [{"boxes": torch.tensor([[20.0, 30.0, 120.0, 150.0], [150.0, 10.0, 260.0, 90.0]]),
                "labels": torch.tensor([3, 17])},
               {"boxes": torch.tensor([[40.0, 50.0, 200.0, 230.0]]), "labels": torch.tensor([1])}]
    samplers = [ours.rpn.sampler, ours.roi_heads.sampler, tv.rpn.fg_bg_sampler, tv.roi_heads.fg_bg_sampler]
    saved = [s.batch_size_per_image for s in samplers]
    try:
        for s in samplers:
            s.batch_size_per_image = 10 ** 7
        tv.train(), ours.train()
        with torch.no_grad():
            theirs = tv(images, [dict(t) for t in targets])
            mine = ours(images, [dict(t) for t in targets])
    finally:
        for s, n in zip(samplers, saved):
            s.batch_size_per_image = n
        tv.eval(), ours.eval()
    assert set(mine) == set(theirs)
    # Each loss is a mean over all anchors or RoIs of the batch (up to ~32k anchors), which we sum at once and
    # torchvision per image: float32 sums of n terms in other orders, at most about n u (2e-3) in theory,
    # log2(n) u (1e-6) for torch's cascade summation in practice (measured 8e-9 relative). rtol 1e-4.
    for key in theirs:
        torch.testing.assert_close(mine[key], theirs[key], rtol=1e-4, atol=1e-6, msg=key)
        assert theirs[key] > 0, key


# --- a small model for the training contract ------------------------------------------------------------

SMALL = {
    "model": {"name": "faster_rcnn", "num_classes": 3,
              "backbone": {"depth": 18, "norm": "FrozenBN", "freeze_at": 2},
              "fpn": {"out_channels": 64},
              "rpn": {"batch_size_per_image": 64, "pre_nms_topk_train": 300, "post_nms_topk_train": 150,
                      "pre_nms_topk_test": 300, "post_nms_topk_test": 150},
              "roi_heads": {"fc_dim": 128, "batch_size_per_image": 64}},
    "input": {"min_size_train": [128], "max_size_train": 192, "min_size_test": 128, "max_size_test": 192},
}


def small_model(*overrides, seed=0):
    torch.manual_seed(seed)
    return build_detector(Config.from_dict(SMALL, overrides))


def _targets(*boxes_per_image):
    out = []
    for boxes in boxes_per_image:
        boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        out.append({"boxes": boxes, "labels": torch.arange(len(boxes)) % 3 + 1})
    return out


def _batch(seed=0, sizes=((96, 128),)):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) for h, w in sizes]


LOSS_KEYS = {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}


def test_training_losses_and_gradients():
    model = small_model().train()
    losses = model(_batch(), _targets([[10, 12, 60, 70], [70, 20, 120, 90]]))
    assert set(losses) == LOSS_KEYS
    for key, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value) and value > 0, key
    sum(losses.values()).backward()

    def has_grad(module):
        return all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters() if p.requires_grad)

    assert has_grad(model.rpn.head) and has_grad(model.roi_heads.box_head) and has_grad(model.roi_heads.predictor)
    body = model.backbone.bottom_up
    for stage in (body.res3, body.res4, body.res5):
        assert any(p.requires_grad for p in stage.parameters()) and has_grad(stage)
    assert has_grad(model.backbone.lateral_convs)
    # freeze_at: 2 freezes the stem and res2.
    for stage in (body.stem, body.res2):
        assert all(not p.requires_grad and p.grad is None for p in stage.parameters())


def test_target_without_boxes_trains_with_finite_losses():
    model = small_model().train()
    losses = model(_batch(1, ((96, 128), (110, 100))), _targets([], [[5, 5, 50, 60]]))
    assert set(losses) == LOSS_KEYS and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.rpn.head.objectness.weight.grad is not None

    empty = model(_batch(2), _targets([]))
    assert all(torch.isfinite(v) for v in empty.values())
    # Nothing to regress: both box losses are exactly zero; the classifiers still learn background.
    assert empty["loss_rpn_box_reg"] == 0 and empty["loss_box_reg"] == 0
    assert empty["loss_objectness"] > 0 and empty["loss_classifier"] > 0


def test_batch_of_two_images_of_different_sizes():
    model = small_model().train()
    images = _batch(3, ((96, 128), (150, 90)))
    targets = _targets([[10, 10, 50, 60]], [[20, 30, 80, 140], [0, 0, 40, 40]])
    losses = model(images, targets)
    assert set(losses) == LOSS_KEYS and all(torch.isfinite(v) and v > 0 for v in losses.values())
    assert targets[1]["boxes"][0].tolist() == [20, 30, 80, 140], "the caller's targets must not be modified"
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2
    for det, img in zip(out, images):
        h, w = img.shape[-2:]
        assert len(det["boxes"]) > 0
        assert det["boxes"][:, 0::2].max() <= w + 1e-3 and det["boxes"][:, 1::2].max() <= h + 1e-3


def test_eval_without_detections_returns_empty_tensors():
    model = small_model("test.score_thresh=0.999").eval()
    with torch.no_grad():
        out = model(_batch(4, ((96, 128), (80, 80))))
    assert len(out) == 2
    for det in out:
        assert set(det) == {"boxes", "scores", "labels"}
        assert det["boxes"].shape == (0, 4) and det["boxes"].dtype == torch.float32
        assert det["scores"].shape == (0,) and det["scores"].dtype == torch.float32
        assert det["labels"].shape == (0,) and det["labels"].dtype == torch.int64


def test_eval_without_any_proposal_returns_empty_tensors():
    # Sigmoid probabilities never reach 1.0 here, so the RPN keeps no proposal at all.
    model = small_model("model.rpn.score_thresh=1.0").eval()
    with torch.no_grad():
        out = model(_batch(5))
    assert out[0]["boxes"].shape == (0, 4) and out[0]["labels"].shape == (0,)


def test_training_without_any_roi_gives_finite_losses():
    # No proposal survives the RPN (probabilities never reach 1.0) and the image has no ground truth to
    # append: the RoI heads sample nothing.
    model = small_model("model.rpn.score_thresh=1.0").train()
    losses = model(_batch(5), _targets([]))
    assert all(torch.isfinite(v) for v in losses.values())


def _losses_with(*overrides):
    model = small_model(*overrides).train()
    torch.manual_seed(123)  # the samplers draw from the global generator
    return model(_batch(6), _targets([[10, 12, 60, 70], [70, 20, 120, 90]]))


def test_box_loss_selection():
    smooth = _losses_with()
    l1 = _losses_with("model.roi_heads.box_loss=l1")
    # Same weights and samples: only the RoI box loss changes, and L1 >= smooth L1 element by element.
    for key in ("loss_objectness", "loss_rpn_box_reg", "loss_classifier"):
        assert torch.equal(l1[key], smooth[key]), key
    assert l1["loss_box_reg"] > smooth["loss_box_reg"] > 0
    rpn_l1 = _losses_with("model.rpn.box_loss=l1")
    assert torch.equal(rpn_l1["loss_box_reg"], smooth["loss_box_reg"])
    assert rpn_l1["loss_rpn_box_reg"] > smooth["loss_rpn_box_reg"] > 0
    beta = _losses_with("model.roi_heads.smooth_l1_beta=0.5")
    assert beta["loss_box_reg"] < smooth["loss_box_reg"]


@torch.no_grad()
def test_post_nms_topk_test_caps_proposals_per_image():
    full, capped = small_model(), small_model("model.rpn.post_nms_topk_test=7")
    assert torch.equal(full.rpn.head.conv.weight, capped.rpn.head.conv.weight)
    images = _batch(7, ((96, 128), (128, 96)))
    outputs = []
    for model in (full, capped):
        model.eval()
        batch, _, _ = model.preprocessor(images)
        outputs.append(model.rpn(batch, model.backbone(batch.tensor))[0])
    for a, b in zip(*outputs):
        assert len(a) > 7 and len(b) == 7
        # NMS runs before the cap, so the capped proposals are the best 7 of the uncapped ones.
        assert torch.equal(b, a[:7])


@pytest.mark.parametrize("norm", ["", "BN"])
def test_4conv1fc_box_head_equals_torchvision_conv_fc_head(norm):
    # torchvision's FastRCNNConvFCHead (the head of fasterrcnn_resnet50_fpn_v2) is the same layout: four
    # 3x3 convs (bias only without a norm), flatten, one fc, ReLU after each layer.
    from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead

    from detection.roi_heads import BoxHead

    torch.manual_seed(0)
    ours = BoxHead(32, 7, num_conv=4, conv_dim=48, num_fc=1, fc_dim=64, norm=norm).eval()
    theirs = FastRCNNConvFCHead((32, 7, 7), [48] * 4, [64], norm_layer=nn.BatchNorm2d if norm else None).eval()
    mine, ref = ours.state_dict(), theirs.state_dict()
    assert [v.shape for v in mine.values()] == [v.shape for v in ref.values()]
    g = torch.Generator().manual_seed(1)
    values = [torch.rand(v.shape, generator=g) + 0.5 if v.is_floating_point() else v for v in ref.values()]
    ours.load_state_dict(dict(zip(mine, values)))
    theirs.load_state_dict(dict(zip(ref, values)))
    x = torch.randn(5, 32, 7, 7, generator=g)
    # The same conv, BN and linear calls on the same shapes on both sides: the same bits (measured). The
    # values reach ~1e12 (all weights 0.5-1.5), so only the relative 1e-4 counts: far above a few u of
    # rounding per layer in another order (five layers), far below a wrong layer or weight.
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-4)


def test_4conv1fc_detector_trains_and_detects():
    model = small_model("model.roi_heads.box_head=4conv1fc", "model.roi_heads.conv_dim=32",
                        "model.roi_heads.norm=GN")
    head = model.roi_heads.box_head
    assert sum(isinstance(m, nn.Conv2d) for m in head.modules()) == 4
    assert sum(isinstance(m, nn.GroupNorm) for m in head.modules()) == 4 and head.out_dim == 128
    losses = model.train()(_batch(), _targets([[10, 12, 60, 70]]))
    assert set(losses) == LOSS_KEYS and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    out = model.eval()(_batch(1))
    assert set(out[0]) == {"boxes", "scores", "labels"}


# --- the builders: config keys -> parts -> heads ---------------------------------------------------------


def test_config_keys_reach_the_parts_of_the_same_name():
    from detection.rpn import ProposalSelection

    model = small_model("model.rpn.iou_thresholds=[0.25,0.75]", "model.rpn.positive_fraction=0.4",
                        "model.rpn.nms_on_logits=true", "model.rpn.strict_min_size=true", "model.rpn.score_thresh=0.1",
                        "model.roi_heads.iou_threshold=0.6", "model.roi_heads.positive_fraction=0.3",
                        "model.roi_heads.bbox_reg_weights=[5,5,2,2]", "model.roi_heads.canonical_level=3",
                        "model.roi_heads.level_formula=detectron2", "test.nms_thresh=0.45",
                        "test.detections_per_img=20")
    rpn, heads = model.rpn, model.roi_heads
    assert (rpn.matcher.low, rpn.matcher.high, rpn.matcher.allow_low_quality_matches) == (0.25, 0.75, True)
    assert (rpn.sampler.batch_size_per_image, rpn.sampler.positive_fraction) == (64, 0.4)
    assert rpn.selection == ProposalSelection(pre_nms_topk_train=300, pre_nms_topk_test=300, post_nms_topk_train=150,
                                              post_nms_topk_test=150, nms_thresh=0.7, min_box_size=1e-3,
                                              score_thresh=0.1, strict_min_size=True, nms_on_logits=True)
    assert rpn.box_coder.weights == (1.0, 1.0, 1.0, 1.0) and rpn.in_features == ["0", "1", "2", "3", "pool"]
    assert (heads.matcher.low, heads.matcher.high, heads.matcher.allow_low_quality_matches) == (0.6, 0.6, False)
    assert (heads.sampler.batch_size_per_image, heads.sampler.positive_fraction) == (64, 0.3)
    assert heads.box_coder.weights == (5.0, 5.0, 2.0, 2.0) and heads.num_classes == 3
    assert (heads.pooler.canonical_level, heads.pooler.level_formula, heads.pooler.output_size) == (3, "detectron2",
                                                                                                    (7, 7))
    assert (heads.score_thresh, heads.nms_thresh, heads.detections_per_img) == (0.05, 0.45, 20)


def test_box_heads_are_a_table_of_the_names_the_schema_accepts():
    from detection.build import BOX_HEADS, build_box_head
    from engine.errors import ConfigError
    from engine.schema import SCHEMA

    assert set(SCHEMA["model"]["roi_heads"]["box_head"].choices) == set(BOX_HEADS)
    cfg = Config.from_dict(SMALL)
    cfg.model.roi_heads.box_head = "5fc"  # past the schema, which refuses it when a config is read
    with pytest.raises(ConfigError, match=r"unknown model.roi_heads.box_head '5fc'; valid: 2fc, 4conv1fc$"):
        build_box_head(cfg, 64)


def test_rpn_builder_refuses_levels_the_shared_head_cannot_serve():
    from backbones.base import ShapeSpec
    from detection.build import build_rpn
    from engine.errors import ConfigError

    cfg = Config.from_dict(SMALL, ["model.rpn.in_features=[a,b]"])
    with pytest.raises(ConfigError, match=r"model.rpn.in_features \['a', 'b'\] have \[8, 16\] channels"):
        build_rpn(cfg, {"a": ShapeSpec(8, 8), "b": ShapeSpec(16, 16)})
    cfg = Config.from_dict(SMALL, ["model.rpn.in_features=[a,b]", "model.anchors.sizes=[[32],[64,96]]"])
    with pytest.raises(ConfigError, match=r"model.anchors.sizes x aspect_ratios give \[3, 6\] anchors per level"):
        build_rpn(cfg, {"a": ShapeSpec(8, 8), "b": ShapeSpec(8, 16)})
    rpn = build_rpn(Config.from_dict(SMALL, ["model.rpn.in_features=[a,b]", "model.anchors.sizes=[[32]]"]),
                    {"a": ShapeSpec(8, 8), "b": ShapeSpec(8, 16)})
    assert rpn.anchor_generator.num_anchors == [3, 3] and rpn.head.objectness.out_channels == 3
