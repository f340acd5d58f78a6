"""Our ResNet and ResNet-FPN as Detectron2 backbones, built from Detectron2's own config keys.

Imported by `backbones.adapters` only when detectron2 is installed (it subclasses
`detectron2.modeling.Backbone`). `register()` adds three builders to `BACKBONE_REGISTRY`, each with
Detectron2's signature `fn(cfg, input_shape)`; choose one with `cfg.MODEL.BACKBONE.NAME`:

    build_resnet_det_backbone                 res2..res5 (MODEL.RESNETS.OUT_FEATURES), like build_resnet_backbone
    build_resnet_det_fpn_backbone             p2..p6, like build_resnet_fpn_backbone (P6 by max pool)
    build_resnet_det_retinanet_fpn_backbone   p3..p7, like build_retinanet_resnet_fpn_backbone (P6, P7 from C5)

Keys read (names as in detectron2/config/defaults.py): MODEL.RESNETS.{DEPTH, OUT_FEATURES, NUM_GROUPS,
WIDTH_PER_GROUP, STRIDE_IN_1X1, NORM, STEM_OUT_CHANNELS, RES2_OUT_CHANNELS, RES5_DILATION,
DEFORM_ON_PER_STAGE}, MODEL.BACKBONE.FREEZE_AT, MODEL.FPN.{IN_FEATURES, OUT_CHANNELS, NORM, FUSE_TYPE}, and
our optional MODEL.BACKBONE.WEIGHTS (ImageNet weights, ours or torchvision's; `add_resnet_det_config`
declares it so YAML files can set it). A value that would build a network other than the one Detectron2
would build is refused with the key's name.
"""
from typing import Dict, List

import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone

from engine.errors import ConfigError, ToolkitError

from ..build import load_backbone_weights
from ..fpn import FPN
from ..norms import NORMS
from ..resnet import DEPTHS, STAGE_NAMES, BasicBlock, ResNet


class Detectron2ResNet(Backbone):
    """A ResNet's stages under Detectron2's names ("stem", "res2".."res5"). size_divisibility is
    Detectron2's default, 0, as for its own ResNet."""

    def __init__(self, resnet: ResNet):
        super().__init__()
        if resnet.num_classes is not None:
            raise ConfigError("Detectron2ResNet wraps a ResNet built as a backbone (num_classes=None)")
        self.body = resnet

    def forward(self, x) -> Dict[str, torch.Tensor]:
        return dict(self.body(x))

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {name: ShapeSpec(channels=s.channels, stride=s.stride)
                for name, s in self.body.output_shape().items()}


class Detectron2FPN(Backbone):
    """Our FPN with its levels named as Detectron2 names them: "p<k>" for stride 2^k (FPN paper's P_k)."""

    def __init__(self, fpn: FPN):
        super().__init__()
        self.fpn = fpn
        self._names = {ours: f"p{level}" for ours, level in fpn.levels.items()}

    @property
    def size_divisibility(self) -> int:
        # Detectron2's FPN pads to the stride of its coarsest input (32 for res5): the extra levels above
        # it are subsampled from it and need no padding of their own.
        return self.fpn.bottom_up.output_shape()[self.fpn.in_features[-1]].stride

    def forward(self, x) -> Dict[str, torch.Tensor]:
        return {self._names[name]: value for name, value in self.fpn(x).items()}

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {self._names[name]: ShapeSpec(channels=s.channels, stride=s.stride)
                for name, s in self.fpn.output_shape().items()}


def _refuse(key: str, value, allowed: str, why: str = ""):
    raise ConfigError(f"{key}={value!r} is not supported by backbones.adapters (only {allowed})"
                      + (f": {why}" if why else ""))


def add_resnet_det_config(cfg):
    """Declare MODEL.BACKBONE.WEIGHTS (ImageNet weights for our ResNet; "" for none), as Detectron2
    projects declare their keys, so that `cfg.merge_from_file` accepts it."""
    if "WEIGHTS" not in cfg.MODEL.BACKBONE:
        cfg.MODEL.BACKBONE.WEIGHTS = ""
    return cfg


def resnet_from_cfg(cfg, input_shape, out_features) -> ResNet:
    """Our ResNet as MODEL.RESNETS and MODEL.BACKBONE describe it, returning `out_features`."""
    r = cfg.MODEL.RESNETS
    depth = r.DEPTH
    if depth not in DEPTHS:
        _refuse("MODEL.RESNETS.DEPTH", depth, ", ".join(map(str, DEPTHS)))
    basic = DEPTHS[depth][0] is BasicBlock
    if r.NORM not in NORMS:
        _refuse("MODEL.RESNETS.NORM", r.NORM, ", ".join(NORMS))
    if r.STEM_OUT_CHANNELS != 64:
        _refuse("MODEL.RESNETS.STEM_OUT_CHANNELS", r.STEM_OUT_CHANNELS, "64")
    res2 = 64 * DEPTHS[depth][0].expansion
    if r.RES2_OUT_CHANNELS != res2:
        _refuse("MODEL.RESNETS.RES2_OUT_CHANNELS", r.RES2_OUT_CHANNELS, f"{res2} for depth {depth}")
    if r.RES5_DILATION != 1:
        _refuse("MODEL.RESNETS.RES5_DILATION", r.RES5_DILATION, "1",
                "Detectron2 dilates every res5 block, our ResNet keeps the first block's dilation "
                "(torchvision's rule), so the two would compute different things")
    if any(r.DEFORM_ON_PER_STAGE):
        _refuse("MODEL.RESNETS.DEFORM_ON_PER_STAGE", list(r.DEFORM_ON_PER_STAGE), "all False",
                "deformable convolution is not implemented")
    if basic and r.NUM_GROUPS != 1:
        _refuse("MODEL.RESNETS.NUM_GROUPS", r.NUM_GROUPS, f"1 for depth {depth}")
    freeze_at = cfg.MODEL.BACKBONE.FREEZE_AT
    if not 0 <= freeze_at <= 5:
        _refuse("MODEL.BACKBONE.FREEZE_AT", freeze_at, "0 (nothing) to 5 (stem and res2..res5)")
    unknown = [f for f in out_features if f not in ("stem",) + STAGE_NAMES]
    if unknown:
        _refuse("MODEL.RESNETS.OUT_FEATURES", list(out_features), f"names among stem, {', '.join(STAGE_NAMES)}")
    resnet = ResNet(depth, num_classes=None, in_channels=input_shape.channels or 3, out_features=list(out_features),
                    # Detectron2's basic blocks ignore the width keys, so a config that sets them still builds.
                    groups=1 if basic else r.NUM_GROUPS, width_per_group=64 if basic else r.WIDTH_PER_GROUP,
                    norm=r.NORM, freeze_at=freeze_at, stride_in_1x1=r.STRIDE_IN_1X1)
    weights = cfg.MODEL.BACKBONE.get("WEIGHTS", "")
    if weights:
        load_backbone_weights(resnet, weights)
    return resnet


def fpn_from_cfg(cfg, input_shape, top_block: str) -> FPN:
    f = cfg.MODEL.FPN
    in_features = list(f.IN_FEATURES)
    if not in_features:
        raise ConfigError("MODEL.FPN.IN_FEATURES is empty (Detectron2's default); set the ResNet stages the "
                          "FPN reads, e.g. [res2, res3, res4, res5]")
    missing = [x for x in in_features if x not in cfg.MODEL.RESNETS.OUT_FEATURES]
    if missing:
        raise ConfigError(f"MODEL.FPN.IN_FEATURES has {missing}, which MODEL.RESNETS.OUT_FEATURES="
                          f"{list(cfg.MODEL.RESNETS.OUT_FEATURES)} does not produce")
    if f.FUSE_TYPE != "sum":
        _refuse("MODEL.FPN.FUSE_TYPE", f.FUSE_TYPE, "'sum'", "the FPN paper's top-down sum")
    if f.NORM not in ("",) + NORMS:
        _refuse("MODEL.FPN.NORM", f.NORM, "'' or " + ", ".join(NORMS))
    if top_block == "p6p7" and in_features[-1] != "res5":
        _refuse("MODEL.FPN.IN_FEATURES", in_features, "a list ending in res5 for RetinaNet",
                "Detectron2 computes P6 from res5")
    resnet = resnet_from_cfg(cfg, input_shape, in_features)
    if top_block == "p6p7" and resnet.output_shape()["res5"].channels == f.OUT_CHANNELS:
        _refuse("MODEL.FPN.OUT_CHANNELS", f.OUT_CHANNELS, "a width other than res5's",
                "with equal widths our FPN starts P6 from P5, Detectron2's RetinaNet from C5")
    # Detectron2's GN has 32 groups, our FPN's default.
    return FPN(resnet, in_features, out_channels=f.OUT_CHANNELS, norm=f.NORM, top_block=top_block)


def build_resnet_det_backbone(cfg, input_shape):
    return Detectron2ResNet(resnet_from_cfg(cfg, input_shape, list(cfg.MODEL.RESNETS.OUT_FEATURES)))


def build_resnet_det_fpn_backbone(cfg, input_shape):
    return Detectron2FPN(fpn_from_cfg(cfg, input_shape, "maxpool"))


def build_resnet_det_retinanet_fpn_backbone(cfg, input_shape):
    return Detectron2FPN(fpn_from_cfg(cfg, input_shape, "p6p7"))


BUILDERS = (build_resnet_det_backbone, build_resnet_det_fpn_backbone, build_resnet_det_retinanet_fpn_backbone)


def register(registry=BACKBONE_REGISTRY) -> List[str]:
    """Put the builders in Detectron2's backbone registry under their function names. A name already
    holding the same builder (registered before, or by an earlier load of this module) is left as it is,
    since fvcore's Registry refuses to register a name twice; another object under the name is an error."""
    for builder in BUILDERS:
        try:
            existing = registry.get(builder.__name__)
        except KeyError:
            registry.register(builder)
            continue
        if (getattr(existing, "__module__", None), getattr(existing, "__qualname__", None)) != (
                builder.__module__, builder.__qualname__):
            raise ToolkitError(f"{builder.__name__!r} is already registered in Detectron2's BACKBONE_REGISTRY "
                               f"by {getattr(existing, '__module__', '?')}; cannot register {builder.__module__}'s")
    return [b.__name__ for b in BUILDERS]
