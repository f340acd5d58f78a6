"""The detector's one resize: the shorter side to `min_size` unless the longer side would then exceed
`max_size`. The data mapper resizes decoded images with it (training and test), the model's Preprocessor
resizes the images it is given, and the exported graph is the Preprocessor's own code.

Each mode (`input.resize_mode`, a name in RESIZE_MODES) is one size rule and one filter:
- "interpolate" (torchvision's GeneralizedRCNNTransform): scale = min(min_size / shorter, max_size / longer)
  and sides floor(side * scale), as F.interpolate(scale_factor, recompute_scale_factor=True) rounds them;
  bilinear with half-pixel centres. The model filters its normalised float image (F.interpolate); the
  data loader's workers filter the decoded uint8 image (OpenCV's INTER_LINEAR, the same interpolation in
  fixed point: pixels within one level of it).
- "pil" (Detectron2's ResizeShortestEdge): sides rounded with int(x + 0.5); PIL's bilinear filter on the
  uint8 image, before normalisation, in the model and in the loader alike.

Sizes are ints in eager mode. While a graph is recorded they are what the recorder gives: SymInts under
torch.export, 0-dim tensors under torch.jit.trace. `resized_size` then runs the same float64 arithmetic on
tensors, so that one exported graph serves every image size (Python's `min` and `int` would fix the sizes
to the example image's).
"""
import math
from dataclasses import dataclass
from typing import Callable, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from engine.errors import ConfigError


def as_float(size, like: torch.Tensor) -> torch.Tensor:
    """A 0-dim float32 tensor on `like`'s device holding a size: an int, a SymInt (torch.tensor would pin
    it to its example value), or the 0-dim tensor torch.jit.trace gives for a size."""
    if isinstance(size, torch.Tensor):
        return size.to(device=like.device, dtype=torch.float32)
    return torch.full((), size, dtype=torch.float32, device=like.device)


def scaled_size(height, width, scale):
    """(H, W) after resizing by `scale`: floor(side * scale), at least 1, as F.interpolate rounds an output
    size it computes from a scale factor. Sides and scale: Python numbers, or float64 0-dim tensors."""
    if isinstance(height, torch.Tensor):
        # float64 tensor arithmetic rounds as Python's floats do; .long() truncates as floor for sides > 0
        return (height * scale).long().clamp(min=1), (width * scale).long().clamp(min=1)
    return max(1, math.floor(height * scale)), max(1, math.floor(width * scale))


def shortest_edge_size(height, width, min_size: float, max_size: float):
    """"interpolate"'s rule: sides scaled by min(min_size / shorter, max_size / longer), rounded down."""
    if isinstance(height, torch.Tensor):
        h, w = height.double(), width.double()
        # Tensor by tensor: `number / tensor` is reciprocal(tensor) * number (Tensor.__rtruediv__), rounded
        # twice: 800 / 428 gives 1.8691588785046727 where Python gives ...29, and 428 times it 799.99... ->
        # 799 rows instead of 800 (a 640x428 image), which moves every detection.
        lo, hi = torch.minimum(h, w), torch.maximum(h, w)
        return scaled_size(h, w, torch.minimum(torch.full_like(lo, min_size) / lo, torch.full_like(hi, max_size) / hi))
    return scaled_size(height, width, min(min_size / min(height, width), max_size / max(height, width)))


def detectron2_resized_size(height: int, width: int, min_size: float, max_size: float) -> Tuple[int, int]:
    """"pil"'s rule, Detectron2's ResizeShortestEdge (data/transforms/augmentation_impl.py,
    get_output_shape): the shorter side to `min_size`, the longer capped at `max_size`, each rounded with
    int(x + 0.5)."""
    min_size, max_size = float(min_size), float(max_size)
    scale = min_size / min(height, width)
    new_h, new_w = (min_size, scale * width) if height < width else (scale * height, min_size)
    if max(new_h, new_w) > max_size:
        scale = max_size / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    return max(1, int(new_h + 0.5)), max(1, int(new_w + 0.5))


def _bilinear_tensor(image: torch.Tensor, size) -> torch.Tensor:
    # `size` and not a scale factor: the same output size and kernel as F.interpolate(scale_factor=s,
    # recompute_scale_factor=True), which drops the factor once it has rounded the size.
    return F.interpolate(image[None], size=tuple(size), mode="bilinear", align_corners=False)[0]


def _bilinear_array(image: np.ndarray, size) -> np.ndarray:
    import cv2

    if tuple(size) == image.shape[:2]:
        return image
    return cv2.resize(image, (int(size[1]), int(size[0])), interpolation=cv2.INTER_LINEAR)


def _pil_array(image: np.ndarray, size) -> np.ndarray:
    """PIL's BILINEAR filter (which averages over the source pixels a target pixel covers when shrinking)
    on an (H, W, 3) uint8 image, as Detectron2's ResizeTransform resizes uint8 images. torch's
    antialiased bilinear interpolation differs from it by 1 in about 0.1% of the pixels."""
    from PIL import Image

    return np.array(Image.fromarray(image).resize((int(size[1]), int(size[0])), Image.BILINEAR))


def _pil_tensor(image: torch.Tensor, size) -> torch.Tensor:
    """`_pil_array` on a (3, H, W) tensor; a float image in [0, 1] is rounded to uint8 first (Detectron2
    only ever resizes uint8 images)."""
    if image.dtype != torch.uint8:
        image = (image * 255).round().clamp(0, 255).to(torch.uint8)
    array = _pil_array(image.permute(1, 2, 0).cpu().numpy(), size)
    return torch.from_numpy(array).permute(2, 0, 1).to(image.device)


@dataclass(frozen=True)
class ResizeMode:
    """size: (H, W, min_size, max_size) -> (H, W). tensor: the filter of a (3, H, W) tensor in the model;
    array: of an (H, W, 3) uint8 array in the data loader. uint8: the filter works on uint8 pixels, so
    the model resizes before it normalises. graph: whether a recorded graph can hold it."""
    size: Callable
    tensor: Callable
    array: Callable
    uint8: bool
    graph: bool


RESIZE_MODES = {
    "interpolate": ResizeMode(shortest_edge_size, _bilinear_tensor, _bilinear_array, uint8=False, graph=True),
    "pil": ResizeMode(detectron2_resized_size, _pil_tensor, _pil_array, uint8=True, graph=False),
}


def get_resize_mode(name: str) -> ResizeMode:
    if name not in RESIZE_MODES:
        raise ConfigError(f"unknown input.resize_mode {name!r}; valid: {', '.join(RESIZE_MODES)}")
    return RESIZE_MODES[name]


def resized_size(height, width, min_size: float, max_size: float, mode: str = "interpolate"):
    """(H, W) of an image of `height` x `width` after the resize of `mode`.

    Under torch.export the sides are SymInts; the size is then computed on tensors and read back as
    unbacked SymInts (values known only when the graph runs), so that every later size is a short
    expression in them, not in the float arithmetic, which keeps torch.export fast. Under
    torch.jit.trace (0-dim tensor sides) it stays a pair of tensors."""
    rule = get_resize_mode(mode).size
    if not (isinstance(height, torch.SymInt) or isinstance(width, torch.SymInt)):
        return rule(height, width, min_size, max_size)
    h, w = rule(torch.full((), height, dtype=torch.float64), torch.full((), width, dtype=torch.float64),
                min_size, max_size)
    h, w = h.item(), w.item()
    torch._check(h >= 1)
    torch._check(w >= 1)
    return h, w


def resize_image(image, size, mode: str = "interpolate"):
    """`image` resized to `size` (H, W) by `mode`'s filter: a (3, H, W) tensor (the model's: float, or
    uint8 for "pil"), or an (H, W, 3) uint8 array (the data loader's)."""
    m = get_resize_mode(mode)
    return m.tensor(image, size) if isinstance(image, torch.Tensor) else m.array(image, size)


def resize_masks(masks, size):
    """Instance masks at `size` (H, W), nearest neighbour: an (N, H, W) tensor (the model's) or an (H, W)
    uint8 array (the data loader's, one mask at a time)."""
    if isinstance(masks, torch.Tensor):
        if tuple(masks.shape[-2:]) == tuple(size):
            return masks
        return F.interpolate(masks[:, None], size=tuple(size), mode="nearest")[:, 0]
    import cv2

    if tuple(size) == masks.shape[:2]:
        return masks
    return cv2.resize(masks, (int(size[1]), int(size[0])), interpolation=cv2.INTER_NEAREST)
