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

Weights. Detectron2's DetectionCheckpointer (MODEL.WEIGHTS) loads a whole detector with
`model.load_state_dict(..., strict=False)`, and torch hands the backbone only the keys under "backbone.":
an ImageNet file (keys "stem.conv1.weight" or torchvision's "conv1.weight") reaches the backbone as nothing,
and Detectron2's name-matching heuristics for Caffe2 files (MSRA's R-50.pkl) find our convolutions but none
of our norms. Either way Detectron2 only logs warnings. The backbones here therefore refuse, with one
CheckpointError naming MODEL.BACKBONE.WEIGHTS, a state dict that gives them fewer than all of their tensors;
a whole detector saved with this backbone (DetectionCheckpointer save -> load) loads as before. Loading
ImageNet files through MODEL.WEIGHTS instead would need a change to Detectron2's checkpointer for every
model, so ImageNet weights go through MODEL.BACKBONE.WEIGHTS, read when the backbone is built.

Norm folding is off in these backbones: Detectron2's own backbones run each norm after its convolution, and
`torch.jit.script`, which runs norms unfolded (TorchScript passes no modules to functions), must give the
eager module's result (Detectron2's scriptability tests compare the two with `torch.allclose`). Turn it on
for speed in eager training and inference with `backbones.norms.set_norm_folding(model.backbone, True)`.
"""
from typing import Dict, List

import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone

from engine.errors import CheckpointError, ConfigError, ToolkitError

from ..build import load_backbone_weights
from ..fpn import FPN
from ..norms import NORMS, set_norm_folding
from ..resnet import DEPTHS, STAGE_NAMES, BasicBlock, ResNet


def partial_weights_error(prefix: str, expected: List[str], given: List[str]) -> CheckpointError:
    """The one error for a state dict that fills only some (or none) of a backbone's tensors."""
    present = set(given)
    missing = [k for k in expected if k not in present]
    where = f"the backbone at {prefix[:-1]!r}" if prefix else "the backbone"
    return CheckpointError(
        f"the state dict being loaded gives {where} {len(given)} of its {len(expected)} tensors (missing "
        f"{', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}); nothing would load them, and the "
        "backbone would stay at its initialisation. Detectron2's MODEL.WEIGHTS must be a whole detector saved "
        "with this backbone. ImageNet weights (ours, or torchvision's names) go in MODEL.BACKBONE.WEIGHTS, read "
        "when the backbone is built, with MODEL.WEIGHTS=''. A Caffe2 file such as MSRA's R-50.pkl (Detectron2's "
        "default MODEL.WEIGHTS) is converted first: `python tools/convert_weights.py --from detectron2 R-50.pkl "
        "r50.pth`, then MODEL.BACKBONE.WEIGHTS=r50.pth")


class RefusesPartialWeights:
    """Loading a state dict that lacks any of the module's tensors is an error, never a partial load: torch
    passes each module only the keys under its prefix, so this sees exactly what the backbone would get.
    BatchNorm's step counters are not required (they change no output)."""

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        expected = [k for k in self.state_dict() if not k.endswith("num_batches_tracked")]
        given = [k for k in expected if prefix + k in state_dict]
        if len(given) < len(expected):
            raise partial_weights_error(prefix, expected, given)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


class Detectron2ResNet(RefusesPartialWeights, Backbone):
    """A ResNet's stages under Detectron2's names ("stem", "res2".."res5"). size_divisibility is
    Detectron2's default, 0, as for its own ResNet."""

    def __init__(self, resnet: ResNet):
        super().__init__()
        if resnet.num_classes is not None:
            raise ConfigError("Detectron2ResNet wraps a ResNet built as a backbone (num_classes=None)")
        self.body = set_norm_folding(resnet, False)

    def forward(self, x) -> Dict[str, torch.Tensor]:
        return dict(self.body(x))

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {name: ShapeSpec(channels=s.channels, stride=s.stride)
                for name, s in self.body.output_shape().items()}


class Detectron2FPN(RefusesPartialWeights, Backbone):
    """Our FPN with its levels named as Detectron2 names them: "p<k>" for stride 2^k (FPN paper's P_k)."""

    def __init__(self, fpn: FPN):
        super().__init__()
        self.fpn = set_norm_folding(fpn, False)
        self._names = {ours: f"p{level}" for ours, level in fpn.levels.items()}
        # Detectron2's FPN pads to the stride of its coarsest input (32 for res5): the extra levels above
        # it are subsampled from it and need no padding of their own. An int attribute, so that TorchScript
        # compiles the property (as Detectron2's FPN keeps it).
        self._size_divisibility = fpn.bottom_up.output_shape()[fpn.in_features[-1]].stride

    @property
    def size_divisibility(self) -> int:
        return self._size_divisibility

    @property
    def padding_constraints(self) -> Dict[str, int]:
        # Detectron2's FPN's: no square padding (its square_pad, set only by LazyConfig ViTDet recipes).
        return {"square_size": 0}

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
