"""The synthetic shapes dataset: COCO validity, exact masks, the fixed definition, determinism, crops."""
import collections
import importlib.util
import json
import os

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from detection.data.synthetic import (CATEGORIES, MAX_OBJECTS, VAL_SEED_OFFSET, make_coco_split, make_crops,
                                      make_synthetic, render_image)
from engine.data.decode import read_image
from backbones.classification.imagefolder import ImageFolder, build_cls_transform

HEIGHT, WIDTH = 96, 128  # not square, so that a swapped H/W shows


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    written = make_synthetic(str(out), num_train=50, num_val=10, seed=0, image_size=(HEIGHT, WIDTH),
                             crops_per_class=3)
    return out, written


def _coco(out, split="train"):
    return COCO(str(out / "annotations" / f"instances_{split}.json"))


def test_coco_file_loads_with_the_fixed_categories(shapes):
    out, written = shapes
    assert written["train_annotations"] == str(out / "annotations" / "instances_train.json")
    coco = _coco(out)
    assert [(c["id"], c["name"]) for c in coco.loadCats(coco.getCatIds())] == [
        (1, "circle"), (2, "triangle"), (3, "rectangle")]
    assert sorted(coco.getImgIds()) == list(range(1, 51))
    ann_ids = [a["id"] for a in coco.dataset["annotations"]]
    assert len(set(ann_ids)) == len(ann_ids)
    for info in coco.loadImgs(coco.getImgIds()):
        assert (info["height"], info["width"]) == (HEIGHT, WIDTH)
        assert read_image(out / "train" / info["file_name"]).shape == (HEIGHT, WIDTH, 3)


def test_polygons_rasterise_to_the_stored_area_and_box(shapes):
    out, _ = shapes
    coco = _coco(out)
    for image_id in coco.getImgIds():
        rles = []
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id)):
            assert ann["iscrowd"] == 0 and ann["segmentation"]
            assert all(len(p) >= 6 and len(p) % 2 == 0 for p in ann["segmentation"])
            rle = mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], HEIGHT, WIDTH))
            # pycocotools' polygon rasteriser may gain or lose a boundary pixel (integer geometry, no float
            # drift): 2% of the area, one pixel of the box.
            assert abs(int(mask_utils.area(rle)) - ann["area"]) <= 0.02 * ann["area"]
            np.testing.assert_allclose(mask_utils.toBbox(rle), ann["bbox"], atol=1)
            assert ann["area"] >= 40
            rles.append(rle)
        for i in range(len(rles)):
            for j in range(i):
                overlap = mask_utils.area(mask_utils.merge([rles[i], rles[j]], intersect=True))
                assert overlap == 0, f"image {image_id}: visible masks of different objects overlap"


def test_object_counts_categories_and_occlusion(shapes):
    out, _ = shapes
    coco = _coco(out)
    counts = [len(coco.getAnnIds(imgIds=i)) for i in coco.getImgIds()]
    assert min(counts) >= 1 and max(counts) <= MAX_OBJECTS
    assert len(set(counts)) >= 4  # uniform 1..6, not a constant
    assert {a["category_id"] for a in coco.dataset["annotations"]} == {1, 2, 3}
    # Occlusion happens: some object is split into several visible pieces.
    assert any(len(a["segmentation"]) > 1 for a in coco.dataset["annotations"])


def test_sizes_stay_within_the_definition():
    rng = np.random.default_rng(5)
    for _ in range(30):
        image, anns = render_image(rng, 64, 80)
        assert image.shape == (64, 80, 3) and image.dtype == np.uint8
        for ann in anns:
            x, y, w, h = ann["bbox"]
            assert x >= 0 and y >= 0 and x + w <= 80 and y + h <= 64
            # longest side 32 px (half of 64), rotated by at most 45 degrees: extent <= 32 * sqrt(2)
            assert max(w, h) <= 32 * 2 ** 0.5 + 2


def test_backgrounds_differ_and_are_textured(shapes):
    out, _ = shapes
    a, b = (read_image(out / "train" / f"{i:06d}.png").astype(np.float32) for i in (0, 1))
    assert np.abs(a - b).mean() > 10
    assert a.std(axis=(0, 1)).min() > 5


def test_train_and_val_differ(shapes):
    out, _ = shapes
    assert (out / "train" / "000000.png").read_bytes() != (out / "val" / "000000.png").read_bytes()
    val = json.loads((out / "annotations" / "instances_val.json").read_text())
    assert len(val["images"]) == 10 and str(VAL_SEED_OFFSET) in val["info"]["description"]


def _files(root):
    return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
            for d, _, names in os.walk(root) for f in names}


def test_same_seed_gives_identical_bytes(tmp_path):
    for name in ("a", "b"):
        make_synthetic(str(tmp_path / name), num_train=4, num_val=2, seed=7, image_size=(64, 64), crops_per_class=2)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(a) == 6 + 2 + 2 * 3 * 2 and a == b
    make_synthetic(str(tmp_path / "c"), num_train=4, num_val=2, seed=8, image_size=(64, 64), crops_per_class=2)
    c = _files(tmp_path / "c")
    assert a["train/000000.png"] != c["train/000000.png"]


def test_two_processes_write_the_same_files(tmp_path):
    """`workers` draws the images in several processes; each image seeds its own generator, so the files
    (and the annotation JSON, in image order) are byte for byte those of one process."""
    for name, workers in (("one", 1), ("two", 2)):
        make_synthetic(str(tmp_path / name), num_train=12, num_val=4, seed=5, image_size=(64, 64),
                       crops_per_class=4, workers=workers)
    one, two = _files(tmp_path / "one"), _files(tmp_path / "two")
    assert len(one) == 12 + 4 + 2 + 2 * 3 * 4 and one == two


def test_image_i_does_not_depend_on_the_number_of_images(tmp_path):
    make_coco_split(str(tmp_path / "few"), "train", 2, seed=3, image_size=(64, 64))
    make_coco_split(str(tmp_path / "many"), "train", 5, seed=3, image_size=(64, 64))
    assert (tmp_path / "few/train/000001.png").read_bytes() == (tmp_path / "many/train/000001.png").read_bytes()


def test_rerun_with_fewer_images_removes_stale_ones(tmp_path):
    make_crops(str(tmp_path), "train", 3, seed=0, crop_size=32)
    (tmp_path / "crops/train/circle/keep.txt").write_text("not ours")
    make_crops(str(tmp_path), "train", 1, seed=0, crop_size=32)
    assert sorted(os.listdir(tmp_path / "crops/train/circle")) == ["000000.png", "keep.txt"]


def test_crops_form_an_imagefolder(shapes):
    out, written = shapes
    train = ImageFolder(written["train_crops"], transform=build_cls_transform(train=False, size=64))
    assert train.classes == sorted(c["name"] for c in CATEGORIES)
    assert len(train) == 9
    image, label = train[0]
    assert image.shape == (3, 64, 64) and label == 0
    val = ImageFolder(out / "crops" / "val", class_names=train.classes)
    assert len(val) == 9
    assert cv2.imread(str(out / "crops/train/triangle/000000.png")).shape == (64, 64, 3)


def test_too_small_image_is_refused():
    with pytest.raises(ValueError, match="below 32 px"):
        render_image(np.random.default_rng(0), 31, 100)


def test_tool_writes_the_dataset(tmp_path, capsys):
    path = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "make_synthetic.py")
    spec = importlib.util.spec_from_file_location("make_synthetic_tool", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.main([str(tmp_path), "--num-train", "3", "--num-val", "2", "--size", "48", "64", "--crops-per-class", "1"])
    printed = capsys.readouterr().out
    assert "instances_train.json" in printed and "crops" in printed
    assert len(os.listdir(tmp_path / "val")) == 2
    stats = collections.Counter(a["image_id"] for a in
                                json.loads((tmp_path / "annotations/instances_train.json").read_text())["annotations"])
    assert set(stats) == {1, 2, 3}


def test_negative_seed_is_refused(tmp_path):
    with pytest.raises(ValueError, match="non-negative"):
        make_coco_split(str(tmp_path), "train", 1, seed=-1)
