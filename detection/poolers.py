"""RoIAlign (He et al. 2017) over FPN levels with the FPN paper's level assignment (Lin et al. 2017,
Eq. 1): k = floor(k0 + log2(sqrt(wh) / 224)), k0 = 4, clamped to the available levels."""
import math
from typing import Dict, List

import torch
from torch import nn
from torchvision.ops import roi_align

from backbones.base import ShapeSpec
from engine.errors import ConfigError


def assign_levels(boxes: torch.Tensor, min_level: int, max_level: int, canonical_box_size: float = 224,
                  canonical_level: int = 4, eps: float = 1e-6) -> torch.Tensor:
    """Index (0 = min_level) of the pyramid level each (K, 4) box is pooled from. `eps` keeps boxes of
    exactly the canonical size from falling a level through floating-point error."""
    size = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sqrt()
    level = torch.floor(canonical_level + torch.log2(size / canonical_box_size) + eps)
    return (level.clamp(min_level, max_level) - min_level).to(torch.int64)


class MultiScaleRoIAlign(nn.Module):
    def __init__(self, input_shape: Dict[str, ShapeSpec], output_size: int, sampling_ratio: int = 2,
                 aligned: bool = False, canonical_box_size: float = 224, canonical_level: int = 4):
        super().__init__()
        self.in_features = list(input_shape)
        self.scales = [1.0 / s.stride for s in input_shape.values()]
        levels = [math.log2(s.stride) for s in input_shape.values()]
        if any(l != int(l) for l in levels) or levels != list(range(int(levels[0]), int(levels[0]) + len(levels))):
            raise ConfigError(f"RoI pooling needs consecutive power-of-two strides, got "
                              f"{[s.stride for s in input_shape.values()]} for {self.in_features}")
        self.min_level, self.max_level = int(levels[0]), int(levels[-1])
        self.output_size = (output_size, output_size)
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.canonical_box_size = canonical_box_size
        self.canonical_level = canonical_level

    def forward(self, features: Dict[str, torch.Tensor], boxes: List[torch.Tensor]) -> torch.Tensor:
        """(sum K_i, C, S, S) features for the boxes of all images, in order."""
        maps = [features[f] for f in self.in_features]
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)])
        out = maps[0].new_zeros((len(rois), maps[0].shape[1]) + self.output_size)
        if len(rois) == 0:
            return out
        if len(maps) == 1:
            return roi_align(maps[0], rois, self.output_size, self.scales[0], self.sampling_ratio, self.aligned)
        level = assign_levels(rois[:, 1:], self.min_level, self.max_level, self.canonical_box_size,
                              self.canonical_level)
        for i, (feature, scale) in enumerate(zip(maps, self.scales)):
            idx = torch.nonzero(level == i).squeeze(1)
            if len(idx):
                out[idx] = roi_align(feature, rois[idx], self.output_size, scale, self.sampling_ratio,
                                     self.aligned).to(out.dtype)
        return out
