"""IoU matching of predictions (anchors or proposals) to ground truth, for a whole batch at once.

Ground truth is padded to the batch's largest count; padded rows are marked invalid and never match.
"""
from typing import Sequence

import torch

from engine.errors import ConfigError

FOREGROUND, BACKGROUND, IGNORE = 1, 0, -1


class Matcher:
    """thresholds=(low, high): IoU >= high is foreground, < low background, in between ignored.

    `allow_low_quality_matches` (Ren et al. 2015, Sec. 3.1.2): every ground-truth box also claims the
    predictions with which it has its highest IoU (ties included), even below `high`, so that no object
    goes without a positive. Those predictions are matched to their best ground truth overall.
    """

    def __init__(self, thresholds: Sequence[float], allow_low_quality_matches: bool = False):
        low, high = thresholds
        if not 0 <= low <= high <= 1:
            raise ConfigError(f"matcher thresholds must satisfy 0 <= low <= high <= 1, got {list(thresholds)}")
        self.low, self.high = low, high
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, iou: torch.Tensor, gt_valid: torch.Tensor):
        """iou: (B, M, N) between M (padded) ground-truth boxes and N predictions; gt_valid: (B, M).
        Returns matched ground-truth index (B, N) and labels (B, N) in {1, 0, -1}."""
        iou = iou.masked_fill(~gt_valid[:, :, None], -1.0)
        best, matched = iou.max(dim=1)
        labels = torch.full_like(matched, FOREGROUND)
        labels[best < self.high] = IGNORE
        labels[best < self.low] = BACKGROUND
        if self.allow_low_quality_matches:
            best_per_gt = iou.max(dim=2, keepdim=True).values
            claimed = ((iou == best_per_gt) & gt_valid[:, :, None]).any(dim=1)
            labels[claimed] = FOREGROUND
        return matched, labels

