"""Numerics and empty cases of the detectors: a NaN or inf image, a loss that turns NaN mid-training, images
without proposals, detections or ground truth, end to end (model, mask pasting, tools/infer.py, COCO
evaluation, the training loop and its checkpoints)."""
import json
import logging
import math

import pytest
import torch
import yaml

import detection.preprocess
from detection import build_detector
from detection.data.build import build_detection_train_loader
from detection.data.synthetic import CATEGORIES
from detection.evaluation import evaluate_detector
from detection.roi_heads import RoIHeads
from detection.rpn import RPN
from detection.train import detection_step, train_detector
from engine.checkpoint import LAST_CHECKPOINT, Checkpointer, load_checkpoint_file
from engine.config import Config
from engine.errors import DatasetError, TrainingError
from engine.events import MetricsWriter
from engine.trainer import Trainer
from segmentation.paste import PASTE_MODES, paste_masks
from tests.conftest import REPO, run_tool, shapes_splits

CATS = [{"id": c["id"], "name": c["name"]} for c in CATEGORIES]
MODEL = {"num_classes": 3, "backbone": {"depth": 18, "norm": "FrozenBN", "freeze_at": 2, "weights": None},
         "fpn": {"out_channels": 32},
         "rpn": {"batch_size_per_image": 32, "pre_nms_topk_train": 100, "post_nms_topk_train": 50,
                 "pre_nms_topk_test": 100, "post_nms_topk_test": 50},
         "roi_heads": {"fc_dim": 32, "batch_size_per_image": 32},
         "mask_head": {"num_conv": 1, "conv_dim": 16}}
SMALL = {"model": MODEL,
         "input": {"min_size_train": [64], "max_size_train": 96, "min_size_test": 64, "max_size_test": 96},
         "solver": {"base_lr": 0.01, "max_iter": 6, "checkpoint_period": 2, "log_period": 1, "warmup_iters": 0},
         "test": {"eval_period": 0}, "device": "cpu"}
NAMES = ("faster_rcnn", "mask_rcnn")
RPN_LOSSES = ("loss_objectness", "loss_rpn_box_reg")
ROI_LOSSES = ("loss_classifier", "loss_box_reg")


def small_model(name="faster_rcnn", *overrides, seed=0):
    torch.manual_seed(seed)
    return build_detector(Config.from_dict(SMALL, [f"model.name={name}", *overrides]))


def image(seed=0, size=(64, 80)):
    return torch.rand(3, *size, generator=torch.Generator().manual_seed(seed))


def target(size=(64, 80), boxes=((8, 10, 40, 50),)):
    masks = torch.zeros(len(boxes), *size, dtype=torch.uint8)
    for k, (x0, y0, x1, y1) in enumerate(boxes):
        masks[k, y0:y1, x0:x1] = 1
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.arange(1, len(boxes) + 1), "masks": masks}


def poisoned(value, seed=0):
    img = image(seed)
    img[1, 7, 9] = value
    return img


def trainer_for(model, tmp_path, batches, max_iter):
    cfg = Config.from_dict(SMALL, [f"solver.max_iter={max_iter}", "solver.checkpoint_period=1"])
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.001)
    writer = MetricsWriter(str(tmp_path), tensorboard=False)
    return Trainer(cfg, model, optimizer, iter(batches), detection_step, Checkpointer(str(tmp_path)), writer,
                   torch.device("cpu"), max_iter)


def assert_empty(det, size=None):
    assert det["boxes"].shape == (0, 4) and det["boxes"].dtype == torch.float32
    assert det["scores"].shape == (0,) and det["scores"].dtype == torch.float32
    assert det["labels"].shape == (0,) and det["labels"].dtype == torch.int64
    if size is not None:
        assert det["masks"].shape == (0, 1, *size) and det["masks"].dtype == torch.float32


# --- 1. NaN or inf in an input image ------------------------------------------------------------------


@pytest.mark.parametrize("value, counts", [(float("nan"), "1 NaN and 0 infinite"),
                                           (float("inf"), "0 NaN and 1 infinite"),
                                           (float("-inf"), "0 NaN and 1 infinite")])
def test_non_finite_image_at_inference_is_named(value, counts):
    model = small_model().eval()
    with torch.no_grad(), pytest.raises(DatasetError, match=rf"^image 1 \(torch.float32, shape \(3, 64, 80\)\) has "
                                                             rf"{counts} pixel values; the detector takes finite"):
        model([image(), poisoned(value)])
    # uint8 images cannot hold NaN; a finite float batch goes through.
    with torch.no_grad():
        assert len(model([(image() * 255).to(torch.uint8), image(1)])) == 2


def test_nan_image_in_training_stops_at_its_iteration(tmp_path):
    model = small_model().train()
    good = ([image(0), image(1)], [target(), target()])
    bad = ([image(2), poisoned(float("nan"))], [target(), target()])
    trainer = trainer_for(model, tmp_path, [good, good, bad, good], max_iter=4)
    kept = tmp_path / "model_0000002.pth"
    with pytest.raises(TrainingError, match=rf"^iteration 2: bad batch: image 1 \(torch.float32, .*\) has 1 NaN and "
                                            rf"0 infinite pixel values.*last good checkpoint is kept \({kept}\)"):
        trainer.train()
    assert not (tmp_path / "model_0000003.pth").exists()
    assert (tmp_path / LAST_CHECKPOINT).read_text() == "model_0000002.pth"
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_nan_past_the_input_check_reaches_the_loss_check(name, tmp_path, monkeypatch):
    """A NaN that arises inside the model (here: the pixel check turned off) goes through matching, box
    coding, NMS and RoIAlign without a crash and stops training at the loss check, every loss named."""
    monkeypatch.setattr(detection.preprocess, "check_finite_images", lambda images: None)
    model = small_model(name).train()
    trainer = trainer_for(model, tmp_path, [([poisoned(float("nan"))], [target()])], max_iter=1)
    losses = RPN_LOSSES + ROI_LOSSES + (("loss_mask",) if name == "mask_rcnn" else ())
    named = ", ".join(f"{k}=nan" for k in losses)
    with pytest.raises(TrainingError, match=rf"^iteration 0: loss is not finite \({named}\); training stopped, "
                                            r"the last good checkpoint is kept \(none saved yet\)"):
        trainer.train()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_non_finite_target_box_is_named():
    model = small_model().train()
    for box in ([8.0, float("nan"), 40, 50], [8.0, 10, float("inf"), 50]):
        t = target(boxes=((1, 1, 20, 20), (8, 10, 40, 50)))
        t["boxes"][1] = torch.tensor(box)
        with pytest.raises(DatasetError, match=r"^target 0: box 1 \[.*\] is not finite \(NaN or inf\)"):
            model([image()], [t])


# --- 2. a loss that becomes NaN mid-training ------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return shapes_splits(tmp_path_factory.mktemp("shapes"), 2, 2, (64, 64))


def run_cfg(shapes, out, *overrides, name="faster_rcnn"):
    d = {"ann_file": str(shapes / "annotations/instances_train.json"), "img_dir": str(shapes / "train")}
    v = {"ann_file": str(shapes / "annotations/instances_val.json"), "img_dir": str(shapes / "val")}
    cfg = dict(SMALL, model=dict(MODEL, name=name), output_dir=str(out),
               data={"num_workers": 0, "categories": CATS, "train": d, "val": v})
    return Config.from_dict(cfg, list(overrides))


def test_loss_nan_mid_training_keeps_the_last_good_checkpoint(shapes, tmp_path, monkeypatch):
    calls = []
    original = RoIHeads.losses

    def nan_at_iteration_3(self, *args):
        losses = original(self, *args)
        calls.append(1)
        if len(calls) == 4:  # the 4th training step: iteration 3
            losses["loss_classifier"] = losses["loss_classifier"] * float("nan")
        return losses

    monkeypatch.setattr(RoIHeads, "losses", nan_at_iteration_3)
    out = tmp_path / "out"
    cfg = run_cfg(shapes, out, "solver.ims_per_batch=2", "solver.max_iter=6", "solver.checkpoint_period=3")
    with pytest.raises(TrainingError) as info:
        train_detector(cfg)
    message = str(info.value)
    assert message.startswith("iteration 3: loss is not finite (loss_objectness=")
    for key in RPN_LOSSES + ("loss_box_reg",):
        value = float(message.split(f"{key}=")[1].split(",")[0].split(")")[0])
        assert math.isfinite(value), key
    assert "loss_classifier=nan" in message
    assert f"the last good checkpoint is kept ({out / 'model_0000003.pth'})" in message
    assert sorted(p.name for p in out.glob("*.pth")) == ["model_0000003.pth"]
    assert (out / LAST_CHECKPOINT).read_text() == "model_0000003.pth"
    state = load_checkpoint_file(str(out / "model_0000003.pth"))
    assert state["iteration"] == 3 and all(torch.isfinite(v).all() for v in state["model"].values()
                                           if v.is_floating_point())


# --- 3. no proposals, no detections ---------------------------------------------------------------------

NO_PROPOSALS = "model.rpn.min_box_size=1000"  # larger than any image: the RPN drops every box
NO_DETECTIONS = "test.score_thresh=1.0"


@pytest.mark.parametrize("name", NAMES)
def test_training_without_proposals_keeps_gradient_paths(name):
    model = small_model(name, NO_PROPOSALS).train()
    # Ground truth but no proposal: the appended ground-truth boxes are the only RoIs.
    losses = model([image()], [target()])
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_classifier"] > 0 and (name == "faster_rcnn" or losses["loss_mask"] > 0)
    # Neither proposals nor ground truth: zero RoIs. The head losses are exactly 0 and still reach the heads.
    model.zero_grad()
    losses = model([image(1)], [target(boxes=())])
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_objectness"] > 0 and losses["loss_rpn_box_reg"] == 0
    heads = ["loss_classifier", "loss_box_reg"] + (["loss_mask"] if name == "mask_rcnn" else [])
    assert all(losses[k] == 0 and losses[k].requires_grad for k in heads)
    sum(losses.values()).backward()
    roi = model.roi_heads
    params = [roi.predictor.cls_score.weight, roi.predictor.bbox_pred.weight, roi.box_head.fc1.weight]
    if name == "mask_rcnn":
        params.append(roi.mask_head.predictor.weight)
    for p in params:
        assert p.grad is not None and p.grad.abs().sum() == 0
    assert model.rpn.head.objectness.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("override", [NO_PROPOSALS, NO_DETECTIONS])
def test_inference_without_proposals_or_detections_is_empty(name, override):
    model = small_model(name, override).eval()
    with torch.no_grad():
        out = model([image(0), (image(1, (50, 70)) * 255).to(torch.uint8)])
    assert len(out) == 2
    for det, size in zip(out, [(64, 80), (50, 70)]):
        assert set(det) == {"boxes", "scores", "labels"} | ({"masks"} if name == "mask_rcnn" else set())
        assert_empty(det, size if name == "mask_rcnn" else None)


@pytest.mark.parametrize("paste_mode", PASTE_MODES)
def test_batch_with_and_without_detections(paste_mode, monkeypatch):
    """Image 0 has detections, image 1 none (its proposals removed), in one batch of Mask R-CNN."""
    select = RPN.select_proposals

    def none_for_image_1(self, *args):
        boxes = select(self, *args)
        return [boxes[0], boxes[1][:0]]

    monkeypatch.setattr(RPN, "select_proposals", none_for_image_1)
    model = small_model("mask_rcnn", "test.score_thresh=0.0", f"model.mask_head.paste_mode={paste_mode}").eval()
    with torch.no_grad():
        first, second = model([image(0), image(1, (50, 70))])
    n = len(first["boxes"])
    assert n > 0 and first["masks"].shape == (n, 1, 64, 80) and first["scores"].shape == (n,)
    assert torch.isfinite(first["boxes"]).all() and ((first["masks"] >= 0) & (first["masks"] <= 1)).all()
    assert_empty(second, (50, 70))
    # Pasting alone, nothing to paste.
    assert paste_masks(torch.zeros(0, 1, 28, 28), torch.zeros(0, 4), (50, 70), mode=paste_mode).shape == (0, 1, 50, 70)


@pytest.fixture(scope="module")
def mask_setup(shapes, tmp_path_factory):
    root = tmp_path_factory.mktemp("mrcnn")
    cfg = run_cfg(shapes, root / "out", name="mask_rcnn")
    torch.manual_seed(0)
    model = build_detector(cfg)
    weights = root / "w.pth"
    torch.save({"model": model.state_dict()}, weights)
    cfg_file = root / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.to_dict()))
    return root, cfg, model, weights, cfg_file


def test_infer_tool_writes_empty_results(mask_setup, shapes, tmp_path, capsys):
    root, _, _, weights, cfg_file = mask_setup
    out = tmp_path / "infer"
    result = run_tool(capsys, "infer.py", cfg_file, "--weights", weights, "--input", shapes / "val", "--output", out,
                      NO_DETECTIONS)
    assert result.returncode == 0, result.stderr
    assert "0 detections written to" in result.stdout
    assert json.loads((out / "results.json").read_text()) == []
    assert sorted(p.name for p in out.glob("*.png")) == sorted(p.name for p in (shapes / "val").glob("*.png"))


def test_evaluation_of_no_detections_is_zero_ap(mask_setup, tmp_path, caplog, monkeypatch):
    _, cfg, model, _, _ = mask_setup
    cfg = Config.from_dict(cfg.to_dict(), [f"output_dir={tmp_path}"])
    monkeypatch.setattr(model.roi_heads, "score_thresh", 1.0)  # test.score_thresh=1.0 on the built model
    with caplog.at_level(logging.WARNING):
        reports = evaluate_detector(cfg, model, torch.device("cpu"))
    assert set(reports) == {"bbox", "segm"}
    # COCO's AP of a size range without ground truth is undefined (NaN), not 0: 64 px images hold no large
    # object (area > 96^2).
    areas = [a["area"] for a in json.loads(open(cfg.data.val.ann_file).read())["annotations"]]
    medium = any(32 ** 2 < a <= 96 ** 2 for a in areas)
    for report in reports.values():
        m = report.metrics
        assert [m[k] for k in ("AP", "AP50", "AP75", "APs")] == [0.0] * 4 and math.isnan(m["APl"])
        assert m["APm"] == 0.0 if medium else math.isnan(m["APm"])
    assert json.loads((tmp_path / "eval" / "results.json").read_text()) == []
    assert "no detections" in caplog.text


# --- 4. a training image without any ground truth (data.filter_empty=false) ----------------------------


def test_image_without_annotations_trains_in_a_batch(shapes, tmp_path):
    data = json.loads((shapes / "annotations/instances_train.json").read_text())
    first = min(img["id"] for img in data["images"])
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] == first]
    ann = tmp_path / "instances_train.json"
    ann.write_text(json.dumps(data))
    cfg = run_cfg(shapes, tmp_path / "out", "data.filter_empty=false", "solver.ims_per_batch=2",
                  f"data.train.ann_file={ann}", name="mask_rcnn")
    images, targets = next(iter(build_detection_train_loader(cfg)))
    assert sorted(len(t["boxes"]) for t in targets)[0] == 0 and max(len(t["boxes"]) for t in targets) > 0
    empty = next(t for t in targets if len(t["boxes"]) == 0)
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape[0] == 0
    torch.manual_seed(0)
    model = build_detector(cfg).train()  # input.train_resize=loader, as train_detector: the loader has resized
    losses = detection_step(model, (images, targets))
    assert set(losses) == {*RPN_LOSSES, *ROI_LOSSES, "loss_mask"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.roi_heads.mask_head.predictor.weight.grad is not None
