"""A detector's evaluation on data.val goes through the dataset and test loader that training uses: the
same refusal of file names outside the image directory, the same size checks, the same
data.skip_bad_images, decoding in data.num_workers DataLoader workers; images without annotations run
too, and the shards of a distributed run add up to the whole."""
import json
import logging

import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import detection.evaluation.evaluator as evaluator
from detection.data.build import build_dataset, build_detection_test_loader
from detection.data.coco import CocoDetection
from detection.data.synthetic import CATEGORIES, make_coco_split
from detection.evaluation import evaluate_detector, predict_coco
from engine.config import Config
from engine.errors import DatasetError

H, W = 64, 96
NUM_IMAGES = 6


class MeanPixelModel(torch.nn.Module):
    """Stand-in detector: one box per image scored by the image's mean pixel (so each image's detection is
    its own), label 1; records the size of every image it is given."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, images):
        self.seen += [tuple(image.shape) for image in images]
        return [{"boxes": torch.tensor([[2.0, 3.0, 40.0, 50.0]]), "scores": (image.float().mean() / 255).reshape(1),
                 "labels": torch.ones(1, dtype=torch.int64)} for image in images]


@pytest.fixture
def val(tmp_path):
    ann = make_coco_split(str(tmp_path), "val", NUM_IMAGES, seed=4, image_size=(H, W))
    return tmp_path, ann


def _cfg(root, ann, out, *overrides):
    return Config.from_dict({
        "model": {"name": "faster_rcnn", "num_classes": 3}, "device": "cpu", "output_dir": str(out),
        "data": {"num_workers": 0, "val": {"ann_file": str(ann), "img_dir": str(root / "val")},
                 "train": {"ann_file": str(ann), "img_dir": str(root / "val")},
                 "categories": [{"id": c["id"], "name": c["name"]} for c in CATEGORIES]}}, list(overrides))


def _edit(ann, change):
    data = json.loads(open(ann).read())
    change(data)
    with open(ann, "w") as f:
        json.dump(data, f)


def _evaluate(cfg, model=None):
    model = model or MeanPixelModel()
    reports = evaluate_detector(cfg, model, torch.device("cpu"))
    return reports, json.loads(open(f"{cfg.output_dir}/eval/results.json").read()), model


def _pycocotools_ap(ann, results, img_ids=None):
    gt = COCO(str(ann))
    ev = COCOeval(gt, gt.loadRes(results), "bbox")
    if img_ids is not None:
        ev.params.imgIds = img_ids
    ev.evaluate(), ev.accumulate(), ev.summarize()
    return list(ev.stats)


def test_file_name_outside_the_image_directory_is_refused_as_in_training(val, tmp_path):
    root, ann = val
    (root / "val" / "000000.png").rename(root / "outside.png")  # there, and readable: still refused
    _edit(ann, lambda d: d["images"][0].update(file_name="../outside.png"))
    cfg = _cfg(root, ann, tmp_path / "out")
    with pytest.raises(DatasetError) as training:
        build_dataset(cfg, "train", True)
    model = MeanPixelModel()
    with pytest.raises(DatasetError) as evaluation:
        evaluate_detector(cfg, model, torch.device("cpu"))
    assert str(evaluation.value) == str(training.value)
    assert "image 1 file_name '../outside.png' points outside the image directory" in str(evaluation.value)
    assert model.seen == []


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_image_skipped_as_in_training_and_left_out(val, tmp_path, caplog, workers):
    root, ann = val
    bad = root / "val" / "000002.png"  # image 3
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    cfg = _cfg(root, ann, tmp_path / "out", f"data.num_workers={workers}")
    with pytest.raises(DatasetError, match=f"{bad}: not a readable image"):
        _evaluate(cfg)

    skipping = _cfg(root, ann, tmp_path / "out", f"data.num_workers={workers}", "data.skip_bad_images=true")
    training = build_dataset(skipping, "train", True)
    assert training[2][1]["image_id"] == 4 and training.num_skipped == 1  # training reads the next image instead
    with caplog.at_level(logging.WARNING):
        reports, results, model = _evaluate(skipping)
    others = [i for i in range(1, NUM_IMAGES + 1) if i != 3]
    assert sorted({r["image_id"] for r in results}) == others  # no image scored twice, none for image 3
    assert len(results) == len(model.seen) == NUM_IMAGES - 1
    assert reports["bbox"].stats == pytest.approx(_pycocotools_ap(ann, results, others), abs=1e-12)
    assert "1 of the 6 images" in caplog.text and "left out of the evaluation" in caplog.text


def test_evaluation_decodes_in_the_configured_dataloader_workers(val, tmp_path, monkeypatch):
    root, ann = val
    loaders = []

    def recording(*args, **kwargs):
        loaders.append(build_detection_test_loader(*args, **kwargs))
        return loaders[-1]

    monkeypatch.setattr(evaluator, "build_detection_test_loader", recording)
    written = {}
    for workers in (0, 2):
        cfg = _cfg(root, ann, tmp_path / str(workers), f"data.num_workers={workers}", "test.ims_per_batch=4")
        reports, written[workers], model = _evaluate(cfg)
        loader = loaders[-1]
        assert loader.num_workers == workers and isinstance(loader.dataset, CocoDetection)
        assert loader.dataset.mapper is None and not loader.dataset.train  # the model resizes, as before
        assert model.seen == [(3, H, W)] * NUM_IMAGES
    assert written[2] == written[0] and len(written[0]) == NUM_IMAGES


def test_images_without_annotations_are_evaluated(val, tmp_path):
    root, ann = val
    _edit(ann, lambda d: d.update(annotations=[a for a in d["annotations"] if a["image_id"] != 2]))
    reports, results, model = _evaluate(_cfg(root, ann, tmp_path / "out"))
    assert len(model.seen) == NUM_IMAGES and 2 in {r["image_id"] for r in results}
    # Its detection is a false positive of COCO AP over every image.
    assert reports["bbox"].stats == pytest.approx(_pycocotools_ap(ann, results), abs=1e-12)


def test_image_of_another_size_than_the_annotation_file_says_is_refused(val, tmp_path):
    root, ann = val
    _edit(ann, lambda d: d["images"][1].update(height=H + 6))
    with pytest.raises(DatasetError, match=rf"000001.png: image is {W}x{H} \(WxH\) but .* says {W}x{H + 6} for image 2"):
        _evaluate(_cfg(root, ann, tmp_path / "out"))


def test_shards_in_rank_order_give_the_whole_in_image_order(val, tmp_path):
    root, ann = val
    cfg = _cfg(root, ann, tmp_path / "out")
    label_to_id = {1: 1, 2: 2, 3: 3}
    whole, _ = predict_coco(MeanPixelModel(), torch.device("cpu"), build_detection_test_loader(cfg, 2), label_to_id)
    shards = [predict_coco(MeanPixelModel(), torch.device("cpu"),
                           build_detection_test_loader(cfg, 2, rank=r, world_size=4), label_to_id)[0]
              for r in range(4)]
    assert [len(s) for s in shards] == [2, 2, 1, 1] and sum(shards, []) == whole
    assert [r["image_id"] for r in whole] == list(range(1, NUM_IMAGES + 1))
