"""Config -> Faster R-CNN. Every `model.rpn.*` / `model.roi_heads.*` key is the constructor argument of
the same name; `input.*` configures the pre-processing and `test.*` the final detections."""
from typing import Dict, Optional

from backbones.build import MODELS as BACKBONE_MODELS
from backbones.build import build_backbone
from engine.config import as_config
from engine.device import memory_format
from engine.errors import ConfigError

from .mask_rcnn import MaskRCNN, MaskRoIHeads
from .preprocess import Preprocessor
from .rcnn import FasterRCNN
from .roi_heads import RoIHeads
from .rpn import RPN
from .weights import load_detector_weights


def _select(shapes, names, key):
    missing = [n for n in names if n not in shapes]
    if missing:
        raise ConfigError(f"{key} names {missing}, which the backbone does not produce; it gives {list(shapes)}")
    return {n: shapes[n] for n in names}


def build_preprocessor(cfg) -> Preprocessor:
    i = cfg.input
    return Preprocessor(i.pixel_mean, i.pixel_std, i.format, i.pixel_scale, i.min_size_train, i.max_size_train,
                        i.min_size_test, i.max_size_test, i.size_divisibility, memory_format(cfg),
                        resize_mode=i.resize_mode)


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
    r, h = m.rpn, m.roi_heads
    rpn = RPN(_select(shapes, r.in_features, "model.rpn.in_features"), anchor_sizes=m.anchors.sizes,
              aspect_ratios=m.anchors.aspect_ratios, anchor_stride_mode=m.anchors.stride_mode,
              iou_thresholds=r.iou_thresholds, batch_size_per_image=r.batch_size_per_image,
              positive_fraction=r.positive_fraction, pre_nms_topk_train=r.pre_nms_topk_train,
              pre_nms_topk_test=r.pre_nms_topk_test, post_nms_topk_train=r.post_nms_topk_train,
              post_nms_topk_test=r.post_nms_topk_test, nms_thresh=r.nms_thresh, min_box_size=r.min_box_size,
              score_thresh=r.score_thresh, box_loss=r.box_loss, smooth_l1_beta=r.smooth_l1_beta,
              round_anchors=m.anchors.round, strict_min_size=r.strict_min_size, nms_on_logits=r.nms_on_logits)
    heads = dict(
        num_classes=m.num_classes,
        pooler_resolution=h.pooler_resolution, sampling_ratio=h.sampling_ratio, aligned=h.aligned,
        canonical_box_size=h.canonical_box_size, canonical_level=h.canonical_level, box_head=h.box_head,
        fc_dim=h.fc_dim, conv_dim=h.conv_dim, head_norm=h.norm, iou_threshold=h.iou_threshold,
        batch_size_per_image=h.batch_size_per_image, positive_fraction=h.positive_fraction,
        bbox_reg_weights=h.bbox_reg_weights, append_gt_boxes=h.append_gt_boxes,
        score_thresh=cfg.test.score_thresh, nms_thresh=cfg.test.nms_thresh,
        detections_per_img=cfg.test.detections_per_img, min_box_size=h.min_box_size, box_loss=h.box_loss,
        smooth_l1_beta=h.smooth_l1_beta, level_formula=h.level_formula)
    box_shapes = _select(shapes, h.in_features, "model.roi_heads.in_features")
    if m.name == "mask_rcnn":
        k = m.mask_head
        roi_heads = MaskRoIHeads(
            box_shapes, mask_input_shape=_select(shapes, k.in_features, "model.mask_head.in_features"),
            mask_pooler_resolution=k.pooler_resolution, mask_sampling_ratio=k.sampling_ratio,
            mask_num_conv=k.num_conv, mask_conv_dim=k.conv_dim, mask_norm=k.norm,
            class_agnostic_masks=k.class_agnostic, **heads)
        model = MaskRCNN(backbone, rpn, roi_heads, build_preprocessor(cfg),
                         drop_empty_boxes=cfg.test.drop_empty_boxes, paste_mode=k.paste_mode)
    else:
        model = FasterRCNN(backbone, rpn, RoIHeads(box_shapes, **heads), build_preprocessor(cfg),
                           drop_empty_boxes=cfg.test.drop_empty_boxes)
    if path:
        load_detector_weights(model, path, for_inference, setting="--weights" if weights else "model.weights")
    return model.to(memory_format=memory_format(cfg))


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
