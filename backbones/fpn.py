"""Feature Pyramid Network (Lin et al. 2017, Sec. 3): 1x1 lateral connections, nearest-neighbour top-down
upsampling, 3x3 output convolutions, plus extra coarse levels for the detectors that use them.

Output names follow torchvision's `BackboneWithFPN` ("0".."3" for P2-P5, then "pool" for P6), so an FPN
from here drops into torchvision's FasterRCNN/MaskRCNN with their default RoI poolers. Which name is
which level is never implied by the name in this project: `output_shape()` gives every stride.
"""
import math
from collections import OrderedDict
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import ConfigError

from .base import Backbone, ShapeSpec
from .norms import get_norm

TOP_BLOCKS = ("maxpool", "p6p7", "none")


class ConvNorm(nn.Sequential):
    """Convolution followed by a norm; the convolution has no bias since the norm adds one."""

    def __init__(self, in_channels, out_channels, kernel_size, norm, num_groups):
        super().__init__(OrderedDict(
            conv=nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            norm=get_norm(norm, out_channels, num_groups),
        ))


def fpn_conv(in_channels, out_channels, kernel_size, norm="", num_groups=32) -> nn.Module:
    if norm:
        return ConvNorm(in_channels, out_channels, kernel_size, norm, num_groups)
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
    # Uniform fan-in init with a=1 ("c2_xavier_fill" of the original Caffe2 FPN).
    nn.init.kaiming_uniform_(conv.weight, a=1)
    nn.init.zeros_(conv.bias)
    return conv


class LastLevelMaxPool(nn.Module):
    """P6 by stride-2 subsampling of P5 (Faster/Mask R-CNN with FPN: anchors of 512^2 on P6)."""

    names = ("pool",)

    def __init__(self):
        super().__init__()
        self.uses_bottom_up = False  # an instance attribute: TorchScript reads no class attributes

    def forward(self, x):
        return [F.max_pool2d(x, kernel_size=1, stride=2, padding=0)]


class LastLevelP6P7(nn.Module):
    """P6 and P7 by stride-2 3x3 convolutions, ReLU between them (RetinaNet, Lin et al. 2017b).

    They start from P5 when it has `out_channels` channels, otherwise from C5, as in the RetinaNet paper.
    """

    names = ("p6", "p7")

    def __init__(self, in_channels, out_channels, uses_bottom_up):
        super().__init__()
        self.uses_bottom_up = uses_bottom_up
        self.p6 = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1)
        for conv in (self.p6, self.p7):
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.zeros_(conv.bias)

    def forward(self, x):
        p6 = self.p6(x)
        return [p6, self.p7(F.relu(p6))]


class FPN(Backbone):
    """Wraps a bottom-up backbone and returns an OrderedDict of `out_channels`-wide pyramid levels."""

    def __init__(self, bottom_up: Backbone, in_features: Optional[Sequence[str]] = None,
                 out_channels: int = 256, norm: str = "", top_block: str = "maxpool",
                 num_groups: int = 32):
        super().__init__()
        in_shapes = bottom_up.output_shape()
        in_features = list(in_features or in_shapes)
        missing = [f for f in in_features if f not in in_shapes]
        if missing:
            raise ConfigError(f"FPN input features {missing} are not produced by the backbone, which "
                              f"gives {list(in_shapes)}")
        strides = [in_shapes[f].stride for f in in_features]
        if any(b != 2 * a for a, b in zip(strides, strides[1:])):
            raise ConfigError(f"FPN needs inputs whose strides double level by level, got {strides} "
                              f"for {in_features}")
        if top_block not in TOP_BLOCKS:
            raise ConfigError(f"unknown FPN top_block {top_block!r}; valid: {', '.join(TOP_BLOCKS)}")
        self.bottom_up = bottom_up
        self.in_features = in_features
        self.out_channels = out_channels  # read by torchvision's detectors
        self.lateral_convs = nn.ModuleList(
            fpn_conv(in_shapes[f].channels, out_channels, 1, norm, num_groups) for f in in_features)
        self.output_convs = nn.ModuleList(
            fpn_conv(out_channels, out_channels, 3, norm, num_groups) for _ in in_features)

        last = in_shapes[in_features[-1]]
        if top_block == "maxpool":
            self.top_block = LastLevelMaxPool()
        elif top_block == "p6p7":
            from_c5 = last.channels != out_channels
            self.top_block = LastLevelP6P7(last.channels, out_channels, uses_bottom_up=from_c5)
        else:
            self.top_block = None

        names = [str(i) for i in range(len(in_features))]
        out_strides = list(strides)
        if self.top_block is not None:
            names += list(self.top_block.names)
            out_strides += [strides[-1] * 2 ** (k + 1) for k in range(len(self.top_block.names))]
        self._shapes = OrderedDict((n, ShapeSpec(out_channels, s)) for n, s in zip(names, out_strides))
        self.out_names = names
        # FPN paper: level index = log2(stride), e.g. P2 at stride 4.
        self.levels = {n: int(math.log2(s)) for n, s in zip(names, out_strides)}

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return dict(self._shapes)

    def forward(self, images) -> Dict[str, torch.Tensor]:
        features = self.bottom_up(images)
        # The laterals, then the top-down pass, then the output convolutions, each replacing its level's
        # entry (so no level's map outlives its use): TorchScript iterates a ModuleList in order only and
        # never indexes one with a variable.
        maps = []
        for i, conv in enumerate(self.lateral_convs):
            maps.append(conv(features[self.in_features[i]]))
        for i in range(len(maps) - 2, -1, -1):
            # Upsample to the lateral's exact size, so inputs of any size (not only multiples of the
            # coarsest stride) work.
            maps[i] = maps[i] + F.interpolate(maps[i + 1], size=maps[i].shape[-2:], mode="nearest")
        for i, conv in enumerate(self.output_convs):
            maps[i] = conv(maps[i])
        if self.top_block is not None:
            source = features[self.in_features[-1]] if self.top_block.uses_bottom_up else maps[-1]
            maps.extend(self.top_block(source))
        out = OrderedDict()
        for name, result in zip(self.out_names, maps):
            out[name] = result
        return out
