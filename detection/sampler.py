"""Balanced sampling of foreground and background candidates (Ren et al. 2015, Sec. 3.1.3), for a whole
batch at once: the RPN samples anchors, the RoI heads sample proposals, both with this one sampler."""
import torch

from .matcher import BACKGROUND, FOREGROUND


class BalancedSampler:
    """Up to `batch_size_per_image * positive_fraction` foreground candidates per image, background for the
    rest of the `batch_size_per_image`, drawn uniformly from the global generator (or `generator`)."""

    def __init__(self, batch_size_per_image: int, positive_fraction: float):
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction

    def __call__(self, labels: torch.Tensor, generator: torch.Generator = None):
        """(B, N) matcher labels -> (B, N) foreground and background masks."""
        return sample_balanced(labels, self.batch_size_per_image, self.positive_fraction, generator)


def sample_balanced(labels: torch.Tensor, per_image: int, positive_fraction: float,
                    generator: torch.Generator = None):
    """Random foreground/background subsets: up to `per_image * positive_fraction` foreground, the rest
    background. Returns two (B, N) masks."""
    fg, bg = labels == FOREGROUND, labels == BACKGROUND
    num_fg = fg.sum(dim=1).clamp(max=int(per_image * positive_fraction))
    num_bg = bg.sum(dim=1).clamp(max=per_image - num_fg)
    # One draw for both subsets: a candidate is foreground or background, never both.
    noise = torch.rand(labels.shape, device=labels.device, generator=generator)
    return _random_subset(fg, num_fg, noise), _random_subset(bg, num_bg, noise)


def _random_subset(mask, counts, noise):
    score = torch.where(mask, noise, torch.full_like(noise, -1.0))
    order = score.argsort(dim=1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return mask & (rank < counts[:, None])
