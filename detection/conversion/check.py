"""What builds models to verify a conversion (the converters are key tables and build nothing).

`verify_conversion`, on every conversion: the tensors fit the model the converter names, by a config
(`check_config_fit`) or otherwise (`Conversion.target`: `FIT_CHECKS`).
`check_conversion`, `tools/convert_weights.py --check`: the source framework's model and ours, each given its
own side of a conversion, run on the same input, and the largest differences printed. torchvision's and timm's
models run on random input; Detectron2's detectors run as its DefaultPredictor runs them, on images (its FPN
features compared on random input first), and Caffe2 ImageNet blobs load into Detectron2's ResNet as its
checkpointer loads them. Where the framework is not importable, the check fails and says so.
"""
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from backbones.resnet import DEPTHS, ResNet
from backbones.weights import Conversion, check_fit, check_timm_resnet_fit, convert_keys, key_list, resnet_config
from engine.data.decode import read_image
from engine.errors import CheckpointError

from ..build import build_detector
from ..inference import binary_masks
from ..predictor import Predictor
from .detectron2_model import (detectron2_config, detectron2_detections, detectron2_predictor, detectron2_resnet,
                               load_caffe2_blobs)
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
    reason: str = ""  # why the check could not run, where it could not

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


def _synthetic_image(height=480, width=640) -> np.ndarray:
    """A smooth random HxWx3 uint8 RGB image (seeded): blobs of colour that detectors find some objects in."""
    coarse = torch.rand(1, 3, 6, 8, generator=torch.Generator().manual_seed(0))
    image = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear")[0]
    return (image * 255).round().byte().permute(1, 2, 0).numpy()


@dataclass(frozen=True)
class Tolerances:
    """How far two correct models' detections can be apart: float32 rounding, which grows through ~60
    layers where the two frameworks sum the same products in other orders (norms folded into convolutions
    or not, other BLAS blockings), to a few 1e-5 of the values' scale (measured up to 2.4e-5; RTOL is 1e-4)."""
    score: float = RTOL  # scores are probabilities: their scale is 1
    box: float = RTOL  # of the image's larger side, the scale of the coordinates
    # Masks are pasted and thresholded: a pixel can flip only where its probability is within rounding of the
    # threshold, a few pixels of a mask's outline. A wrong mask (another class's, a shifted paste) moves far more.
    mask_pixels: float = 0.01  # of the union of the two masks, plus one pixel


def compare_detections(ours: Dict[str, torch.Tensor], theirs: Dict[str, torch.Tensor], *, image_size,
                       score_thresh: float, max_detections: int, tol: Tolerances = Tolerances()):
    """Match two detectors' detections on one image: each of theirs (highest score first) to an unmatched one
    of ours with its label, box and score within `tol`, the nearest box. Left unmatched may be only those whose
    score is within `tol.score` of a boundary where float32 rounding decides: `score_thresh` (kept if above), and,
    where a side has `max_detections`, its lowest score (the cap keeps the highest). `masks` ((N, H, W) bool),
    where both have them, must differ in at most `tol.mask_pixels` of their union. Returns (lines, ok)."""
    box_tol = tol.box * max(image_size)
    n_ours, n_theirs = len(ours["scores"]), len(theirs["scores"])
    free = torch.ones(n_ours, dtype=torch.bool)
    pairs = []
    for j in torch.argsort(theirs["scores"], descending=True).tolist():
        box_diff = (ours["boxes"] - theirs["boxes"][j]).abs().amax(1)
        fits = (free & (ours["labels"] == theirs["labels"][j]) & (box_diff <= box_tol)
                & ((ours["scores"] - theirs["scores"][j]).abs() <= tol.score))
        if fits.any():
            i = int(torch.where(fits, box_diff, torch.inf).argmin())
            free[i] = False
            pairs.append((i, j))
    matched_theirs = {j for _, j in pairs}

    def boundary(scores, n):
        low = scores.min().item() if n >= max_detections else -1.0
        return lambda s: s - score_thresh <= tol.score or (n >= max_detections and s - low <= tol.score)

    near_ours, near_theirs = boundary(ours["scores"], n_ours), boundary(theirs["scores"], n_theirs)
    lone_ours = [("ours", i, ours) for i in torch.where(free)[0].tolist() if not near_ours(ours["scores"][i].item())]
    lone_theirs = [("theirs", j, theirs) for j in range(n_theirs)
                   if j not in matched_theirs and not near_theirs(theirs["scores"][j].item())]
    lone = lone_ours + lone_theirs
    excused = (n_ours - len(pairs)) + (n_theirs - len(pairs)) - len(lone)
    lines = [f"    {n_ours} detections of ours, {n_theirs} of theirs: {len(pairs)} the same"
             + (f", {excused} on one side only with a score within {tol.score:g} of the threshold or the "
                f"{max_detections}-detection cap" if excused else "")]
    ok = not lone
    for side, k, det in lone_ours[:3] + lone_theirs[:3]:
        box = [round(v, 2) for v in det["boxes"][k].tolist()]
        lines.append(f"    only {side}: label {int(det['labels'][k])} score {det['scores'][k].item():.4f} box {box}")
    if pairs:
        i, j = map(list, zip(*pairs))
        box_diff = (ours["boxes"][i] - theirs["boxes"][j]).abs().max().item()
        score_diff = (ours["scores"][i] - theirs["scores"][j]).abs().max().item()
        lines.append(f"    the same: max |ours - theirs| boxes {box_diff:.3g} px, scores {score_diff:.3g}")
        if "masks" in ours and "masks" in theirs:
            a, b = ours["masks"][i], theirs["masks"][j]
            differ = (a ^ b).flatten(1).sum(1).float()
            union = (a | b).flatten(1).sum(1).float()
            worst = (differ / union.clamp_min(1)).max().item()
            lines.append(f"    masks: {int(differ.sum())} pixels differ in all, at most {worst:.3g} of a mask's union")
            ok = ok and bool((differ <= tol.mask_pixels * union + 1).all())
    return lines, ok


def _feature_lines(name: str, ours: Dict[str, torch.Tensor], theirs: Dict[str, torch.Tensor], pairs):
    lines, oks = [], []
    for mine, their in pairs:
        line, ok = _difference(f"{name} {their}", ours[mine], theirs[their])
        lines.append(line)
        oks.append(ok)
    return lines, all(oks)


def check_detectron2_detector(theirs_state: Dict[str, torch.Tensor], ours_state: Dict[str, torch.Tensor],
                              config: Sequence[str], images: Sequence[str] = ()) -> CheckResult:
    """Detectron2's detector of its zoo config plus the settings `config` (Conversion.config: our config and
    overrides) implies, against ours of that config: FPN features on a random input, then, where they agree,
    the detections of both on `images` (files; default a synthetic image), each run as its predictor runs it."""
    if not config:
        raise CheckpointError("--check of a Detectron2 detector needs the config its conversion names "
                              "(Conversion.config), to build both models")
    base, *overrides = config
    mask = "roi_heads.mask_head.predictor.weight" in ours_state
    agnostic = len(theirs_state["roi_heads.box_predictor.bbox_pred.weight"]) == 4
    theirs = detectron2_predictor(detectron2_config(mask, overrides, agnostic), theirs_state, "--check: the input")
    ours = Predictor(REPO / base, overrides=list(overrides) + ["model.weights=null"])
    ours.model.load_state_dict(ours_state, strict=True)
    kind = "Mask R-CNN" if mask else "Faster R-CNN"
    lines = [f"--check against Detectron2's {kind} ({' '.join(overrides) or 'R50-FPN'}):"]
    x = torch.randn(1, 3, 256, 320, generator=torch.Generator().manual_seed(0)) * 50  # ~ BGR 0-255 minus mean
    with torch.no_grad():
        a, b = ours.model.backbone(x), theirs.model.backbone(x)
    levels = [(str(i), f"p{i + 2}") for i in range(4)] + [("pool", "p6")]
    feature_lines, ok = _feature_lines("FPN on a random 1x3x256x320 input:", a, b, levels)
    lines += feature_lines
    if not ok:
        return CheckResult(lines + ["  the FPN features differ: detections not compared"], False)
    named = [(path, read_image(path)) for path in images] or [("a synthetic 480x640 image", _synthetic_image())]
    cfg = theirs.cfg
    for name, image in named:
        det_theirs = detectron2_detections(theirs, image)
        det_ours = ours(image)
        masks = binary_masks(det_ours, ours.cfg.test.mask_thresh)
        if masks is not None:
            det_ours["masks"] = torch.from_numpy(masks)
        lines.append(f"  detections on {name}, resized as {cfg.INPUT.MIN_SIZE_TEST}/{cfg.INPUT.MAX_SIZE_TEST}:")
        image_lines, image_ok = compare_detections(
            det_ours, det_theirs, image_size=image.shape[:2], score_thresh=cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST,
            max_detections=cfg.TEST.DETECTIONS_PER_IMAGE)
        lines += image_lines
        ok = ok and image_ok
    return CheckResult(lines, ok)


def check_caffe2_resnet(theirs_state: Dict[str, torch.Tensor], ours_state: Dict[str, torch.Tensor]) -> CheckResult:
    """Caffe2 ImageNet blobs loaded into Detectron2's ResNet as its checkpointer loads them, against our
    ResNet: res2..res5 on a random input (Detectron2's backbone has no classifier, so the logits are not run)."""
    config = resnet_config(ours_state)
    stride_in_1x1 = config["groups"] == 1  # MSRA's; FAIR's X-101-32x8d strides in the 3x3
    theirs = detectron2_resnet(config["depth"], config["groups"], config["width_per_group"], stride_in_1x1)
    left = load_caffe2_blobs(theirs, theirs_state)
    stages = ["res2", "res3", "res4", "res5"]
    ours = ResNet(config["depth"], None, groups=config["groups"], width_per_group=config["width_per_group"],
                  norm="FrozenBN", stride_in_1x1=stride_in_1x1, out_features=stages).eval()
    ours.load_state_dict({k: v for k, v in ours_state.items() if not k.startswith("fc.")}, strict=True)
    x = _random_images(1, 160) * 50  # ~ BGR 0-255 minus mean
    with torch.no_grad():
        lines, ok = _feature_lines("on a random 1x3x160x160 input:", ours(x), theirs(x), [(s, s) for s in stages])
    head = [f"--check against Detectron2's ResNet-{config['depth']} (build_resnet_backbone, the blobs loaded by "
            f"its Caffe2 name matching{'; not in it: ' + ', '.join(left) if left else ''}):"]
    return CheckResult(head + lines, ok)


def check_conversion(direction: str, framework: str, source: Dict[str, torch.Tensor],
                     converted: Dict[str, torch.Tensor], config: Sequence[str] = (),
                     images: Optional[Sequence[str]] = None) -> CheckResult:
    """Compare the model of `source` (in `framework`'s names for --from, ours for --to) with the model of
    `converted`. `config`: the config the conversion names (Conversion.config), which Detectron2's detectors
    need; `images`: files Detectron2's detectors and ours run on (default: a synthetic image). Fails, saying
    why, where the framework is not importable."""
    module = {"timm": "timm", "torchvision": "torchvision", "detectron2": "detectron2"}[framework]
    if importlib.util.find_spec(module) is None:
        reason = (f"{module} is not importable here, so the conversion cannot be run against {framework}'s own "
                  "model (install it, or leave out --check)")
        return CheckResult([f"--check: {reason}"], False, reason)
    theirs, ours = (source, converted) if direction == "from" else (converted, source)
    if framework == "detectron2":
        if any(k.startswith("backbone.") for k in ours):
            return check_detectron2_detector(theirs, ours, config, images or ())
        return check_caffe2_resnet(theirs, ours)
    if any(k.startswith("backbone.") for k in ours):
        return check_torchvision_detector(theirs, ours)
    avg_down = any(".downsample.2." in k for k in theirs)
    return check_resnet(framework, theirs, ours, avg_down)
