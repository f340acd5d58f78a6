"""Hostile and broken COCO annotation files: each failure is a DatasetError naming the file and the entry,
raised when the file is read, or a drop counted in the dataset's `stats` and logged. Every case is run the
way training reads the file (train=True) and the way evaluation reads its ground truth (train=False)."""
import json
import logging
import re

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from detection.data.coco import CocoDetection
from engine.errors import DatasetError

H, W = 40, 60
BOTH = pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])


def base():
    """Two 60x40 images with one box each; categories 7 'a' and 3 'b' (labels: 3 -> 1, 7 -> 2)."""
    return {"images": [{"id": 1, "file_name": "a.png", "height": H, "width": W},
                       {"id": 2, "file_name": "b.png", "height": H, "width": W}],
            "annotations": [{"id": 10, "image_id": 1, "category_id": 7, "bbox": [5, 5, 20, 10], "iscrowd": 0},
                            {"id": 11, "image_id": 2, "category_id": 3, "bbox": [30, 10, 10, 20], "iscrowd": 0}],
            "categories": [{"id": 7, "name": "a"}, {"id": 3, "name": "b"}]}


def write(tmp_path, data, images=("a.png", "b.png")):
    """The annotation file (`data` a dict, or the file's text as a str) and small real images."""
    (tmp_path / "img").mkdir(exist_ok=True)
    for name in images:
        (tmp_path / "img" / name).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(tmp_path / "img" / name), np.full((H, W, 3), 99, np.uint8))
    path = tmp_path / "ann.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return str(path), str(tmp_path / "img")


def raises(tmp_path, data, message, **kw):
    """The DatasetError loading `data` raises: its message starts with the file and contains `message`."""
    ann, img = write(tmp_path, data)
    with pytest.raises(DatasetError) as e:
        CocoDetection(ann, img, **kw)
    assert str(e.value).startswith(ann), str(e.value)
    assert message in str(e.value), str(e.value)
    return str(e.value)


def mutated(change):
    data = base()
    change(data)
    return data


# 1. Not JSON, or JSON that is not an object ---------------------------------------------------------------

@BOTH
@pytest.mark.parametrize("text, message", [
    ('{"images": [', "is not valid JSON (line 1, column 13"),
    ("", "is not valid JSON (line 1, column 1"),
    ('{"images": []} trailing', "is not valid JSON (line 1, column 16: Extra data"),
    ("[" * 100_000 + "]" * 100_000, "is not a usable annotation file: its JSON is nested too deeply"),
    ("[]", "a COCO annotation file is a JSON object, found list"),
    ("[{}]", "a COCO annotation file is a JSON object, found list"),
    ("3", "a COCO annotation file is a JSON object, found int"),
    ("-1.5e3", "a COCO annotation file is a JSON object, found float"),
    ('"images"', "a COCO annotation file is a JSON object, found str"),
    ("null", "a COCO annotation file is a JSON object, found NoneType"),
])
def test_not_json_or_not_an_object(tmp_path, train, text, message):
    raises(tmp_path, text, message, train=train)


def test_file_that_is_not_utf8_is_named(tmp_path):
    ann, img = write(tmp_path, "{}")
    with open(ann, "wb") as f:
        f.write(b'{"images": "\xff\xfe"}')
    with pytest.raises(DatasetError, match=r"cannot read annotation file .*ann\.json"):
        CocoDetection(ann, img)


# 2. Missing keys and wrong types ---------------------------------------------------------------------------

def _set(section, index, **fields):
    return lambda d: d[section][index].update(fields)


def _drop(section, index, key):
    return lambda d: d[section][index].pop(key)


@BOTH
@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("images"), "missing or malformed 'images' list"),
    (lambda d: d.pop("annotations"), "missing or malformed 'annotations' list"),
    (lambda d: d.pop("categories"), "missing or malformed 'categories' list"),
    (lambda d: d.__setitem__("images", {"1": "a.png"}), "missing or malformed 'images' list"),
    (lambda d: d.__setitem__("annotations", None), "missing or malformed 'annotations' list"),
    (lambda d: d["annotations"].append(5), "annotations[2] is not an object: 5"),
    (lambda d: d["images"].insert(0, "a.png"), "images[0] is not an object: a.png"),
    (_drop("images", 1, "id"), "images[1] (no id) lacks the key(s) ['id']"),
    (_drop("images", 1, "file_name"), "image 2 lacks the key(s) ['file_name']"),
    (_drop("images", 0, "height"), "image 1 lacks the key(s) ['height']"),
    (_drop("images", 0, "width"), "image 1 lacks the key(s) ['width']"),
    (_drop("annotations", 1, "id"), "annotations[1] (no id) lacks the key(s) ['id']"),
    (_drop("annotations", 1, "image_id"), "annotation 11 lacks the key(s) ['image_id']"),
    (_drop("annotations", 1, "category_id"), "annotation 11 lacks the key(s) ['category_id']"),
    (_drop("annotations", 0, "bbox"), "annotation 10 lacks the key(s) ['bbox']"),
    (_drop("categories", 0, "id"), "categories[0] (no id) lacks the key(s) ['id']"),
    (_drop("categories", 1, "name"), "category 3 lacks the key(s) ['name']"),
    (_set("annotations", 0, bbox=[1, 2, 3]), "annotation 10 has bbox [1, 2, 3]; expected [x, y, width, height]"),
    (_set("annotations", 0, bbox=[1, 2, 3, 4, 5]), "annotation 10 has bbox [1, 2, 3, 4, 5]; expected"),
    (_set("annotations", 0, bbox="1 2 3 4"), "annotation 10 has bbox 1 2 3 4; expected [x, y, width, height]"),
    (_set("annotations", 0, bbox={"x": 1}), "annotation 10 has bbox {'x': 1}; expected"),
    (_set("annotations", 0, bbox=[1, 2, "3", 4]), "annotation 10 has bbox [1, 2, '3', 4]; expected"),
    (_set("annotations", 0, bbox=[1, 2, True, 4]), "annotation 10 has bbox [1, 2, True, 4]; expected"),
    (_set("annotations", 0, bbox=None), "annotation 10 has bbox None; expected"),
    (_set("images", 0, id="1"), "image '1': ids must be integers that fit in 64 bits"),
    (_set("images", 0, id=1.0), "image 1.0: ids must be integers"),
    (_set("images", 0, id=True), "image True: ids must be integers"),
    (_set("images", 0, id=2 ** 70), f"image {2 ** 70}: ids must be integers that fit in 64 bits"),
    (_set("annotations", 0, id=[10]), "annotation [10]: ids must be integers"),
    (_set("categories", 0, id="7"), "category '7': ids must be integers"),
    (_set("images", 0, height=-40), "image 1 has height -40 and width 60; both must be positive whole numbers"),
    (_set("images", 0, height=0), "image 1 has height 0 and width 60"),
    (_set("images", 0, width=60.5), "image 1 has height 40 and width 60.5"),
    (_set("images", 0, width="60"), "image 1 has height 40 and width 60;"),
    (_set("images", 0, width=None), "image 1 has height 40 and width None"),
    (_set("images", 0, height=float("nan")), "image 1 has height nan and width 60"),
    (_set("images", 0, height=float("inf")), "image 1 has height inf and width 60"),
    (_set("images", 0, height=True), "image 1 has height True and width 60"),
    (_set("annotations", 0, image_id="1"), "annotation 10 has image_id 1; expected an integer id"),
    (_set("annotations", 0, image_id=[1]), "annotation 10 has image_id [1]; expected an integer id"),
    (_set("annotations", 0, category_id=7.0), "annotation 10 has category_id 7.0; expected an integer id"),
    (_set("annotations", 0, category_id={"id": 7}), "annotation 10 has category_id {'id': 7}; expected"),
    (_set("annotations", 0, iscrowd="0"), "annotation 10 has iscrowd 0; expected 0 or 1"),
    (_set("annotations", 0, iscrowd=2), "annotation 10 has iscrowd 2; expected 0 or 1"),
    (_set("annotations", 0, iscrowd=None), "annotation 10 has iscrowd None; expected 0 or 1"),
    (_set("categories", 0, name=7), "category 7 has name 7; expected a string"),
])
def test_missing_keys_and_wrong_types(tmp_path, train, change, message):
    raises(tmp_path, mutated(change), message, train=train)


def test_whole_number_floats_and_booleans_where_coco_allows_them(tmp_path):
    """480.0 is a side, iscrowd may be a JSON boolean: real converters write both."""
    data = mutated(_set("images", 0, height=40.0, width=60.0))
    data["annotations"][0]["iscrowd"] = False
    data["annotations"][1]["iscrowd"] = True
    ds = CocoDetection(*write(tmp_path, data), train=False)
    assert ds.records[0]["size"] == (40, 60) and ds.stats["crowd"] == 1
    assert ds[0][1]["boxes"].tolist() == [[5, 5, 25, 15]] and ds[1][1]["boxes"].shape == (0, 4)


# 3. Duplicate ids ------------------------------------------------------------------------------------------

@BOTH
@pytest.mark.parametrize("change, message", [
    (lambda d: d["images"].append({"id": 2, "file_name": "c.png", "height": H, "width": W}),
     "duplicate image id 2; ids must be unique"),
    (lambda d: d["annotations"].append({"id": 10, "image_id": 2, "category_id": 3, "bbox": [1, 1, 5, 5]}),
     "duplicate annotation id 10; ids must be unique"),
    (lambda d: d["categories"].append({"id": 3, "name": "c"}), "duplicate category id 3; ids must be unique"),
])
def test_duplicate_ids(tmp_path, train, change, message):
    raises(tmp_path, mutated(change), message, train=train)


# 4. Bad boxes: dropped, counted, logged --------------------------------------------------------------------

@BOTH
@pytest.mark.parametrize("bbox, reason", [
    ("[5, 5, 0, 10]", "degenerate"),
    ("[5, 5, 10, 0]", "degenerate"),
    ("[5, 5, -3, 10]", "degenerate"),
    ("[5, 5, 10, -0.5]", "degenerate"),
    ("[NaN, 5, 10, 10]", "non_finite"),
    ("[5, 5, Infinity, 10]", "non_finite"),
    ("[-Infinity, 5, 10, 10]", "non_finite"),
    ("[5, 5, 10, " + "9" * 400 + "]", "non_finite"),  # an integer no float can hold
    ("[100, 5, 10, 10]", "outside_image"),  # right of the image
    ("[-30, 5, 20, 10]", "outside_image"),  # left of it
    ("[5, 40, 10, 10]", "outside_image"),  # starts on the bottom edge
    ("[5, 39.995, 10, 10]", "outside_image"),  # a sliver thinner than MIN_BOX_SIDE is left
    ("[1e308, 5, 1e308, 10]", "outside_image"),
])
def test_unusable_boxes_dropped_and_counted(tmp_path, caplog, train, bbox, reason):
    text = json.dumps(base()).replace("[30, 10, 10, 20]", bbox)
    ann, img = write(tmp_path, text)
    with caplog.at_level(logging.INFO, logger="detection.data"):
        ds = CocoDetection(ann, img, train=train)
    assert ds.stats[reason] == 1
    assert sum(ds.stats[k] for k in ("degenerate", "non_finite", "outside_image")) == 1
    assert ds.stats["images_without_boxes"] == 1 and ds.stats["images_skipped"] == (1 if train else 0)
    assert [r["image_id"] for r in ds.records] == ([1] if train else [1, 2])
    if not train:
        image, target = ds[1]
        assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,) and image.shape == (3, H, W)
    log = [r.getMessage() for r in caplog.records if r.name == "detection.data"]
    assert len(log) == 1 and f"annotations left out: {reason} 1;" in log[0]


@BOTH
def test_boxes_partly_outside_are_clipped_to_the_image(tmp_path, train):
    data = base()
    data["annotations"] += [{"id": 12, "image_id": 1, "category_id": 3, "bbox": [-10, -10, 20, 30]},
                            {"id": 13, "image_id": 1, "category_id": 3, "bbox": [50, 30, 100, 100]},
                            {"id": 14, "image_id": 1, "category_id": 3, "bbox": [-1e9, 2, 2e9, 3]}]
    ds = CocoDetection(*write(tmp_path, data), train=train)
    boxes = ds[0][1]["boxes"].tolist()
    assert boxes == [[5, 5, 25, 15], [0, 0, 10, 20], [50, 30, 60, 40], [0, 2, 60, 5]]
    assert ds.stats["outside_image"] == ds.stats["degenerate"] == ds.stats["non_finite"] == 0


# 5. Categories ---------------------------------------------------------------------------------------------

@BOTH
def test_unknown_category_and_empty_categories(tmp_path, train):
    data = base()
    data["annotations"].append({"id": 12, "image_id": 2, "category_id": 99, "bbox": [1, 1, 5, 5]})
    raises(tmp_path, data, "annotation 12 has category_id 99, which is not in 'categories'", train=train)
    raises(tmp_path, mutated(lambda d: d.__setitem__("categories", [])), "the 'categories' list is empty",
           train=train)


def test_category_id_zero_cannot_be_a_label_in_category_id_space(tmp_path):
    data = mutated(_set("categories", 1, id=0))
    data["annotations"][1]["category_id"] = 0
    raises(tmp_path, data, "category id(s) [0] are not valid labels with model.label_space='category_id'",
           label_space="category_id")
    ds = CocoDetection(*write(tmp_path, data))  # contiguous labels: category 0 is label 1
    assert ds.category_id_to_label == {0: 1, 7: 2} and ds[1][1]["labels"].tolist() == [1]


# 6. Images without annotations, crowd-only images ----------------------------------------------------------

@pytest.mark.parametrize("train, filter_empty, kept", [(True, True, [1]), (True, False, [1, 2, 3]),
                                                       (False, True, [1, 2, 3]), (False, False, [1, 2, 3])])
def test_images_without_annotations_and_crowd_only(tmp_path, caplog, train, filter_empty, kept):
    data = base()
    data["images"].append({"id": 3, "file_name": "c.png", "height": H, "width": W})  # no annotation at all
    data["annotations"][1]["iscrowd"] = 1  # image 2: crowd only
    ann, img = write(tmp_path, data, images=("a.png", "b.png", "c.png"))
    with caplog.at_level(logging.INFO, logger="detection.data"):
        ds = CocoDetection(ann, img, train=train, filter_empty=filter_empty)
    assert [r["image_id"] for r in ds.records] == kept
    assert ds.stats["crowd"] == 1 and ds.stats["images_without_boxes"] == 2
    assert ds.stats["images_skipped"] == (2 if train and filter_empty else 0)
    for i in range(1, len(ds)):
        assert ds[i][1]["boxes"].shape == (0, 4) and ds[i][1]["labels"].shape == (0,)
    assert (f"images without usable boxes: 2, skipped: {ds.stats['images_skipped']}"
            in caplog.records[-1].getMessage())


def test_training_set_without_any_usable_box_is_an_error(tmp_path):
    data = mutated(lambda d: [a.update(iscrowd=1) for a in d["annotations"]])
    raises(tmp_path, data, "no usable images (2 images and 2 annotations in the file; annotations left out: "
                           "crowd 2;")
    assert len(CocoDetection(*write(tmp_path, data), filter_empty=False)) == 2


# 7. Segmentations (Mask R-CNN) -----------------------------------------------------------------------------

SQUARE = [5, 5, 25, 5, 25, 25, 5, 25]


def _rle(mask, compressed=True):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    if compressed:
        return {"size": list(rle["size"]), "counts": rle["counts"].decode()}
    flat, runs, value, n = mask.flatten(order="F"), [], 0, 0
    for v in flat:
        if v == value:
            n += 1
        else:
            runs.append(n)
            value, n = v, 1
    return {"size": [H, W], "counts": runs + [n]}


def _masks(tmp_path, segmentations, train=False, crowd=False):
    data = base()
    data["annotations"] = [{"id": 20 + k, "image_id": 1, "category_id": 3, "bbox": [5, 5, 20, 20],
                            "iscrowd": int(crowd), "segmentation": s} for k, s in enumerate(segmentations)]
    data["annotations"].append({"id": 40, "image_id": 1, "category_id": 7, "bbox": [5, 5, 20, 20],
                                "segmentation": [SQUARE]})
    return write(tmp_path, data)


@BOTH
@pytest.mark.parametrize("polygons, reasons", [
    ([[1, 1, 3, 3]], {"polygon_too_short": 1}),
    ([[]], {"polygon_too_short": 1}),
    ([[1, 1, 3, 3, 5, 1, 7]], {"polygon_odd_length": 1}),
    ([[1, 1, 3, float("nan"), 5, 1]], {"polygon_non_finite": 1}),
    ([[1, 1, 3, float("-inf"), 5, 1], [1, 1, 2, 2]], {"polygon_non_finite": 1, "polygon_too_short": 1}),
    ([[1, 1, 3, 10 ** 400, 5, 1]], {"polygon_non_finite": 1}),
    ([[1, 1, 3, 1e7, 5, 1]], {"polygon_out_of_range": 1}),  # pycocotools would allocate ~1e7*5 ints
    ([[-241, 1, 3, 3, 5, 1]], {"polygon_out_of_range": 1}),
    ([], {}),
])
def test_unusable_polygons_dropped_and_counted(tmp_path, caplog, train, polygons, reasons):
    with caplog.at_level(logging.INFO, logger="detection.data"):
        ds = CocoDetection(*_masks(tmp_path, [polygons]), train=train, with_masks=True)
    assert {k: ds.stats[k] for k in reasons} == reasons
    assert sum(ds.stats[k] for k in ("polygon_too_short", "polygon_odd_length", "polygon_non_finite",
                                     "polygon_out_of_range", "rle_wrong_size")) == sum(reasons.values())
    assert ds.stats["no_valid_mask"] == 1 and [a["id"] for a in ds.annotations(0)] == [40]
    _, target = ds[0]
    assert target["masks"].shape == (1, H, W) and target["labels"].tolist() == [2]
    assert int(target["masks"].sum()) == int(mask_utils.area(mask_utils.frPyObjects([SQUARE], H, W)).sum())
    assert "no_valid_mask 1" in caplog.text


def test_polygon_reaching_a_little_outside_the_image_is_kept(tmp_path):
    ds = CocoDetection(*_masks(tmp_path, [[[-50, -50, 200, -50, 200, 150]]]), train=False, with_masks=True)
    assert ds.stats["polygon_out_of_range"] == 0 and len(ds.annotations(0)) == 2
    assert ds[0][1]["masks"][0].any()


@BOTH
def test_rle_of_the_wrong_size(tmp_path, train):
    wrong = {"size": [W, H], "counts": _rle(np.ones((W, H)))["counts"]}
    ds = CocoDetection(*_masks(tmp_path, [wrong, {"size": [H, W + 1], "counts": [H * (W + 1)]}]), train=train,
                       with_masks=True)
    assert ds.stats["rle_wrong_size"] == 2 and ds.stats["no_valid_mask"] == 2
    assert [a["id"] for a in ds.annotations(0)] == [40]
    ann, img = _masks(tmp_path, [wrong], crowd=True)
    with pytest.raises(DatasetError, match=re.escape(f"{ann}: crowd annotation 20 has an RLE of size [60, 40] "
                                                     "(height, width), but image 1 is [40, 60]")):
        CocoDetection(ann, img, train=train, with_masks=True)


@BOTH
@pytest.mark.parametrize("crowd", [False, True], ids=["object", "crowd"])
def test_rle_of_the_right_size_and_valid_is_read(tmp_path, train, crowd):
    mask = np.zeros((H, W), bool)
    mask[5:25, 5:25] = True
    ds = CocoDetection(*_masks(tmp_path, [_rle(mask), _rle(mask, compressed=False)], crowd=crowd), train=train,
                       with_masks=True)
    masks = ds[0][1]["masks"].numpy().astype(bool)
    assert len(masks) == (1 if crowd else 3) and ds.stats["crowd"] == (2 if crowd else 0)
    for m in masks:
        assert (m == mask).all()


@BOTH
@pytest.mark.parametrize("crowd", [False, True], ids=["object", "crowd"])
@pytest.mark.parametrize("segmentation, message", [
    ({"size": [H, W], "counts": ""}, "annotation 20 has an RLE whose counts do not add up to its size [40, 60]"),
    ({"size": [H, W], "counts": "zz"}, "annotation 20 has an RLE whose counts do not add up"),
    ({"size": [H, W], "counts": "0\u00ff"}, "annotation 20 has an RLE whose counts do not add up"),
    ({"size": [H, W], "counts": [100, 200]}, "annotation 20 has an RLE whose counts do not add up"),
    ({"size": [H, W], "counts": [-1, H * W + 1]}, "annotation 20 has an RLE whose counts do not add up"),
    ({"size": [H, W], "counts": 5}, "annotation 20 has an RLE segmentation without 'size' [height, width]"),
    ({"size": [H, W], "counts": [1.5, 2]}, "annotation 20 has an RLE segmentation without 'size'"),
    ({"size": [H, W]}, "annotation 20 has an RLE segmentation without 'size' [height, width] (two integers) or "
                       "with 'counts' neither a str"),
    ({"counts": "abc"}, "annotation 20 has an RLE segmentation without 'size'"),
    ({"size": [40.0, 60.0], "counts": "abc"}, "annotation 20 has an RLE segmentation without 'size'"),
    ({"size": "40x60", "counts": [H * W]}, "annotation 20 has an RLE segmentation without 'size'"),
    ({"size": [H, W, 3], "counts": [H * W]}, "annotation 20 has an RLE segmentation without 'size'"),
])
def test_corrupt_rle_named_at_construction(tmp_path, train, crowd, segmentation, message):
    raises_path, img = _masks(tmp_path, [segmentation], crowd=crowd)
    with pytest.raises(DatasetError) as e:
        CocoDetection(raises_path, img, train=train, with_masks=True)
    assert str(e.value).startswith(raises_path) and message in str(e.value)
    assert len(CocoDetection(raises_path, img, train=train).annotations(0)) == (1 if crowd else 2)  # boxes only


@BOTH
@pytest.mark.parametrize("segmentation, message", [
    ("polygon", "annotation 20 has segmentation polygon; expected polygons"),
    (None, "annotation 20 has segmentation None; expected polygons"),
    (5, "annotation 20 has segmentation 5; expected polygons"),
    ([[1, 2, "3", 4, 5, 6]], "annotation 20 has polygon [1, 2, '3', 4, 5, 6]; a polygon is a flat list"),
    ([[[1, 2], [3, 4], [5, 6]]], "annotation 20 has polygon [[1, 2], [3, 4], [5, 6]]; a polygon is a flat"),
    ([5], "annotation 20 has polygon 5; a polygon is a flat list"),
])
def test_segmentation_of_a_wrong_type_named(tmp_path, train, segmentation, message):
    raises(tmp_path, json.load(open(_masks(tmp_path, [segmentation])[0])), message, train=train, with_masks=True)


# 8. Annotation of an image that is not in the file ---------------------------------------------------------

@BOTH
def test_annotation_of_an_unknown_image(tmp_path, train):
    data = base()
    data["annotations"].append({"id": 12, "image_id": 9, "category_id": 3, "bbox": [1, 1, 5, 5]})
    raises(tmp_path, data, "annotation 12 names image_id 9, which is not in 'images'", train=train)


# 9. file_name leaving the image directory ------------------------------------------------------------------

@BOTH
@pytest.mark.parametrize("file_name, message", [
    ("../secret.jpg", "image 499 file_name '../secret.jpg' points outside the image directory"),
    ("sub/../../x.jpg", "image 499 file_name 'sub/../../x.jpg' points outside the image directory"),
    ("/etc/passwd", "image 499 file_name '/etc/passwd' points outside the image directory"),
    ("..", "image 499 file_name '..' points outside the image directory"),
    ("./../x.jpg", "image 499 file_name './../x.jpg' points outside"),
    ("//etc/passwd", "image 499 file_name '//etc/passwd' points outside"),
    (".", "image 499 has file_name '.', the image directory itself"),
    ("sub/..", "image 499 has file_name 'sub/..', the image directory itself"),
    ("", "image 499 has file_name ''; expected a relative path"),
    (None, "image 499 has file_name None; expected a relative path"),
    (7, "image 499 has file_name 7; expected a relative path"),
    ("a\x00.png", "image 499 has file_name 'a\\x00.png', which no file can have"),
    ("\ud800.png", "image 499 has file_name '\\ud800.png', which no file can have"),
])
def test_file_name_leaving_the_image_directory_refused_when_the_file_is_read(tmp_path, train, file_name,
                                                                            message):
    data = base()
    # The bad name is the last of many images, and no item is ever read: the check is at construction.
    data["images"] += [{"id": 100 + k, "file_name": "a.png", "height": H, "width": W} for k in range(400)]
    data["images"][-1]["file_name"] = file_name
    raises(tmp_path, data, message, train=train, filter_empty=False)


@BOTH
def test_sub_folders_inside_the_image_directory_stay_allowed(tmp_path, train):
    data = mutated(_set("images", 0, file_name="a/b.png"))
    data["images"][1]["file_name"] = "sub/../b.png"
    ds = CocoDetection(*write(tmp_path, data, images=("a/b.png", "b.png")), train=train)
    assert ds.records[0]["path"] == str(tmp_path / "img" / "a" / "b.png")
    assert ds.records[1]["path"] == str(tmp_path / "img" / "b.png")
    assert ds[0][0].shape == (3, H, W) and ds[1][1]["labels"].tolist() == [1]


def test_original_file_is_not_modified_by_loading(tmp_path):
    """The checks read the parsed file only; nothing is rewritten or lost."""
    data = base()
    ann, img = write(tmp_path, data)
    before = open(ann).read()
    ds = CocoDetection(ann, img)
    assert open(ann).read() == before and ds.coco.dataset == data
    assert ds.stats["images"] == 2 and ds.stats["annotations"] == 2
