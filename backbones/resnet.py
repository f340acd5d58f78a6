"""ResNet (He et al. 2015), its ResNeXt and wide variants, and the paper's plain baselines.

Module names follow the paper's stage names: `stem`, then `res2`..`res5` (conv2_x..conv5_x in Table 1),
each block with `conv{i}`/`norm{i}` and an optional `shortcut`. Parameter counts equal torchvision's for
the same architecture; `backbones.weights` maps between the two naming schemes.
"""
from collections import OrderedDict
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import ConfigError, DatasetError

from .base import Backbone, ShapeSpec
from .norms import FoldedSequential, FoldsNorms, FrozenBatchNorm2d, conv_norm, get_norm

SHORTCUTS = ("A", "B", "C")
STEM_TYPES = ("basic", "deep")
STAGE_NAMES = ("res2", "res3", "res4", "res5")


class ZeroPadShortcut(nn.Module):
    """Option A of the paper (Sec. 3.3): identity with stride-s subsampling and zero channels appended."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        if out_channels < in_channels:
            raise ConfigError("shortcut option A cannot reduce channels "
                              f"({in_channels} -> {out_channels}); use option B or C")
        self.extra = out_channels - in_channels
        self.stride = stride

    def forward(self, x):
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra)) if self.extra else x


class Projection(FoldsNorms, nn.Module):
    """Options B and C: a strided 1x1 convolution and a norm (Eq. 2, W_s).

    With `avg_down`, a 2x2 average pool does the striding and the 1x1 has stride 1 (ResNet-D, He et al.
    2019 "Bag of Tricks", Sec. 4.1, Fig. 2c): a strided 1x1 ignores three quarters of its input.
    """

    def __init__(self, in_channels, out_channels, stride, norm, num_groups, avg_down=False):
        super().__init__()
        pool = avg_down and stride > 1
        # ceil_mode as in timm's ResNet-D: an odd size H gives ceil(H / 2), as the strided 3x3 of the block.
        self.pool = nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False) if pool else None
        self.conv = nn.Conv2d(in_channels, out_channels, 1, stride=1 if pool else stride, bias=False)
        self.norm = get_norm(norm, out_channels, num_groups)

    def forward(self, x):
        if self.pool is not None:
            x = self.pool(x)
        if torch.jit.is_scripting():  # TorchScript passes no modules to functions: unfolded there
            return self.norm(self.conv(x))
        return conv_norm(self.conv, self.norm, x, self.fold_norms)


def make_shortcut(in_channels, out_channels, stride, shortcut, plain, norm, num_groups, avg_down=False):
    """None means identity (or, for plain networks, no shortcut at all; the block checks `plain`)."""
    if plain:
        return None
    if shortcut not in SHORTCUTS:
        raise ConfigError(f"unknown shortcut option {shortcut!r}; valid values: A, B, C")
    shape_changes = in_channels != out_channels or stride != 1
    if shortcut == "C" or (shortcut == "B" and shape_changes):
        return Projection(in_channels, out_channels, stride, norm, num_groups, avg_down)
    if shortcut == "A" and shape_changes:
        return ZeroPadShortcut(in_channels, out_channels, stride)
    return None


class BasicBlock(FoldsNorms, nn.Module):
    """Two 3x3 convolutions (Fig. 5 left); used by ResNet-18/34 and the CIFAR networks."""

    expansion = 1

    def __init__(self, in_channels, out_channels, *, stride=1, dilation=1, first_dilation=None,
                 groups=1, width_per_group=64, stride_in_1x1=False, norm="BN", num_groups=32,
                 shortcut="B", plain=False, avg_down=False):
        super().__init__()
        if groups != 1 or width_per_group != 64:
            raise ConfigError("BasicBlock (ResNet-18/34, CIFAR) supports only groups=1 and "
                              "width_per_group=64; use depth >= 50 for ResNeXt or wide variants")
        first_dilation = first_dilation or dilation
        self.plain = plain
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=first_dilation,
                               dilation=first_dilation, bias=False)
        self.norm1 = get_norm(norm, out_channels, num_groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=dilation, dilation=dilation,
                               bias=False)
        self.norm2 = get_norm(norm, out_channels, num_groups)
        self.shortcut = make_shortcut(in_channels, out_channels, stride, shortcut, plain, norm,
                                      num_groups, avg_down)

    @property
    def last_norm(self):
        return self.norm2

    def forward(self, x):
        if torch.jit.is_scripting():  # TorchScript passes no modules to functions: unfolded there
            out = F.relu(self.norm1(self.conv1(x)), inplace=True)
            out = self.norm2(self.conv2(out))
        else:
            out = F.relu(conv_norm(self.conv1, self.norm1, x, self.fold_norms), inplace=True)
            out = conv_norm(self.conv2, self.norm2, out, self.fold_norms)
        if not self.plain:
            out += x if self.shortcut is None else self.shortcut(x)  # in place: no new activation
        return F.relu(out, inplace=True)


class Bottleneck(FoldsNorms, nn.Module):
    """1x1 reduce, 3x3 (grouped for ResNeXt), 1x1 expand (Fig. 5 right); ResNet-50 and deeper.

    `stride_in_1x1=True` puts the stride in the first 1x1 as the original MSRA/Caffe2 models do;
    the default puts it in the 3x3 (torchvision's "v1.5"), which costs more FLOPs and is more accurate.
    """

    expansion = 4

    def __init__(self, in_channels, out_channels, *, stride=1, dilation=1, first_dilation=None,
                 groups=1, width_per_group=64, stride_in_1x1=False, norm="BN", num_groups=32,
                 shortcut="B", plain=False, avg_down=False):
        super().__init__()
        first_dilation = first_dilation or dilation
        planes = out_channels // self.expansion
        # ResNeXt (Xie et al. 2017, Table 1): bottleneck width = groups x width_per_group at res2.
        width = int(planes * (width_per_group / 64.0)) * groups
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.plain = plain
        self.conv1 = nn.Conv2d(in_channels, width, 1, stride=stride_1x1, bias=False)
        self.norm1 = get_norm(norm, width, num_groups)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride_3x3, padding=first_dilation,
                               dilation=first_dilation, groups=groups, bias=False)
        self.norm2 = get_norm(norm, width, num_groups)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.norm3 = get_norm(norm, out_channels, num_groups)
        self.shortcut = make_shortcut(in_channels, out_channels, stride, shortcut, plain, norm,
                                      num_groups, avg_down)

    @property
    def last_norm(self):
        return self.norm3

    def forward(self, x):
        if torch.jit.is_scripting():  # TorchScript passes no modules to functions: unfolded there
            out = F.relu(self.norm1(self.conv1(x)), inplace=True)
            out = F.relu(self.norm2(self.conv2(out)), inplace=True)
            out = self.norm3(self.conv3(out))
        else:
            out = F.relu(conv_norm(self.conv1, self.norm1, x, self.fold_norms), inplace=True)
            out = F.relu(conv_norm(self.conv2, self.norm2, out, self.fold_norms), inplace=True)
            out = conv_norm(self.conv3, self.norm3, out, self.fold_norms)
        if not self.plain:
            out += x if self.shortcut is None else self.shortcut(x)  # in place: no new activation
        return F.relu(out, inplace=True)


def make_stage(block, num_blocks, in_channels, out_channels, stride, dilation=1,
               first_dilation=None, **block_kwargs) -> nn.Sequential:
    """`num_blocks` blocks; the first one changes stride and width, the rest keep them."""
    blocks = []
    for i in range(num_blocks):
        blocks.append(block(in_channels, out_channels, stride=stride if i == 0 else 1,
                            dilation=dilation, first_dilation=first_dilation if i == 0 else dilation,
                            **block_kwargs))
        in_channels = out_channels
    return nn.Sequential(*blocks)


# Table 1 of the paper: block type and number of blocks in conv2_x..conv5_x.
DEPTHS = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}


def make_stem(stem_type: str, in_channels: int, norm: str, num_groups: int) -> nn.Sequential:
    """Stride 4 and 64 channels: the paper's 7x7 convolution ("basic"), or three 3x3 convolutions of 32,
    32 and 64 channels ("deep": ResNet-C and -D of He et al. 2019 "Bag of Tricks", Sec. 4.1, Fig. 2b).
    Then a 3x3 max pool."""
    if stem_type not in STEM_TYPES:
        raise ConfigError(f"unknown stem_type {stem_type!r}; valid values: {', '.join(STEM_TYPES)}")
    layers = OrderedDict()
    if stem_type == "basic":
        layers["conv1"] = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        layers["norm1"] = get_norm(norm, 64, num_groups)
    else:
        for i, (c_in, c_out, stride) in enumerate([(in_channels, 32, 2), (32, 32, 1), (32, 64, 1)], start=1):
            layers[f"conv{i}"] = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
            layers[f"norm{i}"] = get_norm(norm, c_out, num_groups)
            if i < 3:
                layers[f"relu{i}"] = nn.ReLU(inplace=True)
    layers["relu"] = nn.ReLU(inplace=True)
    layers["pool"] = nn.MaxPool2d(3, stride=2, padding=1)
    return FoldedSequential(layers)


def init_weights(model: nn.Module, zero_init_residual: bool):
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            # He et al. 2015 ("Delving deep into rectifiers"), as in the paper's Sec. 3.4.
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if zero_init_residual:
        # Goyal et al. 2017: each residual branch starts as zero, so every block starts as identity.
        for m in model.modules():
            if isinstance(m, (BasicBlock, Bottleneck)) and hasattr(m.last_norm, "weight"):
                nn.init.zeros_(m.last_norm.weight)


def check_images(x, in_channels: int, who: str):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{who} expects a tensor of images (N, {in_channels}, H, W), got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != in_channels:
        raise DatasetError(f"{who} expects images of shape (N, {in_channels}, H, W), got {tuple(x.shape)}")


def freeze_module(module: nn.Module) -> nn.Module:
    """No gradients and fixed norm statistics: what `freeze_at` does to the stem and early stages."""
    for p in module.parameters():
        p.requires_grad_(False)
    return FrozenBatchNorm2d.convert_frozen_batchnorm(module)


class ResNet(Backbone):
    """ImageNet ResNet. With `num_classes` it is a classifier returning logits; with `num_classes=None`
    it is a backbone returning an OrderedDict of the stages named in `out_features`.

    Args:
        depth: 18, 34, 50, 101 or 152 (Table 1).
        groups, width_per_group: ResNeXt cardinality and per-group width (32, 8 for 32x8d);
            width_per_group=128 gives the wide ResNets.
        norm: "BN", "FrozenBN", "SyncBN" or "GN"; num_groups: groups of GN.
        freeze_at: 0 freezes nothing, 1 the stem, k the stem and res2..res{k}.
        stride_in_1x1: stride of bottleneck blocks in the first 1x1 (MSRA/Caffe2) instead of the 3x3.
        zero_init_residual: start each residual branch's last norm at zero.
        dilation: for res3, res4, res5, whether to replace the stride with dilation (dense prediction).
        shortcut: the paper's option "A" (zero-padded identity), "B" (projections where the shape
            changes) or "C" (projections everywhere).
        plain: no shortcuts at all (the paper's plain baselines).
        stem_type: "basic" (one 7x7 convolution) or "deep" (three 3x3 convolutions, ResNet-C/D).
        avg_down: projection shortcuts average-pool, then apply a stride-1 1x1 (ResNet-D).
        out_features: stages returned in backbone mode; stages past the last one are not built.
    """

    def __init__(self, depth: int = 50, num_classes: Optional[int] = 1000, *, groups: int = 1,
                 width_per_group: int = 64, norm: str = "BN", num_groups: int = 32,
                 freeze_at: int = 0, stride_in_1x1: bool = False, zero_init_residual: bool = False,
                 dilation: Sequence[bool] = (False, False, False), shortcut: str = "B",
                 plain: bool = False, out_features: Optional[Sequence[str]] = None,
                 in_channels: int = 3, stem_type: str = "basic", avg_down: bool = False):
        super().__init__()
        if depth not in DEPTHS:
            raise ConfigError(f"unknown ResNet depth {depth!r}; valid depths: "
                              f"{', '.join(map(str, DEPTHS))} (CIFAR depths 6n+2: backbones.cifar_resnet)")
        if len(dilation) != 3:
            raise ConfigError(f"dilation takes 3 flags (res3, res4, res5), got {list(dilation)}")
        if num_classes is None and not out_features:
            out_features = list(STAGE_NAMES)
        out_features = list(out_features or [])
        unknown = [f for f in out_features if f not in ("stem",) + STAGE_NAMES]
        if unknown:
            raise ConfigError(f"unknown out_features {unknown}; valid: stem, {', '.join(STAGE_NAMES)}")
        if not 0 <= freeze_at <= 5:
            raise ConfigError(f"freeze_at must be 0 (nothing) .. 5 (stem and res2-res5), got {freeze_at}")
        if avg_down and (plain or shortcut == "A"):
            raise ConfigError("avg_down pools in projection shortcuts, and "
                              f"{'plain networks have no shortcuts' if plain else 'shortcut A has none'}; "
                              "use shortcut B or C")
        block, stage_blocks = DEPTHS[depth]
        self.depth = depth
        self.in_channels = in_channels
        self.out_features = out_features
        self.num_classes = num_classes

        self.stem = make_stem(stem_type, in_channels, norm, num_groups)
        self._shapes = {"stem": ShapeSpec(64, 4)}

        # Build stages up to the last one used (a C4 backbone needs no res5).
        needed = 4 if num_classes is not None else 1 + max(
            [STAGE_NAMES.index(f) for f in out_features if f in STAGE_NAMES], default=-1)
        channels, stride, current_dilation = 64, 4, 1
        block_kwargs = dict(groups=groups, width_per_group=width_per_group,
                            stride_in_1x1=stride_in_1x1, norm=norm, num_groups=num_groups,
                            shortcut=shortcut, plain=plain, avg_down=avg_down)
        self.stage_names = []
        for i in range(needed):
            name = STAGE_NAMES[i]
            out_channels = 64 * 2 ** i * block.expansion
            stage_stride, first_dilation = (1 if i == 0 else 2), current_dilation
            if i > 0 and dilation[i - 1]:
                current_dilation *= stage_stride
                stage_stride = 1
            setattr(self, name, make_stage(block, stage_blocks[i], channels, out_channels,
                                           stage_stride, current_dilation, first_dilation,
                                           **block_kwargs))
            channels, stride = out_channels, stride * stage_stride
            self._shapes[name] = ShapeSpec(out_channels, stride)
            self.stage_names.append(name)

        if num_classes is not None:
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(channels, num_classes)
        init_weights(self, zero_init_residual)
        self.freeze_at = freeze_at
        self.freeze(freeze_at)

    def freeze(self, freeze_at: int):
        if freeze_at >= 1:
            freeze_module(self.stem)
        for i, name in enumerate(self.stage_names, start=2):
            if freeze_at >= i:
                freeze_module(getattr(self, name))

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {name: self._shapes[name] for name in self.out_features}

    def forward_features(self, x) -> Dict[str, torch.Tensor]:
        if not torch.jit.is_scripting():  # TorchScript has no type(self).__name__; the model is checked eager
            check_images(x, self.in_channels, type(self).__name__)
        outputs = OrderedDict()
        # named_children, not getattr(self, name): TorchScript unrolls a loop over the children only.
        for name, module in self.named_children():
            if name == "stem" or name in self.stage_names:
                x = module(x)
                if name in self.out_features:
                    outputs[name] = x
        return outputs

    def forward(self, x):
        if self.num_classes is None:
            return self.forward_features(x)
        if not torch.jit.is_scripting():
            check_images(x, self.in_channels, type(self).__name__)
        x = self.stem(x)
        for name, module in self.named_children():
            if name in self.stage_names:
                x = module(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))
