"""The small containers that flow between the detector's stages."""
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch
from torchvision.ops import box_iou

batched_box_iou = torch.vmap(box_iou)  # (B, M, 4) x (B, N, 4) -> (B, M, N)


@dataclass
class ImageBatch:
    """Images resized, normalised and padded into one tensor, with each image's size before padding."""
    tensor: torch.Tensor
    image_sizes: List[Tuple[int, int]]

    @property
    def padded_size(self) -> Tuple[int, int]:
        return tuple(self.tensor.shape[-2:])

    def sizes_tensor(self) -> torch.Tensor:
        """(B, 2) heights and widths, for clipping boxes of the whole batch at once."""
        return torch.tensor(self.image_sizes, device=self.tensor.device, dtype=torch.float32)


def pad_boxes(boxes: Sequence[torch.Tensor], fill: float = 0.0):
    """A list of (M_i, 4) into (B, max(1, max M_i), 4) plus a validity mask. There is always at least
    one (invalid) row, so images without boxes go through the same code as the others."""
    m = max([1] + [len(b) for b in boxes])
    out = boxes[0].new_full((len(boxes), m, 4), fill)
    valid = torch.zeros(len(boxes), m, dtype=torch.bool, device=out.device)
    for i, b in enumerate(boxes):
        out[i, : len(b)] = b
        valid[i, : len(b)] = True
    return out, valid


def clip_boxes(boxes: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Clip (B, ..., 4) boxes to per-image (B, 2) heights and widths."""
    shape = (sizes.shape[0],) + (1,) * (boxes.dim() - 2)
    h, w = sizes[:, 0].reshape(shape), sizes[:, 1].reshape(shape)
    x = torch.minimum(boxes[..., 0::2].clamp(min=0), w.unsqueeze(-1))
    y = torch.minimum(boxes[..., 1::2].clamp(min=0), h.unsqueeze(-1))
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)


def box_sizes_at_least(boxes: torch.Tensor, min_size: float) -> torch.Tensor:
    return ((boxes[..., 2] - boxes[..., 0]) >= min_size) & ((boxes[..., 3] - boxes[..., 1]) >= min_size)


def top_k_per_image(image_ids: torch.Tensor, k: int, num_images: int) -> torch.Tensor:
    """Given indices already sorted by descending score, the mask keeping each image's first k.

    A stable sort by image keeps the score order within each image."""
    order = torch.sort(image_ids, stable=True).indices
    sorted_ids = image_ids[order]
    counts = torch.bincount(sorted_ids, minlength=num_images)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(order), device=image_ids.device) - starts[sorted_ids]
    keep = torch.zeros_like(image_ids, dtype=torch.bool)
    keep[order] = rank < k
    return keep
