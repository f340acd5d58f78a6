"""torchvision detection checkpoints <-> ours. Key tables in the format of `backbones.weights`."""
from typing import Dict

import torch

from backbones.weights import (TORCHVISION_RESNET_KEYS, convert_keys, from_torchvision_resnet,
                               to_torchvision_resnet)
from engine.errors import CheckpointError

# ResNet body under "backbone.body." (theirs) / "backbone.bottom_up." (ours), minus the classifier.
_BODY = [(f"backbone.body.{tv}", f"backbone.bottom_up.{ours}") for tv, ours in TORCHVISION_RESNET_KEYS
         if not tv.startswith("fc.")]

TORCHVISION_DETECTION_KEYS = _BODY + [
    ("backbone.fpn.inner_blocks.{i}.0.", "backbone.lateral_convs.{i}."),
    ("backbone.fpn.layer_blocks.{i}.0.", "backbone.output_convs.{i}."),
    # Checkpoints saved before torchvision wrapped these convolutions in Conv2dNormActivation.
    ("backbone.fpn.inner_blocks.{i}.", "backbone.lateral_convs.{i}."),
    ("backbone.fpn.layer_blocks.{i}.", "backbone.output_convs.{i}."),
    ("rpn.head.conv.0.0.", "rpn.head.conv."),
    ("rpn.head.conv.", "rpn.head.conv."),
    ("rpn.head.cls_logits.", "rpn.head.objectness."),
    ("rpn.head.bbox_pred.", "rpn.head.deltas."),
    ("roi_heads.box_head.fc6.", "roi_heads.box_head.fc1."),
    ("roi_heads.box_head.fc7.", "roi_heads.box_head.fc2."),
    ("roi_heads.box_predictor.", "roi_heads.predictor."),
    # Mask R-CNN: torchvision's mask_head.{s}.0 (Conv2dNormActivation; .1 its norm) are our fcn{r}/norm{r},
    # r = s + 1; checkpoints from before that wrapper name them mask_fcn{r}.
    ("roi_heads.mask_head.{s}.0.", "roi_heads.mask_head.fcn{r}."),
    ("roi_heads.mask_head.{s}.1.", "roi_heads.mask_head.norm{r}."),
    ("roi_heads.mask_head.mask_fcn{r}.", "roi_heads.mask_head.fcn{r}."),
    ("roi_heads.mask_predictor.conv5_mask.", "roi_heads.mask_head.deconv."),
    ("roi_heads.mask_predictor.mask_fcn_logits.", "roi_heads.mask_head.predictor."),
]


def from_torchvision_detector(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    if "backbone.body.conv1.weight" not in state_dict:
        raise CheckpointError("not a torchvision detection state dict (no 'backbone.body.conv1.weight'); "
                              f"keys start with {sorted(state_dict)[:5]}")
    converted, skipped = convert_keys(state_dict, TORCHVISION_DETECTION_KEYS)
    if skipped:
        raise CheckpointError(f"torchvision detection keys that no rule converts: {skipped[:10]}")
    return converted


def from_torchvision(state_dict):
    """A torchvision ResNet classifier or detector, whichever the keys say it is."""
    if "backbone.body.conv1.weight" in state_dict:
        return from_torchvision_detector(state_dict)
    return from_torchvision_resnet(state_dict)


# tools/convert_weights.py: --from FORMAT and --to FORMAT.
CONVERTERS_IN = {"torchvision": from_torchvision}
CONVERTERS_OUT = {"torchvision": to_torchvision_resnet}
