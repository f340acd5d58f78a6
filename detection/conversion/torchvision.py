"""torchvision detection checkpoints <-> ours. Key tables in the format of `backbones.weights`."""
from typing import Dict

import torch

from backbones.weights import (TORCHVISION_RESNET_KEYS, Conversion, convert_keys, key_list, from_torchvision_resnet,
                               to_torchvision_resnet)
from engine.errors import CheckpointError

# ResNet body under "backbone.body." (theirs) / "backbone.bottom_up." (ours), minus the classifier.
_BODY = [(f"backbone.body.{tv}", f"backbone.bottom_up.{ours}") for tv, ours in TORCHVISION_RESNET_KEYS
         if not tv.startswith("fc.")]

# Where several rules name the same key of ours, the first is torchvision's current layout: `convert_keys`
# takes the first rule that matches, so `reverse=True` writes the current layout.
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


# torchvision's detectors built without weights use BatchNorm2d, which keeps a step counter; built around
# pretrained weights they use FrozenBatchNorm2d, which drops one on load. Ours freeze their norms.
_COUNTER = ".num_batches_tracked"
_COUNTERS_IN = "BatchNorm step counters (our detectors' FrozenBN keeps none; they do not change outputs)"
_COUNTERS_OUT = ("BatchNorm step counters, zero (torchvision's model built without weights has BatchNorm2d, "
                 "which keeps one; its FrozenBatchNorm2d drops them on load)")


def from_torchvision_detector(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A torchvision Faster/Mask R-CNN R50-FPN state dict (either layout) in our names, less `_COUNTER`s."""
    if "backbone.body.conv1.weight" not in state_dict:
        raise CheckpointError("not a torchvision detection state dict (no 'backbone.body.conv1.weight'); "
                              f"keys start with {sorted(state_dict)[:5]}")
    weights = {k: v for k, v in state_dict.items() if not k.endswith(_COUNTER)}
    converted, skipped = convert_keys(weights, TORCHVISION_DETECTION_KEYS)
    if skipped:
        raise CheckpointError(f"torchvision detection keys that no rule converts: {skipped[:10]}")
    return converted


def from_torchvision(state_dict) -> Conversion:
    """A torchvision ResNet classifier or detector, whichever the keys say it is."""
    if "backbone.body.conv1.weight" in state_dict:
        counters = [k for k in state_dict if k.endswith(_COUNTER)]
        return Conversion(from_torchvision_detector(state_dict), "torchvision's detector",
                          skipped={_COUNTERS_IN: counters} if counters else {})
    return Conversion(from_torchvision_resnet(state_dict), "torchvision's ResNet")


# torchvision's builder of the detector our R50-FPN model matches, by whether it has masks.
TORCHVISION_BUILDERS = {False: "fasterrcnn_resnet50_fpn", True: "maskrcnn_resnet50_fpn"}


def to_torchvision_detector(state_dict: Dict[str, torch.Tensor]) -> Conversion:
    """Our R50-FPN Faster R-CNN or Mask R-CNN in torchvision's current names, for fasterrcnn_resnet50_fpn /
    maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=K) with strict=True. Builds nothing:
    `check.check_torchvision_fit` sees that the tensors fit that model (`Conversion.target`)."""
    kind = "Mask R-CNN" if any(k.startswith("roi_heads.mask_head.") for k in state_dict) else "Faster R-CNN"
    classifier = state_dict.get("roi_heads.predictor.cls_score.weight")
    if classifier is None:
        raise CheckpointError(f"our {kind} without 'roi_heads.predictor.cls_score.weight': torchvision's "
                              "detectors need a box classifier of that name")
    builder = TORCHVISION_BUILDERS[kind == "Mask R-CNN"]
    # Each BatchNorm of torchvision's model built without weights has a step counter next to its running_var;
    # our FrozenBN keeps running_var without one. Each goes right after its running_var, as torchvision orders them.
    counters, with_counters = [], {}
    for key, value in state_dict.items():
        with_counters[key] = value
        counter = key[:-len(".running_var")] + _COUNTER
        if key.endswith(".running_var") and counter not in state_dict:
            with_counters[counter] = torch.zeros((), dtype=torch.long)
            counters.append(counter)
    converted, skipped = convert_keys(with_counters, TORCHVISION_DETECTION_KEYS, reverse=True)
    if skipped:
        raise CheckpointError(f"our {kind} has {len(skipped)} tensors with no place in torchvision's {builder}: "
                              f"{key_list(skipped, 10)}")
    target = f"torchvision's {builder}(weights=None, weights_backbone=None, num_classes={len(classifier)})"
    return Conversion(converted, f"our {kind}, loadable with strict=True into {target}",
                      added={_COUNTERS_OUT: counters} if counters else {},
                      target=("torchvision", {"builder": builder, "num_classes": len(classifier)}))


def to_torchvision(state_dict) -> Conversion:
    """Our detector or ResNet classifier in torchvision's names, whichever the keys say it is."""
    if any(k.startswith("backbone.bottom_up.") for k in state_dict):
        return to_torchvision_detector(state_dict)
    if any(k.startswith(("stem.", "res2.")) for k in state_dict):
        return Conversion(to_torchvision_resnet(state_dict), "our ResNet classifier")
    if "backbone.body.conv1.weight" in state_dict or "layer1.0.conv1.weight" in state_dict:
        found = "it is in torchvision's names already (convert it with --from torchvision)"
    else:
        found = f"its keys start with {sorted(state_dict)[:5]}"
    raise CheckpointError("neither our detector ('backbone.bottom_up.' keys) nor our ResNet classifier "
                          f"('stem.', 'res2.' keys): {found}")


