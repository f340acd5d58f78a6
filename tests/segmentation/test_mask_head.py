"""The mask branch: head shapes and options, targets and loss equal to torchvision's, the training
contract of a small Mask R-CNN (losses, gradients, empty cases, resized targets) and its outputs."""
import pytest
import torch
import torchvision
from torchvision.models.detection.roi_heads import maskrcnn_loss, project_masks_on_boxes

from backbones.base import ShapeSpec
from detection import build_detector
from detection.build import build_roi_heads
from detection.preprocess import Preprocessor
from engine.config import Config
from tests.detection import test_rpn_roi_heads as rpn_roi_heads
from segmentation.mask_head import MaskHead, mask_loss, mask_targets
from detection.mask_rcnn import MaskRCNN
from detection.mask_rcnn import MaskRoIHeads


def test_own_class_logits_equal_selected_logits_with_the_same_gradients():
    """head(x, labels) computes only each RoI's class: the same logits as selecting from all classes, and
    the same gradients for every parameter (other classes' predictor rows get none either way)."""
    torch.manual_seed(0)
    head = MaskHead(32, num_classes=5, num_conv=2, conv_dim=16)
    torch.nn.init.normal_(head.predictor.bias)
    x, labels = torch.rand(7, 32, 14, 14), torch.tensor([1, 5, 2, 1, 3, 5, 5])
    grads = []
    for logits in (lambda: head.select(head(x), labels), lambda: head(x, labels)):
        out = logits()
        assert out.shape == (7, 28, 28)
        head.zero_grad()
        (out.sigmoid() * torch.linspace(0, 1, 28)).sum().backward()
        grads.append((out.detach(), {k: p.grad.clone() for k, p in head.named_parameters()}))
    # Equal up to the order of float32 sums: a 1x1 convolution against a batched matrix product, and their
    # backward passes, blocked differently per SIMD width and thread count. The logits are sums of 16
    # products of size ~1: the float32 default (1e-5 absolute) is ~100 u of them (u = 2**-24; measured at
    # most 4 u). Each gradient sums over the 7 RoIs' 28 x 28 pixels (or fewer): a sum of n terms moves by
    # at most about n u of its size (measured at most 6 u, with 2 threads).
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for key in grads[0][1]:
        want = grads[1][1][key]
        torch.testing.assert_close(grads[0][1][key], want, rtol=0, atol=7 * 28 * 28 * 2**-24 * want.abs().max().item(),
                                   msg=key)
    assert grads[1][1]["predictor.weight"][4].abs().sum() == 0  # class 4 is no RoI's label


def test_head_shapes_class_specific_and_agnostic():
    x = torch.rand(5, 32, 14, 14)
    head = MaskHead(32, num_classes=3, num_conv=2, conv_dim=16)
    assert head(x).shape == (5, 4, 28, 28)
    labels = torch.tensor([1, 3, 2, 1, 3])
    logits = head(x)
    # select is indexing: the same values, bitwise; as is agnostic(x, labels), the same convolution
    torch.testing.assert_close(head.select(logits, labels), logits[torch.arange(5), labels])
    agnostic = MaskHead(32, num_classes=3, num_conv=0, conv_dim=16, class_agnostic=True)
    assert agnostic(x).shape == (5, 1, 28, 28) and agnostic.select(agnostic(x), labels).shape == (5, 28, 28)
    torch.testing.assert_close(agnostic(x, labels), agnostic.select(agnostic(x), labels))
    gn = MaskHead(32, num_classes=3, num_conv=4, conv_dim=64, norm="GN")
    assert isinstance(gn.norm4, torch.nn.GroupNorm) and gn.fcn1.bias is None
    assert gn(x).shape == (5, 4, 28, 28)


def _gt(seed=0):
    g = torch.Generator().manual_seed(seed)
    masks = [(torch.rand(3, 50, 70, generator=g) > 0.5).to(torch.uint8),
             (torch.rand(2, 40, 30, generator=g) > 0.3).to(torch.uint8)]
    rois = [torch.tensor([[1.0, 2.0, 40.0, 30.0], [10.0, 10.0, 69.0, 49.0], [0.0, 0.0, 5.0, 5.0]]),
            torch.tensor([[3.0, 4.0, 20.0, 35.5]])]
    matched = [torch.tensor([2, 0, 2]), torch.tensor([1])]
    return masks, rois, matched


def test_targets_and_loss_equal_torchvision():
    masks, rois, matched = _gt()
    ours = mask_targets(masks, rois, matched, 28, aligned=False)
    theirs = torch.cat([project_masks_on_boxes(m, r, i, 28) for m, r, i in zip(masks, rois, matched)])
    # The same roi_align kernel on the same masks and boxes, and the same BCE: equal up to the order of the
    # loss's mean over 4 x 28 x 28 values, well inside the float32 default (measured: identical).
    torch.testing.assert_close(ours, theirs)
    labels = [torch.tensor([0, 0, 2, 1]), torch.tensor([3, 2])]  # classes of the ground truth per image
    logits = torch.randn(4, 4, 28, 28, generator=torch.Generator().manual_seed(1))
    roi_labels = torch.cat([l[i] for l, i in zip(labels, matched)])
    expected = maskrcnn_loss(logits, rois, masks, labels, matched)
    head = MaskHead(8, num_classes=3)
    torch.testing.assert_close(mask_loss(head.select(logits, roi_labels), ours), expected)


def test_loss_without_positives_is_zero_with_gradient():
    head = MaskHead(8, num_classes=3, num_conv=1, conv_dim=8)
    logits = head(torch.rand(0, 8, 14, 14))
    loss = mask_loss(head.select(logits, torch.zeros(0, dtype=torch.long)), torch.zeros(0, 28, 28))
    assert loss == 0
    loss.backward()
    assert head.predictor.weight.grad is not None


SMALL = dict(rpn_roi_heads.SMALL, model=dict(rpn_roi_heads.SMALL["model"], name="mask_rcnn", fpn={"out_channels": 32},
                                             mask_head={"num_conv": 2, "conv_dim": 32}))


def small_model(*overrides, seed=0):
    torch.manual_seed(seed)
    return build_detector(Config.from_dict(SMALL, overrides))


def _sample(seed=0, size=(96, 128), boxes=((10, 12, 60, 70), (70, 20, 120, 90))):
    g = torch.Generator().manual_seed(seed)
    h, w = size
    masks = torch.zeros(len(boxes), h, w, dtype=torch.uint8)
    for k, (x0, y0, x1, y1) in enumerate(boxes):
        masks[k, y0 + 5:y1 - 5, x0 + 5:x1 - 5] = 1
    target = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
              "labels": torch.arange(len(boxes)) % 3 + 1, "masks": masks}
    # Dark noise with the objects bright: the masks can be seen.
    image = torch.rand(3, h, w, generator=g) * 0.3
    image[:, masks.bool().any(dim=0)] += 0.6
    return image, target


def test_builds_mask_rcnn_from_the_config():
    model = small_model()
    assert isinstance(model, MaskRCNN) and isinstance(model.roi_heads, MaskRoIHeads)
    assert model.roi_heads.mask_pooler.output_size == (14, 14)
    assert model.roi_heads.mask_head.predictor.out_channels == 4
    agnostic = small_model("model.mask_head.class_agnostic=true")
    assert agnostic.roi_heads.mask_head.predictor.out_channels == 1


def test_training_losses_and_gradients_reach_the_mask_head():
    model = small_model().train()
    image, target = _sample()
    losses = model([image], [target])
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"}
    assert torch.isfinite(losses["loss_mask"]) and losses["loss_mask"] > 0
    sum(losses.values()).backward()
    head = model.roi_heads.mask_head
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


def test_images_without_objects_and_missing_masks():
    model = small_model().train()
    image, target = _sample(boxes=())
    target["masks"] = torch.zeros(0, 96, 128, dtype=torch.uint8)
    losses = model([image], [target])
    assert losses["loss_mask"] == 0 and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    image, target = _sample()
    del target["masks"]
    with pytest.raises(ValueError, match="masks"):
        model([image], [target])


def test_the_model_resizes_target_masks_with_its_images():
    """torchvision's contract: the model resizes training images, and the masks go with them (nearest)."""
    pre = Preprocessor([0.5] * 3, [0.25] * 3, min_size_train=(192,), max_size_train=400).train()
    image, target = _sample()
    batch, targets, _ = pre([image], [target])
    assert targets[0]["masks"].shape == (2, 192, 256) and targets[0]["masks"].dtype == torch.uint8
    tv = torchvision.models.detection.transform.GeneralizedRCNNTransform(192, 400, [0.5] * 3, [0.25] * 3)
    _, theirs = tv([image], [dict(target)])
    torch.testing.assert_close(targets[0]["masks"], theirs[0]["masks"])  # uint8, nearest: exact
    # The training loader's resizing: nothing to do.
    pre = Preprocessor([0.5] * 3, [0.25] * 3, min_size_train=(192,), max_size_train=400,
                       resize_in_training=False).train()
    assert pre([image], [target])[1][0]["masks"] is target["masks"]


@pytest.mark.parametrize("aligned", [False, True])
def test_mask_branch_learns_masks_it_can_see(aligned):
    """Features that show the objects (their masks, one channel per object): the mask branch alone fits
    its targets quickly; a misplaced crop (shifted or flipped) would not."""
    torch.manual_seed(0)  # the heads' initialisation and the RoI sampler draw from the global generator
    image, target = _sample(3)
    masks = target["masks"].float()
    features = {"p": torch.cat([masks, 1 - masks.amax(0, keepdim=True)])[None].repeat(1, 4, 1, 1)}
    cfg = Config.from_dict({"model": {"name": "mask_rcnn", "num_classes": 3,
                                      "roi_heads": {"in_features": ["p"], "aligned": aligned, "fc_dim": 16,
                                                    "batch_size_per_image": 32},
                                      "mask_head": {"in_features": ["p"], "num_conv": 1, "conv_dim": 16}}})
    heads = build_roi_heads(cfg, {"p": ShapeSpec(12, 1)})
    assert isinstance(heads, MaskRoIHeads) and heads.aligned_mask_targets == aligned
    g = torch.Generator().manual_seed(0)
    proposals = [target["boxes"].repeat(8, 1) + torch.randn(16, 4, generator=g) * 3]
    optimizer = torch.optim.Adam(heads.mask_head.parameters(), lr=1e-2)
    heads.train()
    for step in range(60):
        loss = heads(features, proposals, torch.tensor([[96.0, 128.0]]), [target])[1]["loss_mask"]
        first = loss.item() if step == 0 else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert first > 0.6 and loss.item() < 0.15


def test_inference_outputs_full_size_masks():
    model = small_model("test.score_thresh=0.0").eval()
    with torch.no_grad():
        model.roi_heads.predictor.cls_score.weight.mul_(50)
        out = model([_sample(1)[0], _sample(2, size=(70, 90))[0]])
    for det, size in zip(out, [(96, 128), (70, 90)]):
        n = len(det["boxes"])
        assert n > 0 and det["masks"].shape == (n, 1) + size
        assert det["masks"].min() >= 0 and det["masks"].max() <= 1
    none = small_model("test.score_thresh=0.999").eval()
    with torch.no_grad():
        det = none([_sample(1)[0]])[0]
    assert det["masks"].shape == (0, 1, 96, 128)


def test_missing_masks_are_a_dataset_error():
    from engine.errors import DatasetError

    model = small_model().train()
    image, target = _sample()
    del target["masks"]
    with pytest.raises(DatasetError, match=r"Mask R-CNN training needs 'masks' \(N, H, W\) in every target"):
        model([image], [target])


def test_the_mask_pooler_is_built_from_the_config():
    """The mask pooler's own keys (model.mask_head.*) and the level assignment and alignment of the box
    pooler's (model.roi_heads.*), which the mask targets' alignment follows too."""
    model = small_model("model.mask_head.pooler_resolution=10", "model.mask_head.sampling_ratio=0",
                        "model.roi_heads.aligned=true", "model.roi_heads.canonical_level=3",
                        "model.roi_heads.canonical_box_size=160", "model.roi_heads.level_formula=detectron2")
    heads = model.roi_heads
    mask, box = heads.mask_pooler, heads.pooler
    assert (mask.output_size, mask.sampling_ratio, box.output_size, box.sampling_ratio) == ((10, 10), 0, (7, 7), 2)
    for pooler in (mask, box):
        assert (pooler.aligned, pooler.canonical_level, pooler.canonical_box_size, pooler.level_formula) == (
            True, 3, 160, "detectron2")
    assert heads.aligned_mask_targets is True
