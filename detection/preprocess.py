"""Pre-processing inside the model, so callers pass raw images and get boxes in their own pixels.

Input contract (torchvision's): a list of (3, H, W) RGB tensors, float in [0, 1] or uint8. Each image is
converted to the model's pixel format (RGB or BGR, scale 0-1 or 0-255), normalised with mean/std,
resized so its shorter side is `min_size` unless its longer side would exceed `max_size`, and the batch
is zero-padded (zero = the mean pixel after normalisation) to a multiple of `size_divisibility`.
"""
import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import ConfigError, DatasetError

from .structures import ImageBatch, recording

FORMATS = ("RGB", "BGR")
RESIZE_MODES = ("interpolate", "pil")


def resized_scale(height: int, width: int, min_size: float, max_size: float) -> float:
    return min(min_size / min(height, width), max_size / max(height, width))


def detectron2_resized_size(height: int, width: int, min_size: float, max_size: float) -> Tuple[int, int]:
    """(H, W) after Detectron2's ResizeShortestEdge (data/transforms/augmentation_impl.py, get_output_shape):
    the shorter side to `min_size`, the longer capped at `max_size`, each rounded with int(x + 0.5)."""
    scale = min_size / min(height, width)
    new_h, new_w = (min_size, scale * width) if height < width else (scale * height, min_size)
    if max(new_h, new_w) > max_size:
        scale = max_size / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    return int(new_h + 0.5), int(new_w + 0.5)


def pil_resize(image: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """A (3, H, W) uint8 image resized to `size` by PIL's BILINEAR filter (which averages over the source
    pixels a target pixel covers when shrinking), as Detectron2's ResizeTransform does for uint8 images.
    torch's antialiased bilinear interpolation differs from it by 1 in about 0.1% of the pixels."""
    from PIL import Image

    array = image.permute(1, 2, 0).cpu().numpy()
    resized = Image.fromarray(array).resize((size[1], size[0]), Image.BILINEAR)
    return torch.from_numpy(np.array(resized)).permute(2, 0, 1).to(image.device)


def scale_boxes(boxes: torch.Tensor, from_size: Sequence[int], to_size: Sequence[int]) -> torch.Tensor:
    """Map xyxy boxes between image sizes (H, W), one float32 ratio per axis."""
    ry = torch.tensor(float(to_size[0]), device=boxes.device) / torch.tensor(float(from_size[0]), device=boxes.device)
    rx = torch.tensor(float(to_size[1]), device=boxes.device) / torch.tensor(float(from_size[1]), device=boxes.device)
    return boxes * torch.stack([rx, ry, rx, ry]).to(boxes.dtype)


class Preprocessor(nn.Module):
    def __init__(self, pixel_mean: Sequence[float], pixel_std: Sequence[float], input_format: str = "RGB",
                 pixel_scale: float = 1.0, min_size_train: Sequence[int] = (800,), max_size_train: int = 1333,
                 min_size_test: int = 800, max_size_test: int = 1333, size_divisibility: int = 32,
                 memory_format: torch.memory_format = torch.contiguous_format, resize_mode: str = "interpolate"):
        super().__init__()
        if resize_mode not in RESIZE_MODES:
            raise ConfigError(f"unknown resize mode {resize_mode!r}; valid: {', '.join(RESIZE_MODES)}")
        # "interpolate": bilinear F.interpolate of the normalised float image (torchvision's transform);
        # "pil": Detectron2's test-time resize, PIL on the uint8 image before normalisation.
        self.resize_mode = resize_mode
        if input_format not in FORMATS:
            raise ConfigError(f"unknown input format {input_format!r}; valid: RGB, BGR")
        if len(pixel_mean) != 3 or len(pixel_std) != 3:
            raise ConfigError(f"pixel mean and std need 3 values, got {list(pixel_mean)} and {list(pixel_std)}")
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(3, 1, 1), persistent=False)
        self.input_format = input_format
        self.pixel_scale = pixel_scale
        self.min_size_train = list(min_size_train)
        self.max_size_train = max_size_train
        self.min_size_test = min_size_test
        self.max_size_test = max_size_test
        self.size_divisibility = size_divisibility
        self.memory_format = memory_format  # of the padded batch: channels_last for an NHWC model
        # torchvision's contract: the model resizes training images too. The trainer's data pipeline
        # resizes with albumentations instead (in its workers) and turns this off.
        self.resize_in_training = True

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        if image.dtype == torch.uint8 and self.resize_mode == "pil":
            # x * 1.0 for pixel_scale 255: Detectron2's exact 0-255 floats (x / 255 * 255 is not always x).
            image = image.float() * (self.pixel_scale / 255)
            image = image.flip(0) if self.input_format == "BGR" else image
            return (image - self.pixel_mean) / self.pixel_std
        if image.dtype == torch.uint8:
            image = image.float() / 255
        image = image.to(self.pixel_mean.dtype)
        if self.pixel_scale != 1.0:
            image = image * self.pixel_scale
        if self.input_format == "BGR":
            image = image.flip(0)
        return (image - self.pixel_mean) / self.pixel_std

    def target_size(self) -> Tuple[float, float]:
        if self.training:
            # One shorter-side size per image, drawn from torch's RNG so a seed fixes it.
            i = int(torch.empty(1).uniform_(0.0, float(len(self.min_size_train))).item())
            return float(self.min_size_train[i]), float(self.max_size_train)
        return float(self.min_size_test), float(self.max_size_test)

    def resize(self, image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[-2:]
        scale = resized_scale(h, w, *self.target_size())
        return F.interpolate(image[None], scale_factor=scale, mode="bilinear", recompute_scale_factor=True,
                             align_corners=False)[0]

    def resize_uint8(self, image: torch.Tensor) -> torch.Tensor:
        """`resize_mode="pil"`: Detectron2's size and PIL's filter on the uint8 image (float images in [0, 1]
        are rounded to uint8 first: Detectron2 only ever resizes uint8 images)."""
        if image.dtype != torch.uint8:
            image = (image * 255).round().clamp(0, 255).to(torch.uint8)
        size = detectron2_resized_size(*image.shape[-2:], *self.target_size())
        return pil_resize(image, size)

    def forward(self, images: List[torch.Tensor], targets: Optional[List[Dict[str, torch.Tensor]]] = None):
        check_images(images)
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        if self.training and not self.resize_in_training:
            resized = [self.normalize(img) for img in images]
        elif self.resize_mode == "pil":
            resized = [self.normalize(self.resize_uint8(img)) for img in images]
        else:
            resized = [self.resize(self.normalize(img)) for img in images]
        sizes = [tuple(img.shape[-2:]) for img in resized]
        if targets is not None:
            targets = [resize_target(t, o, s) for t, o, s in zip(targets, original_sizes, sizes)]
        d = self.size_divisibility
        h = int(math.ceil(max(s[0] for s in sizes) / d) * d)
        w = int(math.ceil(max(s[1] for s in sizes) / d) * d)
        batch = resized[0].new_zeros((len(resized), 3, h, w)).contiguous(memory_format=self.memory_format)
        for i, img in enumerate(resized):
            batch[i, :, : img.shape[1], : img.shape[2]] = img
        return ImageBatch(batch, sizes), targets, original_sizes

    @staticmethod
    def postprocess(detections: List[Dict[str, torch.Tensor]], image_sizes, original_sizes):
        """Boxes from the resized image back to the caller's pixels."""
        return [dict(d, boxes=scale_boxes(d["boxes"], s, o)) for d, s, o in zip(detections, image_sizes, original_sizes)]


def resize_target(target: Dict[str, torch.Tensor], from_size, to_size) -> Dict[str, torch.Tensor]:
    """A target's boxes, and instance masks (N, H, W) if it has them (nearest neighbour), at the resized
    image's size."""
    target = dict(target, boxes=scale_boxes(target["boxes"], from_size, to_size))
    masks = target.get("masks")
    if masks is not None and tuple(masks.shape[-2:]) != tuple(to_size):
        target["masks"] = F.interpolate(masks[:, None], size=tuple(to_size), mode="nearest")[:, 0]
    return target


def check_images(images):
    """The input contract, checked before any work: a non-empty list of non-empty (3, H, W) tensors whose
    pixels are finite. Raises DatasetError naming the first image at fault."""
    if not isinstance(images, (list, tuple)) or not images:
        raise DatasetError(f"the detector takes a non-empty list of (3, H, W) image tensors, got {type(images).__name__}")
    for i, img in enumerate(images):
        if not isinstance(img, torch.Tensor) or img.dim() != 3 or img.shape[0] != 3:
            shape = tuple(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__
            raise DatasetError(f"image {i}: expected a (3, H, W) RGB tensor, got {shape}")
        if min(img.shape[-2:]) < 1:
            raise DatasetError(f"image {i} is empty: shape {tuple(img.shape)}")
    check_finite_images(images)


def check_finite_images(images: Sequence[torch.Tensor]):
    """A float image holding NaN or inf would give NaN losses in training and, at inference, no detections
    at all (NaN scores fail every threshold) or NaN boxes, with nothing saying why. One reduction per float
    image and one device sync for the batch (uint8 images cannot hold either). Skipped while a graph is
    recorded (torch.export, torch.jit.trace), which cannot branch on pixel values."""
    floats = [(i, img) for i, img in enumerate(images) if img.is_floating_point()]
    if not floats or recording():
        return
    finite = torch.stack([torch.isfinite(img).all() for _, img in floats])
    if bool(finite.all()):
        return
    i, img = floats[int(torch.nonzero(~finite)[0])]
    nan, inf = int(torch.isnan(img).sum()), int(torch.isinf(img).sum())
    raise DatasetError(f"image {i} ({img.dtype}, shape {tuple(img.shape)}) has {nan} NaN and {inf} infinite "
                       "pixel values; the detector takes finite pixels (float in [0, 1] or uint8): check how "
                       "the image was loaded, converted or augmented")


def check_targets(targets, num_images):
    if targets is None:
        raise DatasetError("training mode needs targets: one dict per image with 'boxes' (N, 4) xyxy and 'labels' (N,)")
    if len(targets) != num_images:
        raise DatasetError(f"got {num_images} images but {len(targets)} targets")
    for i, t in enumerate(targets):
        boxes, labels = t.get("boxes"), t.get("labels")
        if not isinstance(boxes, torch.Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4:
            raise DatasetError(f"target {i}: 'boxes' must be a float tensor of shape (N, 4), got "
                               f"{tuple(boxes.shape) if isinstance(boxes, torch.Tensor) else type(boxes).__name__}")
        if not isinstance(labels, torch.Tensor) or labels.shape != boxes.shape[:1]:
            raise DatasetError(f"target {i}: 'labels' must be a tensor of shape ({len(boxes)},)")
        # A positive width and height, and finite (NaN fails the comparisons, inf does not).
        bad = ~((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]) & torch.isfinite(boxes).all(1))
        if bad.any():  # one sync per target, as before
            j = int(torch.nonzero(bad)[0])
            if not bool(torch.isfinite(boxes[j]).all()):
                raise DatasetError(f"target {i}: box {j} {boxes[j].tolist()} is not finite (NaN or inf)")
            raise DatasetError(f"target {i}: box {j} {boxes[j].tolist()} has zero or negative width or height")
