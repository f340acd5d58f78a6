"""ResNet backbones (He et al. 2015) with FPN (Lin et al. 2017), importable by any detector.

    import backbones
    model = backbones.resnet50()                     # ImageNet classifier, torchvision's parameters
    body = backbones.resnet_fpn(depth=101, norm="FrozenBN", freeze_at=2)
    features = body(images)                          # OrderedDict of 5 maps, 256 channels each
    body.output_shape()                              # {"0": ShapeSpec(256, 4), ..., "pool": ShapeSpec(256, 64)}
"""
from .base import Backbone, ShapeSpec
from .cifar import CifarResNet, cifar_resnet
from .fpn import FPN
from .norms import FrozenBatchNorm2d, get_norm
from .resnet import BasicBlock, Bottleneck, ResNet


def resnet18(num_classes=1000, **options):
    return ResNet(18, num_classes, **options)


def resnet34(num_classes=1000, **options):
    return ResNet(34, num_classes, **options)


def resnet50(num_classes=1000, **options):
    return ResNet(50, num_classes, **options)


def resnet101(num_classes=1000, **options):
    return ResNet(101, num_classes, **options)


def resnet152(num_classes=1000, **options):
    return ResNet(152, num_classes, **options)


# ResNeXt (Xie et al. 2017) "CxWd": cardinality C, bottleneck width W per group at res2.
def resnext50_32x4d(num_classes=1000, **options):
    return ResNet(50, num_classes, groups=32, width_per_group=4, **options)


def resnext101_32x8d(num_classes=1000, **options):
    return ResNet(101, num_classes, groups=32, width_per_group=8, **options)


def resnext101_64x4d(num_classes=1000, **options):
    return ResNet(101, num_classes, groups=64, width_per_group=4, **options)


# Wide ResNet (Zagoruyko & Komodakis 2016) as torchvision defines it: bottlenecks twice as wide.
def wide_resnet50_2(num_classes=1000, **options):
    return ResNet(50, num_classes, width_per_group=128, **options)


def wide_resnet101_2(num_classes=1000, **options):
    return ResNet(101, num_classes, width_per_group=128, **options)


ARCHITECTURES = {f.__name__: f for f in (
    resnet18, resnet34, resnet50, resnet101, resnet152, resnext50_32x4d, resnext101_32x8d,
    resnext101_64x4d, wide_resnet50_2, wide_resnet101_2)}


def resnet_fpn(depth=50, *, in_features=("res2", "res3", "res4", "res5"), out_channels=256,
               fpn_norm="", top_block="maxpool", **options) -> FPN:
    """ResNet-`depth` with FPN: P2-P5 plus P6 (`top_block="maxpool"`, Faster/Mask R-CNN) or P6-P7
    (`"p6p7"`, RetinaNet). `options` go to `ResNet` (norm, freeze_at, groups, width_per_group, ...)."""
    body = ResNet(depth, num_classes=None, out_features=list(in_features), **options)
    return FPN(body, in_features, out_channels=out_channels, norm=fpn_norm, top_block=top_block,
               num_groups=options.get("num_groups", 32))


__all__ = ["Backbone", "ShapeSpec", "ResNet", "BasicBlock", "Bottleneck", "CifarResNet", "FPN",
           "FrozenBatchNorm2d", "get_norm", "cifar_resnet", "resnet_fpn", "ARCHITECTURES",
           *ARCHITECTURES]
