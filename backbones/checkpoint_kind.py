"""What a state dict is, told from its key names, so that a file given in the wrong place gets a message
that says what it is, what was expected and what to do, instead of a list of missing keys.
"""
from dataclasses import dataclass
from typing import Dict, Iterable

CONVERT = "python tools/convert_weights.py --from {source} IN OUT"


@dataclass(frozen=True)
class Kind:
    source: str  # "ours", "torchvision", "timm", "detectron2", "caffe2" or "unknown"
    model: str  # "classifier", "resnet", "backbone", "faster_rcnn", "mask_rcnn" or "unknown"
    description: str  # e.g. "our Mask R-CNN checkpoint"

    @property
    def is_detector(self) -> bool:
        return self.model in ("faster_rcnn", "mask_rcnn")

    def hint(self) -> str:
        """What to do with a file of this kind, for files that are not ours."""
        if self.source in ("torchvision", "ours", "unknown"):
            return ""
        return f"; convert it first: {CONVERT.format(source='detectron2' if self.source == 'caffe2' else self.source)}"


def _any(keys: Iterable[str], *parts: str, start: bool = True) -> bool:
    return any((k.startswith(parts) if start else any(p in k for p in parts)) for k in keys)


def checkpoint_kind(state_dict: Dict[str, object]) -> Kind:
    keys = list(state_dict)
    # Detectron2 keeps its norms inside the convolution (conv1.norm.weight); ours are siblings (norm1).
    if _any(keys, "proposal_generator.", "backbone.fpn_lateral") or _any(keys, ".conv1.norm.", start=False):
        masks = _any(keys, "roi_heads.mask_head.")
        model = "mask_rcnn" if masks else "faster_rcnn" if _any(keys, "roi_heads.") else "backbone"
        return Kind("detectron2", model, f"a Detectron2 {_NAMES[model]} checkpoint")
    if _any(keys, "res2_0_branch2a_w", "conv1_w", "res_conv1_bn_s"):
        return Kind("caffe2", "resnet", "a Caffe2/MSRA ImageNet ResNet (blob names such as res2_0_branch2a_w)")
    if _any(keys, "backbone.body."):
        model = "mask_rcnn" if _any(keys, "roi_heads.mask_predictor.", "roi_heads.mask_head.") else "faster_rcnn"
        return Kind("torchvision", model, f"a torchvision {_NAMES[model]} checkpoint")
    if _any(keys, "conv1.0.weight") and _any(keys, "layer1."):
        return Kind("timm", "resnet", "a timm ResNet-C/D (deep stem: conv1.0, conv1.3, conv1.6)")
    if _any(keys, "layer1.") and _any(keys, "downsample.2.", start=False):
        return Kind("timm", "resnet", "a timm ResNet-D (average-pool shortcuts: downsample.1/.2)")
    if _any(keys, "layer1.0.conv1.weight"):
        model = "classifier" if "fc.weight" in state_dict else "resnet"
        return Kind("torchvision", model, f"a torchvision ResNet{' classifier' * (model == 'classifier')}")
    if _any(keys, "backbone.bottom_up."):
        masks = _any(keys, "roi_heads.mask_head.")
        model = "mask_rcnn" if masks else "faster_rcnn" if _any(keys, "roi_heads.") else "backbone"
        return Kind("ours", model, f"our {_NAMES[model]} checkpoint")
    if _any(keys, "stem.conv1.", "res2."):
        model = "classifier" if "fc.weight" in state_dict else "resnet"
        return Kind("ours", model, "our ResNet classifier" if model == "classifier" else "our ResNet backbone")
    return Kind("unknown", "unknown", f"not a checkpoint of a known kind (its keys start with {sorted(keys)[:3]})")


_NAMES = {"mask_rcnn": "Mask R-CNN", "faster_rcnn": "Faster R-CNN", "backbone": "ResNet-FPN backbone"}
