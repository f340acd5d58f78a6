"""The COCO format's checks, one place for the training dataset (coco.py) and the evaluator
(evaluation/coco_eval.py): numbers and ids, the structure of an instances file, RLE masks.

Non-finite numbers are decided per use, deliberately:
- `is_number` takes NaN and inf. The dataset reads a ground-truth box or polygon with them as unusable and
  drops it, counted (`non_finite`, `polygon_non_finite`), so that one broken annotation does not stop a
  training run, and refuses an image size with them (`is_side`).
- `is_finite_number` refuses them. A NaN score, box or area reaching COCOeval would be sorted and matched
  arbitrarily (NaN compares false both ways), so the evaluator rejects it with a DatasetError naming the
  entry.
"""
import math
import numbers
from collections.abc import Mapping
from typing import Any, Optional

from engine.errors import DatasetError

# list in the file -> (what one entry is called, the keys it needs)
REQUIRED_KEYS = {"images": ("image", ("id", "file_name", "height", "width")),
                 "annotations": ("annotation", ("id", "image_id", "category_id", "bbox")),
                 "categories": ("category", ("id", "name"))}
# Ids are stored as int64 downstream (labels, evaluation); larger ones cannot be represented.
MAX_ID = 2 ** 63 - 1
RESULTS_RLE_USAGE = ("segmentation must be compressed RLE {'size': [height, width], 'counts': str} as "
                     "pycocotools.mask.encode makes it (counts decoded to str)")


def is_int(value: Any) -> bool:
    """An integer, numpy's included; not a bool (JSON true would otherwise be id 1)."""
    return type(value) is int or (isinstance(value, numbers.Integral) and not isinstance(value, bool))


def is_number(value: Any) -> bool:
    """A real number, NaN, inf and ints too large for a float included; not a bool."""
    # Exact-type checks first: isinstance against the numbers ABCs costs about a microsecond, which a
    # full COCO results list (500k detections x 6 numbers) turns into seconds.
    if type(value) is float or type(value) is int:
        return True
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """A real number that is neither NaN nor infinite; not a bool."""
    if type(value) is float:
        return math.isfinite(value)
    if type(value) is int:
        return True  # every int is finite; math.isfinite would overflow on one beyond a float's range
    return is_number(value) and math.isfinite(value)


def as_float(value) -> float:
    """A checked number as a float; an int too large for a float is infinite."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def is_side(value) -> bool:
    """A positive, finite, whole image side (an int, or a float such as 480.0)."""
    return is_number(value) and math.isfinite(as_float(value)) and value > 0 and float(value).is_integer()


def check_coco_structure(data, path: str):
    """The keys and ids the dataset and the evaluator rely on, each failure one DatasetError naming the file
    and entry."""
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: a COCO annotation file is a JSON object, found {type(data).__name__}")
    for key in REQUIRED_KEYS:
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{path}: missing or malformed '{key}' list")
    if not data["categories"]:
        raise DatasetError(f"{path}: the 'categories' list is empty")
    for key, (what, required) in REQUIRED_KEYS.items():
        seen = set()
        for position, entry in enumerate(data[key]):
            if not isinstance(entry, dict):
                raise DatasetError(f"{path}: {key}[{position}] is not an object: {str(entry)[:80]}")
            name = f"{what} {entry['id']!r}" if "id" in entry else f"{key}[{position}] (no id)"
            missing = [k for k in required if k not in entry]
            if missing:
                raise DatasetError(f"{path}: {name} lacks the key(s) {missing}")
            if not is_int(entry["id"]) or abs(entry["id"]) > MAX_ID:
                raise DatasetError(f"{path}: {name}: ids must be integers that fit in 64 bits")
            if entry["id"] in seen:
                raise DatasetError(f"{path}: duplicate {what} id {entry['id']}; ids must be unique")
            seen.add(entry["id"])
    for img in data["images"]:
        if not all(is_side(img[k]) for k in ("height", "width")):
            raise DatasetError(f"{path}: image {img['id']} has height {str(img['height'])[:40]} and width "
                               f"{str(img['width'])[:40]}; both must be positive whole numbers (pixels)")
    for cat in data["categories"]:
        if not isinstance(cat["name"], str):
            raise DatasetError(f"{path}: category {cat['id']} has name {str(cat['name'])[:80]}; expected a string")
    images, categories = {i["id"] for i in data["images"]}, {c["id"] for c in data["categories"]}
    for ann in data["annotations"]:
        for key in ("image_id", "category_id"):
            if not is_int(ann[key]):
                raise DatasetError(f"{path}: annotation {ann['id']} has {key} {str(ann[key])[:80]}; expected an "
                                   "integer id")
        crowd = ann.get("iscrowd", 0)
        if not (isinstance(crowd, (int, float)) and crowd in (0, 1)):  # JSON true/false allowed too
            raise DatasetError(f"{path}: annotation {ann['id']} has iscrowd {str(ann['iscrowd'])[:80]}; expected "
                               "0 or 1")
        if ann["image_id"] not in images:
            raise DatasetError(f"{path}: annotation {ann['id']} names image_id {ann['image_id']}, which is not "
                               "in 'images'")
        if ann["category_id"] not in categories:
            raise DatasetError(f"{path}: annotation {ann['id']} has category_id {ann['category_id']}, which is "
                               "not in 'categories'")
        bbox = ann["bbox"]
        # NaN and inf pass here: the dataset drops such a box, counted; the evaluator refuses it.
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(is_number(v) for v in bbox)):
            raise DatasetError(f"{path}: annotation {ann['id']} has bbox {str(bbox)[:80]}; expected "
                               "[x, y, width, height]")


def check_rle(seg: Any, img: dict, where: str, results: bool = False) -> Optional[dict]:
    """`seg` checked as the RLE mask of image `img` ({"id", "height", "width"}): {"size": [height, width],
    "counts"} with int sizes and str (not bytes) counts when its size is the image's, None when it is
    another size (the caller decides whether that is an error). Malformed: a DatasetError starting with
    `where` ("FILE: annotation ID", "results entry I").

    Annotations (results=False) may be compressed (counts a str) or uncompressed (a list of run lengths),
    and their runs must add up to height * width, or pycocotools would read past its buffer.
    Results (results=True) take the one form pycocotools.mask.encode makes and loadRes reads: exactly
    size and counts, compressed (str or bytes). Their runs are not added up: over the ~500k detections of
    a COCO evaluation the Python loop would take a minute, and a model's results come from mask.encode."""
    if results and (not isinstance(seg, Mapping) or set(seg) != {"size", "counts"}):
        # loadRes computes the area with mask.area, which takes only RLE; polygons would crash there.
        raise DatasetError(f"{where}: {RESULTS_RLE_USAGE}; got {short(seg)}")
    counts, size = seg.get("counts"), seg.get("size")
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    good_size = isinstance(size, (list, tuple)) and len(size) == 2 and all(is_int(v) for v in size)
    if results:
        if not isinstance(counts, str):
            raise DatasetError(f"{where}: {RESULTS_RLE_USAGE}; got counts of type {type(counts).__name__}")
        if not good_size:
            raise DatasetError(f"{where}: segmentation size must be [height, width], got {short(size)}")
    elif not (good_size and isinstance(size, list)
              and (isinstance(counts, str) or (isinstance(counts, list) and all(is_int(c) for c in counts)))):
        raise DatasetError(f"{where} has an RLE segmentation without 'size' [height, width] (two integers) or "
                           "with 'counts' neither a str (compressed) nor a list of ints (uncompressed)")
    expected = [img.get("height"), img.get("width")]
    if None not in expected and list(size) != expected:
        return None
    if not results:
        runs = rle_runs(counts) if isinstance(counts, str) else counts
        if runs is None or any(r < 0 for r in runs) or sum(runs) != size[0] * size[1]:
            raise DatasetError(f"{where} has an RLE whose counts do not add up to its size {list(size)} "
                               "(height * width pixels); the mask is corrupt")
    return {"size": [int(v) for v in size], "counts": counts}


def rle_runs(counts: str):
    """The run lengths of a compressed COCO RLE string, or None when it is not one. Each run is a
    little-endian sequence of 5-bit groups stored as characters 48 + group (bit 0x20: another group
    follows; bit 0x10 of the last group: negative), from the third run on relative to the run two before."""
    runs, value, shift = [], 0, 0
    for ch in counts:
        c = ord(ch) - 48
        if not 0 <= c < 64:
            return None
        value |= (c & 0x1F) << shift
        shift += 5
        if c & 0x20:
            continue
        if c & 0x10:
            value -= 1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
        value, shift = 0, 0
    return None if shift else runs


def short(value: Any) -> str:
    """repr(value), cut to 80 characters for an error message."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
