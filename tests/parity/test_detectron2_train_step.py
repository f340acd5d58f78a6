"""One training step of Detectron2's own Mask R-CNN and Faster R-CNN R50-FPN (its model-zoo configs, built by
Detectron2) and of ours (configs/detectron2/{mrcnn,frcnn}_r50_fpn.yaml, the config the converter names) with the
same weights on the same batch: the proposals, every loss and every parameter's gradient agree.

Both samplers draw at random; with sample sizes above the candidate counts they keep every foreground and
background anchor and RoI, so the draws no longer matter (the premise is asserted). Faster R-CNN's losses and
parameters are Mask R-CNN's less the mask branch, computed by the same code; it runs as well because it is
cheap (a few seconds) and its config and model classes are its own."""
import pytest
import torch

from backbones.norms import set_norm_folding
from backbones.weights import convert_keys
from detection.build import build_detector
from detection.conversion.detectron2 import DETECTRON2_KEYS, from_detectron2_detector
from detection.conversion import detectron2_model

# Detectron2's model-zoo config -> the config of ours the converter names for its weights.
ZOO_CONFIGS = {
    "mask_rcnn": ("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml", "configs/detectron2/mrcnn_r50_fpn.yaml"),
    "faster_rcnn": ("COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml", "configs/detectron2/frcnn_r50_fpn.yaml"),
}
SIZES = [(128, 192), (160, 128)]  # (H, W), padded to 160 x 192: 3 x (40*48 + 20*24 + 10*12 + 5*6 + 3*3) anchors
RPN_BATCH = 16384  # >= 2 x 7677 anchors per image: half of it exceeds the foreground, the rest the background
POST_NMS = 100  # proposals per image, so that the RoI heads run on ~100 RoIs, not 1000
ROI_BATCH = 512  # >= 4 x (100 proposals + 3 ground-truth boxes): its quarter exceeds the foreground
# The same settings on both sides: Detectron2's key, ours, the value. Positive fractions stay the configs'
# (0.5 for the RPN, 0.25 for the RoI heads); everything else is the zoo config against ours.
SETTINGS = [("MODEL.RPN.BATCH_SIZE_PER_IMAGE", "model.rpn.batch_size_per_image", RPN_BATCH),
            ("MODEL.RPN.POST_NMS_TOPK_TRAIN", "model.rpn.post_nms_topk_train", POST_NMS),
            ("MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "model.roi_heads.batch_size_per_image", ROI_BATCH)]
LOSSES = {"loss_rpn_cls": "loss_objectness", "loss_rpn_loc": "loss_rpn_box_reg", "loss_cls": "loss_classifier",
          "loss_box_reg": "loss_box_reg", "loss_mask": "loss_mask"}  # Detectron2's name -> ours


def _detectron2_model(zoo_config):
    from detectron2.layers import FrozenBatchNorm2d
    from detectron2.modeling import build_model

    mask = zoo_config == detectron2_model.ZOO_CONFIGS[True]
    assert zoo_config == detectron2_model.ZOO_CONFIGS[mask]
    cfg = detectron2_model.detectron2_config(mask, opts=[x for d2, _, v in SETTINGS for x in (d2, v)])
    assert cfg.MODEL.BACKBONE.FREEZE_AT == 2 and cfg.MODEL.RPN.POSITIVE_FRACTION == 0.5
    torch.manual_seed(0)
    model = build_model(cfg)  # Detectron2's own initialisation of every layer
    # Non-trivial frozen statistics and affine parameters, so that a wrong mapping of any of them shows.
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.25)
            m.bias.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
    return model.train()


def _batch():
    """Two RGB uint8 images at the models' input size (neither model resizes in training) with ground-truth
    boxes, 1-based labels and elliptic masks."""
    g = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in SIZES]
    boxes = [torch.tensor([[16.0, 20.0, 100.0, 110.0], [90.0, 8.0, 180.0, 70.0], [50.0, 50.0, 92.0, 84.0]]),
             torch.tensor([[30.0, 40.0, 120.0, 150.0], [4.0, 4.0, 50.0, 60.0]])]
    labels = [torch.tensor([3, 17, 3]), torch.tensor([1, 80])]
    targets = []
    for (h, w), b, l in zip(SIZES, boxes, labels):
        ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
        centre, radius = (b[:, :2] + b[:, 2:]) / 2, (b[:, 2:] - b[:, :2]) / 2
        masks = ((xs - centre[:, 0, None, None]) / radius[:, 0, None, None]) ** 2 + \
            ((ys - centre[:, 1, None, None]) / radius[:, 1, None, None]) ** 2 <= 1
        targets.append({"boxes": b, "labels": l, "masks": masks.to(torch.uint8)})
    return images, targets


def _detectron2_inputs(images, targets):
    """Detectron2's batch: BGR 0-255 float images, Instances with 0-based classes and BitMasks.

    The images require a gradient for one reason: Detectron2's FrozenBatchNorm2d runs F.batch_norm on inputs
    that need none (its frozen stem and res2, here) and x * scale + shift otherwise, as ours always does; the
    two differ in the last bits, which moves a ReLU input near 0 to the other side of it now and then and
    with it a whole row of a head's gradient. With the gradient, both sides compute the same features to the
    bit (measured), and what is compared below is the heads' and losses' arithmetic, not BN's."""
    from detectron2.structures import BitMasks, Boxes, Instances

    return [{"image": image.flip(0).float().requires_grad_(),
             "instances": Instances(tuple(image.shape[-2:]), gt_boxes=Boxes(t["boxes"].clone()),
                                    gt_classes=t["labels"] - 1,
                                    **({"gt_masks": BitMasks(t["masks"].bool())} if "masks" in t else {}))}
            for image, t in zip(images, targets)]


def _proposals_of(roi_heads, index):
    """Records the proposals `roi_heads` receives (argument `index` of its forward)."""
    seen = []
    roi_heads.register_forward_pre_hook(lambda module, args: seen.append(args[index]))
    return seen


@pytest.fixture(scope="module", params=list(ZOO_CONFIGS))
def step(request, detectron2):
    from detectron2.utils.events import EventStorage

    zoo_config, our_config = ZOO_CONFIGS[request.param]
    theirs = _detectron2_model(zoo_config)
    conversion = from_detectron2_detector({k: v.clone() for k, v in theirs.state_dict().items()})
    config, *overrides = conversion.config
    assert config == our_config
    # Norms applied after each convolution as Detectron2 does, not folded into it (the same gradient, other
    # roundings of the features; see _detectron2_inputs for why the features must be the same bits).
    ours = set_norm_folding(build_detector(config, overrides + [f"{key}={v}" for _, key, v in SETTINGS]), False)
    ours.load_state_dict(conversion.state_dict, strict=True)
    ours.train()
    images, targets = _batch()
    if request.param == "faster_rcnn":
        targets = [{k: v for k, v in t.items() if k != "masks"} for t in targets]
    their_proposals = _proposals_of(theirs.roi_heads, 2)
    our_proposals = _proposals_of(ours.roi_heads, 1)
    anchors = []
    ours.rpn.anchor_generator.register_forward_hook(lambda module, args, out: anchors.append(sum(map(len, out))))
    # One thread (tests/conftest.py, one_thread): 9 s for both models on two cores, quiet or loaded; two
    # threads take 7 s on quiet cores and up to 30 s on loaded ones. The results do not depend on it.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with EventStorage(0):  # Detectron2's losses log to it
            their_losses = theirs(_detectron2_inputs(images, targets))
        sum(their_losses.values()).backward()
        our_losses = ours(images, targets)
        sum(our_losses.values()).backward()
    finally:
        torch.set_num_threads(threads)
    return {"kind": request.param, "theirs": theirs, "ours": ours, "their_losses": their_losses,
            "our_losses": our_losses, "their_proposals": [p.proposal_boxes.tensor for p in their_proposals[0]],
            "our_proposals": our_proposals[0], "anchors_per_image": anchors[0], "targets": targets}


def test_every_candidate_is_sampled_and_the_proposals_are_the_same(step):
    assert RPN_BATCH >= 2 * step["anchors_per_image"], "some anchors may go unsampled: raise RPN_BATCH"
    for i, (a, b) in enumerate(zip(step["their_proposals"], step["our_proposals"])):
        assert len(a) == len(b) == POST_NMS, f"image {i}: {len(a)} and {len(b)} proposals"
        assert ROI_BATCH >= 4 * (len(b) + len(step["targets"][i]["boxes"])), "raise ROI_BATCH"
        # Both decode the same deltas of the same anchors (RPN heads of the same bits): the same boxes, in the
        # same order, up to the roundings of a decoding written in another order (a few ulps of 192 px).
        torch.testing.assert_close(b, a, rtol=0, atol=1e-4, msg=f"image {i}")


def test_losses_equal_detectron2(step):
    theirs, mine = step["their_losses"], step["our_losses"]
    names = {k: v for k, v in LOSSES.items() if k != "loss_mask" or step["kind"] == "mask_rcnn"}
    assert set(theirs) == set(names) and set(mine) == set(names.values())
    for their_key, our_key in names.items():
        # The same terms (same features, proposals and targets), summed in other orders (Detectron2 orders
        # the sampled RoIs foreground first and sums per image): torch's cascade sums of n <= 1e5 terms round
        # to ~log2(n) u = 1e-6 of the total; 1e-5 relative leaves a margin of 10. Measured: 1.1e-7 at most.
        torch.testing.assert_close(mine[our_key], theirs[their_key], rtol=1e-5, atol=0, msg=our_key)
        assert theirs[their_key] > 0, their_key


def test_every_gradient_equals_detectron2(step):
    theirs = {n: p for n, p in step["theirs"].named_parameters()}
    ours = {n: p for n, p in step["ours"].named_parameters()}
    names, unknown = convert_keys({n: n for n in theirs}, DETECTRON2_KEYS)  # our name -> Detectron2's
    assert not unknown and set(names) == set(ours)
    # Frozen alike (FREEZE_AT 2: the stem and res2), and every other parameter has a gradient on both sides.
    frozen = {n for n, p in ours.items() if not p.requires_grad}
    assert frozen == {n for n, d2 in names.items() if not theirs[d2].requires_grad}
    assert frozen and all(n.startswith(("backbone.bottom_up.stem.", "backbone.bottom_up.res2.")) for n in frozen)
    for name, d2 in names.items():
        mine, reference = ours[name].grad, theirs[d2].grad
        if name in frozen:
            assert mine is None and reference is None, name
            continue
        assert mine is not None and reference is not None, f"{name}: no gradient"
        if name.startswith("roi_heads.predictor.cls_score."):
            mine = torch.cat([mine[1:], mine[:1]])  # background first in ours, last in Detectron2's
        elif name.startswith(("roi_heads.predictor.bbox_pred.", "roi_heads.mask_head.predictor.")):
            background = 4 if "bbox_pred" in name else 1  # rows Detectron2 has not got; no loss reads them
            assert not mine[:background].any(), f"{name}: gradient in the background rows"
            mine = mine[background:]
        assert mine.shape == reference.shape, name
        largest = torch.linalg.vector_norm(reference, float("inf")).item()
        assert largest > 0, d2
        # Forward values are the same bits on both sides; the backward passes sum the same products in other
        # orders (RoIs in another order through the heads' matrix products and RoIAlign's scatter into the
        # feature maps, up to a few thousand terms per element: n u = 1e-4 of the terms' magnitude at worst),
        # so each tensor is compared relative to its largest gradient. Measured: 1.5e-6 (one or two threads).
        difference = torch.linalg.vector_norm(mine - reference, float("inf")).item()
        assert difference <= 1e-4 * largest, f"{name}: gradients differ by {difference:.3g}, largest {largest:.3g}"
