"""Box regression losses selectable by name."""
import torch.nn.functional as F

from engine.errors import ConfigError

BOX_LOSSES = ("smooth_l1", "l1")


def box_regression_loss(pred, target, kind: str, beta: float):
    """Summed over elements; callers normalise. Smooth L1 (Girshick 2015, Eq. 3) with a transition at
    `beta` (1/9 in the reference RPN, so that small deltas are penalised almost like L1)."""
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred, target, beta=beta, reduction="sum")
    if kind == "l1":
        return F.l1_loss(pred, target, reduction="sum")
    raise ConfigError(f"unknown box regression loss {kind!r}; valid: {', '.join(BOX_LOSSES)}")
