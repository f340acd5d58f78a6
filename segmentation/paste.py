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

PADDING = 1
CHUNK_BYTES = 1 << 28  # working memory per chunk on a GPU (the output itself aside)


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


def paste_masks(masks: torch.Tensor, boxes: torch.Tensor, image_size: Tuple[int, int],
                chunk: Optional[int] = None) -> torch.Tensor:
    """(N, 1, M, M) masks over (N, 4) xyxy boxes (the image's pixels) -> (N, 1, H, W) full-image masks.
    `chunk`: masks computed together (default: 1 on a CPU, as many as CHUNK_BYTES allows on a GPU)."""
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
