"""Loaders from a config: same seed, same batches with any number of workers; resuming; the test loader
decodes only."""
import pytest
import torch

from detection.data.build import build_detection_test_loader, build_detection_train_loader
from detection.data.synthetic import make_coco_split
from engine.config import Config
from engine.errors import ConfigError
from tests.conftest import SHARED_DATA


@pytest.fixture(scope="module")
def shapes_cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    make_coco_split(str(root), "train", 12, seed=0, image_size=(128, 128))
    make_coco_split(str(root), "val", 3, seed=1, image_size=(128, 128))
    return Config.from_dict({
        "model": {"num_classes": 3},
        "input": {"min_size_train": [64, 96], "max_size_train": 200, "min_size_test": 64},
        "solver": {"ims_per_batch": 4},
        "data": {"num_workers": 0,
                 "train": {"ann_file": str(root / "annotations/instances_train.json"), "img_dir": str(root / "train")},
                 "val": {"ann_file": str(root / "annotations/instances_val.json"), "img_dir": str(root / "val")}},
    })


def _iterate(cfg, n, start_iter=0):
    it = iter(build_detection_train_loader(cfg, start_iter=start_iter))
    return [next(it) for _ in range(n)]


def _cfg(cfg, *overrides):
    return Config.from_dict(cfg.to_dict(), list(overrides))


def _assert_same(a, b):
    assert len(a) == len(b)
    for (ia, ta), (ib, tb) in zip(a, b):
        assert all(torch.equal(x, y) for x, y in zip(ia, ib))
        for x, y in zip(ta, tb):
            assert x["image_id"] == y["image_id"] and torch.equal(x["boxes"], y["boxes"])
            assert torch.equal(x["labels"], y["labels"])


def test_same_seed_same_batches_with_0_and_2_workers(shapes_cfg):
    single = _iterate(shapes_cfg, 4)
    _assert_same(single, _iterate(_cfg(shapes_cfg, "data.num_workers=2"), 4))
    images, targets = single[0]
    assert len(images) == len(targets) == 4
    assert all(img.dtype == torch.uint8 and img.shape[0] == 3 and img.shape[1] in (64, 96) for img in images)
    assert {img.shape[1] for images, _ in single for img in images} == {64, 96}  # sizes drawn per image
    t = targets[0]
    assert t["boxes"].dtype == torch.float32 and t["labels"].dtype == torch.int64 and t["orig_size"] == (128, 128)
    assert (t["boxes"] >= 0).all() and (t["boxes"] <= images[0].shape[1]).all()


def test_resume_continues_the_stream_and_other_seed_differs(shapes_cfg):
    first = _iterate(shapes_cfg, 4)
    _assert_same(first[2:], _iterate(shapes_cfg, 2, start_iter=2))
    other = _iterate(_cfg(shapes_cfg, "seed=1"), 4)
    assert [t["image_id"] for _, ts in first for t in ts] != [t["image_id"] for _, ts in other for t in ts]


def test_global_batch_must_split_across_processes(shapes_cfg):
    with pytest.raises(ConfigError, match="ims_per_batch=4 is not divisible by the 3 processes"):
        build_detection_train_loader(shapes_cfg, world_size=3)


def test_missing_dataset_names_the_config_key(shapes_cfg, tmp_path):
    with pytest.raises(ConfigError, match="data.train.img_dir"):
        build_detection_train_loader(_cfg(shapes_cfg, f"data.train.img_dir={tmp_path / 'nope'}"))
    with pytest.raises(ConfigError, match="data.val.ann_file"):
        build_detection_test_loader(_cfg(shapes_cfg, f"data.val.ann_file={tmp_path / 'nope.json'}"))


def test_test_loader_yields_every_val_image_once_at_its_own_size(shapes_cfg):
    seen = [(t["image_id"], tuple(img.shape)) for images, targets in build_detection_test_loader(shapes_cfg, 2)
            for img, t in zip(images, targets)]
    assert seen == [(1, (3, 128, 128)), (2, (3, 128, 128)), (3, (3, 128, 128))]
    resized = next(iter(build_detection_test_loader(shapes_cfg, resize=True)))[0][0]
    assert resized.shape == (3, 64, 64)


def test_new_config_keys_have_defaults():
    cfg = Config.from_dict({})
    assert (cfg.data.filter_empty, cfg.data.skip_bad_images, cfg.input.flip_prob) == (True, False, 0.5)
    assert (cfg.input.lsj_size, cfg.input.lsj_min_scale, cfg.input.lsj_max_scale) == (0, 0.1, 2.0)


def test_real_coco_batches_group_by_orientation(tmp_path):
    root = SHARED_DATA / "tiny_coco"
    if not root.is_dir():
        pytest.skip(f"tiny_coco not found at {root} (real COCO subsets live in ../shared/data)")
    cfg = Config.from_dict({
        "model": {"num_classes": 80},
        "input": {"min_size_train": [64], "max_size_train": 100},
        "solver": {"ims_per_batch": 2},
        "data": {"num_workers": 0, "train": {"ann_file": str(root / "annotations/instances_train2017.json"),
                                             "img_dir": str(root / "train2017")}},
    })
    orientations = set()
    for images, _ in _iterate(cfg, 6):
        landscape = {img.shape[2] >= img.shape[1] for img in images}
        assert len(landscape) == 1
        orientations |= landscape
    assert orientations == {True, False}


def test_mask_rcnn_batches_carry_masks(shapes_cfg):
    cfg = _cfg(shapes_cfg, "model.name=mask_rcnn")
    images, targets = _iterate(cfg, 1)[0]
    for image, target in zip(images, targets):
        masks = target["masks"]
        assert masks.dtype == torch.uint8 and masks.shape == (len(target["boxes"]), *image.shape[1:])
        assert set(masks.unique().tolist()) <= {0, 1} and (masks.flatten(1).sum(1) > 0).all()
    assert "masks" not in _iterate(shapes_cfg, 1)[0][1][0]  # Faster R-CNN batches stay as they were
    val_images, val_targets = next(iter(build_detection_test_loader(cfg)))
    assert val_targets[0]["masks"].shape[1:] == val_images[0].shape[1:]
