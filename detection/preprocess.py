"""Pre-processing inside the model, so callers pass raw images and get boxes in their own pixels.

Input contract (torchvision's): a list of (3, H, W) RGB tensors, float in [0, 1] or uint8. Each image is
converted to the model's pixel format (RGB or BGR, scale 0-1 or 0-255), normalised with mean/std,
resized so its shorter side is `min_size` unless its longer side would exceed `max_size` (detection/resize.py,
the resize the data loader uses too), and the batch is zero-padded (zero = the mean pixel after
normalisation) to a multiple of `size_divisibility`.

Every size here may be a SymInt (torch.export) or a 0-dim tensor (torch.jit.trace) as well as an int, so
that the exported graph (detection/export) is this code, recorded: padding is integer arithmetic and
size tensors are built from the sizes, never through Python floats.
"""
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import ConfigError, DatasetError

from .resize import as_float, get_resize_mode, resize_image, resize_masks, resized_size
from .structures import ImageBatch, recording

FORMATS = ("RGB", "BGR")


def scale_boxes(boxes: torch.Tensor, from_size: Sequence, to_size: Sequence) -> torch.Tensor:
    """Map xyxy boxes between image sizes (H, W), one float32 ratio per axis."""
    ry = as_float(to_size[0], boxes) / as_float(from_size[0], boxes)
    rx = as_float(to_size[1], boxes) / as_float(from_size[1], boxes)
    return boxes * torch.stack([rx, ry, rx, ry]).to(boxes.dtype)


def sizes_tensor(sizes: Sequence, like: torch.Tensor) -> torch.Tensor:
    """(B, 2) float32 heights and widths of `sizes`, built in the graph where they are recorded sizes."""
    return torch.stack([torch.stack([as_float(h, like), as_float(w, like)]) for h, w in sizes])


class _RecordedBatch(ImageBatch):
    """An ImageBatch whose sizes are SymInts or traced tensors: its size tensor is made from them in the
    graph (ImageBatch's torch.tensor would fix them to the example image's)."""

    def sizes_tensor(self) -> torch.Tensor:
        return sizes_tensor(self.image_sizes, self.tensor)


class Preprocessor(nn.Module):
    """resize_mode: a name in resize.RESIZE_MODES. resize_in_training: whether training images are resized
    here (torchvision's contract) or arrive resized by the data loader (`input.train_resize=loader`, our
    trainer: albumentations in the loader's workers); test images are always resized here."""

    def __init__(self, pixel_mean: Sequence[float], pixel_std: Sequence[float], input_format: str = "RGB",
                 pixel_scale: float = 1.0, min_size_train: Sequence[int] = (800,), max_size_train: int = 1333,
                 min_size_test: int = 800, max_size_test: int = 1333, size_divisibility: int = 32,
                 memory_format: torch.memory_format = torch.contiguous_format, resize_mode: str = "interpolate",
                 resize_in_training: bool = True):
        super().__init__()
        self.mode = get_resize_mode(resize_mode)
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
        self.resize_in_training = resize_in_training

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        if image.dtype == torch.uint8 and self.mode.uint8:
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

    def target_size(self):
        """(min_size, max_size) of the next image's resize."""
        if self.training:
            # One shorter-side size per image, drawn from torch's RNG so a seed fixes it.
            i = int(torch.empty(1).uniform_(0.0, float(len(self.min_size_train))).item())
            return float(self.min_size_train[i]), float(self.max_size_train)
        return float(self.min_size_test), float(self.max_size_test)

    def resize(self, image: torch.Tensor) -> torch.Tensor:
        """One (3, H, W) image resized by `resize_mode` to the size of `target_size` (normalised first for
        "interpolate", as torchvision does; "pil" filters the uint8 pixels)."""
        size = resized_size(*image.shape[-2:], *self.target_size(), mode=self.resize_mode)
        return resize_image(image, size, self.resize_mode)

    def prepare(self, image: torch.Tensor, resize: bool) -> torch.Tensor:
        """One image normalised and, if `resize`, resized (before normalising where the filter works on
        uint8 pixels, after it otherwise)."""
        if not resize:
            return self.normalize(image)
        return self.normalize(self.resize(image)) if self.mode.uint8 else self.resize(self.normalize(image))

    def forward(self, images: List[torch.Tensor], targets: Optional[List[Dict[str, torch.Tensor]]] = None):
        check_images(images)
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        resize = self.resize_in_training or not self.training
        resized = [self.prepare(img, resize) for img in images]
        sizes = [tuple(img.shape[-2:]) for img in resized]
        if targets is not None:
            targets = [resize_target(t, o, s) for t, o, s in zip(targets, original_sizes, sizes)]
        # Rounded up with integer arithmetic (the same as math.ceil for ints), which a recorded size keeps.
        d = self.size_divisibility
        h = (max(s[0] for s in sizes) + d - 1) // d * d
        w = (max(s[1] for s in sizes) + d - 1) // d * d
        # Zero padding at the bottom and right: zero is the mean pixel after normalisation.
        padded = [F.pad(img, (0, w - img.shape[2], 0, h - img.shape[1])) for img in resized]
        batch = (padded[0][None] if len(padded) == 1 else torch.stack(padded))
        batch = batch.contiguous(memory_format=self.memory_format)
        return (_RecordedBatch if recording() else ImageBatch)(batch, sizes), targets, original_sizes

    @staticmethod
    def postprocess(detections: List[Dict[str, torch.Tensor]], image_sizes, original_sizes):
        """Boxes from the resized image back to the caller's pixels."""
        return [dict(d, boxes=scale_boxes(d["boxes"], s, o)) for d, s, o in zip(detections, image_sizes, original_sizes)]


def resize_target(target: Dict[str, torch.Tensor], from_size, to_size) -> Dict[str, torch.Tensor]:
    """A target's boxes, and instance masks (N, H, W) if it has them (nearest neighbour), at the resized
    image's size."""
    target = dict(target, boxes=scale_boxes(target["boxes"], from_size, to_size))
    if target.get("masks") is not None:
        target["masks"] = resize_masks(target["masks"], to_size)
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
