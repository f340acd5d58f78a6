"""Property-based fuzzing of the COCO annotation loader: arbitrary JSON, and mutations of a valid small
file, either load into a consistent dataset whose every item is a valid target, or fail with the
project's own error (a ToolkitError with a message); never any other exception."""
import copy
import json
import os
import tempfile

import cv2
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycocotools import mask as mask_utils

from detection.data.coco import ANNOTATION_DROPS, CocoDetection
from engine.errors import ToolkitError

FUZZ = settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
COCO_KEYS = ["images", "annotations", "categories", "id", "file_name", "height", "width", "image_id",
             "category_id", "bbox", "iscrowd", "segmentation", "name", "size", "counts", "area"]
SPECIAL = [float("nan"), float("inf"), -float("inf"), -1, 0, 1, 0.5, 1e308, -1e308, 10 ** 30, -10 ** 30,
           10 ** 400, 2 ** 63, True, False, None, "", "é/ü.png", "1", [], {}, [[]], {"counts": "x"}]

scalars = (st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.sampled_from(SPECIAL[:13])
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8))
junk = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.sampled_from(COCO_KEYS) | st.text(max_size=5), inner, max_size=4),
                    max_leaves=10)
values = st.sampled_from(SPECIAL) | junk
file_names = (st.sampled_from(["../secret.png", "sub/../../x.png", "/etc/passwd", "a/b/c.png", "sub/../d.png",
                               ".", "..", "sub", "a.png", "a\x00.png", "\ud800.png", "ß/日本.png"])
              | st.text(max_size=12))


def valid_coco():
    """Three small images (one in a sub-folder), three categories, boxes with polygons, RLE and a crowd."""
    mask = np.zeros((20, 30), np.uint8)
    mask[2:10, 3:12] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {
        "images": [{"id": 1, "file_name": "a.png", "height": 20, "width": 30},
                   {"id": 2, "file_name": "sub/b.png", "height": 24, "width": 16},
                   {"id": 3, "file_name": "c.png", "height": 32, "width": 32}],
        "categories": [{"id": 5, "name": "cat"}, {"id": 1, "name": "dog"}, {"id": 9, "name": "bird"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 5, "bbox": [2, 2, 10, 8], "iscrowd": 0,
             "segmentation": [[2, 2, 12, 2, 12, 10, 2, 10]]},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [3, 2, 9, 8], "iscrowd": 0,
             "segmentation": {"size": [20, 30], "counts": rle["counts"].decode()}},
            {"id": 3, "image_id": 2, "category_id": 9, "bbox": [1, 1, 14, 20], "iscrowd": 0,
             "segmentation": [[1, 1, 15, 1, 8, 21], [2, 2, 4, 2, 3, 4]]},
            {"id": 4, "image_id": 2, "category_id": 5, "bbox": [0, 0, 16, 24], "iscrowd": 1,
             "segmentation": {"size": [24, 16], "counts": [0, 24 * 16]}},
            {"id": 5, "image_id": 3, "category_id": 1, "bbox": [20, 20, 30, 30], "iscrowd": 0,
             "segmentation": [[20, 20, 40, 20, 40, 40]]}]}


def _entry(doc, draw):
    """A random list entry of the document (or None when every list is gone)."""
    lists = [v for v in doc.values() if isinstance(v, list) and v]
    if not lists:
        return None
    entries = draw(st.sampled_from(lists))
    return entries, draw(st.integers(0, len(entries) - 1))


def mutate(doc, draw):
    op = draw(st.sampled_from(["drop", "set", "dup", "dup_new_id", "remove", "top", "file_name", "number",
                               "polygon", "rle"]))
    if op == "top":
        key = draw(st.sampled_from(["images", "annotations", "categories", "info"]))
        if draw(st.booleans()):
            doc.pop(key, None)
        else:
            doc[key] = draw(values)
        return
    picked = _entry(doc, draw)
    if picked is None:
        return
    entries, i = picked
    entry = entries[i]
    if op == "remove":
        entries.pop(i)
    elif op in ("dup", "dup_new_id"):
        twin = copy.deepcopy(entry)
        if op == "dup_new_id" and isinstance(twin, dict):
            twin["id"] = draw(st.integers(0, 12))
        entries.append(twin)
    elif not isinstance(entry, dict):
        entries[i] = draw(values)
    elif op == "drop" and entry:
        entry.pop(draw(st.sampled_from(sorted(entry, key=str))))
    elif op == "set":
        entry[draw(st.sampled_from(COCO_KEYS))] = draw(values)
    elif op == "file_name":
        entry["file_name"] = draw(file_names)
    elif op == "number":  # one coordinate, side or id made hostile
        key = draw(st.sampled_from(["bbox", "height", "width", "id", "image_id", "category_id"]))
        number = draw(st.sampled_from(SPECIAL[:13]) | st.floats(-100, 100) | st.integers(-5, 60))
        if key == "bbox" and isinstance(entry.get("bbox"), list) and entry["bbox"]:
            entry["bbox"][draw(st.integers(0, len(entry["bbox"]) - 1))] = number
        else:
            entry[key] = number
    elif op == "polygon" and isinstance(entry.get("segmentation"), list):
        polygons = entry["segmentation"]
        if polygons and isinstance(polygons[0], list) and polygons[0] and draw(st.booleans()):
            poly = polygons[0]
            poly[draw(st.integers(0, len(poly) - 1))] = draw(st.sampled_from(SPECIAL[:13]) | st.floats())
        else:
            polygons.append(draw(st.lists(st.integers(-40, 80) | st.floats(), max_size=9)))
    elif op == "rle":
        entry["segmentation"] = {"size": draw(st.sampled_from([[20, 30], [24, 16], [32, 32], [3, 3]]) | values),
                                 "counts": draw(st.text("0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`abcdefghijklmno",
                                                        max_size=12)
                                                | st.lists(st.integers(-3, 800), max_size=5) | values)}


PNG = {}


def _png(height, width):
    if (height, width) not in PNG:
        image = np.random.default_rng(height * 100 + width).integers(0, 256, (height, width, 3), dtype=np.uint8)
        PNG[height, width] = cv2.imencode(".png", image)[1].tobytes()
    return PNG[height, width]


def _write_images(doc, img_dir):
    """A real image of the declared size for every image entry whose name stays inside img_dir."""
    images = doc.get("images") if isinstance(doc, dict) else None
    for img in images if isinstance(images, list) else []:
        if not isinstance(img, dict):
            continue
        name, h, w = img.get("file_name"), img.get("height"), img.get("width")
        if not (isinstance(name, str) and name and type(h) is int and type(w) is int and 0 < h <= 64
                and 0 < w <= 64):
            continue
        target = os.path.normpath(os.path.join(img_dir, name))
        if os.path.commonpath([target, img_dir]) != img_dir or target == img_dir:
            continue  # never write outside the temporary image directory
        try:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as f:
                f.write(_png(h, w))
        except (OSError, ValueError, UnicodeError):
            pass  # a name the file system refuses: the loader must say so itself


def check_load(text_or_doc, train, filter_empty, with_masks, label_space):
    """Load; a ToolkitError with a message is a valid outcome, anything else raised fails the test. A loaded
    dataset must be consistent and each of its items a valid target."""
    with tempfile.TemporaryDirectory() as root:
        img_dir = os.path.join(root, "img")
        os.mkdir(img_dir)
        if not isinstance(text_or_doc, str):
            _write_images(text_or_doc, img_dir)
            text_or_doc = json.dumps(text_or_doc)
        ann = os.path.join(root, "ann.json")
        with open(ann, "w", encoding="utf-8") as f:
            f.write(text_or_doc)
        try:
            ds = CocoDetection(ann, img_dir, train=train, filter_empty=filter_empty, with_masks=with_masks,
                               label_space=label_space)
        except ToolkitError as e:
            assert str(e).strip()
            return "error"
        check_dataset(ds, with_masks, label_space)
        return "loaded"


def check_dataset(ds, with_masks, label_space):
    valid_labels = (set(range(1, len(ds.categories) + 1)) if label_space == "contiguous"
                    else {c["id"] for c in ds.categories})
    assert valid_labels and min(valid_labels) >= 1
    s = ds.stats
    # No lost data: every image is an item or a counted skip, every annotation a target or a counted drop.
    assert len(ds) + s["images_skipped"] == s["images"]
    assert sum(len(r["labels"]) for r in ds.records) + sum(s[k] for k in ANNOTATION_DROPS) == s["annotations"]
    for index, record in enumerate(ds.records):
        h, w = record["size"]
        boxes = record["boxes"]
        assert boxes.dtype == np.float32 and boxes.shape == (len(record["labels"]), 4)
        assert np.isfinite(boxes).all()
        assert (boxes[:, 0] < boxes[:, 2]).all() and (boxes[:, 1] < boxes[:, 3]).all()
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
        assert set(record["labels"].tolist()) <= valid_labels
        if index >= 4:
            continue
        try:
            image, target = ds[index]
        except ToolkitError as e:  # the image missing, unreadable or of another size than the file says
            assert str(e).strip()
            continue
        assert image.shape == (3, h, w) and target["image_id"] == record["image_id"]
        assert target["boxes"].tolist() == boxes.tolist()
        assert target["labels"].tolist() == record["labels"].tolist()
        if with_masks:
            assert tuple(target["masks"].shape) == (len(boxes), h, w)
            assert set(np.unique(target["masks"].numpy()).tolist()) <= {0, 1}


options = dict(train=st.booleans(), filter_empty=st.booleans(), with_masks=st.booleans(),
               label_space=st.sampled_from(["contiguous", "category_id"]))


@FUZZ
@given(doc=junk | st.dictionaries(st.sampled_from(["images", "annotations", "categories", "info"]),
                                  st.lists(st.dictionaries(st.sampled_from(COCO_KEYS), junk, max_size=6),
                                           max_size=3), max_size=4),
       **options)
def test_arbitrary_json_loads_or_raises_a_toolkit_error(doc, train, filter_empty, with_masks, label_space):
    check_load(doc, train, filter_empty, with_masks, label_space)


@FUZZ
@given(text=st.text(max_size=40) | st.sampled_from(["NaN", "[NaN]", "{", '{"images": [}', "[" * 5000, "\ufeff{}"]),
       **options)
def test_arbitrary_text_loads_or_raises_a_toolkit_error(text, train, filter_empty, with_masks, label_space):
    check_load(text, train, filter_empty, with_masks, label_space)


OUTCOMES = []


@settings(FUZZ, max_examples=250)
@given(data=st.data(), n=st.integers(1, 4), **options)
def test_mutated_coco_loads_consistently_or_raises_a_toolkit_error(data, n, train, filter_empty, with_masks,
                                                                 label_space):
    doc = valid_coco()
    for _ in range(n):
        mutate(doc, data.draw)
    OUTCOMES.append(check_load(doc, train, filter_empty, with_masks, label_space))


def test_the_mutation_fuzz_exercised_both_outcomes():
    """The mutated files are neither all rejected nor all accepted (otherwise the fuzz tests little)."""
    if not OUTCOMES:
        test_mutated_coco_loads_consistently_or_raises_a_toolkit_error()
    assert OUTCOMES.count("loaded") >= 20 and OUTCOMES.count("error") >= 20, \
        (OUTCOMES.count("loaded"), OUTCOMES.count("error"))


def test_valid_file_loads_with_every_option():
    for train in (True, False):
        for with_masks in (True, False):
            for label_space in ("contiguous", "category_id"):
                assert check_load(valid_coco(), train, True, with_masks, label_space) == "loaded"
