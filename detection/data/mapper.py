"""Detection augmentation with albumentations: image and boxes (and, for Mask R-CNN, masks) transformed
together. Albumentations does all the geometry; this file only chooses sizes and wires the pipeline.

The resize is the model's own (`detection/resize.py`): the same size rule and filter for the mode
(`input.resize_mode`), so training images are prepared as the model prepares test images.
"""
from typing import Optional, Sequence

import albumentations as A
import cv2
import numpy as np

from engine.errors import ConfigError, DatasetError

from ..resize import get_resize_mode, resize_image, resize_masks, resized_size, scaled_size
from .samplers import sample_seed

LSJ_KEYS = ("size", "min_scale", "max_scale")
# A crop can leave slivers of boxes at its border; under 1 px^2 they are no longer objects.
LSJ_MIN_BOX_AREA = 1.0


class _Resize(A.DualTransform):
    """Resize to a size chosen per call (`_size`), in one interpolation: the mode's filter for the image,
    nearest neighbour for masks. Boxes need nothing: albumentations keeps them normalised to the image size."""

    def __init__(self, mode: str = "interpolate", p: float = 1.0):
        super().__init__(p=p)
        get_resize_mode(mode)
        self.mode = mode

    def _size(self, height: int, width: int):
        raise NotImplementedError

    def get_params_dependent_on_data(self, params, data):
        height, width = params["shape"][:2]
        return {"target_shape": self._size(height, width)}

    def apply(self, img, target_shape=(1, 1), **params):
        return resize_image(img, target_shape, self.mode)

    def apply_to_mask(self, mask, target_shape=(1, 1), **params):
        return resize_masks(mask, target_shape)

    def apply_to_bboxes(self, bboxes, **params):
        return bboxes


class ResizeShortestEdge(_Resize):
    """Shorter side to a size drawn uniformly from `sizes` (one per call), longer side at most `max_size`."""

    def __init__(self, sizes: Sequence[int], max_size: int, mode: str = "interpolate", p: float = 1.0):
        super().__init__(mode, p=p)
        self.sizes, self.max_size = list(sizes), max_size

    def _size(self, height, width):
        size = self.sizes[self.py_random.randrange(len(self.sizes))]
        return resized_size(height, width, size, self.max_size, self.mode)

    def get_transform_init_args_names(self):
        return ("sizes", "max_size", "mode")


class ScaleJitter(_Resize):
    """Longer side to `size` times a scale drawn uniformly from [min_scale, max_scale]."""

    def __init__(self, size: int, min_scale: float, max_scale: float, mode: str = "interpolate", p: float = 1.0):
        super().__init__(mode, p=p)
        self.size, self.min_scale, self.max_scale = size, min_scale, max_scale

    def _size(self, height, width):
        return scaled_size(height, width, self.size * self.py_random.uniform(self.min_scale, self.max_scale) /
                           max(height, width))

    def get_transform_init_args_names(self):
        return ("size", "min_scale", "max_scale", "mode")


def large_scale_jitter(size: int, min_scale: float = 0.1, max_scale: float = 2.0, mode: str = "interpolate"):
    """Ghiasi et al. 2021 (Copy-Paste): the image scaled to `size` x [min_scale, max_scale] on its longer
    side, then a random `size` x `size` crop, zero-padded at the bottom and right where it is smaller."""
    if size <= 0 or not 0 < min_scale <= max_scale:
        raise ConfigError(f"large-scale jitter needs size > 0 and 0 < min_scale <= max_scale; got size {size}, "
                          f"min_scale {min_scale}, max_scale {max_scale} (input.lsj_*)")
    return [ScaleJitter(size, min_scale, max_scale, mode),
            A.RandomCrop(size, size, pad_if_needed=True, pad_position="top_left", border_mode=cv2.BORDER_CONSTANT,
                         fill=0)]


class DetectionTransform:
    """`transform(image, boxes, labels, seed=None) -> (image, boxes, labels)`, and with instance masks
    `transform(image, boxes, labels, seed, masks=masks) -> (image, boxes, labels, masks)`.

    image: HxWx3 uint8; boxes: (N, 4) float xyxy pixels ("pascal_voc"); labels: (N,) ints, a label field,
    so a box the transform drops takes its label with it. masks: (N, H, W) uint8, one per box, moved with
    the image (nearest-neighbour resize, flip, crop, zero padding); a box the transform drops (an LSJ crop)
    takes its mask with it, through the box's index carried as a second label field. Boxes stay as given,
    never recomputed from the masks.

    seed: this call's random choices become a function of the seed alone, whatever process runs it. Each
    transform gets its own seed derived from it: albumentations' `Compose.set_random_seed` hands all of
    them the same one, which would tie, say, the jitter scale to the crop position.
    """

    def __init__(self, transforms, min_box_area: float = 0.0):
        self.compose = A.Compose(transforms, bbox_params=A.BboxParams(
            format="pascal_voc", label_fields=["labels", "indices"], min_area=min_box_area, clip=True))

    def set_random_seed(self, seed: Optional[int]):
        self.compose.set_random_seed(seed)
        if seed is not None:
            for k, t in enumerate(self.compose.transforms):
                t.set_random_seed(sample_seed(seed, k))

    def __call__(self, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, seed: Optional[int] = None,
                 masks: Optional[np.ndarray] = None):
        if seed is not None:
            self.set_random_seed(seed)
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        data = {"image": image, "bboxes": boxes, "labels": np.asarray(labels, np.int64).reshape(-1),
                "indices": np.arange(len(boxes))}
        if masks is not None:
            if len(masks) != len(boxes) or tuple(masks.shape[1:]) != image.shape[:2]:
                raise DatasetError(f"masks of shape {tuple(masks.shape)} for {len(boxes)} boxes on an image of "
                                   f"shape {image.shape[:2]}; expected one (H, W) mask per box")
            if len(masks):  # albumentations cannot stack an empty list of masks
                data["masks"] = masks
        out = self.compose(**data)
        image, boxes = out["image"], np.asarray(out["bboxes"], np.float32).reshape(-1, 4)
        labels = np.asarray(out["labels"], np.int64).reshape(-1)
        if masks is None:
            return image, boxes, labels
        kept = np.asarray(out["indices"], np.int64).reshape(-1)
        masks = np.asarray(out["masks"])[kept] if len(masks) else np.zeros((0, *image.shape[:2]), np.uint8)
        return image, boxes, labels, masks


def build_det_transform(train: bool, min_size_train=(800,), max_size_train=1333, min_size_test=800,
                        max_size_test=1333, flip_prob=0.5, lsj: Optional[dict] = None, resize_mode: str = "interpolate",
                        train_resize: bool = True) -> DetectionTransform:
    """Training: large-scale jitter when `lsj` ({"size", "min_scale", "max_scale"}) is given, else a
    shorter-side resize drawn from `min_size_train` (none when not `train_resize`: the model resizes);
    then a horizontal flip with `flip_prob`. Test: the shorter-side resize to `min_size_test` only.
    `resize_mode`: a name in resize.RESIZE_MODES, the model's."""
    if not 0.0 <= flip_prob <= 1.0:
        raise ConfigError(f"input.flip_prob={flip_prob} is not a probability in [0, 1]")
    if not train:
        return DetectionTransform([ResizeShortestEdge([min_size_test], max_size_test, resize_mode)])
    if not train_resize:
        if lsj:
            # The model would resize the jittered crops again, to min_size_train.
            raise ConfigError("input.lsj_size needs input.train_resize=loader: large-scale jitter is the "
                              "training resize, which input.train_resize=model leaves to the model")
        return DetectionTransform([A.HorizontalFlip(p=flip_prob)])
    if lsj:
        unknown = set(lsj) - set(LSJ_KEYS)
        if unknown:
            raise ConfigError(f"large-scale jitter got unknown keys {sorted(unknown)}; valid: {', '.join(LSJ_KEYS)}")
        return DetectionTransform(large_scale_jitter(**lsj, mode=resize_mode) + [A.HorizontalFlip(p=flip_prob)],
                                  min_box_area=LSJ_MIN_BOX_AREA)
    if not min_size_train:
        raise ConfigError("input.min_size_train is empty; give at least one shorter-side size")
    return DetectionTransform([ResizeShortestEdge(min_size_train, max_size_train, resize_mode),
                               A.HorizontalFlip(p=flip_prob)])


def transform_from_config(cfg, train: bool) -> DetectionTransform:
    i = cfg.input
    lsj = {"size": i.lsj_size, "min_scale": i.lsj_min_scale, "max_scale": i.lsj_max_scale} if i.lsj_size else None
    return build_det_transform(train, i.min_size_train, i.max_size_train, i.min_size_test, i.max_size_test,
                               i.flip_prob, lsj, i.resize_mode, train_resize=i.train_resize == "loader")
