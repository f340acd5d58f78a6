"""Instance masks of COCO-format datasets: equal to pycocotools' rasterisation on real COCO polygons,
moved with the image by the augmentation, RLE inputs, and each kind of broken segmentation dropped and
counted or named."""
import json
import logging

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from detection.data.coco import CocoDetection
from detection.data.mapper import build_det_transform
from engine.errors import DatasetError
from tests.conftest import SHARED_DATA

TINY_COCO = SHARED_DATA / "tiny_coco"
H, W = 40, 60


@pytest.fixture(scope="module")
def tiny_val():
    if not TINY_COCO.is_dir():
        pytest.skip(f"tiny_coco not found at {TINY_COCO} (real COCO subsets live in ../shared/data)")
    ann_file = TINY_COCO / "annotations/instances_val2017.json"
    gt = COCO(str(ann_file))
    # Images with a multi-polygon object first, then the next images in id order: a handful is enough.
    multi = sorted({a["image_id"] for a in gt.dataset["annotations"]
                    if not a["iscrowd"] and isinstance(a["segmentation"], list) and len(a["segmentation"]) > 1})
    assert multi, "tiny_coco val is expected to hold objects of several polygons"
    return ann_file, gt, multi[:3]


def _indices(ds, image_ids):
    return [i for i, r in enumerate(ds.records) if r["image_id"] in image_ids]


def _reference(gt, ds, index):
    anns = ds.annotations(index)
    img = gt.imgs[ds.records[index]["image_id"]]
    return np.stack([gt.annToMask(a) for a in anns]) if anns else np.zeros((0, img["height"], img["width"]))


def test_real_coco_masks_equal_pycocotools(tiny_val):
    ann_file, gt, multi = tiny_val
    ds = CocoDetection(str(ann_file), str(TINY_COCO / "val2017"), train=False, with_masks=True)
    chosen = _indices(ds, set(multi)) + [0, 1]
    for i in chosen:
        image, target = ds[i]
        anns = ds.annotations(i)
        assert [a["id"] for a in anns] == gt.getAnnIds(imgIds=target["image_id"], iscrowd=False)
        masks = target["masks"]
        assert masks.dtype.is_floating_point is False and str(masks.dtype) == "torch.uint8"
        assert masks.shape == (len(target["boxes"]), *image.shape[1:])
        np.testing.assert_array_equal(masks.numpy(), _reference(gt, ds, i))
    assert ds.stats["no_valid_mask"] == 0 and ds.stats["crowd"] == len(gt.getAnnIds(iscrowd=True))


@pytest.mark.parametrize("size", [300, 1000])
def test_real_coco_masks_follow_resize_and_flip(tiny_val, size):
    ann_file, gt, multi = tiny_val
    mapper = build_det_transform(True, min_size_train=(size,), max_size_train=2000, flip_prob=1.0)
    ds = CocoDetection(str(ann_file), str(TINY_COCO / "val2017"), train=False, with_masks=True, mapper=mapper)
    plain = CocoDetection(str(ann_file), str(TINY_COCO / "val2017"), train=False, mapper=mapper)
    for i in _indices(ds, set(multi)):
        image, target = ds[i, 7]
        h, w = image.shape[1:]
        expected = np.stack([cv2.resize(m, (w, h), interpolation=cv2.INTER_NEAREST)[:, ::-1]
                             for m in _reference(gt, ds, i)])
        np.testing.assert_array_equal(target["masks"].numpy(), expected)
        # Boxes as without masks: transformed from the annotation, not recomputed from the masks.
        _, plain_target = plain[i, 7]
        assert (target["boxes"] == plain_target["boxes"]).all()


def _write(tmp_path, annotations, extra_images=()):
    (tmp_path / "img").mkdir(exist_ok=True)
    cv2.imwrite(str(tmp_path / "img" / "a.png"), np.full((H, W, 3), 128, np.uint8))
    images = [{"id": 1, "file_name": "a.png", "height": H, "width": W}, *extra_images]
    for k, a in enumerate(annotations):
        a.setdefault("id", k + 1)
        a.setdefault("image_id", 1)
        a.setdefault("category_id", 1)
        a.setdefault("bbox", [5, 5, 20, 20])
        a.setdefault("area", 400)
        a.setdefault("iscrowd", 0)
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 1, "name": "thing"}]}))
    return str(path)


def _dataset(tmp_path, annotations, **kw):
    return CocoDetection(_write(tmp_path, annotations), str(tmp_path / "img"), train=False, with_masks=True, **kw)


def test_compressed_and_uncompressed_rle(tmp_path):
    bitmap = np.zeros((H, W), np.uint8)
    bitmap[3:17, 8:30] = 1
    bitmap[20:35, 40:41] = 1
    compressed = mask_utils.encode(np.asfortranarray(bitmap))
    # Uncompressed RLE: run lengths of the column-major bitmap, starting with a run of zeros.
    flat = bitmap.flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    counts = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    assert flat[0] == 0
    ds = _dataset(tmp_path, [
        {"segmentation": {"size": [H, W], "counts": compressed["counts"].decode("ascii")}},
        {"segmentation": {"size": [H, W], "counts": counts}},
        {"segmentation": [[8, 3, 30, 3, 30, 17, 8, 17]]}])
    _, target = ds[0]
    np.testing.assert_array_equal(target["masks"][0].numpy(), bitmap)
    np.testing.assert_array_equal(target["masks"][1].numpy(), bitmap)
    gt = COCO(str(tmp_path / "ann.json"))
    np.testing.assert_array_equal(target["masks"][2].numpy(), gt.annToMask(gt.anns[3]))


def test_out_of_image_and_self_intersecting_polygons_as_pycocotools(tmp_path):
    anns = [{"segmentation": [[-10, -10, W + 10, -10, W + 10, H + 10, -10, H + 10]]},  # covers the image
            {"segmentation": [[50, 30, 90, 30, 90, 60]]},  # partly outside, bottom right
            {"segmentation": [[5, 5, 25, 25, 25, 5, 5, 25]]},  # a bow tie
            {"segmentation": [[2, 2, 10, 2, 10, 10, 2, 10], [20, 20, 30, 20, 30, 30]]}]  # two parts
    ds = _dataset(tmp_path, anns)
    _, target = ds[0]
    gt = COCO(str(tmp_path / "ann.json"))
    masks = target["masks"].numpy()
    assert masks.shape == (4, H, W)
    for k in range(4):
        np.testing.assert_array_equal(masks[k], gt.annToMask(gt.anns[k + 1]))
    assert masks[0].all()
    assert masks[1].any() and not masks[1][:28].any() and not masks[1][:, :48].any()
    bow = masks[2]
    assert bow[15, 7] and bow[15, 23] and not bow[7, 15] and not bow[23, 15]  # two triangles, left and right
    assert masks[3][5, 5] and masks[3][22, 28] and not masks[3][15, 15]


def test_bad_polygons_dropped_and_counted(tmp_path, caplog):
    good = [5, 5, 25, 5, 25, 25, 5, 25]
    anns = [{"segmentation": [[1, 1, 3, 3], good]},  # a 2-point polygon next to a good one: kept
            {"segmentation": [[1, 1, 3, float("nan"), 5, 1]]},  # nothing usable left: dropped with its box
            {"segmentation": [[1, 1, 3, 3, 5, 1, 7]]},  # odd number of coordinates
            {"segmentation": []},
            {"bbox": [1, 1, 3, 3]},  # no segmentation at all
            {"segmentation": [[1, 1, float("inf"), 3, 5, 1], good], "category_id": 1}]
    with caplog.at_level(logging.INFO, logger="detection.data"):
        ds = _dataset(tmp_path, anns)
    s = ds.stats
    assert (s["polygon_too_short"], s["polygon_non_finite"], s["polygon_odd_length"]) == (1, 2, 1)
    assert s["no_valid_mask"] == 4
    assert [a["id"] for a in ds.annotations(0)] == [1, 6]
    _, target = ds[0]
    assert target["masks"].shape == (2, H, W) and len(target["boxes"]) == 2
    expected = mask_utils.decode(mask_utils.frPyObjects([good], H, W))[:, :, 0]  # the good polygon alone
    assert expected.sum() >= 20 * 20
    np.testing.assert_array_equal(target["masks"][0].numpy(), expected)
    np.testing.assert_array_equal(target["masks"][1].numpy(), expected)
    assert "no_valid_mask 4" in caplog.text and "polygon_too_short 1" in caplog.text
    # Without masks, segmentation is not looked at: every box is a target.
    boxes_only = CocoDetection(str(tmp_path / "ann.json"), str(tmp_path / "img"), train=False)
    assert len(boxes_only.annotations(0)) == 6 and boxes_only.stats["no_valid_mask"] == 0


def test_training_image_left_without_masks_is_skipped(tmp_path):
    ds = CocoDetection(_write(tmp_path, [{"segmentation": [[1, 1, 2, 2]]}, {"segmentation": [[1, 1, 4, 1, 4, 4]],
                                                                            "image_id": 2}],
                              [{"id": 2, "file_name": "a.png", "height": H, "width": W}]),
                       str(tmp_path / "img"), train=True, with_masks=True)
    assert len(ds) == 1 and ds.records[0]["image_id"] == 2 and ds.stats["images_skipped"] == 1


def test_rle_of_another_size_is_dropped_with_its_box_and_counted(tmp_path, caplog):
    good = {"size": [H, W], "counts": mask_utils.encode(np.asfortranarray(np.ones((H, W), np.uint8)))["counts"].decode()}
    anns = [{"id": 17, "segmentation": {"size": [W, H], "counts": "abc"}}, {"id": 18, "segmentation": good}]
    with caplog.at_level(logging.INFO, logger="detection.data"):
        ds = CocoDetection(_write(tmp_path, anns), str(tmp_path / "img"), train=False, with_masks=True)
    assert ds.stats["rle_wrong_size"] == 1 and ds.stats["no_valid_mask"] == 1
    assert [a["id"] for a in ds.annotations(0)] == [18]
    _, target = ds[0]
    assert target["masks"].shape == (1, H, W) and target["masks"].all()
    assert "rle_wrong_size 1" in caplog.text


@pytest.mark.parametrize("ann, message", [
    ({"id": 18, "iscrowd": 1, "segmentation": {"size": [H, W + 1], "counts": [5, 3]}},
     "crowd annotation 18 has an RLE of size [40, 61]"),
    ({"id": 19, "segmentation": {"size": [H, W], "counts": 5}}, "annotation 19 has an RLE segmentation without"),
    ({"id": 20, "segmentation": "polygon"}, "annotation 20 has segmentation polygon; expected polygons"),
    ({"id": 21, "segmentation": [[1, 2, "3", 4, 5, 6]]}, "annotation 21 has polygon"),
])
def test_malformed_segmentation_named_at_construction(tmp_path, ann, message):
    path = _write(tmp_path, [ann])
    with pytest.raises(DatasetError, match=message.replace("[", r"\[").replace("]", r"\]")):
        CocoDetection(path, str(tmp_path / "img"), train=False, with_masks=True)
    CocoDetection(path, str(tmp_path / "img"), train=False)  # boxes only: the segmentation is not read


def test_lsj_crop_drops_masks_with_their_boxes():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (50, 100, 3), dtype=np.uint8)
    boxes = np.array([[2, 2, 20, 20], [30, 10, 60, 40], [70, 5, 98, 45]], np.float32)
    masks = np.zeros((3, 50, 100), np.uint8)
    for k, (x0, y0, x1, y1) in enumerate(boxes.astype(int)):
        masks[k, y0:y1, x0:x1] = 1
    t = build_det_transform(True, flip_prob=0.5, lsj={"size": 64, "min_scale": 0.8, "max_scale": 2.0})
    dropped = 0
    for seed in range(30):
        out_image, out_boxes, labels, out_masks = t(image, boxes, [1, 2, 3], seed=seed, masks=masks)
        assert out_masks.shape == (len(out_boxes), 64, 64) and out_masks.dtype == np.uint8
        dropped += 3 - len(out_boxes)
        for box, mask in zip(out_boxes, out_masks):
            ys, xs = np.nonzero(mask)
            if min(box[2] - box[0], box[3] - box[1]) < 2:  # a sliver at the crop border: at most a line
                assert len(xs) <= 2 * max(box[2] - box[0], box[3] - box[1]) + 2
                continue
            # Each mask is the filled rectangle of its own box (up to the nearest-neighbour rounding).
            assert len(xs) and abs(xs.min() - box[0]) <= 2 and abs(xs.max() + 1 - box[2]) <= 2
            assert abs(ys.min() - box[1]) <= 2 and abs(ys.max() + 1 - box[3]) <= 2
    assert dropped > 0


def test_mapper_with_no_objects_and_without_masks():
    t = build_det_transform(True, min_size_train=(32,), max_size_train=100)
    image = np.zeros((50, 100, 3), np.uint8)
    out = t(image, np.zeros((0, 4)), [], seed=0, masks=np.zeros((0, 50, 100), np.uint8))
    assert out[0].shape == (32, 64, 3) and out[3].shape == (0, 32, 64) and out[3].dtype == np.uint8
    assert len(t(image, np.zeros((0, 4)), [], seed=0)) == 3
    with pytest.raises(ValueError, match="one \\(H, W\\) mask per box"):
        t(image, [[1, 1, 5, 5]], [1], masks=np.zeros((0, 50, 100), np.uint8))


def test_mask_mismatch_in_the_mapper_is_a_dataset_error_naming_the_image(tmp_path):
    """A data problem found by the mapper is a DatasetError (the trainer names the iteration, the CLI prints
    one line); through the dataset it also names the file and the image."""
    t = build_det_transform(True, min_size_train=(32,), max_size_train=100)
    with pytest.raises(DatasetError, match=r"masks of shape \(2, 50, 100\) for 1 boxes"):
        t(np.zeros((50, 100, 3), np.uint8), [[1, 1, 5, 5]], [1], masks=np.zeros((2, 50, 100), np.uint8))

    def drops_a_mask(image, boxes, labels, masks):
        return t(image, boxes, labels, masks=masks[:-1])

    ds = _dataset(tmp_path, [{"segmentation": [[5, 5, 25, 5, 25, 25]]}, {"segmentation": [[1, 1, 9, 1, 9, 9]]}],
                  mapper=drops_a_mask)
    with pytest.raises(DatasetError) as e:
        ds[0]
    assert str(e.value).startswith(f"{tmp_path / 'img' / 'a.png'} (image 1 of {tmp_path / 'ann.json'}): masks of "
                                   "shape (1, 40, 60) for 2 boxes")
