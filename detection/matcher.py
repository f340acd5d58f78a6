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


def sample_balanced(labels: torch.Tensor, per_image: int, positive_fraction: float,
                    generator: torch.Generator = None):
    """Random foreground/background subsets (Ren et al. 2015, Sec. 3.1.3): up to
    `per_image * positive_fraction` foreground, the rest background. Returns two (B, N) masks."""
    fg, bg = labels == FOREGROUND, labels == BACKGROUND
    num_fg = fg.sum(dim=1).clamp(max=int(per_image * positive_fraction))
    num_bg = bg.sum(dim=1).clamp(max=per_image - num_fg)
    noise = torch.rand(labels.shape, device=labels.device, generator=generator)
    return _random_subset(fg, num_fg, noise), _random_subset(bg, num_bg, noise)


def _random_subset(mask, counts, noise):
    score = torch.where(mask, noise, torch.full_like(noise, -1.0))
    order = score.argsort(dim=1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return mask & (rank < counts[:, None])
