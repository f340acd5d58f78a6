"""COCO-format datasets: label mapping, target filtering with counts, and one clear error per broken input;
on real COCO ground truth (../shared/data/tiny_coco) and on crafted files."""
import json
import logging
import os

import cv2
import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from detection.data.coco import CocoDetection
from detection.data.synthetic import make_coco_split
from engine.errors import ConfigError, DatasetError
from tests.conftest import SHARED_DATA

TINY_COCO = SHARED_DATA / "tiny_coco"


@pytest.fixture(scope="module")
def tiny_coco():
    if not TINY_COCO.is_dir():
        pytest.skip(f"tiny_coco not found at {TINY_COCO} (real COCO subsets live in ../shared/data)")
    return TINY_COCO


def _tiny(root, split="val", **kw):
    return CocoDetection(str(root / f"annotations/instances_{split}2017.json"), str(root / f"{split}2017"), **kw)


@pytest.mark.parametrize("split", ["train", "val"])
def test_real_coco_labels_map_to_category_ids_and_back(tiny_coco, split):
    ds = _tiny(tiny_coco, split)
    gt = COCO(str(tiny_coco / f"annotations/instances_{split}2017.json"))
    cat_ids = gt.getCatIds()
    assert len(cat_ids) == 80 and [c["id"] for c in ds.categories] == sorted(cat_ids)
    assert ds.label_to_category_id == {i + 1: c for i, c in enumerate(sorted(cat_ids))}
    assert ds.category_id_to_label == {c: i + 1 for i, c in enumerate(sorted(cat_ids))}
    for i, record in enumerate(ds.records):
        anns = gt.loadAnns(gt.getAnnIds(imgIds=record["image_id"], iscrowd=False))
        got = [ds.label_to_category_id[int(label)] for label in record["labels"]]
        assert got == [a["category_id"] for a in anns]  # every non-crowd box kept, in file order
        assert [a["id"] for a in ds.annotations(i)] == [a["id"] for a in anns]


def test_real_coco_crowd_left_out_and_counted(tiny_coco):
    gt = COCO(str(tiny_coco / "annotations/instances_val2017.json"))
    crowd = gt.getAnnIds(iscrowd=True)
    assert crowd, "tiny_coco val is expected to hold crowd regions"
    ds = _tiny(tiny_coco, train=True)
    assert ds.stats["crowd"] == len(crowd)
    assert sum(len(r["labels"]) for r in ds.records) == len(gt.getAnnIds()) - len(crowd)
    no_annotations = [i for i in gt.getImgIds() if not gt.getAnnIds(imgIds=i)]
    assert ds.stats["images_skipped"] == len(no_annotations) and len(ds) == 50 - len(no_annotations)
    assert len(_tiny(tiny_coco, train=False)) == 50


def test_real_coco_image_with_only_crowd_regions(tiny_coco, tmp_path):
    # tiny_coco has no crowd-only image: make one by keeping only the crowd region of an image.
    data = json.loads((tiny_coco / "annotations/instances_train2017.json").read_text())
    crowd = next(a for a in data["annotations"] if a["iscrowd"])
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != crowd["image_id"] or a["iscrowd"]]
    ann = tmp_path / "crowd_only.json"
    ann.write_text(json.dumps(data))
    kw = dict(ann_file=str(ann), img_dir=str(tiny_coco / "train2017"))
    train = CocoDetection(**kw)
    assert crowd["image_id"] not in [r["image_id"] for r in train.records]
    test = CocoDetection(**kw, train=False)
    index = [r["image_id"] for r in test.records].index(crowd["image_id"])
    assert test[index][1]["boxes"].shape == (0, 4) and test.stats["crowd"] == train.stats["crowd"]


def test_real_coco_items_and_orientation(tiny_coco):
    ds = _tiny(tiny_coco, train=False)
    gt = COCO(str(tiny_coco / "annotations/instances_val2017.json"))
    for i in (0, 1, len(ds) - 1):
        image, target = ds[i]
        record = ds.records[i]
        info = gt.imgs[record["image_id"]]
        assert image.dtype == torch.uint8 and image.shape == (3, info["height"], info["width"])
        assert target["orig_size"] == (info["height"], info["width"]) and target["image_id"] == info["id"]
        b = target["boxes"]
        assert b.dtype == torch.float32 and target["labels"].dtype == torch.int64
        assert (b[:, :2] >= 0).all() and (b[:, 2] <= info["width"]).all() and (b[:, 3] <= info["height"]).all()
    assert ds.landscape == [gt.imgs[r["image_id"]]["width"] >= gt.imgs[r["image_id"]]["height"] for r in ds.records]
    assert 0 < sum(ds.landscape) < len(ds)


def write_dataset(tmp_path, images=None, annotations=None, categories=None):
    """Two 60x40 images with one box each; categories 3 'b' and 7 'a' (not sorted in the file)."""
    images = [{"id": 1, "file_name": "a.png", "height": 40, "width": 60},
              {"id": 2, "file_name": "b.png", "height": 40, "width": 60}] if images is None else images
    annotations = [{"id": 10, "image_id": 1, "category_id": 7, "bbox": [5, 5, 20, 10], "iscrowd": 0,
                    "segmentation": [[5, 5, 25, 5, 25, 15]]},
                   {"id": 11, "image_id": 2, "category_id": 3, "bbox": [30, 10, 10, 20], "iscrowd": 0}] \
        if annotations is None else annotations
    categories = [{"id": 7, "name": "a"}, {"id": 3, "name": "b"}] if categories is None else categories
    (tmp_path / "img").mkdir(exist_ok=True)
    for img in images:
        cv2.imwrite(str(tmp_path / "img" / img["file_name"]), np.full((img["height"], img["width"], 3), 99, np.uint8))
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return str(path), str(tmp_path / "img")


def test_contiguous_labels_follow_categories_order(tmp_path):
    ann, img = write_dataset(tmp_path)
    ds = CocoDetection(ann, img)  # no categories given: the file's, sorted by id
    assert ds.label_to_category_id == {1: 3, 2: 7} and ds.category_id_to_label == {3: 1, 7: 2}
    assert ds[0][1]["labels"].tolist() == [2] and ds[1][1]["labels"].tolist() == [1]
    ds = CocoDetection(ann, img, categories=[{"id": 7, "name": "a"}, {"id": 3, "name": "b"}])
    assert ds.label_to_category_id == {1: 7, 2: 3} and ds[0][1]["labels"].tolist() == [1]
    ds = CocoDetection(ann, img, label_space="category_id")
    assert ds[0][1]["labels"].tolist() == [7] and ds.label_to_category_id == {3: 3, 7: 7}


def test_categories_subset_leaves_other_annotations_out(tmp_path):
    ann, img = write_dataset(tmp_path)
    ds = CocoDetection(ann, img, categories=[{"id": 7, "name": "a"}])
    assert len(ds) == 1 and ds.stats["other_category"] == 1 and ds.stats["images_skipped"] == 1


def test_boxes_clipped_and_bad_boxes_dropped_with_counts(tmp_path, caplog):
    anns = [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [-5, 30, 20, 20]},          # clipped
            {"id": 2, "image_id": 1, "category_id": 3, "bbox": [5, 5, 0, 10]},             # zero width
            {"id": 3, "image_id": 1, "category_id": 3, "bbox": [5, 5, -3, 10]},            # negative
            {"id": 4, "image_id": 1, "category_id": 3, "bbox": [100, 100, 5, 5]},          # outside
            {"id": 5, "image_id": 1, "category_id": 3, "bbox": [float("nan"), 1, 5, 5]},   # NaN
            {"id": 6, "image_id": 1, "category_id": 3, "bbox": [1, 1, 5, float("inf")]},   # infinite
            {"id": 7, "image_id": 1, "category_id": 3, "bbox": [1, 1, 5, 5], "iscrowd": 1},
            {"id": 8, "image_id": 2, "category_id": 3, "bbox": [1, 1, 5, 5], "iscrowd": 1}]  # crowd-only image
    ann, img = write_dataset(tmp_path, annotations=anns)
    with caplog.at_level(logging.INFO, logger="detection.data"):
        ds = CocoDetection(ann, img)
    assert ds[0][1]["boxes"].tolist() == [[0.0, 30.0, 15.0, 40.0]]
    assert [a["id"] for a in ds.annotations(0)] == [1]
    assert {k: ds.stats[k] for k in ("degenerate", "outside_image", "non_finite", "crowd", "images_skipped")} == \
        {"degenerate": 2, "outside_image": 1, "non_finite": 2, "crowd": 2, "images_skipped": 1}
    assert len(ds) == 1
    summary = [r.getMessage() for r in caplog.records if r.name == "detection.data"]
    assert len(summary) == 1 and "crowd 2, degenerate 2, non_finite 2, outside_image 1" in summary[0]
    assert len(CocoDetection(ann, img, filter_empty=False)) == 2
    assert len(CocoDetection(ann, img, train=False)) == 2  # evaluation keeps crowd-only images


def test_raw_annotations_keep_segmentation(tmp_path):
    ann, img = write_dataset(tmp_path)
    assert CocoDetection(ann, img).annotations(0)[0]["segmentation"] == [[5, 5, 25, 5, 25, 15]]


def _add_annotation(**fields):
    return lambda d: d["annotations"].append({"id": 12, "image_id": 1, "category_id": 3, "bbox": [1, 1, 2, 2],
                                              **fields})


@pytest.mark.parametrize("mutate, match", [
    (_add_annotation(image_id=9), "annotation 12 names image_id 9, which is not in 'images'"),
    (_add_annotation(category_id=99), "annotation 12 has category_id 99, which is not in 'categories'"),
    (_add_annotation(id=10), "duplicate annotation id 10"),
    (_add_annotation(bbox=[1, 2, 3]), r"annotation 12 has bbox \[1, 2, 3\]; expected \[x, y, width, height\]"),
    (lambda d: d["annotations"].append({"id": 12, "image_id": 1, "category_id": 3}), r"annotation 12 lacks .*'bbox'"),
    (lambda d: d["annotations"].append({"image_id": 1, "category_id": 3, "bbox": [1, 1, 2, 2]}),
     r"annotations\[2\] \(no id\) lacks .*'id'"),
    (lambda d: d["images"].append({"id": 1, "file_name": "c.png", "height": 4, "width": 4}), "duplicate image id 1"),
    (lambda d: d["images"].append({"id": 5, "file_name": "c.png", "height": 4}), r"image 5 lacks .*'width'"),
    (lambda d: d["images"].append({"id": 5, "file_name": "c.png", "height": 0, "width": 4}),
     "image 5 has height 0 and width 4"),
    (lambda d: d.__setitem__("categories", []), "'categories' list is empty"),
    (lambda d: d.pop("images"), "missing or malformed 'images' list"),
    (lambda d: d["images"].append({"id": 5, "file_name": "../escape.png", "height": 4, "width": 4}),
     "image 5 file_name '../escape.png' points outside the image directory"),
    (lambda d: d["images"].append({"id": 5, "file_name": "/etc/passwd", "height": 4, "width": 4}),
     "image 5 file_name '/etc/passwd' points outside the image directory"),
    (lambda d: d["images"].append({"id": 5, "file_name": "sub/../../x.png", "height": 4, "width": 4}),
     "image 5 file_name 'sub/../../x.png' points outside"),
    (lambda d: d["images"].append({"id": "5", "file_name": "c.png", "height": 4, "width": 4}),
     "image '5': ids must be integers"),
])
def test_broken_annotation_files_name_the_file_and_entry(tmp_path, mutate, match):
    ann, img = write_dataset(tmp_path)
    data = json.loads(open(ann).read())
    mutate(data)
    with open(ann, "w") as f:
        json.dump(data, f)
    with pytest.raises(DatasetError, match=match) as e:
        CocoDetection(ann, img)
    assert str(e.value).startswith(ann)


def test_invalid_json_and_missing_paths(tmp_path):
    ann, img = write_dataset(tmp_path)
    with open(ann, "w") as f:
        f.write('{"images": [')
    with pytest.raises(DatasetError, match=r"ann.json is not valid JSON \(line 1"):
        CocoDetection(ann, img)
    with pytest.raises(ConfigError, match=r"annotation file not found: .*nope.json \(set by data.train.ann_file"):
        CocoDetection(str(tmp_path / "nope.json"), img)
    with pytest.raises(ConfigError, match=r"image directory not found: .*nodir \(set by data.val.img_dir"):
        CocoDetection(ann, str(tmp_path / "nodir"), img_setting="data.val.img_dir")
    with pytest.raises(ConfigError, match="config key 'data.val.ann_file' is not set"):
        CocoDetection(None, img, ann_setting="data.val.ann_file")


def test_configured_category_missing_from_the_file_is_named(tmp_path):
    ann, img = write_dataset(tmp_path)
    with pytest.raises(DatasetError, match=r"ann.json: data.categories lists categories the file does not have: "
                                           r"5 \(person\)"):
        CocoDetection(ann, img, categories=[{"id": 3, "name": "b"}, {"id": 5, "name": "person"}])
    with pytest.raises(ConfigError, match=r"data.categories\[0\] .* needs 'id' and 'name'"):
        CocoDetection(ann, img, categories=[{"id": 3}])
    with pytest.raises(ConfigError, match="label_space='coco'"):
        CocoDetection(ann, img, label_space="coco")


def test_empty_training_set_is_an_error_with_the_counts(tmp_path):
    ann, img = write_dataset(tmp_path, annotations=[
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 1, 5, 5], "iscrowd": 1}])
    with pytest.raises(DatasetError, match=r"ann.json: no usable images .*crowd 1.*images without usable boxes: 2"):
        CocoDetection(ann, img)
    assert len(CocoDetection(ann, img, train=False)) == 2


def test_corrupt_image_named_or_skipped_and_counted(tmp_path, caplog):
    ann, img = write_dataset(tmp_path)
    (tmp_path / "img" / "a.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="a.png"):
        CocoDetection(ann, img)[0]
    ds = CocoDetection(ann, img, skip_bad_images=True)
    with caplog.at_level(logging.WARNING):
        image, target = ds[0]
    assert target["image_id"] == 2 and ds.num_skipped == 1 and "a.png" in caplog.text
    ds[0]
    assert ds.num_skipped == 1  # a known bad file is not read (or counted) again
    os.remove(tmp_path / "img" / "b.png")
    with pytest.raises(DatasetError, match="b.png"):
        CocoDetection(ann, img)[1]


def test_symbolic_links_inside_the_image_directory_are_followed(tmp_path):
    ann, img = write_dataset(tmp_path)
    elsewhere = tmp_path / "elsewhere.png"
    os.replace(tmp_path / "img" / "a.png", elsewhere)
    os.symlink(elsewhere, tmp_path / "img" / "a.png")
    assert CocoDetection(ann, img)[0][0].shape == (3, 40, 60)


def test_image_size_must_match_annotation(tmp_path):
    ann, img = write_dataset(tmp_path)
    cv2.imwrite(str(tmp_path / "img" / "a.png"), np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(DatasetError, match=r"a.png: image is 10x10 \(WxH\) but .*ann.json says 60x40 for image 1"):
        CocoDetection(ann, img)[0]


def test_index_out_of_range_ends_iteration(tmp_path):
    ann, img = write_dataset(tmp_path)
    ds = CocoDetection(ann, img)
    assert len(list(ds)) == 2
    with pytest.raises(IndexError):
        ds[2]


def test_mapper_gets_image_boxes_labels_and_the_seed(tmp_path):
    ann, img = write_dataset(tmp_path)
    calls = []

    def mapper(image, boxes, labels, seed=None):
        calls.append(seed)
        return image[:20], boxes / 2, labels

    ds = CocoDetection(ann, img, mapper=mapper)
    image, target = ds[(0, 1234)]
    assert image.shape == (3, 20, 60) and target["boxes"].tolist() == [[2.5, 2.5, 12.5, 7.5]]
    assert target["orig_size"] == (40, 60) and calls == [1234]
    ds[0]
    assert calls[-1] is None


def test_synthetic_split_round_trip(tmp_path):
    ann = make_coco_split(str(tmp_path), "train", 3, seed=0, image_size=(64, 96))
    ds = CocoDetection(ann, str(tmp_path / "train"))
    gt = json.loads(open(ann).read())
    image, target = ds[1]
    boxes = [a["bbox"] for a in gt["annotations"] if a["image_id"] == target["image_id"]]
    expected = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in boxes], dtype=torch.float32)
    assert torch.equal(target["boxes"], expected) and image.shape == (3, 64, 96)
    assert ds.landscape == [True, True, True]
