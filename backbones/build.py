"""Config -> modules. Each `model.backbone.*` key is the ResNet constructor argument of the same name,
and each `model.fpn.*` key the FPN argument of the same name.
"""
import logging
import shlex
from pathlib import Path

from engine.errors import CheckpointError, ConfigError

from .fpn import FPN
from .resnet import ResNet
from .weights import Accepts, from_torchvision_resnet, load_weights

logger = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[1]

# model.backbone keys that are ResNet constructor arguments (the rest: depth, weights, out_features).
RESNET_OPTIONS = ("groups", "width_per_group", "norm", "num_groups", "freeze_at", "stride_in_1x1",
                  "zero_init_residual", "dilation", "shortcut", "plain", "stem_type", "avg_down")


def resnet_options(backbone_cfg) -> dict:
    return {k: backbone_cfg[k] for k in RESNET_OPTIONS if k in backbone_cfg}


def missing_backbone_file(path: str, depth: int) -> CheckpointError:
    """The error for a model.backbone.weights file that does not exist, saying the two ways to make one.
    Only training from ImageNet weights reads this file: a trained detector (--weights, model.weights)
    holds its backbone, so the message says that too."""
    cls_config = f"configs/cls_r{depth}.yaml"
    cls_config = cls_config if (REPO / cls_config).is_file() else "configs/cls_r50.yaml"
    return CheckpointError(
        f"model.backbone.weights={path} not found: it holds the ImageNet weights that start the ResNet for "
        f"training. Make it by training a classifier, `python tools/train_cls.py {cls_config}` (writes backbone.pth "
        f"in its output_dir; point model.backbone.weights there), or by converting torchvision's: save "
        f"torchvision.models.resnet{depth}(weights='IMAGENET1K_V1').state_dict() as resnet{depth}-tv.pth, then "
        f"`python tools/convert_weights.py --from torchvision resnet{depth}-tv.pth {shlex.quote(path)}`; or set "
        "model.backbone.weights=null to start from random initialisation. A trained detector needs no such "
        "file: give it with --weights or model.weights")


# model.backbone.weights: ImageNet weights, ours or torchvision's (converted on the fly), with or without the
# classifier.
BACKBONE_WEIGHTS = Accepts(
    "a ResNet classifier or backbone",
    {("ours", "classifier"): None, ("ours", "resnet"): None,
     ("torchvision", "classifier"): from_torchvision_resnet, ("torchvision", "resnet"): from_torchvision_resnet},
    model="ResNet",
    elsewhere=dict.fromkeys(("faster_rcnn", "mask_rcnn", "backbone"),
                            " (a detector's checkpoint goes in model.weights)"))
# A classifier's model.weights: the whole classifier.
CLASSIFIER_WEIGHTS = Accepts(
    "a ResNet classifier",
    {("ours", "classifier"): None, ("torchvision", "classifier"): from_torchvision_resnet},
    model="ResNet",
    elsewhere={"resnet": " (ImageNet weights for fine-tuning go in model.backbone.weights)"})


def load_backbone_weights(resnet: ResNet, path: str):
    """ImageNet weights into a ResNet: ours, or torchvision's names (converted on the fly). Another kind
    of file (a detector, or weights another converter handles) is refused, saying what it is. Logs what was
    loaded, and names what was not (a classifier's fc.*, tensors left at initialisation)."""
    return load_weights(resnet, path, "model.backbone.weights", BACKBONE_WEIGHTS,
                        missing_file=missing_backbone_file(path, resnet.depth))


def build_resnet(cfg, num_classes, out_features=None, init_weights: bool = True) -> ResNet:
    """`init_weights`: load model.backbone.weights. False where a whole-model file will fill the ResNet
    anyway (a detector's weights), so that the ImageNet file is neither opened nor required."""
    b = cfg["model"]["backbone"]
    model = ResNet(b["depth"], num_classes, out_features=out_features, **resnet_options(b))
    if init_weights and b.get("weights"):
        load_backbone_weights(model, b["weights"])
    return model


def build_classifier(cfg) -> ResNet:
    path = cfg["model"].get("weights")
    # model.weights is the whole classifier: model.backbone.weights is not opened then.
    model = build_resnet(cfg, cfg["model"]["num_classes"], init_weights=not path)
    if path:
        load_weights(model, path, "model.weights", CLASSIFIER_WEIGHTS)
    return model


def build_backbone(cfg, init_weights: bool = True) -> FPN:
    """ResNet + FPN as configured under `model.backbone` and `model.fpn`; `init_weights` as in `build_resnet`."""
    b, f = cfg["model"]["backbone"], cfg["model"]["fpn"]
    body = build_resnet(cfg, None, out_features=b["out_features"], init_weights=init_weights)
    return FPN(body, b["out_features"], out_channels=f["out_channels"], norm=f["norm"],
               top_block=f["top_block"], num_groups=b.get("num_groups", 32))


MODELS = {"classifier": build_classifier, "resnet_fpn": build_backbone}


def build_model(cfg):
    name = cfg["model"]["name"]
    if name not in MODELS:
        raise ConfigError(f"unknown model.name {name!r}; valid: {', '.join(MODELS)}")
    return MODELS[name](cfg)
