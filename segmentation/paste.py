"""Pasting RoI masks (M x M probabilities over each detection's box) into full images.

The geometry is torchvision's `MaskRCNN` post-processing, so its converted weights give its masks: the
mask is padded with one zero pixel on each side, its box grown by (M + 2) / M about the centre and
truncated to integer pixels, and the padded mask resized bilinearly (half-pixel centres, edge values
clamped) to the grown box's w x h = (x1 - x0 + 1) x (y1 - y0 + 1) pixels, then placed at (x0, y0).

Bilinear resizing is separable, so each mask is computed as Ry @ mask @ Rx^T with two sparse-in-effect
interpolation matrices over the image rows and columns the box covers. Masks are processed in chunks
whose working memory stays under `chunk_bytes`: on a CPU one mask at a time over its own box region
(the least arithmetic), on a GPU many at once over the union of their regions (fewer kernel launches).
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from engine.errors import ConfigError

PADDING = 1
# Working memory per chunk on a GPU (the output itself aside). The paste is ours on every device because
# it is the one implementation of both paste modes (torchvision's and Detectron2's pixels); on a GPU the
# chunks replace one small kernel sequence per mask with one per chunk. Its GPU speed has not been measured
# yet: tests/cuda/test_paste.py checks its pixels against the CPU's, and tools/benchmark.py --task infer on
# a Mask R-CNN config with device=cuda times it inside the whole inference against torchvision's.
CHUNK_BYTES = 1 << 28


def grown_boxes(boxes: torch.Tensor, mask_size: int) -> torch.Tensor:
    """(N, 4) float boxes grown to cover the padded mask, as int64 pixels (truncated towards zero)."""
    scale = float(mask_size + 2 * PADDING) / mask_size
    centre = (boxes[:, :2] + boxes[:, 2:]) * 0.5
    half = (boxes[:, 2:] - boxes[:, :2]) * 0.5 * scale
    return torch.cat([centre - half, centre + half], dim=1).to(torch.int64)


def interpolation_matrix(start: torch.Tensor, length: torch.Tensor, region: Tuple[int, int],
                         source: int, dtype) -> torch.Tensor:
    """(C, region length, source) weights that resize `source` samples to `length` output pixels starting
    at pixel `start` (per row of the C masks), evaluated over the pixels of `region` = [lo, hi); zero
    outside [start, start + length)."""
    pixels = torch.arange(region[0], region[1], device=start.device)
    u = pixels[None, :] - start[:, None]  # position inside the resized mask
    inside = (u >= 0) & (u < length[:, None])
    scale = source / length.to(torch.float32)  # float32 ratio, as the bilinear kernels compute it
    src = ((u.to(torch.float32) + 0.5) * scale[:, None] - 0.5).clamp(min=0)
    i0 = src.floor().clamp(max=source - 1)
    weight1 = (src - i0).clamp(0, 1)
    i0 = i0.to(torch.int64)
    i1 = (i0 + 1).clamp(max=source - 1)
    matrix = torch.zeros(u.shape + (source,), dtype=dtype, device=start.device)
    matrix.scatter_add_(2, i0[..., None], ((1 - weight1) * inside).to(dtype)[..., None])
    matrix.scatter_add_(2, i1[..., None], (weight1 * inside).to(dtype)[..., None])
    return matrix


PASTE_MODES = ("torchvision", "detectron2")


def box_interpolation_matrix(start: torch.Tensor, end: torch.Tensor, region: Tuple[int, int], source: int,
                             dtype) -> torch.Tensor:
    """(C, region length, source) bilinear weights that sample `source` mask cells spread over [start, end)
    (float, per row of the C masks) at the centres of the pixels of `region` = [lo, hi), zero beyond the
    mask's outer cell centres. This is Detectron2's geometry (layers/mask_ops.py, _do_paste_mask: the pixel
    centre normalised to [-1, 1] over the box, then grid_sample with align_corners=False and zero padding),
    computed in its order of float32 operations."""
    pixels = torch.arange(region[0], region[1], device=start.device, dtype=torch.float32) + 0.5
    g = (pixels[None, :] - start[:, None]) / (end - start)[:, None] * 2 - 1
    src = ((g + 1) * source - 1) / 2  # grid_sample's unnormalisation for align_corners=False
    i0 = src.floor()
    weight1 = src - i0
    i0 = i0.to(torch.int64)
    matrix = torch.zeros(src.shape + (source + 2,), dtype=dtype, device=start.device)
    # Taps outside [0, source) read zero padding: they are scattered to two spare columns, then dropped.
    for index, weight in ((i0, 1 - weight1), (i0 + 1, weight1)):
        valid = (index >= 0) & (index < source)
        matrix.scatter_add_(2, torch.where(valid, index, source).clamp(max=source + 1)[..., None],
                            (weight * valid).to(dtype)[..., None])
    return matrix[..., :source]


def paste_masks_unpadded(masks: torch.Tensor, boxes: torch.Tensor, image_size: Tuple[int, int]) -> torch.Tensor:
    """Detectron2's pasting: each M x M mask sampled bilinearly at the image's pixel centres over its box
    as it is (not grown, not truncated to integers), zero outside the mask's outer half cells. One mask at a
    time, over the pixels its box can reach (the box grown by one pixel, rounded outwards)."""
    height, width = image_size
    out = masks.new_zeros((len(masks), 1, height, width))
    source = masks.shape[-1]
    boxes = boxes.to(torch.float32)
    lo = (boxes[:, :2].floor() - 1).clamp(min=0).to(torch.int64)
    hi = torch.minimum((boxes[:, 2:].ceil() + 1).to(torch.int64),
                       torch.tensor([width, height], device=boxes.device))
    for i, (x0, y0, x1, y1) in enumerate(torch.cat([lo, hi], 1).tolist()):
        if x0 >= x1 or y0 >= y1:
            continue
        rx = box_interpolation_matrix(boxes[i:i + 1, 0], boxes[i:i + 1, 2], (x0, x1), source, masks.dtype)
        ry = box_interpolation_matrix(boxes[i:i + 1, 1], boxes[i:i + 1, 3], (y0, y1), source, masks.dtype)
        out[i, 0, y0:y1, x0:x1] = (ry @ masks[i:i + 1, 0] @ rx.transpose(1, 2))[0]
    return out


def paste_masks(masks: torch.Tensor, boxes: torch.Tensor, image_size: Tuple[int, int],
                chunk: Optional[int] = None, mode: str = "torchvision") -> torch.Tensor:
    """(N, 1, M, M) masks over (N, 4) xyxy boxes (the image's pixels) -> (N, 1, H, W) full-image masks.
    `chunk`: masks computed together (default: 1 on a CPU, as many as CHUNK_BYTES allows on a GPU).
    `mode`: "torchvision" (the geometry above) or "detectron2" (`paste_masks_unpadded`)."""
    if mode not in PASTE_MODES:
        raise ConfigError(f"unknown mask paste mode {mode!r} (model.mask_head.paste_mode); valid: "
                          f"{', '.join(PASTE_MODES)}")
    if mode == "detectron2":
        return paste_masks_unpadded(masks, boxes, image_size)
    height, width = image_size
    n = len(masks)
    out = masks.new_zeros((n, 1, height, width))
    if n == 0:
        return out
    padded = F.pad(masks[:, 0], (PADDING,) * 4)
    source = padded.shape[-1]
    grown = grown_boxes(boxes, masks.shape[-1])
    x0, y0 = grown[:, 0], grown[:, 1]
    w = (grown[:, 2] - x0 + 1).clamp(min=1)
    h = (grown[:, 3] - y0 + 1).clamp(min=1)
    # Each mask's pixels inside the image: [lo, hi) per axis.
    xlo, xhi = x0.clamp(0, width), (x0 + w).clamp(0, width)
    ylo, yhi = y0.clamp(0, height), (y0 + h).clamp(0, height)
    if chunk is None:
        per_mask = (height + width) * source * 4 + height * width * 4
        chunk = 1 if masks.device.type == "cpu" else max(1, min(n, CHUNK_BYTES // per_mask))
    bounds = torch.stack([xlo, xhi, ylo, yhi], 1).tolist()  # one device sync for all chunks
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        part = bounds[s:e]
        cols = (min(b[0] for b in part), max(b[1] for b in part))
        rows = (min(b[2] for b in part), max(b[3] for b in part))
        if cols[0] >= cols[1] or rows[0] >= rows[1]:
            continue  # every box of the chunk is outside the image
        ry = interpolation_matrix(y0[s:e], h[s:e], rows, source, masks.dtype)
        rx = interpolation_matrix(x0[s:e], w[s:e], cols, source, masks.dtype)
        out[s:e, 0, rows[0]:rows[1], cols[0]:cols[1]] = ry @ padded[s:e] @ rx.transpose(1, 2)
    return out
