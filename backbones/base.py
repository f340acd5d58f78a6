"""The contract between a backbone and the heads on top of it.

Heads size themselves from `output_shape()` (channels and stride per feature name), never from
constants, so a new backbone only has to report its shapes truthfully.
"""
from dataclasses import dataclass
from typing import Dict

from torch import nn


@dataclass(frozen=True)
class ShapeSpec:
    channels: int
    stride: int


class Backbone(nn.Module):
    """A module mapping images (N, 3, H, W) to an ordered dict of named feature maps."""

    __jit_unused_properties__ = ["size_divisibility"]  # Python-side information; torch.jit.script skips it

    def output_shape(self) -> Dict[str, ShapeSpec]:
        raise NotImplementedError

    @property
    def size_divisibility(self) -> int:
        """Inputs padded to a multiple of this give feature maps that align exactly across levels."""
        # 1 for a classifier (no feature maps): it pools globally, so any size fits.
        return max((spec.stride for spec in self.output_shape().values()), default=1)
