"""The mask branch of Mask R-CNN (He et al. 2017, Fig. 4 right, FPN variant): on 14x14 RoIAlign features,
`num_conv` 3x3 convolutions, a 2x2 stride-2 deconvolution to 28x28 and a 1x1 convolution giving one mask
logit map per class (or one for all classes). Training targets are the ground-truth masks resampled
into each positive RoI; the loss is the per-pixel binary cross-entropy of the RoI's own class only."""
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from backbones.norms import get_norm


class MaskHead(nn.Module):
    """(R, C, S, S) pooled features -> (R, K + 1, 2S, 2S) mask logits; channel k is class k's mask (channel
    0, background, is never trained or used; it keeps class k at index k as in the box predictor). With
    `class_agnostic`, one channel for every class."""

    def __init__(self, in_channels: int, num_classes: int, num_conv: int = 4, conv_dim: int = 256,
                 norm: str = "", class_agnostic: bool = False):
        super().__init__()
        self.num_conv = num_conv
        for k in range(1, num_conv + 1):
            setattr(self, f"fcn{k}", nn.Conv2d(in_channels if k == 1 else conv_dim, conv_dim, 3, padding=1,
                                               bias=not norm))
            if norm:
                setattr(self, f"norm{k}", get_norm(norm, conv_dim))
        self.norm = norm
        width = conv_dim if num_conv else in_channels
        self.deconv = nn.ConvTranspose2d(width, conv_dim, 2, stride=2)
        self.class_agnostic = class_agnostic
        self.predictor = nn.Conv2d(conv_dim, 1 if class_agnostic else num_classes + 1, 1)
        for m in [getattr(self, f"fcn{k}") for k in range(1, num_conv + 1)] + [self.deconv]:
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        # Small initial logits: every mask starts near probability 0.5 instead of at a random extreme.
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(R, C, S, S) pooled features -> (R, conv_dim, 2S, 2S), what the 1x1 predictor reads."""
        for k in range(1, self.num_conv + 1):
            x = getattr(self, f"fcn{k}")(x)
            if self.norm:
                x = getattr(self, f"norm{k}")(x)
            x = F.relu(x)
        return F.relu(self.deconv(x))

    def forward(self, x: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Every class's logits (R, K + 1, M, M); with `labels` (R,), each RoI's own class only, (R, M, M).

        The loss and the pasted masks read one class per RoI, so that is all the second form computes: one
        dot product per pixel with the label's row of the 1x1 predictor instead of K + 1 (91 for COCO). The
        result is `select(forward(x), labels)` up to float rounding (a batched matrix product instead of a
        convolution); the gradient reaches the same predictor rows."""
        y = self.features(x)
        if labels is None:
            return self.predictor(y)
        if self.class_agnostic:
            return self.predictor(y)[:, 0]
        weight = self.predictor.weight[labels].flatten(1)  # (R, C)
        logits = torch.bmm(weight[:, None], y.flatten(2))  # (R, 1, M*M)
        return logits.view(y.shape[0], *y.shape[2:]) + self.predictor.bias[labels].view(-1, 1, 1)

    def select(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(R, M, M) logits of each RoI's class, from every class's (R, K + 1, M, M)."""
        if self.class_agnostic:
            return logits[:, 0]
        return logits[torch.arange(logits.shape[0], device=logits.device), labels]  # a SymInt in export


def mask_targets(gt_masks: List[torch.Tensor], rois: List[torch.Tensor], matched: List[torch.Tensor],
                 size: int, aligned: bool) -> torch.Tensor:
    """(sum R_i, size, size) soft targets in [0, 1]: each RoI's matched ground-truth mask ((G_i, H, W)
    uint8 at the image's size), resampled by RoIAlign over the RoI box (xyxy, the same image's pixels).
    Only the masks some RoI is matched to are converted to float (full-image masks are large)."""
    out = []
    for masks, boxes, idx in zip(gt_masks, rois, matched):
        if len(boxes) == 0:
            continue
        used, idx = torch.unique(idx, return_inverse=True)
        bitmaps = masks[used][:, None].to(boxes.dtype)
        index = idx.to(boxes.dtype)[:, None]
        out.append(roi_align(bitmaps, torch.cat([index, boxes], dim=1), (size, size), 1.0, 0, aligned)[:, 0])
    if not out:
        return torch.zeros(0, size, size, device=rois[0].device if rois else "cpu")
    return torch.cat(out)


def mask_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean per-pixel binary cross-entropy of (R, M, M) selected logits; zero (with a gradient path to
    every mask parameter) when the batch has no positive RoI."""
    if logits.numel() == 0:
        return logits.sum() * 0
    return F.binary_cross_entropy_with_logits(logits, targets)
