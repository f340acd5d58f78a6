"""`ResNetDet`: our ResNet with the constructor and outputs of MMDetection 3.x's `ResNet` backbone.

MMDetection builds backbones from dicts (`backbone=dict(type="ResNetDet", depth=50, ...)`) and feeds the
tuple they return to its FPN neck. `ResNetDet` takes the keyword arguments of mmdet's
`mmdet/models/backbones/resnet.py::ResNet` (and `groups`/`base_width` of its `ResNeXt`), maps those it can
honour to our `ResNet`, and refuses the others by name rather than build a different network:

    depth, in_channels, out_indices        -> depth, in_channels, out_features (0 -> res2 .. 3 -> res5)
    style="pytorch" / "caffe"               -> stride_in_1x1=False / True
    frozen_stages=-1..4                     -> freeze_at=frozen_stages + 1 (the stem is mmdet's stage 0)
    norm_cfg=dict(type=BN|SyncBN|GN, ...)   -> norm, num_groups; requires_grad=False freezes its affine
    norm_eval                               -> BatchNorm statistics stay fixed in train() (mmdet's rule)
    deep_stem, avg_down, zero_init_residual -> stem_type="deep", avg_down, zero_init_residual
    groups, base_width                      -> groups, width_per_group (ResNeXt; groups=1 ignores width)
    init_cfg=dict(type="Pretrained", checkpoint=PATH) or pretrained=PATH -> our weights reader, on
        init_weights(), which MMEngine calls on every child of the detector

This module does not import mmdet: the class works on its own, and `register` puts it in a registry.

Building through the registry (`MODELS.build`) needs full mmcv, with its compiled ops: mmengine's
`Registry.get` first imports the registry's location, `mmdet.models`, which imports `mmcv.ops`, whose
extension `mmcv._ext` mmcv-lite does not ship. `build_problem` says so before the build fails.
"""
import importlib.util
import sys
from typing import List, Optional, Sequence

from torch import nn

from engine.errors import CheckpointError, ConfigError, ToolkitError

from ..build import load_backbone_weights
from ..resnet import DEPTHS, STAGE_NAMES, ResNet

MMDET_NAME = "ResNetDet"
# mmcv's norm layer types -> ours. mmcv names BatchNorm2d both "BN" and "BN2d".
NORM_TYPES = {"BN": "BN", "BN2d": "BN", "SyncBN": "SyncBN", "GN": "GN"}
STYLES = {"pytorch": False, "caffe": True}  # -> stride_in_1x1
DEFAULT_STRIDES, DEFAULT_DILATIONS = (1, 2, 2, 2), (1, 1, 1, 1)


def _refuse(key: str, value, allowed: str, why: str = ""):
    raise ConfigError(f"{MMDET_NAME}: {key}={value!r} is not supported (only {allowed})"
                      + (f": {why}" if why else ""))


def _norm(norm_cfg) -> tuple:
    """mmcv's norm_cfg -> (our norm name, GN groups, requires_grad)."""
    norm_cfg = dict(norm_cfg if norm_cfg is not None else {"type": "BN", "requires_grad": True})
    unknown = sorted(set(norm_cfg) - {"type", "requires_grad", "num_groups"})
    if unknown:
        raise ConfigError(f"{MMDET_NAME}: norm_cfg keys {unknown} are not supported; it takes type, "
                          "requires_grad and (for GN) num_groups, with PyTorch's eps and momentum")
    kind = norm_cfg.get("type")
    if kind not in NORM_TYPES:
        _refuse("norm_cfg.type", kind, ", ".join(NORM_TYPES))
    if kind == "GN" and "num_groups" not in norm_cfg:
        raise ConfigError(f"{MMDET_NAME}: norm_cfg type GN needs num_groups (mmcv requires it too), e.g. 32")
    return NORM_TYPES[kind], int(norm_cfg.get("num_groups", 32)), bool(norm_cfg.get("requires_grad", True))


def _pretrained_path(init_cfg, pretrained):
    """The checkpoint of an init_cfg of type Pretrained (or the deprecated `pretrained`), or None."""
    if init_cfg and pretrained:
        raise ConfigError(f"{MMDET_NAME}: give init_cfg or pretrained, not both (as mmdet's ResNet)")
    if pretrained is not None:
        if not isinstance(pretrained, str):
            _refuse("pretrained", pretrained, "a path or None")
        init_cfg = {"type": "Pretrained", "checkpoint": pretrained}
    if not init_cfg:
        return None
    cfgs = [init_cfg] if isinstance(init_cfg, dict) else list(init_cfg)
    if len(cfgs) != 1 or not isinstance(cfgs[0], dict) or cfgs[0].get("type") != "Pretrained":
        _refuse("init_cfg", init_cfg, "None or dict(type='Pretrained', checkpoint=PATH)",
                "the ResNet initialises itself (He et al. 2015), so only loading weights is configurable")
    unknown = sorted(set(cfgs[0]) - {"type", "checkpoint", "map_location"})
    if unknown:
        raise ConfigError(f"{MMDET_NAME}: init_cfg keys {unknown} are not supported; it takes type="
                          "'Pretrained', checkpoint and map_location (weights are always read on the CPU)")
    path = cfgs[0].get("checkpoint")
    if not isinstance(path, str) or not path:
        _refuse("init_cfg.checkpoint", path, "the path of a weights file")
    if "://" in path:
        _refuse("init_cfg.checkpoint", path, "a local file",
                "MMEngine's URL schemes (torchvision://, open-mmlab://, http://) are not read here; "
                "download the file and give its path (torchvision's ImageNet ResNets load as they are)")
    return path


class ResNetDet(ResNet):
    """Our ResNet as an MMDetection backbone: returns a tuple of the stages in `out_indices`.

    The state dict is our ResNet's (stem.*, res2.* .. res5.*), so weights move between this class, our
    detectors and `backbones.resnet50()` unchanged.
    """

    def __init__(self, depth: int = 50, *, in_channels: int = 3, stem_channels=None, base_channels: int = 64,
                 num_stages: int = 4, strides: Sequence[int] = DEFAULT_STRIDES,
                 dilations: Sequence[int] = DEFAULT_DILATIONS, out_indices: Sequence[int] = (0, 1, 2, 3),
                 style: str = "pytorch", deep_stem: bool = False, avg_down: bool = False,
                 frozen_stages: int = -1, conv_cfg=None, norm_cfg=None, norm_eval: bool = True, dcn=None,
                 stage_with_dcn: Sequence[bool] = (False, False, False, False), plugins=None,
                 with_cp: bool = False, zero_init_residual: bool = True, groups: int = 1,
                 base_width: int = 4, pretrained=None, init_cfg=None, **unknown):
        if unknown:
            raise ConfigError(f"{MMDET_NAME}: unknown arguments {sorted(unknown)}; it takes the arguments of "
                              "mmdet's ResNet (depth, out_indices, style, frozen_stages, norm_cfg, norm_eval, "
                              "deep_stem, avg_down, zero_init_residual, init_cfg, ...) and groups, base_width")
        if depth not in DEPTHS:
            _refuse("depth", depth, ", ".join(map(str, DEPTHS)))
        # Arguments whose other values would build a network this ResNet cannot.
        if stem_channels not in (None, 64):
            _refuse("stem_channels", stem_channels, "None or 64")
        if base_channels != 64:
            _refuse("base_channels", base_channels, "64")
        if not 1 <= num_stages <= 4:
            _refuse("num_stages", num_stages, "1 to 4")
        if tuple(strides) != DEFAULT_STRIDES[:num_stages]:
            _refuse("strides", strides, f"{DEFAULT_STRIDES[:num_stages]}")
        if tuple(dilations) != DEFAULT_DILATIONS[:num_stages]:
            _refuse("dilations", dilations, f"{DEFAULT_DILATIONS[:num_stages]}",
                    "mmdet dilates every block of a stage, our ResNet keeps the first block's dilation "
                    "(torchvision's rule), so the two would compute different things")
        for key, value, default in (("conv_cfg", conv_cfg, None), ("dcn", dcn, None), ("plugins", plugins, None),
                                    ("with_cp", with_cp, False)):
            if value != default:
                _refuse(key, value, repr(default))
        if any(stage_with_dcn):
            _refuse("stage_with_dcn", stage_with_dcn, "all False", "deformable convolution is not implemented")
        if style not in STYLES:
            _refuse("style", style, "'pytorch' or 'caffe'")
        if not -1 <= frozen_stages <= num_stages:
            _refuse("frozen_stages", frozen_stages, f"-1 (nothing) to {num_stages}")
        out_indices = sorted(set(out_indices))
        if not out_indices or any(not 0 <= i < num_stages for i in out_indices):
            _refuse("out_indices", out_indices, f"indices 0..{num_stages - 1} of the stages res2..res5")
        norm, num_groups, norm_requires_grad = _norm(norm_cfg)
        checkpoint = _pretrained_path(init_cfg, pretrained)

        super().__init__(depth, num_classes=None, in_channels=in_channels,
                         out_features=[STAGE_NAMES[i] for i in out_indices], groups=groups,
                         # mmdet's ResNeXt: with one group the bottleneck keeps its plain width.
                         width_per_group=64 if groups == 1 else base_width,
                         norm=norm, num_groups=num_groups, freeze_at=frozen_stages + 1,
                         stride_in_1x1=STYLES[style], zero_init_residual=zero_init_residual,
                         stem_type="deep" if deep_stem else "basic", avg_down=avg_down)
        self.out_indices = tuple(out_indices)
        self.norm_eval = norm_eval
        self.init_cfg = {"type": "Pretrained", "checkpoint": checkpoint} if checkpoint else None
        self._checkpoint = checkpoint
        self.is_init = False  # read by MMEngine's BaseModule.init_weights before it calls ours
        if not norm_requires_grad:
            for m in self.modules():
                if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)):
                    for p in m.parameters():
                        p.requires_grad_(False)

    def init_weights(self):
        """Load `init_cfg`'s checkpoint (our names or torchvision's). Construction already initialised
        every layer, so without a checkpoint there is nothing to do."""
        if self._checkpoint is not None:
            try:
                load_backbone_weights(self, self._checkpoint)
            except CheckpointError as e:
                raise CheckpointError(f"{MMDET_NAME} init_cfg.checkpoint: {e}") from None
        self.is_init = True

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.norm_eval:
            # mmdet's norm_eval: BatchNorm keeps its ImageNet statistics while its affine still trains.
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, x):
        return tuple(self.forward_features(x).values())


def build_problem() -> Optional[str]:
    """Why `mmdet.registry.MODELS.build` cannot build models in this environment, or None when it can (as
    far as mmcv goes). Imports nothing but mmcv's package, which mmdet imports anyway."""
    if "mmdet.models" in sys.modules:  # imported already: the registry lookups will not import it again
        return None
    try:
        if importlib.util.find_spec("mmcv._ext") is not None:
            return None
        missing = "mmcv is installed without its compiled ops (mmcv._ext; mmcv-lite ships none)"
    except ImportError:  # find_spec imports the parent package, mmcv
        missing = "mmcv is not installed"
    mmdet = sys.modules.get("mmdet")
    versions = (f"mmcv>={mmdet.mmcv_minimum_version},<{mmdet.mmcv_maximum_version}"
                if hasattr(mmdet, "mmcv_minimum_version") and hasattr(mmdet, "mmcv_maximum_version")
                else "mmcv 2.x")
    return (f"{missing}: {MMDET_NAME} is registered in mmdet.registry.MODELS, but MODELS.build() of it or any "
            "model fails, since mmengine imports mmdet.models before the lookup and mmdet.models imports "
            f"mmcv.ops. Install full mmcv built with its ops ({versions}, e.g. with `mim install`) to build "
            f"detectors; {MMDET_NAME}(...) itself works without it")


def register(registry, name: str = MMDET_NAME) -> List[str]:
    """Put `ResNetDet` in an MMEngine registry (mmdet.registry.MODELS). Registering again is a no-op, and
    a reloaded module replaces its earlier self; another class under the same name is an error."""
    existing = registry.module_dict.get(name)
    if existing is None or existing is ResNetDet:
        if existing is None:
            registry.register_module(name=name, module=ResNetDet)
    elif (getattr(existing, "__module__", None), getattr(existing, "__qualname__", None)) == (
            ResNetDet.__module__, ResNetDet.__qualname__):
        registry.register_module(name=name, module=ResNetDet, force=True)
    else:
        raise ToolkitError(f"{name!r} is already registered in {registry.name} by "
                           f"{getattr(existing, '__module__', '?')}; cannot register {ResNetDet.__module__}'s")
    return [name]
