"""Box <-> delta encoding of R-CNN (Girshick et al. 2014, Appendix C; Ren et al. 2015, Eq. 2).

t_x = w_x (x - x_a) / w_a, t_y = w_y (y - y_a) / h_a, t_w = w_w log(w / w_a), t_h = w_h log(h / h_a),
with per-coordinate weights (1,1,1,1) in the RPN and (10,10,5,5) in the box head, which scale the
targets to roughly unit variance. Works on any leading shape: (..., 4) boxes with (..., 4k) deltas.
"""
import math
from typing import Sequence

import torch

# Largest log-scale a delta may request: a box at most 1000/16 times larger than its reference,
# which keeps exp() finite early in training.
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


class BoxCoder:
    def __init__(self, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
                 scale_clamp: float = DEFAULT_SCALE_CLAMP):
        self.weights = tuple(float(w) for w in weights)
        self.scale_clamp = scale_clamp

    def encode(self, targets: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        """Deltas that turn `references` into `targets` (both (..., 4) xyxy)."""
        wx, wy, ww, wh = self.weights
        ref_w = references[..., 2] - references[..., 0]
        ref_h = references[..., 3] - references[..., 1]
        ref_x = references[..., 0] + 0.5 * ref_w
        ref_y = references[..., 1] + 0.5 * ref_h
        w = targets[..., 2] - targets[..., 0]
        h = targets[..., 3] - targets[..., 1]
        x = targets[..., 0] + 0.5 * w
        y = targets[..., 1] + 0.5 * h
        return torch.stack((wx * (x - ref_x) / ref_w, wy * (y - ref_y) / ref_h,
                            ww * torch.log(w / ref_w), wh * torch.log(h / ref_h)), dim=-1)

    def decode(self, deltas: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        """Boxes (..., k, 4) from deltas (..., 4k) applied to `references` (..., 4)."""
        references = references.to(deltas.dtype)
        deltas = deltas.reshape(*deltas.shape[:-1], deltas.shape[-1] // 4, 4)
        wx, wy, ww, wh = self.weights
        ref_w = (references[..., 2] - references[..., 0]).unsqueeze(-1)
        ref_h = (references[..., 3] - references[..., 1]).unsqueeze(-1)
        ref_x = references[..., 0].unsqueeze(-1) + 0.5 * ref_w
        ref_y = references[..., 1].unsqueeze(-1) + 0.5 * ref_h
        x = deltas[..., 0] / wx * ref_w + ref_x
        y = deltas[..., 1] / wy * ref_h + ref_y
        half_w = 0.5 * torch.exp((deltas[..., 2] / ww).clamp(max=self.scale_clamp)) * ref_w
        half_h = 0.5 * torch.exp((deltas[..., 3] / wh).clamp(max=self.scale_clamp)) * ref_h
        return torch.stack((x - half_w, y - half_h, x + half_w, y + half_h), dim=-1)
