"""Config -> Faster R-CNN or Mask R-CNN, Detectron2's `from_config` shape without its registries: one
builder per part makes its modules from the config and passes them, with the plain settings, to the
part's constructor as keyword arguments; `build_detector` composes the parts.

Every `model.anchors.*`, `model.rpn.*`, `model.roi_heads.*` and `model.mask_head.*` key is the argument of
the same name of the part that uses it, but for these: `in_features` pick a part's `input_shape` from the
backbone's outputs; `iou_thresholds` and `iou_threshold` are the matchers' `thresholds`; `bbox_reg_weights`
is the box coder's `weights`; `pooler_resolution` is the poolers' `output_size` (and the box head's
`resolution`); `box_head` names a constructor in `BOX_HEADS`. `input.*` configures the pre-processing and
`test.*` the final detections (`test.score_thresh`, `nms_thresh` and `detections_per_img` are the RoI
heads' arguments of those names)."""
from typing import Dict, Optional

from backbones.base import ShapeSpec
from backbones.build import MODELS as BACKBONE_MODELS
from backbones.build import build_backbone
from engine.compile import compile_model
from engine.config import as_config
from engine.device import memory_format
from engine.errors import ConfigError
from segmentation.mask_head import MaskHead

from .anchors import AnchorGenerator
from .box_coder import BoxCoder
from .mask_rcnn import MaskRCNN, MaskRoIHeads
from .matcher import Matcher
from .poolers import MultiScaleRoIAlign
from .preprocess import Preprocessor
from .rcnn import FasterRCNN
from .roi_heads import BoxHead, BoxPredictor, RoIHeads
from .rpn import RPN, ProposalSelection, RPNHead
from .sampler import BalancedSampler
from .weights import load_detector_weights


def _select(shapes, names, key):
    missing = [n for n in names if n not in shapes]
    if missing:
        raise ConfigError(f"{key} names {missing}, which the backbone does not produce; it gives {list(shapes)}")
    return {n: shapes[n] for n in names}


def build_preprocessor(cfg) -> Preprocessor:
    """input.*: the model's pre-processing. input.train_resize says who resizes training images: the data
    loader (whose mapper reads the same key) or the model."""
    i = cfg.input
    return Preprocessor(i.pixel_mean, i.pixel_std, i.format, i.pixel_scale, i.min_size_train, i.max_size_train,
                        i.min_size_test, i.max_size_test, i.size_divisibility, memory_format(cfg),
                        resize_mode=i.resize_mode, resize_in_training=i.train_resize == "model")


def build_anchor_generator(cfg, input_shape: Dict[str, ShapeSpec]) -> AnchorGenerator:
    """model.anchors.* on the levels of `input_shape`; one list of sizes or ratios serves every level."""
    a = cfg.model.anchors
    levels = len(input_shape)
    sizes = list(a.sizes) * levels if len(a.sizes) == 1 else a.sizes
    aspect_ratios = list(a.aspect_ratios) * levels if len(a.aspect_ratios) == 1 else a.aspect_ratios
    return AnchorGenerator(sizes=sizes, aspect_ratios=aspect_ratios, strides=[s.stride for s in input_shape.values()],
                           stride_mode=a.stride_mode, round=a.round)


def build_rpn(cfg, shapes: Dict[str, ShapeSpec]) -> RPN:
    """The RPN on model.rpn.in_features of the backbone's `shapes`."""
    r = cfg.model.rpn
    input_shape = _select(shapes, r.in_features, "model.rpn.in_features")
    channels = {s.channels for s in input_shape.values()}
    if len(channels) != 1:
        raise ConfigError(f"model.rpn.in_features {list(input_shape)} have {sorted(channels)} channels; the RPN "
                          "head is shared across levels and needs them equal")
    anchor_generator = build_anchor_generator(cfg, input_shape)
    if len(set(anchor_generator.num_anchors)) != 1:
        raise ConfigError(f"model.anchors.sizes x aspect_ratios give {anchor_generator.num_anchors} anchors per "
                          "level; the shared RPN head needs the same number on every level")
    selection = ProposalSelection(
        pre_nms_topk_train=r.pre_nms_topk_train, pre_nms_topk_test=r.pre_nms_topk_test,
        post_nms_topk_train=r.post_nms_topk_train, post_nms_topk_test=r.post_nms_topk_test,
        nms_thresh=r.nms_thresh, min_box_size=r.min_box_size, score_thresh=r.score_thresh,
        strict_min_size=r.strict_min_size, nms_on_logits=r.nms_on_logits)
    return RPN(
        in_features=list(input_shape),
        head=RPNHead(in_channels=channels.pop(), num_anchors=anchor_generator.num_anchors[0]),
        anchor_generator=anchor_generator,
        # Ren et al. 2015, Sec. 3.1.2: each object also claims its best anchors below the IoU threshold.
        matcher=Matcher(thresholds=r.iou_thresholds, allow_low_quality_matches=True),
        sampler=BalancedSampler(batch_size_per_image=r.batch_size_per_image, positive_fraction=r.positive_fraction),
        # Unweighted deltas, as in the paper's RPN (Eq. 2); weighting is a setting of the RoI heads only.
        box_coder=BoxCoder(weights=(1.0, 1.0, 1.0, 1.0)),
        selection=selection, box_loss=r.box_loss, smooth_l1_beta=r.smooth_l1_beta, loss_normalizer=r.loss_normalizer)


def build_pooler(cfg, input_shape: Dict[str, ShapeSpec], *, output_size: int,
                 sampling_ratio: int) -> MultiScaleRoIAlign:
    """RoIAlign over the levels of `input_shape`. The box and mask poolers differ in features, size and
    sampling ratio; both take model.roi_heads' alignment and level assignment."""
    h = cfg.model.roi_heads
    return MultiScaleRoIAlign(input_shape=input_shape, output_size=output_size, sampling_ratio=sampling_ratio,
                              aligned=h.aligned, canonical_box_size=h.canonical_box_size,
                              canonical_level=h.canonical_level, level_formula=h.level_formula)


def two_fc_head(*, in_channels: int, resolution: int, fc_dim: int, conv_dim: int, norm: str) -> BoxHead:
    """The FPN paper's head (Lin et al. 2017, Sec. 4.2, "2mlp"); it has no convolution for conv_dim and norm."""
    return BoxHead(in_channels=in_channels, resolution=resolution, num_conv=0, num_fc=2, fc_dim=fc_dim)


def four_conv_one_fc_head(*, in_channels: int, resolution: int, fc_dim: int, conv_dim: int, norm: str) -> BoxHead:
    """The GroupNorm paper's head (Wu & He 2018, Sec. 6.1): four 3x3 convolutions, then one fc."""
    return BoxHead(in_channels=in_channels, resolution=resolution, num_conv=4, conv_dim=conv_dim, num_fc=1,
                   fc_dim=fc_dim, norm=norm)


# model.roi_heads.box_head -> constructor; engine/schema.py lists the same names as the key's choices.
BOX_HEADS = {"2fc": two_fc_head, "4conv1fc": four_conv_one_fc_head}


def build_box_head(cfg, in_channels: int) -> BoxHead:
    """The box head model.roi_heads.box_head names, on `in_channels` pooled features."""
    h = cfg.model.roi_heads
    if h.box_head not in BOX_HEADS:
        raise ConfigError(f"unknown model.roi_heads.box_head {h.box_head!r}; valid: {', '.join(BOX_HEADS)}")
    return BOX_HEADS[h.box_head](in_channels=in_channels, resolution=h.pooler_resolution, fc_dim=h.fc_dim,
                                 conv_dim=h.conv_dim, norm=h.norm)


def build_roi_heads(cfg, shapes: Dict[str, ShapeSpec]) -> RoIHeads:
    """The RoI heads on model.roi_heads.in_features of the backbone's `shapes`, with the mask branch
    (`build_mask_branch`) for model.name=mask_rcnn."""
    m, h, t = cfg.model, cfg.model.roi_heads, cfg.test
    input_shape = _select(shapes, h.in_features, "model.roi_heads.in_features")
    pooler = build_pooler(cfg, input_shape, output_size=h.pooler_resolution, sampling_ratio=h.sampling_ratio)
    box_head = build_box_head(cfg, next(iter(input_shape.values())).channels)
    box_branch = dict(
        pooler=pooler, box_head=box_head, predictor=BoxPredictor(in_dim=box_head.out_dim, num_classes=m.num_classes),
        # Fast R-CNN (Girshick 2015, Sec. 2.3): one threshold and no low-quality matches; the ground truth
        # appended to the proposals gives every object its positives.
        matcher=Matcher(thresholds=(h.iou_threshold, h.iou_threshold), allow_low_quality_matches=False),
        sampler=BalancedSampler(batch_size_per_image=h.batch_size_per_image, positive_fraction=h.positive_fraction),
        box_coder=BoxCoder(weights=h.bbox_reg_weights),
        append_gt_boxes=h.append_gt_boxes, score_thresh=t.score_thresh, nms_thresh=t.nms_thresh,
        detections_per_img=t.detections_per_img, min_box_size=h.min_box_size, box_loss=h.box_loss,
        smooth_l1_beta=h.smooth_l1_beta)
    if m.name == "mask_rcnn":
        return MaskRoIHeads(**box_branch, **build_mask_branch(cfg, shapes))
    return RoIHeads(**box_branch)


def build_mask_branch(cfg, shapes: Dict[str, ShapeSpec]) -> dict:
    """MaskRoIHeads' own arguments: the mask pooler on model.mask_head.in_features and the mask head."""
    m, k = cfg.model, cfg.model.mask_head
    input_shape = _select(shapes, k.in_features, "model.mask_head.in_features")
    mask_head = MaskHead(in_channels=next(iter(input_shape.values())).channels, num_classes=m.num_classes,
                         num_conv=k.num_conv, conv_dim=k.conv_dim, norm=k.norm, class_agnostic=k.class_agnostic)
    return dict(mask_pooler=build_pooler(cfg, input_shape, output_size=k.pooler_resolution,
                                         sampling_ratio=k.sampling_ratio),
                mask_head=mask_head, aligned_mask_targets=m.roi_heads.aligned, binary_mask_targets=k.binary_targets)


def build_detector(config, overrides=(), weights: Optional[str] = None, for_inference: bool = False) -> FasterRCNN:
    """A Faster R-CNN, or a Mask R-CNN for model.name=mask_rcnn, from a config file path or a resolved
    Config, plus KEY=VALUE overrides.

    Its weights: `weights` (a tool's --weights), else model.weights, is the whole detector, so
    model.backbone.weights is then neither opened nor required (as Detectron2's MODEL.WEIGHTS overrides
    the backbone's); without either, model.backbone.weights starts the ResNet and the rest is initialised.
    `for_inference`: the model is used as it is (inference, evaluation, export, benchmarks), so the
    detector file must cover it exactly (`load_detector_weights`); otherwise the file starts training."""
    cfg = as_config(config, overrides)
    m = cfg.model
    path = weights or m.weights
    backbone = build_backbone(cfg, init_weights=not path)
    shapes = backbone.output_shape()
    # The parts in this order: their initialisation draws from the global generator in turn.
    rpn = build_rpn(cfg, shapes)
    roi_heads = build_roi_heads(cfg, shapes)
    if m.name == "mask_rcnn":
        model = MaskRCNN(backbone=backbone, rpn=rpn, roi_heads=roi_heads, preprocessor=build_preprocessor(cfg),
                         drop_empty_boxes=cfg.test.drop_empty_boxes, paste_mode=m.mask_head.paste_mode)
    else:
        model = FasterRCNN(backbone=backbone, rpn=rpn, roi_heads=roi_heads, preprocessor=build_preprocessor(cfg),
                           drop_empty_boxes=cfg.test.drop_empty_boxes)
    if path:
        load_detector_weights(model, path, for_inference, setting="--weights" if weights else "model.weights")
    return model.to(memory_format=memory_format(cfg))


def compile_detector(model: FasterRCNN, cfg) -> FasterRCNN:
    """`model.compile` for a detector that trains or infers (export records the eager model and never
    calls this): the backbone and FPN, in place, so the state dict keeps its keys.

    They hold nearly all of the computation, and their graph depends on the input only through the
    batch's padded size; the RPN and RoI heads are all data-dependent shapes (top-k, NMS, sampling), which
    would split the graph in many places and gain little. Detection batches change size with nearly every
    image, so every size is symbolic from the first call (`dynamic=True`): in inference one compilation
    serves them all, where torch's default (None) would compile for the first size and again for the
    second. Training graphs (torch 2.14) still compile once per padded batch size, because Inductor's
    lowering of the convolutions' backward fixes their strides to numbers; past
    torch._dynamo.config.recompile_limit (8) such compilations, new sizes run eagerly, with a warning
    from torch. Training at one size (input.lsj_size) compiles once."""
    return compile_model(model, cfg, part="backbone", dynamic=True, what="the detector's backbone and FPN")


def category_ids(cfg) -> Dict[int, int]:
    """Detector label (1..K) -> dataset category id."""
    if cfg.model.label_space == "category_id":
        return {i: i for i in range(1, cfg.model.num_classes + 1)}
    cats = cfg.data.categories
    if cats and len(cats) != cfg.model.num_classes:
        raise ConfigError(f"model.num_classes={cfg.model.num_classes} but data.categories lists {len(cats)} "
                          "categories; they must agree with model.label_space=contiguous")
    return {i + 1: int(c["id"]) for i, c in enumerate(cats)} or {i: i for i in range(1, cfg.model.num_classes + 1)}


def category_names(cfg) -> Dict[int, str]:
    """Dataset category id -> name (ids without a listed name are shown as numbers)."""
    return {int(c["id"]): str(c["name"]) for c in cfg.data.categories}


MODELS = {**BACKBONE_MODELS, "faster_rcnn": build_detector, "mask_rcnn": build_detector}


def build_model(cfg):
    """Any model a config can name (`model.name`): the backbones' and the detectors'."""
    name = cfg.model.name
    if name not in MODELS:
        raise ConfigError(f"unknown model.name {name!r}; valid: {', '.join(MODELS)}")
    return MODELS[name](cfg)
