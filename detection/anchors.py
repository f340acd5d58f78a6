"""Anchors (Ren et al. 2015, Sec. 3.1.1): at every feature-map cell, boxes of each size and aspect ratio
centred on the cell's top-left corner in image coordinates. With FPN (Lin et al. 2017, Sec. 4.1) each
level gets one size (32..512 on P2..P6) and three ratios.
"""
from typing import List, Sequence

import torch
from torch import nn

from engine.errors import ConfigError

STRIDE_MODES = ("backbone", "padded_image")


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float], round: bool = True) -> torch.Tensor:
    """(len(ratios) * len(sizes), 4) boxes centred on 0: ratio-major, size-minor order, with
    ratio = height / width at constant area, coordinates rounded to integers as in the original
    implementation (and torchvision); `round=False` keeps them exact, as Detectron2 does
    (modeling/anchor_generator.py: w = sqrt(size^2 / ratio), h = ratio * w, unrounded)."""
    if not round:
        # Detectron2's arithmetic (in float64, then float32), so that its anchors are matched to the bit.
        s = torch.as_tensor(sizes, dtype=torch.float64)
        r = torch.as_tensor(aspect_ratios, dtype=torch.float64)
        w = (s[None, :] ** 2 / r[:, None]).sqrt()
        h = r[:, None] * w
        w, h = w.reshape(-1), h.reshape(-1)
        return (torch.stack([-w, -h, w, h], dim=1) / 2).to(torch.float32)
    sizes = torch.as_tensor(sizes, dtype=torch.float32)
    ratios = torch.as_tensor(aspect_ratios, dtype=torch.float32)
    h = (ratios.sqrt()[:, None] * sizes[None, :]).reshape(-1)
    w = ((1 / ratios.sqrt())[:, None] * sizes[None, :]).reshape(-1)
    return (torch.stack([-w, -h, w, h], dim=1) / 2).round()


class AnchorGenerator(nn.Module):
    """Anchors for every level of a feature pyramid.

    sizes[i] and aspect_ratios[i] belong to level i. `stride_mode="backbone"` places anchors at the
    backbone's nominal stride; `"padded_image"` uses padded image size // feature size instead, which is
    what torchvision does (it differs from the nominal stride on levels whose size was rounded up,
    e.g. P6 of an 800-pixel-high input: 800 // 13 = 61, not 64).
    """

    def __init__(self, sizes: Sequence[Sequence[float]], aspect_ratios: Sequence[Sequence[float]],
                 strides: Sequence[int], stride_mode: str = "backbone", round: bool = True):
        super().__init__()
        if not (len(sizes) == len(aspect_ratios) == len(strides)):
            raise ConfigError(f"anchor sizes ({len(sizes)} levels), aspect ratios ({len(aspect_ratios)}) "
                              f"and backbone levels ({len(strides)}) must have the same length")
        if stride_mode not in STRIDE_MODES:
            raise ConfigError(f"unknown anchor stride mode {stride_mode!r}; valid: {', '.join(STRIDE_MODES)}")
        self.strides = list(strides)
        self.stride_mode = stride_mode
        self.num_anchors = [len(s) * len(r) for s, r in zip(sizes, aspect_ratios)]
        for i, (s, r) in enumerate(zip(sizes, aspect_ratios)):
            self.register_buffer(f"cell{i}", cell_anchors(s, r, round), persistent=False)

    def forward(self, feature_shapes: List[Sequence[int]], padded_size: Sequence[int]) -> List[torch.Tensor]:
        """One (H_i * W_i * A_i, 4) tensor per level, ordered (y, x, anchor) like the head's outputs."""
        anchors = []
        for i, (h, w) in enumerate(feature_shapes):
            base = getattr(self, f"cell{i}")
            if self.stride_mode == "padded_image":
                sy, sx = padded_size[0] // h, padded_size[1] // w
            else:
                sy = sx = self.strides[i]
            ys = torch.arange(h, dtype=torch.int32, device=base.device) * sy
            xs = torch.arange(w, dtype=torch.int32, device=base.device) * sx
            y, x = torch.meshgrid(ys, xs, indexing="ij")
            shifts = torch.stack([x, y, x, y], dim=-1).reshape(-1, 1, 4)
            anchors.append((shifts + base.reshape(1, -1, 4)).reshape(-1, 4))
        return anchors
