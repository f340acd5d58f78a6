"""The paper's CIFAR-10 networks (Sec. 4.2): depth 6n+2, three stages of n basic blocks with 16, 32 and
64 filters on 32x32, 16x16 and 8x8 maps, global average pooling and a 10-way fully connected layer.
Shortcuts are option A by default, so ResNet-n has exactly the parameters of plain-n.
"""
from collections import OrderedDict

import torch
from torch import nn

from engine.errors import ConfigError

from .base import Backbone, ShapeSpec
from .norms import get_norm
from .resnet import BasicBlock, check_images, init_weights, make_stage

CIFAR_WIDTHS = (16, 32, 64)


class CifarResNet(Backbone):
    def __init__(self, depth: int = 20, num_classes: int = 10, *, norm: str = "BN",
                 num_groups: int = 8, shortcut: str = "A", plain: bool = False,
                 zero_init_residual: bool = False, in_channels: int = 3):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ConfigError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110, "
                              f"1202), got {depth!r}")
        n = (depth - 2) // 6
        self.depth, self.in_channels, self.num_classes = depth, in_channels, num_classes
        self.stem = nn.Sequential(OrderedDict(
            conv1=nn.Conv2d(in_channels, CIFAR_WIDTHS[0], 3, padding=1, bias=False),
            norm1=get_norm(norm, CIFAR_WIDTHS[0], num_groups),
            relu=nn.ReLU(inplace=True),
        ))
        channels = CIFAR_WIDTHS[0]
        self.stage_names = []
        self._shapes = {}
        for i, width in enumerate(CIFAR_WIDTHS):
            name = f"res{i + 2}"
            stride = 1 if i == 0 else 2
            setattr(self, name, make_stage(BasicBlock, n, channels, width, stride, norm=norm,
                                           num_groups=num_groups, shortcut=shortcut, plain=plain))
            channels = width
            self.stage_names.append(name)
            self._shapes[name] = ShapeSpec(width, 2 ** i)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        init_weights(self, zero_init_residual)

    def output_shape(self):
        return dict(self._shapes)

    def forward(self, x):
        check_images(x, self.in_channels, "CifarResNet")
        x = self.stem(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def cifar_resnet(depth: int = 20, num_classes: int = 10, **options) -> CifarResNet:
    """ResNet-`depth` for CIFAR-10 (`plain=True` for the plain-`depth` baseline)."""
    return CifarResNet(depth, num_classes, **options)
