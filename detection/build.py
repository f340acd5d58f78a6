"""Config -> Faster R-CNN. Every `model.rpn.*` / `model.roi_heads.*` key is the constructor argument of
the same name; `input.*` configures the pre-processing and `test.*` the final detections."""
import logging
import os
from typing import Dict, Optional

from backbones.build import MODELS as BACKBONE_MODELS
from backbones.build import build_backbone
from backbones.checkpoint_kind import checkpoint_kind
from backbones.weights import check_fit, key_list, read_weights
from engine.config import as_config
from engine.device import memory_format
from engine.errors import CheckpointError, ConfigError

from .preprocess import Preprocessor
from .rcnn import FasterRCNN
from .roi_heads import RoIHeads
from .rpn import RPN
from .weights import from_torchvision_detector

logger = logging.getLogger(__name__)


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
        # Imported here: segmentation builds on detection, so detection cannot import it at load time.
        from segmentation.mask_rcnn import MaskRCNN
        from segmentation.roi_heads import MaskRoIHeads

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


# The tools' --weights: a whole detector, which build_detector(weights=..., for_inference=True) loads.
WEIGHTS_HELP = ("the whole detector, ours or torchvision's; model.backbone.weights is not read, and a file that "
                "does not cover the model is an error")


# Tensors whose shape follows model.num_classes: the box predictor's (K + 1 classes, 4 deltas each) and the
# mask predictor's (K + 1 masks, one when class-agnostic).
CLASS_TENSORS = ("roi_heads.predictor.", "roi_heads.mask_head.predictor.")
CLASS_SCORE = "roi_heads.predictor.cls_score.weight"


def load_detector_weights(model, path: str, for_inference: bool = True, setting: Optional[str] = None):
    """Our checkpoints, or torchvision's detection state dicts (converted on the fly). A file of another
    kind is refused, saying what it is. `setting` names where the file was given (default --weights for
    inference, model.weights for training).

    `for_inference`: the weights are to be evaluated or deployed as they are, so the file must hold every
    tensor of the model and no other: anything else is a CheckpointError naming the tensors (a head left at
    random initialisation writes detections that look real and mean nothing). That includes a file for
    another class count, and a Mask R-CNN checkpoint for a Faster R-CNN (its masks would be dropped) or
    the reverse (its masks would come from random weights). As an initialisation for training
    (model.weights), each of those is a warning naming what training starts from initialisation and why:
    fine-tuning to a new label space replaces the predictors, a Faster R-CNN has no mask head."""
    setting = setting or ("--weights" if for_inference else "model.weights")
    name = f"{setting}={path}"
    if not os.path.isfile(path):
        raise CheckpointError(f"{name} not found")
    state = read_weights(path)
    kind = checkpoint_kind(state)
    if kind.source == "torchvision" and kind.is_detector:
        state = from_torchvision_detector(state)
    elif not (kind.source == "ours" and kind.is_detector):
        where = (" (a backbone or classifier goes in model.backbone.weights)"
                 if kind.model in ("classifier", "resnet", "backbone") and kind.source in ("ours", "torchvision") else "")
        raise CheckpointError(f"{name} is {kind.description}, not a detector checkpoint{where}{kind.hint()}")
    own = model.state_dict()
    built = "mask_rcnn" if any(k.startswith("roi_heads.mask_head.") for k in own) else "faster_rcnn"
    if kind.model != built:
        names = {"mask_rcnn": "Mask R-CNN", "faster_rcnn": "Faster R-CNN"}
        what = (f"{path} is a {names[kind.model]} checkpoint and the config builds a {names[built]}"
                + (" (model.name=mask_rcnn builds one; configs/mrcnn_*.yaml)" if kind.model == "mask_rcnn" else ""))
        if for_inference:
            consequence = ("its mask head would be dropped" if kind.model == "mask_rcnn" else
                           "the masks would come from an untrained mask head")
            raise CheckpointError(f"{what}: {consequence}")
        logger.warning("%s: %s", what, "its mask head is not used" if kind.model == "mask_rcnn"
                       else "the mask head starts from initialisation")
    file_classes, model_classes = (len(s[CLASS_SCORE]) - 1 if CLASS_SCORE in s else None for s in (state, own))
    new_classes = None not in (file_classes, model_classes) and file_classes != model_classes
    # Another class count reshapes the predictors, and only them: any other shape mismatch is an error
    # (check_fit), never skipped.
    reshaped = [k for k, v in state.items() if new_classes and k.startswith(CLASS_TENSORS)
                and k in own and v.shape != own[k].shape]
    if reshaped and for_inference:
        shapes = ", ".join(f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in reshaped)
        raise CheckpointError(f"{name} is a detector of {file_classes} classes and the config builds one of "
                              f"{model_classes} (model.num_classes): set model.num_classes={file_classes}, with "
                              f"data.categories to match the file's label space ({shapes})")
    state = {k: v for k, v in state.items() if k not in reshaped}
    report = check_fit(own, state, name)
    if for_inference and (report.missing or report.unexpected):
        problems = [f"{len(keys)} {what}: {key_list(keys)}" for what, keys in (
            ("of the model's tensors are not in it", report.missing),
            ("of its tensors have no place in the model", report.unexpected)) if keys]
        raise CheckpointError(
            f"{name} does not cover the model: " + "; ".join(problems) + ". A detector used as it is needs all "
            "of its tensors from the file (left at random initialisation they would give meaningless "
            "detections): use its run's complete checkpoint (model_final.pth), or, to train from this file, "
            "give it as model.weights to tools/train_det.py")
    model.load_state_dict(state, strict=False)
    logger.info("%s: %s", name, report.summary())
    if report.missing:
        mask = [k for k in report.missing if kind.model != built and k.startswith("roi_heads.mask_head.")
                and k not in reshaped]
        absent = [k for k in report.missing if k not in reshaped and k not in mask]
        reasons = [(reshaped, f"of the class predictors, as the file has {file_classes} classes and "
                              f"model.num_classes={model_classes} (a new label space, as in fine-tuning)"),
                   (mask, "of the mask head, which a Faster R-CNN checkpoint does not have"),
                   (absent, "not in the file")]
        logger.warning("%s leaves %d tensors at initialisation for training to learn: %s", name,
                       len(report.missing), "; ".join(f"{len(keys)} {why}: {key_list(keys)}"
                                                      for keys, why in reasons if keys))
    if report.unexpected:
        logger.warning("%s: %d tensors have no place in the model and are not used: %s", name,
                       len(report.unexpected), key_list(report.unexpected))
    return report


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
