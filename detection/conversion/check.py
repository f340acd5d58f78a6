"""What builds models to verify a conversion (the converters are key tables and build nothing).

`verify_conversion`, on every conversion: the tensors fit the model the converter names, by a config
(`check_config_fit`) or otherwise (`Conversion.target`: `FIT_CHECKS`).
`check_conversion`, `tools/convert_weights.py --check`: the source framework's model and ours, each given its
own side of a conversion, run on the same random input, and the largest difference printed. Runs where the
other framework is importable (torchvision always; timm when installed; Detectron2 is not installable here,
so its conversions are not checked this way).
"""
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import torch

from backbones.resnet import DEPTHS, ResNet
from backbones.weights import Conversion, check_fit, check_timm_resnet_fit, convert_keys, key_list, resnet_config
from engine.errors import CheckpointError

from ..build import build_detector
from .torchvision import TORCHVISION_BUILDERS, TORCHVISION_DETECTION_KEYS

REPO = Path(__file__).resolve().parents[2]
RTOL = 1e-4  # of the largest output value: float32 through ~50 layers of the same operations


def check_config_fit(conversion: Conversion):
    """Every tensor of `conversion` has its place in the model of the config it names (`Conversion.config`,
    relative to the repository, wherever the tool runs), and that model lacks none: shapes only, the model
    is built on the meta device. A conversion that names no config passes."""
    if not conversion.config:
        return
    base, *overrides = conversion.config
    with torch.device("meta"):  # nothing is allocated or initialised
        model = build_detector(REPO / base, ["model.backbone.weights=null", "model.weights=null"] + overrides)
    source = f"the state dict converted for {base} {' '.join(overrides)}"
    fit = check_fit(model.state_dict(), conversion.state_dict, source)
    problems = [f"{len(keys)} {what}: {key_list(keys)}" for what, keys in
                [("with no place in it", fit.unexpected), ("of the model's missing", fit.missing)] if keys]
    if problems:
        raise CheckpointError(f"{source} does not fit the model it builds: " + "; ".join(problems))


def check_torchvision_fit(conversion: Conversion):
    """The tensors `to_torchvision_detector` converted load with strict=True into torchvision's detector it names
    (`Conversion.target`): shapes only, the model is built on the meta device. Problems are named as our file
    names them."""
    from torchvision.models import detection  # 2 s to import; only this check needs it

    builder, num_classes = conversion.target[1]["builder"], conversion.target[1]["num_classes"]
    with torch.device("meta"):
        model = getattr(detection, builder)(weights=None, weights_backbone=None, num_classes=num_classes)
    # Both sides in our names, so that every problem is named as the file names it.
    expected, _ = convert_keys(model.state_dict(), TORCHVISION_DETECTION_KEYS)
    ours, _ = convert_keys(conversion.state_dict, TORCHVISION_DETECTION_KEYS)
    kind = "Mask R-CNN" if builder == TORCHVISION_BUILDERS[True] else "Faster R-CNN"
    source = (f"our {kind}, converted for torchvision's {builder}(weights=None, weights_backbone=None, "
              f"num_classes={num_classes}),")
    fit = check_fit(expected, ours, source)  # a shape mismatch is an error naming every one
    problems = [f"{len(keys)} {what}: {key_list(keys, 10)}" for what, keys in
                [("of its tensors have no place there", fit.unexpected), ("of the model's are not in it", fit.missing)]
                if keys]
    if problems:
        raise CheckpointError(f"{source} does not fit the model, the ResNet-50-FPN detector torchvision builds "
                              "(3 anchors a location, 2-fc box head, 4-conv mask head without norm, a mask a "
                              "class): " + "; ".join(problems))


# Conversion.target's kind -> what builds that model to check the fit.
FIT_CHECKS = {"timm_resnet": check_timm_resnet_fit, "torchvision": check_torchvision_fit}


def verify_conversion(conversion: Conversion):
    """The tensors of `conversion` fit the model its converter names (`convert_file`'s verify): by a config,
    by `Conversion.target`, or both; a conversion that names none passes."""
    check_config_fit(conversion)
    if conversion.target:
        FIT_CHECKS[conversion.target[0]](conversion)


@dataclass
class CheckResult:
    lines: List[str]
    ok: bool

    def __str__(self):
        return "\n".join(self.lines)


def _difference(name: str, ours: torch.Tensor, theirs: torch.Tensor):
    scale = theirs.abs().max().item() if theirs.numel() else 0.0
    diff = (ours - theirs).abs().max().item() if theirs.numel() else 0.0
    ok = ours.shape == theirs.shape and diff <= RTOL * max(scale, 1.0)
    return f"  {name}: max |ours - theirs| = {diff:.3g} (largest |value| {scale:.3g})", ok


def _random_images(n=2, size=160):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def _torchvision_resnet(config: dict):
    from torchvision.models import resnet

    block = resnet.Bottleneck if DEPTHS[config["depth"]][0].__name__ == "Bottleneck" else resnet.BasicBlock
    return resnet.ResNet(block, list(DEPTHS[config["depth"]][1]), num_classes=config["num_classes"] or 1000,
                         groups=config["groups"], width_per_group=config["width_per_group"])


def _torchvision_features(model, x):
    for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
        x = getattr(model, name)(x)
    return x


def _timm_resnet(config: dict):
    from timm.layers import GroupNorm
    from timm.models import resnet

    deep = config["stem_type"] == "deep"
    block = resnet.Bottleneck if DEPTHS[config["depth"]][0].__name__ == "Bottleneck" else resnet.BasicBlock
    return resnet.ResNet(block, list(DEPTHS[config["depth"]][1]), num_classes=config["num_classes"] or 0,
                         cardinality=config["groups"], base_width=config["width_per_group"],
                         stem_width=32 if deep else 64, stem_type="deep" if deep else "",
                         avg_down=config["avg_down"],
                         norm_layer=GroupNorm if config["norm"] == "GN" else torch.nn.BatchNorm2d)


def check_resnet(framework: str, theirs_state: Dict[str, torch.Tensor], ours_state: Dict[str, torch.Tensor],
                 avg_down: bool = False) -> CheckResult:
    """Logits (or, without a classifier, the last stage's features) of the two ResNets."""
    config = dict(resnet_config(ours_state), avg_down=avg_down)
    ours = ResNet(**config).eval()
    ours.load_state_dict(ours_state, strict=False)
    theirs = (_timm_resnet if framework == "timm" else _torchvision_resnet)(config).eval()
    missing, unexpected = theirs.load_state_dict(theirs_state, strict=False)
    missing = [k for k in missing if not (config["num_classes"] is None and k.startswith("fc."))]
    if missing or unexpected:
        raise CheckpointError(f"--check: {framework}'s ResNet does not take the weights: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    x = _random_images()
    with torch.no_grad():
        if config["num_classes"]:
            what, a, b = "logits", ours(x), theirs(x)
        else:
            features = theirs.forward_features(x) if framework == "timm" else _torchvision_features(theirs, x)
            what, a, b = "res5 features", ours(x)["res5"], features
    line, ok = _difference(f"{what} on random 2x3x160x160 input", a, b)
    return CheckResult([f"--check against {framework}'s model:", line], ok)


def check_torchvision_detector(theirs_state: Dict[str, torch.Tensor], ours_state: Dict[str, torch.Tensor]):
    """FPN features on a random normalised batch, then the detections of both on one random image."""
    from torchvision.models import detection

    mask = any(k.startswith("roi_heads.mask_head.") for k in ours_state)
    classes = len(ours_state["roi_heads.predictor.cls_score.weight"])
    name = "mrcnn" if mask else "frcnn"
    ours = build_detector(REPO / "configs" / "torchvision" / f"{name}_r50_fpn.yaml",
                          [f"model.num_classes={classes - 1}", "model.backbone.weights=null"]).eval()
    ours.load_state_dict(ours_state, strict=False)
    builder = TORCHVISION_BUILDERS[mask]
    theirs = getattr(detection, builder)(weights=None, weights_backbone=None, num_classes=classes).eval()
    theirs.load_state_dict(theirs_state, strict=True)
    lines, oks = [f"--check against torchvision's {builder}:"], []
    x = _random_images(1, 256)
    with torch.no_grad():
        a, b = ours.backbone(x), theirs.backbone(x)
        for level in b:
            line, ok = _difference(f"FPN level {level} on a random 1x3x256x256 input", a[level], b[level])
            lines.append(line)
            oks.append(ok)
        # A smooth random image, so that the real weights find some objects in it.
        image = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 10, generator=torch.Generator().manual_seed(0)),
                                                size=(480, 600), mode="bilinear")[0]
        da, db = ours([image])[0], theirs([image])[0]
    n_a, n_b = len(da["boxes"]), len(db["boxes"])
    if n_a != n_b:
        lines.append(f"  detections on a random 480x600 image: ours {n_a}, theirs {n_b}")
        oks.append(False)
    else:
        line, ok = _difference(f"boxes of the {n_a} detections on a random 480x600 image", da["boxes"], db["boxes"])
        lines.append(line)
        oks.append(ok and torch.equal(da["labels"], db["labels"]))
    return CheckResult(lines, all(oks))


def check_conversion(direction: str, framework: str, source: Dict[str, torch.Tensor],
                     converted: Dict[str, torch.Tensor]) -> CheckResult:
    """Compare the model of `source` (in `framework`'s names for --from, ours for --to) with the model of
    `converted`."""
    module = {"timm": "timm", "torchvision": "torchvision", "detectron2": "detectron2"}[framework]
    if importlib.util.find_spec(module) is None:
        return CheckResult([f"--check: {module} is not importable here, so the conversion was not run against "
                            f"{framework}'s own model"], True)
    theirs, ours = (source, converted) if direction == "from" else (converted, source)
    if framework == "detectron2":
        return CheckResult(["--check: running Detectron2's model is not implemented; the conversion was not "
                            "checked against it"], True)
    if any(k.startswith("backbone.") for k in ours):
        return check_torchvision_detector(theirs, ours)
    avg_down = any(".downsample.2." in k for k in theirs)
    return check_resnet(framework, theirs, ours, avg_down)
