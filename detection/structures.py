"""The small containers that flow between the detector's stages."""
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch
import torchvision
from torch.fx.experimental.symbolic_shapes import guard_or_false
from torchvision.ops import box_iou, nms

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


def known_zero(count) -> bool:
    """Whether a count is 0, where that is known: an int in eager mode. While torch.export (a SymInt) or
    torch.jit.trace (a 0-dim tensor) records a graph the count is unknown, and this says False so that the
    general path, which must then handle empty tensors, is recorded instead of a branch."""
    if isinstance(count, torch.Tensor):
        return False
    return guard_or_false(count == 0)


def size_min(a, b):
    """min() of two sizes that does not fix either while a graph is recorded: ints in eager mode, SymInts
    under torch.export, 0-dim tensors under torch.jit.trace."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return torch.minimum(torch.as_tensor(a), torch.as_tensor(b))
    return torch.sym_min(a, b)


def recording() -> bool:
    """Whether torch.export/torch.compile or torch.jit.trace is recording a graph (then eager-only shortcuts,
    such as branching on a count or calling kernels from threads, must not be taken)."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, iou_threshold: float):
    """torchvision's batched_nms (NMS within each group). While torch.export or a tracer records the
    graph, its offset form only, which torchvision itself uses for up to 1000 boxes on a CPU: each group's
    boxes are moved apart so one NMS never compares two groups. torchvision picks between its two forms
    by the box count, which a graph cannot branch on; the max over an extra 0 keeps no boxes legal."""
    if not recording():
        return torchvision.ops.batched_nms(boxes, scores, groups, iou_threshold)
    span = torch.cat([boxes.reshape(-1), boxes.new_zeros(1)]).max() + 1
    return nms(boxes + (groups.to(boxes) * span)[:, None], scores, iou_threshold)


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

    An entry's rank within its image is the running count of its image's entries up to it: a cumulative
    sum over (N, num_images) one-hot rows, with no sort (ONNX has no stable sort to export it to)."""
    one_hot = image_ids[:, None] == torch.arange(num_images, device=image_ids.device)[None, :]
    rank = one_hot.cumsum(0).gather(1, image_ids[:, None]).squeeze(1) - 1
    return rank < k
