"""Detectron2's own models, for checking our conversions against them (`--check`) and for the parity tests.

Imports detectron2 only inside its functions: the toolkit never needs it.
"""
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import torch
import yaml

from backbones.weights import key_list
from engine.errors import CheckpointError, ConfigError


def zoo_config_file(name: str) -> Path:
    """The path of a model-zoo config ("COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml") of the importable
    detectron2: inside the installed package (detectron2/model_zoo/configs, where `pip install` puts them) or
    at the root of a source checkout (configs/, beside the detectron2 package)."""
    import detectron2

    package = Path(detectron2.__file__).resolve().parent
    places = [package / "model_zoo" / "configs", package.parent / "configs"]
    for place in places:
        if (place / name).is_file():
            return place / name
    raise ConfigError(f"Detectron2's model-zoo config {name} is not in {' or '.join(map(str, places))}")


# Detectron2's zoo configs of the detectors our conversion takes (R101 / X101: these plus the settings below).
ZOO_CONFIGS = {False: "COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml",
               True: "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"}
# The overrides of our config a conversion records (Conversion.config) -> the key of Detectron2's config that
# sets the same (values as YAML reads them: 101, false, [57.375, 57.12, 58.395]).
DETECTRON2_SETTINGS = {
    "model.backbone.depth": "MODEL.RESNETS.DEPTH",
    "model.backbone.groups": "MODEL.RESNETS.NUM_GROUPS",
    "model.backbone.width_per_group": "MODEL.RESNETS.WIDTH_PER_GROUP",
    "model.backbone.stride_in_1x1": "MODEL.RESNETS.STRIDE_IN_1X1",
    "input.pixel_std": "MODEL.PIXEL_STD",
    "model.num_classes": "MODEL.ROI_HEADS.NUM_CLASSES",
    "model.mask_head.class_agnostic": "MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK",
}


def detectron2_config(mask: bool, overrides: Sequence[str] = (), agnostic_boxes: bool = False, opts: Sequence = ()):
    """Detectron2's config (a CfgNode) of its R50-FPN zoo detector (`ZOO_CONFIGS`), on the CPU and with no
    weights file, plus the Detectron2 settings of `overrides` (our config's KEY=VALUE, as a conversion records
    them), class-agnostic box regression where asked, and `opts` (Detectron2's KEY, VALUE list) last."""
    from detectron2.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(str(zoo_config_file(ZOO_CONFIGS[mask])))
    settings = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", agnostic_boxes]
    for override in overrides:
        key, _, value = override.partition("=")
        if key not in DETECTRON2_SETTINGS:
            raise ConfigError(f"{override}: no setting of Detectron2's config is known to match it (known: "
                              f"{', '.join(DETECTRON2_SETTINGS)})")
        settings += [DETECTRON2_SETTINGS[key], yaml.safe_load(value)]
    cfg.merge_from_list(settings + list(opts))
    cfg.freeze()
    return cfg


def load_detectron2_state(model, state_dict: Dict[str, object], source: str = "the state dict"):
    """Load a Detectron2 state dict (tensors or numpy arrays, as its .pkl files hold) into Detectron2's `model`
    strictly: every tensor of the model from it, and nothing left over but what Detectron2 keeps as
    non-persistent buffers, which are settings (pixel_mean / pixel_std, the cell anchors of older files)."""
    settings = {name for name, _ in model.named_buffers()} - set(model.state_dict())
    state = {k: torch.as_tensor(v) for k, v in state_dict.items() if k not in settings}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        problems = [f"{len(keys)} {what}: {key_list(sorted(keys))}" for what, keys in
                    [("not in Detectron2's model", unexpected), ("of Detectron2's model missing", missing)] if keys]
        raise CheckpointError(f"{source} does not load into Detectron2's model: " + "; ".join(problems))


def detectron2_predictor(cfg, state_dict: Dict[str, object], source: str = "the state dict"):
    """Detectron2's DefaultPredictor of `cfg` (BGR input, ResizeShortestEdge to INPUT.MIN_SIZE_TEST /
    MAX_SIZE_TEST, the model in eval mode) with `state_dict` loaded strictly."""
    from detectron2.engine import DefaultPredictor

    predictor = DefaultPredictor(cfg)  # MODEL.WEIGHTS "": its checkpointer loads nothing
    load_detectron2_state(predictor.model, state_dict, source)
    return predictor


def detectron2_detections(predictor, image: np.ndarray) -> Dict[str, torch.Tensor]:
    """Detectron2's detections on an HxWx3 uint8 RGB image (given to the predictor as BGR, as cv2 reads it) in
    our terms: `boxes` (xyxy, the image's pixels), `scores`, `labels` 1..K (Detectron2's 0..K-1 plus one) and,
    for Mask R-CNN, `masks` (N, H, W) bool (Detectron2 pastes them thresholded at 0.5)."""
    instances = predictor(np.ascontiguousarray(image[:, :, ::-1]))["instances"].to("cpu")
    out = {"boxes": instances.pred_boxes.tensor, "scores": instances.scores, "labels": instances.pred_classes + 1}
    if instances.has("pred_masks"):
        out["masks"] = instances.pred_masks.bool()
    return out


def detectron2_resnet(depth: int, groups: int, width_per_group: int, stride_in_1x1: bool):
    """Detectron2's ResNet backbone (build_resnet_backbone: FrozenBN, res2..res5 out) of these settings, in eval
    mode."""
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from detectron2.modeling import build_resnet_backbone

    cfg = get_cfg()
    cfg.merge_from_list(["MODEL.RESNETS.DEPTH", depth, "MODEL.RESNETS.NUM_GROUPS", groups,
                         "MODEL.RESNETS.WIDTH_PER_GROUP", width_per_group, "MODEL.RESNETS.STRIDE_IN_1X1", stride_in_1x1,
                         "MODEL.RESNETS.OUT_FEATURES", ["res2", "res3", "res4", "res5"]])
    return build_resnet_backbone(cfg, ShapeSpec(channels=3)).eval()


def load_caffe2_blobs(model, blobs: Dict[str, object]) -> List[str]:
    """Load Caffe2 ImageNet blobs into Detectron2's ResNet `model` the way its DetectionCheckpointer loads a
    Caffe2 .pkl (momentum blobs dropped, names matched by c2_model_loading, FrozenBN statistics the file lacks
    filled in by FrozenBatchNorm2d); every tensor of the model must come from the file. Returns the blobs the
    backbone has no place for (the ImageNet classifier)."""
    from detectron2.checkpoint.c2_model_loading import align_and_update_state_dicts

    blobs = {k: torch.as_tensor(v) for k, v in blobs.items() if not k.endswith("_momentum")}
    aligned = align_and_update_state_dicts(model.state_dict(), blobs, c2_conversion=True)
    missing, unexpected = model.load_state_dict(aligned, strict=False)
    if missing:
        raise CheckpointError(f"Caffe2 blobs that do not cover Detectron2's ResNet: {len(missing)} of its tensors "
                              f"missing: {key_list(sorted(missing))}")
    return sorted(unexpected)
