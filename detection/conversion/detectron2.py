"""Detectron2 and Caffe2 (MSRA/FAIR ImageNet) weights in our names: `tools/convert_weights.py --from detectron2`.

Two kinds of file come from Detectron2's world, told apart by their keys:

- model-zoo detectors (`model_final_*.pkl` or `.pth`): Faster/Mask R-CNN with a ResNet/ResNeXt-FPN, in
  Detectron2's module names (detectron2/modeling/backbone/{resnet,fpn}.py, proposal_generator/rpn.py,
  roi_heads/{box_head,fast_rcnn,mask_head}.py);
- the Caffe2 ImageNet backbones they were trained from (`R-50.pkl`, `R-101.pkl`, `X-101-32x8d.pkl`), in blob
  names (conv1_w, res_conv1_bn_s, res2_0_branch2a_w, ...) that detectron2/checkpoint/c2_model_loading.py maps.

Detectron2's box classifier puts background last (index K) and its box and mask predictors have no
background row (4K deltas, K masks); ours put background first and keep its rows (4(K+1), K+1), so the
converter moves the classifier's last row to the front and adds zero background rows, which inference
never reads. Nothing is dropped silently: every skipped tensor is reported with the reason, and tensors
no module of ours can hold are refused by name.
"""
import re
from typing import Dict, List

import torch

from backbones.weights import Conversion, config_overrides, convert_keys, key_list, resnet_config
from engine.errors import CheckpointError

# Detectron2's Conv2d carries its norm as `.norm`; ours are siblings (norm{k} next to conv{k}). The norm rows
# come first: `convert_keys` takes the first rule whose pattern is a prefix of the key.
_D2 = "backbone.bottom_up."
DETECTRON2_KEYS = [
    (_D2 + "stem.conv1.norm.", _D2 + "stem.norm1."),
    (_D2 + "stem.conv1.", _D2 + "stem.conv1."),
    (_D2 + "res{r}.{b}.conv{k}.norm.", _D2 + "res{r}.{b}.norm{k}."),
    (_D2 + "res{r}.{b}.conv{k}.", _D2 + "res{r}.{b}.conv{k}."),
    (_D2 + "res{r}.{b}.shortcut.norm.", _D2 + "res{r}.{b}.shortcut.norm."),
    (_D2 + "res{r}.{b}.shortcut.", _D2 + "res{r}.{b}.shortcut.conv."),
] + [(f"backbone.fpn_lateral{level}.", f"backbone.lateral_convs.{level - 2}.") for level in (2, 3, 4, 5)] + [
    (f"backbone.fpn_output{level}.", f"backbone.output_convs.{level - 2}.") for level in (2, 3, 4, 5)] + [
    ("proposal_generator.rpn_head.conv.", "rpn.head.conv."),
    ("proposal_generator.rpn_head.objectness_logits.", "rpn.head.objectness."),
    ("proposal_generator.rpn_head.anchor_deltas.", "rpn.head.deltas."),
    ("roi_heads.box_head.fc{k}.", "roi_heads.box_head.fc{k}."),
    ("roi_heads.box_predictor.", "roi_heads.predictor."),
    ("roi_heads.mask_head.mask_fcn{k}.", "roi_heads.mask_head.fcn{k}."),
    ("roi_heads.mask_head.deconv.", "roi_heads.mask_head.deconv."),
    ("roi_heads.mask_head.predictor.", "roi_heads.mask_head.predictor."),
]

# Buffers in (older) zoo files that are settings, not weights: our config holds them.
_NOT_WEIGHTS = {
    "pixel_mean": "input normalisation buffers (input.pixel_mean / input.pixel_std in configs/detectron2/)",
    "pixel_std": "input normalisation buffers (input.pixel_mean / input.pixel_std in configs/detectron2/)",
    "proposal_generator.anchor_generator.cell_anchors.": "anchor buffers of old Detectron2 files (our anchors are "
                                                         "computed from model.anchors.*)",
    "num_batches_tracked": "BatchNorm step counters (they do not change outputs)",
}
_BACKGROUND = ("background rows, zero (Detectron2's box deltas and masks have none; our predictors keep one "
               "at index 0, which inference never reads)")
_AGNOSTIC_BOXES = ("class-agnostic box deltas repeated for every class (our predictor is class-specific; "
                   "inference gives the same boxes)")

# Detectron2's configs for its ImageNet initialisations (configs/Base-RCNN-FPN.yaml, config/defaults.py and
# COCO-Detection/faster_rcnn_X_101_32x8d_FPN_3x.yaml): MSRA's stride in the 1x1 with the std folded
# into conv1; FAIR's X-101-32x8d strides in the 3x3 and needs the ImageNet std.
MSRA_INPUT = ("BGR 0-255 input minus mean [103.53, 116.28, 123.675], std [1, 1, 1] (folded into conv1), "
              "stride_in_1x1=True")
FAIR_X101_INPUT = "BGR 0-255 input minus mean [103.53, 116.28, 123.675], std [57.375, 57.120, 58.395], stride_in_1x1=False"
FAIR_X101_STD = "[57.375,57.120,58.395]"


def _reason_for(key: str):
    return next((why for part, why in _NOT_WEIGHTS.items() if key.startswith(part) or key.endswith(part)), None)


def _backbone_settings(converted: Dict[str, torch.Tensor], prefix: str):
    """(config overrides, note) of the ResNet under `prefix`."""
    backbone = {k[len(prefix):]: v for k, v in converted.items() if k.startswith(prefix)}
    cfg = resnet_config(backbone)
    fair = cfg["groups"] > 1  # the zoo's only ResNeXt initialisation is FAIR's X-101-32x8d
    settings = [f"model.backbone.depth={cfg['depth']}"]
    if fair:
        settings += [f"model.backbone.groups={cfg['groups']}", f"model.backbone.width_per_group={cfg['width_per_group']}",
                     "model.backbone.stride_in_1x1=false", f"input.pixel_std={FAIR_X101_STD}"]
    return cfg, settings, FAIR_X101_INPUT if fair else MSRA_INPUT


def from_detectron2_detector(state_dict: Dict[str, torch.Tensor]) -> Conversion:
    """A Detectron2 model-zoo Faster/Mask R-CNN with a ResNet/ResNeXt-FPN in our names, for the config
    (configs/detectron2/{frcnn,mrcnn}_r50_fpn.yaml plus overrides) that the returned `what` names."""
    res5_head = sorted(k for k in state_dict if k.startswith("roi_heads.res5."))
    if res5_head:
        raise CheckpointError(f"a Detectron2 C4 model (its box head is ResNet's res5: {key_list(res5_head)}); only "
                              "FPN models (R50/R101/X101-FPN) convert: our detectors have no res5 RoI head")
    if "backbone.fpn_lateral2.weight" not in state_dict:
        fpn_less = sorted(k for k in state_dict if k.startswith(("backbone.", "proposal_generator.")))[:3]
        raise CheckpointError("a Detectron2 model without an FPN (no 'backbone.fpn_lateral2.weight'; a DC5 or C4 "
                              f"model? keys {fpn_less} ...); only R50/R101/X101-FPN models convert")
    skipped: Dict[str, List[str]] = {}
    weights = {}
    for key, value in state_dict.items():
        why = _reason_for(key)
        if why:
            skipped.setdefault(why, []).append(key)
        else:
            weights[key] = value
    converted, unknown = convert_keys(weights, DETECTRON2_KEYS)
    if unknown:
        raise CheckpointError(f"Detectron2 tensors no module of ours holds ({len(unknown)}): {key_list(sorted(unknown))}; "
                              "refused, since a network without them computes something else (norms in the FPN "
                              "or heads, a 4conv1fc box head, cascade or keypoint heads do not convert)")
    added: Dict[str, List[str]] = {}
    num_classes = _reorder_box_predictor(converted, added)
    mask = "roi_heads.mask_head.predictor.weight" in converted
    agnostic_masks = mask and _add_mask_background(converted, num_classes, added)

    cfg, settings, expects = _backbone_settings(converted, _D2)
    kind = "Mask R-CNN" if mask else "Faster R-CNN"
    base = "configs/detectron2/mrcnn_r50_fpn.yaml" if mask else "configs/detectron2/frcnn_r50_fpn.yaml"
    if num_classes != 80:
        settings.append(f"model.num_classes={num_classes} data.categories=[...]")
    if agnostic_masks:
        settings.append("model.mask_head.class_agnostic=true")
    overrides = [s for s in settings if not s.startswith("data.")]
    name = "X101" if cfg["groups"] > 1 else f"R{cfg['depth']}"
    what = (f"Detectron2's {kind} {name}-FPN ({num_classes} classes); build it with {base} "
            f"{' '.join(settings)}; its backbone was trained for {expects}")
    return Conversion(converted, what, skipped=skipped, added=added, config=(base, *overrides))


def _reorder_box_predictor(converted, added) -> int:
    """Background last -> first in the classifier, a zero background row in front of the box deltas;
    returns K."""
    cls_w = converted.get("roi_heads.predictor.cls_score.weight")
    if cls_w is None:
        raise CheckpointError("a Detectron2 model without 'roi_heads.box_predictor.cls_score.weight': not a "
                              "Faster/Mask R-CNN")
    num_classes = len(cls_w) - 1
    for part in ("weight", "bias"):
        key = f"roi_heads.predictor.cls_score.{part}"
        converted[key] = torch.cat([converted[key][-1:], converted[key][:-1]])
    rows = len(converted["roi_heads.predictor.bbox_pred.weight"])
    if rows not in (4, 4 * num_classes):
        raise CheckpointError(f"Detectron2 bbox_pred has {rows} rows for {num_classes} classes: neither 4 (class-"
                              f"agnostic) nor 4 x {num_classes}")
    for part in ("weight", "bias"):
        key = f"roi_heads.predictor.bbox_pred.{part}"
        deltas = converted[key]
        if rows == 4:
            converted[key] = deltas.repeat((num_classes + 1,) + (1,) * (deltas.dim() - 1))
            added.setdefault(_AGNOSTIC_BOXES, []).append(key)
        else:
            converted[key] = torch.cat([deltas.new_zeros((4,) + deltas.shape[1:]), deltas])
            added.setdefault(_BACKGROUND, []).append(key)
    return num_classes


def _add_mask_background(converted, num_classes: int, added) -> bool:
    """A zero background channel 0 in front of Detectron2's K mask channels; True for a class-agnostic
    mask predictor (one channel, kept as it is)."""
    channels = len(converted["roi_heads.mask_head.predictor.weight"])
    if channels == 1:
        return True
    if channels != num_classes:
        raise CheckpointError(f"Detectron2 mask predictor has {channels} channels for {num_classes} classes")
    for part in ("weight", "bias"):
        key = f"roi_heads.mask_head.predictor.{part}"
        w = converted[key]
        converted[key] = torch.cat([w.new_zeros((1,) + w.shape[1:]), w])
        added.setdefault(_BACKGROUND, []).append(key)
    return False


# Caffe2 blob name -> our ResNet key (detectron2/checkpoint/c2_model_loading.py, convert_basic_c2_names).
_C2_NORM = {"s": "weight", "b": "bias", "rm": "running_mean", "riv": "running_var"}
_C2_BRANCH2 = {"a": 1, "b": 2, "c": 3}
_C2_BLOB = re.compile(r"^(?:(?P<stem>conv1|res_conv1_bn)|res(?P<r>\d)_(?P<b>\d+)_branch(?P<branch>1|2[abc])(?P<bn>_bn)?"
                      r"|(?P<fc>fc1000))_(?P<part>w|b|s|rm|riv)$")
_MOMENTUM = "SGD momentum buffers of Caffe2's training state (not weights)"
# Detectron2's FrozenBatchNorm2d (layers/batch_norm.py, _load_from_state_dict) fills statistics a file lacks
# with mean 0 and var 1 when the file carries no module version, which a Caffe2 conversion never does; with
# its eps 1e-5 that scales by 1/sqrt(1 + 1e-5), and so does ours with these values.
_STATS = ("BN running_mean 0 and running_var 1: Caffe2's affine BN keeps only scale and bias, and these are the "
          "statistics Detectron2's FrozenBatchNorm2d fills in for it")


def _c2_name(blob: str):
    m = _C2_BLOB.match(blob)
    if not m:
        return None
    part = m["part"]
    if m["stem"] == "conv1" and part == "w":
        return "stem.conv1.weight"
    if m["stem"] == "res_conv1_bn" and part in _C2_NORM:
        return f"stem.norm1.{_C2_NORM[part]}"
    if m["fc"] and part in ("w", "b"):
        return "fc." + {"w": "weight", "b": "bias"}[part]
    if m["r"] is None:
        return None
    block = f"res{m['r']}.{m['b']}."
    if m["branch"] == "1":
        module = "shortcut.norm" if m["bn"] else "shortcut.conv"
    else:
        k = _C2_BRANCH2[m["branch"][1]]
        module = f"norm{k}" if m["bn"] else f"conv{k}"
    if m["bn"] and part in _C2_NORM:
        return f"{block}{module}.{_C2_NORM[part]}"
    if not m["bn"] and part == "w":
        return f"{block}{module}.weight"
    return None


def from_caffe2_resnet(blobs: Dict[str, torch.Tensor]) -> Conversion:
    """MSRA's R-50/R-101 or FAIR's X-101-32x8d ImageNet blobs (the Caffe2 files Detectron2 initialises from)
    as our ResNet: loads into `ResNet(...)` and as model.backbone.weights of a detector."""
    skipped: Dict[str, List[str]] = {}
    converted, unknown = {}, []
    for blob, value in blobs.items():
        if blob.endswith("_momentum"):
            skipped.setdefault(_MOMENTUM, []).append(blob)
            continue
        name = _c2_name(blob)
        if name is None:
            unknown.append(blob)
        else:
            converted[name] = value
    if unknown:
        raise CheckpointError(f"Caffe2 blobs that are not a ResNet's ({len(unknown)}): {key_list(sorted(unknown))}; "
                              "refused (only ResNet/ResNeXt ImageNet files such as R-50.pkl convert)")
    added: Dict[str, List[str]] = {}
    for key in sorted(k for k in converted if k.endswith("norm1.weight") or k.endswith("norm2.weight")
                      or k.endswith("norm3.weight") or k.endswith("shortcut.norm.weight")):
        stem = key[: -len("weight")]
        for stat, fill in (("running_mean", 0.0), ("running_var", 1.0)):
            if stem + stat not in converted:
                converted[stem + stat] = torch.full_like(converted[key], fill)
                added.setdefault(_STATS, []).append(stem + stat)
    cfg, _, expects = _backbone_settings(converted, "")
    settings = config_overrides(dict(cfg, stride_in_1x1=cfg["groups"] == 1))
    what = f"Caffe2 ImageNet ResNet ({settings}); it expects {expects}"
    return Conversion(converted, what, skipped=skipped, added=added)


def from_detectron2(state_dict: Dict[str, torch.Tensor]) -> Conversion:
    """A Detectron2 model-zoo detector or a Caffe2 ImageNet ResNet, whichever the keys say it is."""
    if any(k.startswith(("backbone.", "proposal_generator.", "roi_heads.")) for k in state_dict):
        return from_detectron2_detector(state_dict)
    if any(_c2_name(k) for k in state_dict):
        return from_caffe2_resnet(state_dict)
    raise CheckpointError("neither a Detectron2 detector ('backbone.bottom_up.' keys) nor Caffe2 ResNet blobs "
                          f"('conv1_w', 'res2_0_branch2a_w', ...): keys start with {sorted(state_dict)[:5]}")
