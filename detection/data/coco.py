"""COCO-format detection datasets: the annotation file checked up front, targets prepared once.

Labels are contiguous, 1..K in the order of `categories` (the config's `data.categories`; empty: the
file's categories sorted by id), with 0 the background; `label_space="category_id"` uses the ids
themselves. Crowd regions never become targets; boxes are clipped to the image; boxes with no
area left, NaN or infinite coordinates are dropped. Every drop is counted (`stats`) and logged once, so a
broken conversion shows in the log instead of as a quietly weaker model.

Instance masks (`with_masks=True`, Mask R-CNN) come from each annotation's `segmentation`: polygons (one
or more flat [x0, y0, x1, y1, ...] lists per object), uncompressed RLE ({"size", "counts": [ints]}) or
compressed RLE (counts a str). They are checked when the file is read and rasterised by pycocotools only
in `__getitem__`, at the image's own size, so no full-image bitmaps are kept for the dataset. A polygon
with fewer than 3 points, an odd number of coordinates, a NaN/inf coordinate or a coordinate beyond
+-POLYGON_REACH times the image's longer side is left out; an object
with no usable polygon left is dropped entirely, box included (as torchvision and Detectron2 expect:
a box target without its mask would teach the mask head an empty object). Coordinates outside the image
are clipped by the rasterisation; self-intersecting polygons are filled as pycocotools fills them. An RLE
whose size is not the image's is left out and counted (`rle_wrong_size`), its object with it; for a crowd
region, which COCO evaluation reads, it is a DatasetError naming the annotation. An RLE of the image's size
whose runs do not add up to its height * width is a DatasetError (pycocotools would read past its buffer).

Everything else malformed in the file (not JSON, not an object, a list or key missing, a wrong type, a
duplicate id, an unknown image or category id, a file_name leaving the image directory) is a DatasetError
naming the file and the entry, raised when the file is read.
"""
import contextlib
import io
import logging
import math
import os
from typing import List, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from engine.data.decode import ImageReader, read_json
from engine.data.paths import require_path
from engine.errors import ConfigError, DatasetError

from .coco_format import as_float, check_coco_structure, check_rle, is_number

logger = logging.getLogger("detection.data")

LABEL_SPACES = ("contiguous", "category_id")
# Why an annotation is not a target: crowd region, w or h <= 0, NaN/inf, nothing left after clipping to
# the image, category not among `categories`.
# With masks also: no usable polygon (or no segmentation at all).
ANNOTATION_DROPS = ("crowd", "degenerate", "non_finite", "outside_image", "other_category", "no_valid_mask")
# Single polygons (or an RLE) left out of an object's mask (with_masks); the object stays while one
# polygon is left.
SEGMENTATION_DROPS = ("polygon_too_short", "polygon_odd_length", "polygon_non_finite", "polygon_out_of_range",
                      "rle_wrong_size")
# A polygon coordinate beyond +-this many times the image's longer side is broken (pycocotools'
# rasterisation would allocate memory in proportion to it, or overflow).
POLYGON_REACH = 4
# Narrower than this after clipping, a box is a line, not an object (the model's regression targets
# would divide by its width).
MIN_BOX_SIDE = 1e-2


def safe_join(img_dir: str, file_name, path: str, image_id) -> str:
    """img_dir/file_name, refusing names that leave img_dir (absolute or through `..`). Checked on the
    name only: symbolic links inside img_dir may point anywhere (subsets are often built from links)."""
    if not isinstance(file_name, str) or not file_name:
        raise DatasetError(f"{path}: image {image_id} has file_name {repr(file_name)[:80]}; expected a relative "
                           "path")
    try:
        os.fsencode(file_name)
        unusable = "\0" in file_name
    except UnicodeError:
        unusable = True
    if unusable:
        raise DatasetError(f"{path}: image {image_id} has file_name {file_name[:80]!r}, which no file can have "
                           "(a NUL character or an unencodable one)")
    normalized = os.path.normpath(file_name)
    if normalized == os.curdir:
        raise DatasetError(f"{path}: image {image_id} has file_name {file_name!r}, the image directory itself; "
                           "expected the path of an image file")
    if os.path.isabs(file_name) or normalized == os.pardir or normalized.startswith(os.pardir + os.sep):
        raise DatasetError(f"{path}: image {image_id} file_name {file_name!r} points outside the image "
                           f"directory {img_dir}; refused")
    return os.path.join(img_dir, normalized)


def clip_box(bbox, width, height):
    """COCO [x, y, w, h] -> xyxy clipped to the image, or None with the reason the box is unusable."""
    bbox = [as_float(v) for v in bbox]
    if not all(math.isfinite(v) for v in bbox):
        return None, "non_finite"
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        return None, "degenerate"
    x0, y0 = min(max(x, 0.0), width), min(max(y, 0.0), height)
    x1, y1 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
    if x1 - x0 < MIN_BOX_SIDE or y1 - y0 < MIN_BOX_SIDE:
        return None, "outside_image"
    return (x0, y0, x1, y1), None


def check_segmentation(seg, img: dict, path: str, ann_id):
    """(what `rasterize` takes, or None when no usable polygon is left; the SEGMENTATION_DROPS reason of
    each polygon or RLE left out). A malformed entry (not polygons or RLE) is a DatasetError; an RLE of
    another size than its image is left out (`rle_wrong_size`)."""
    if isinstance(seg, dict):
        rle = check_rle(seg, img, f"{path}: annotation {ann_id}")
        return (rle, []) if rle is not None else (None, ["rle_wrong_size"])
    if not isinstance(seg, list):
        raise DatasetError(f"{path}: annotation {ann_id} has segmentation {str(seg)[:80]}; expected polygons "
                           "[[x0, y0, x1, y1, ...], ...] or RLE {'size': [height, width], 'counts': ...}")
    kept, dropped = [], []
    for poly in seg:
        if not (isinstance(poly, list) and all(is_number(v) for v in poly)):
            raise DatasetError(f"{path}: annotation {ann_id} has polygon {str(poly)[:80]}; a polygon is a flat "
                               "list of numbers [x0, y0, x1, y1, ...]")
        coords = [as_float(v) for v in poly]
        if not all(math.isfinite(v) for v in coords):
            dropped.append("polygon_non_finite")
        elif max(map(abs, coords), default=0) > POLYGON_REACH * max(img["height"], img["width"]):
            dropped.append("polygon_out_of_range")
        elif len(poly) < 6:
            dropped.append("polygon_too_short")
        elif len(poly) % 2:
            dropped.append("polygon_odd_length")
        else:
            kept.append(poly)
    return kept or None, dropped


def rasterize(segmentations: Sequence, height: int, width: int) -> np.ndarray:
    """(N, height, width) uint8 binary masks of checked segmentations (`check_segmentation`), by pycocotools:
    the polygons of one object merged into one mask, RLE decoded."""
    if not segmentations:
        return np.zeros((0, height, width), np.uint8)
    rles = []
    for seg in segmentations:
        if isinstance(seg, list):
            rles.append(mask_utils.merge(mask_utils.frPyObjects(seg, height, width)))
        elif isinstance(seg["counts"], list):
            rles.append(mask_utils.frPyObjects(seg, height, width))
        else:
            rles.append(seg)
    return np.ascontiguousarray(mask_utils.decode(rles).transpose(2, 0, 1))


def label_categories(categories: Sequence[dict], file_categories: Sequence[dict], path: str) -> List[dict]:
    """The detector's classes in label order: `categories` checked against the file, or the file's own."""
    by_id = {c["id"]: c for c in file_categories}
    if not categories:
        return [{"id": i, "name": by_id[i]["name"]} for i in sorted(by_id)]
    for i, c in enumerate(categories):
        if not (isinstance(c, dict) and "id" in c and "name" in c):
            raise ConfigError(f"data.categories[{i}] is {c!r}; each entry needs 'id' and 'name'")
    missing = [f"{c['id']} ({c['name']})" for c in categories if c["id"] not in by_id]
    if missing:
        raise DatasetError(f"{path}: data.categories lists categories the file does not have: "
                           f"{', '.join(missing)}; remove them or use the matching annotation file")
    ids = [c["id"] for c in categories]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"data.categories lists a category id twice: {ids}")
    for c in categories:
        if c["name"] != by_id[c["id"]]["name"]:
            logger.warning("data.categories names category %s %r, %s calls it %r", c["id"], c["name"], path,
                           by_id[c["id"]]["name"])
    return [{"id": c["id"], "name": c["name"]} for c in categories]


class CocoDetection(Dataset):
    """Items are `(image, target)`: image a uint8 (3, H, W) RGB tensor after `mapper`; target a dict of
    `boxes` (N, 4) float32 xyxy in that image's pixels, `labels` (N,) int64, `image_id` and `orig_size`
    (H, W) of the file; with `with_masks`, also `masks` (N, H, W) uint8, one binary mask per box in the same
    order, in the same pixels as the image. An item may be an index or an `(index, seed)` pair; the seed
    fixes the augmentation of that item (see samplers.py).

    Crowd regions are never targets (COCO evaluation reads them from the annotation file itself).
    train: with `filter_empty`, images without any usable box are skipped; at test every image is kept.
    mapper: `mapper(image, boxes, labels[, seed]) -> (image, boxes, labels)`, with masks
    `mapper(image, boxes, labels[, seed], masks=masks) -> (image, boxes, labels, masks)`
    (mapper.DetectionTransform), or None (the decoded image as it is).
    skip_bad_images: an unreadable image is logged, counted (`num_skipped`) and the next one returned,
    instead of a DatasetError naming the file.
    `annotations(i)`: the raw COCO annotations behind item i's boxes, in the same order (segmentation
    included), for heads that need more than boxes.
    """

    def __init__(self, ann_file: str, img_dir: str, categories: Sequence[dict] = (),
                 label_space: str = "contiguous", train: bool = True, filter_empty: bool = True,
                 skip_bad_images: bool = False, mapper=None, ann_setting: str = "data.train.ann_file",
                 img_setting: str = "data.train.img_dir", with_masks: bool = False):
        if label_space not in LABEL_SPACES:
            raise ConfigError(f"model.label_space={label_space!r}; valid values: {', '.join(LABEL_SPACES)}")
        require_path(ann_file, ann_setting, "annotation file")
        require_path(img_dir, img_setting, "image directory", folder=True)
        self.ann_file, self.img_dir, self.train, self.mapper = ann_file, img_dir, train, mapper
        self.with_masks = with_masks
        data = read_json(ann_file, "annotation file")
        check_coco_structure(data, ann_file)
        self.coco = COCO()
        self.coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco.createIndex()
        self.categories = label_categories(categories, data["categories"], ann_file)
        if label_space == "category_id":
            background = [c["id"] for c in self.categories if c["id"] < 1]
            if background:
                raise DatasetError(f"{ann_file}: category id(s) {background} are not valid labels with "
                                   "model.label_space='category_id' (label 0 is the background); use "
                                   "model.label_space='contiguous'")
            self.category_id_to_label = {c["id"]: c["id"] for c in self.categories}
        else:
            self.category_id_to_label = {c["id"]: i + 1 for i, c in enumerate(self.categories)}
        self.label_to_category_id = {v: k for k, v in self.category_id_to_label.items()}
        self.stats = {"images": len(data["images"]), "annotations": len(data["annotations"]),
                      **{k: 0 for k in ANNOTATION_DROPS}, **{k: 0 for k in SEGMENTATION_DROPS},
                      "images_without_boxes": 0, "images_skipped": 0}
        self.records = [self._record(img) for img in sorted(data["images"], key=lambda i: i["id"])]
        if train and filter_empty:
            kept = [r for r in self.records if len(r["labels"])]
            self.stats["images_skipped"] = len(self.records) - len(kept)
            self.records = kept
        if not self.records:
            raise DatasetError(f"{ann_file}: no usable images ({self._stats_text()}); check the annotations, "
                               "or set data.filter_empty=false to train on images without objects")
        self.reader = ImageReader(skip_bad_images)
        logger.info("%s: %d images used; %s", ann_file, len(self.records), self._stats_text())

    def _stats_text(self) -> str:
        s = self.stats
        dropped = ", ".join(f"{k} {s[k]}" for k in ANNOTATION_DROPS if s[k]) or "none"
        segmentations = ", ".join(f"{k} {s[k]}" for k in SEGMENTATION_DROPS if s[k])
        return (f"{s['images']} images and {s['annotations']} annotations in the file; annotations left out: "
                f"{dropped}; {'segmentations left out: ' + segmentations + '; ' if segmentations else ''}images without usable "
                f"boxes: {s['images_without_boxes']}, skipped: {s['images_skipped']}")

    def _check_crowd_rle(self, ann: dict, img: dict):
        """A crowd region's RLE must be well-formed and of its image's size: COCO evaluation of this file
        reads it (objects of another size are only left out)."""
        seg = ann["segmentation"]
        if check_rle(seg, img, f"{self.ann_file}: annotation {ann['id']}") is None:
            raise DatasetError(f"{self.ann_file}: crowd annotation {ann['id']} has an RLE of size {seg['size']} "
                               f"(height, width), but image {img['id']} is {[img['height'], img['width']]}; COCO "
                               "evaluation needs the region to cover its image exactly")

    def _record(self, img: dict) -> dict:
        boxes, labels, kept, segmentations = [], [], [], []
        for ann in self.coco.imgToAnns[img["id"]]:
            if ann.get("iscrowd", 0):
                self.stats["crowd"] += 1
                if self.with_masks and isinstance(ann.get("segmentation"), dict):
                    self._check_crowd_rle(ann, img)
                continue
            if ann["category_id"] not in self.category_id_to_label:
                self.stats["other_category"] += 1
                continue
            box, problem = clip_box(ann["bbox"], img["width"], img["height"])
            if problem:
                self.stats[problem] += 1
                continue
            if self.with_masks:
                seg, polygons_dropped = check_segmentation(ann.get("segmentation", []), img, self.ann_file, ann["id"])
                for reason in polygons_dropped:
                    self.stats[reason] += 1
                if seg is None:
                    self.stats["no_valid_mask"] += 1
                    continue
                segmentations.append(seg)
            boxes.append(box)
            labels.append(self.category_id_to_label[ann["category_id"]])
            kept.append(ann)
        if not boxes:
            self.stats["images_without_boxes"] += 1
        return {"image_id": img["id"], "path": safe_join(self.img_dir, img["file_name"], self.ann_file, img["id"]),
                "size": (int(img["height"]), int(img["width"])),
                "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
                "labels": np.asarray(labels, np.int64), "annotations": kept,
                "segmentations": segmentations if self.with_masks else None}

    @property
    def landscape(self) -> List[bool]:
        """Per item: width >= height, from the annotation file (no decoding), for aspect-ratio grouping."""
        return [r["size"][1] >= r["size"][0] for r in self.records]

    @property
    def image_ids(self) -> List[int]:
        """Per item: its image id. An item whose target names another id was skipped (skip_bad_images)
        and stands in for the next readable image."""
        return [r["image_id"] for r in self.records]

    @property
    def num_skipped(self) -> int:
        """Unreadable images skipped so far by this process (each DataLoader worker counts its own)."""
        return self.reader.num_skipped

    def annotations(self, index: int) -> List[dict]:
        return self.records[index]["annotations"]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, None)
        if not 0 <= index < len(self.records):
            raise IndexError(f"CocoDetection index {index} out of range for {len(self.records)} images")
        index, image = self.reader.first_readable(index, len(self.records), lambda j: self.records[j]["path"])
        record = self.records[index]
        if image.shape[:2] != record["size"]:
            raise DatasetError(f"{record['path']}: image is {image.shape[1]}x{image.shape[0]} (WxH) but "
                               f"{self.ann_file} says {record['size'][1]}x{record['size'][0]} for image "
                               f"{record['image_id']}")
        boxes, labels = record["boxes"], record["labels"]
        # Rasterised here, one image at a time: bitmaps of a whole dataset would not fit in memory.
        masks = rasterize(record["segmentations"], *record["size"]) if self.with_masks else None
        if self.mapper is not None:
            args = (image, boxes, labels) if seed is None else (image, boxes, labels, seed)
            try:
                if self.with_masks:
                    image, boxes, labels, masks = self.mapper(*args, masks=masks)
                else:
                    image, boxes, labels = self.mapper(*args)
            except DatasetError as e:  # the mapper sees arrays only; the message names their file
                raise DatasetError(f"{record['path']} (image {record['image_id']} of {self.ann_file}): {e}") from None
        target = {"boxes": torch.from_numpy(np.ascontiguousarray(boxes, np.float32)).reshape(-1, 4),
                  "labels": torch.from_numpy(np.ascontiguousarray(labels, np.int64)).reshape(-1),
                  "image_id": record["image_id"], "orig_size": record["size"]}
        if self.with_masks:
            target["masks"] = torch.from_numpy(np.ascontiguousarray(masks, np.uint8))
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1), target
