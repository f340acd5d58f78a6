"""Classification training on the shared Trainer: every output, bitwise resume, worker-count independence,
EMA, label smoothing, the linear lr scaling rule, mixed precision, the NaN guard, bad data and settings,
and the ImageNet configs."""
import json
import logging
import shutil
from pathlib import Path

import albumentations as A
import pytest
import torch
import torch.nn.functional as F
import torchvision

from backbones.build import build_classifier, build_model
from detection.data.synthetic import make_crops
from backbones.classification import train as classification
from engine.checkpoint import LAST_CHECKPOINT, Checkpointer
from backbones.classification.train import (build_cls_datasets, build_cls_train_loader, classification_step, cls_transform,
                                   evaluate_only, train_classifier)
from engine.config import Config, load_config
from engine.ema import ModelEMA
from engine.errors import ConfigError, DatasetError, TrainingError
from engine.events import MetricsWriter
from engine.solver import lr_at
from engine.trainer import Trainer
from tests.conftest import REPO


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    make_crops(str(root), "train", 8, seed=0, crop_size=32)
    make_crops(str(root), "val", 4, seed=1, crop_size=32)
    return root / "crops"


def small_cfg(crops, out, **solver):
    """ResNet-18 on 32-px crops of 3 classes: 24 training images, 3 iterations of 8 per epoch, 2 epochs."""
    return Config.from_dict({
        "model": {"name": "classifier", "num_classes": 3, "backbone": {"depth": 18}},
        "input": {"size": 32},
        "data": {"num_workers": 0, "train": {"root": str(crops / "train")}, "val": {"root": str(crops / "val")}},
        "solver": {"ims_per_batch": 8, "epochs": 2, "base_lr": 0.01, "log_period": 2, "checkpoint_period": 4,
                   **solver},
        "device": "cpu", "output_dir": str(out)})


def records(out):
    return [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def checkpoint(path):
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def ema_run(crops, tmp_path_factory):
    """The reference run: 6 iterations with an EMA of the weights and a checkpoint at 4."""
    cfg = small_cfg(crops, tmp_path_factory.mktemp("ema_run"), ema=True, ema_decay=0.5)
    return cfg, train_classifier(cfg)


def test_training_writes_every_output(ema_run):
    cfg, metrics = ema_run
    out = Path(cfg.output_dir)
    assert set(metrics) == {"top1", "top5"} and 0 <= metrics["top1"] <= 100
    assert metrics["top5"] == 100.0  # 3 classes: top-5 is capped at 3, which always holds the label
    assert json.loads((out / "metrics.json").read_text()) == metrics
    for name in ("config.yaml", "log.txt", "metrics.jsonl", "model_0000004.pth", "model_final.pth",
                 "backbone.pth", "accuracy_curve.png"):
        assert (out / name).is_file(), name
    assert any((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / LAST_CHECKPOINT).read_text() == "model_final.pth"
    lines = records(out)
    assert [l["iter"] for l in lines if "loss" in l] == [0, 1, 3, 5]  # the first, then every log_period
    assert {"lr", "loss", "loss_cls", "data_time", "time"} <= set(lines[0])
    assert [l["iter"] for l in lines if "top1" in l] == [3, 6]  # the end of each epoch
    assert load_config(out / "config.yaml").model.num_classes == 3

    final = checkpoint(out / "model_final.pth")
    assert final["iteration"] == 6 and {"model", "optimizer", "ema", "rng"} <= set(final)
    backbone = checkpoint(out / "backbone.pth")
    meta = backbone["meta"]
    assert meta["kind"] == "backbone" and meta["depth"] == 18 and meta["ema"] is True
    assert meta["classes"] == sorted(p.name for p in Path(cfg.data.train.root).iterdir())
    # backbone.pth holds the EMA weights, classifier included, not the last raw weights.
    assert set(backbone["model"]) == set(final["model"]) and "fc.weight" in backbone["model"]
    assert all(torch.equal(backbone["model"][k], final["ema"][k]) for k in final["ema"])
    assert not torch.equal(final["ema"]["fc.weight"], final["model"]["fc.weight"])
    # backbone.pth is the hand-over to detection: it loads as model.backbone.weights.
    det_cfg = Config.from_dict({"model": {"name": "resnet_fpn", "backbone": {
        "depth": 18, "weights": str(out / "backbone.pth")}}})
    body = build_model(det_cfg).bottom_up
    assert torch.equal(body.res5[1].conv2.weight, backbone["model"]["res5.1.conv2.weight"])


def test_resume_ends_with_bitwise_the_uninterrupted_weights(ema_run, tmp_path):
    # The run dies after its checkpoint at iteration 4, in the middle of epoch 2; --resume must continue
    # with the batches (order and augmentation) the uninterrupted run saw, and with its EMA.
    cfg, metrics = ema_run
    src, out = Path(cfg.output_dir), tmp_path / "run"
    shutil.copytree(src, out)
    (out / LAST_CHECKPOINT).write_text("model_0000004.pth")
    (out / "model_final.pth").unlink()
    resumed = train_classifier(load_config(src / "config.yaml", [f"output_dir={out}"]), resume=True)
    expected, got = checkpoint(src / "model_final.pth"), checkpoint(out / "model_final.pth")
    for part in ("model", "ema"):
        for key in expected[part]:
            assert torch.equal(got[part][key], expected[part][key]), f"{part}: {key}"
    assert resumed == metrics
    assert "resumed from" in (out / "log.txt").read_text()
    lines = records(out)
    # Records from iteration 4 on were dropped and redone (the resumed run logs its first iteration).
    assert [l["iter"] for l in lines if "loss" in l] == [0, 1, 3, 4, 5]
    assert [l["iter"] for l in lines if "top1" in l] == [3, 6]


def test_training_stream_is_the_same_for_any_worker_count_and_after_resume(crops, tmp_path):
    # Every sample carries its own augmentation seed (engine/data/samplers.py): 0 and 2 workers load the
    # same batches bitwise, and a stream started at iteration k continues the full one exactly.
    cfg = small_cfg(crops, tmp_path)
    train_set, _ = build_cls_datasets(cfg)

    def batches(workers, start_iter=0, count=5):
        cfg.data.num_workers = workers
        stream = iter(build_cls_train_loader(cfg, train_set, start_iter))
        return [next(stream) for _ in range(count)]

    full = batches(2)  # 5 iterations: across the end of the first epoch (3 iterations)
    for (images, labels), (images0, labels0) in zip(full, batches(0)):
        assert torch.equal(images, images0) and torch.equal(labels, labels0)
    for (images, labels), (images4, labels4) in zip(full[4:], batches(0, start_iter=4, count=1)):
        assert torch.equal(images, images4) and torch.equal(labels, labels4)
    assert not torch.equal(full[0][0], full[3][0])  # epoch 2 is another order and other augmentations


def test_eval_only_reproduces_the_final_metrics(ema_run, tmp_path):
    cfg, metrics = ema_run
    out = Path(cfg.output_dir)
    # The run's model_final.pth (its EMA weights, as solver.ema is on), into a fresh output folder.
    # The backbone's initialisation file is not needed to evaluate a whole classifier.
    eval_cfg = load_config(out / "config.yaml", [f"output_dir={tmp_path}", f"model.weights={out / 'model_final.pth'}",
                                                 f"model.backbone.weights={tmp_path / 'absent.pth'}"])
    assert evaluate_only(eval_cfg) == metrics
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    # backbone.pth (a bare set of weights, already the EMA) evaluates the same.
    assert evaluate_only(eval_cfg, weights=str(out / "backbone.pth")) == metrics
    # Without data.train.root, the validation folders give the class order.
    eval_cfg.data.train.root = None
    assert evaluate_only(eval_cfg) == metrics


def test_non_finite_loss_stops_naming_iteration_and_loss(crops, tmp_path):
    with pytest.raises(TrainingError, match=r"iteration \d+: loss is not finite \(loss_cls=nan\)"):
        train_classifier(small_cfg(crops, tmp_path, base_lr=1e12, epochs=1))


def test_amp_reaches_the_classifier_step(crops, tmp_path, monkeypatch):
    class Seen(Exception):
        pass

    def spy(model, batch, **kwargs):  # the first step's autocast state, then stop (bfloat16 is slow on CPUs)
        raise Seen(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)

    monkeypatch.setattr(classification, "classification_step", spy)
    with pytest.raises(Seen) as info:
        train_classifier(small_cfg(crops, tmp_path, amp=True, amp_dtype="bfloat16"))
    assert info.value.args == (torch.bfloat16,)


def test_label_smoothing_reaches_the_loss():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    images, labels = torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 1])
    logits = model(images)
    smoothed = classification_step(model, (images, labels), label_smoothing=0.2)["loss_cls"]
    # The same linear layer and loss on the same inputs in one process: the same bits; the float32 default
    # (1.3e-6 relative) leaves room for rounding only.
    torch.testing.assert_close(smoothed, F.cross_entropy(logits, labels, label_smoothing=0.2))
    assert not torch.allclose(smoothed, classification_step(model, (images, labels))["loss_cls"])  # 5e-3 apart


def _toy_batches():
    g = torch.Generator().manual_seed(0)
    while True:
        yield torch.randn(8, 3, generator=g)


def _toy_step(model, x):
    return {"loss": model(x).pow(2).mean()}


def _toy_trainer(tmp_path, **solver):
    cfg = Config.from_dict({"solver": {"base_lr": 0.1, "log_period": 1, "checkpoint_period": 0, **solver}})
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return Trainer(cfg, model, optimizer, _toy_batches(), _toy_step, Checkpointer(str(tmp_path)),
                   MetricsWriter(str(tmp_path), tensorboard=False), torch.device("cpu"), 4,
                   ema=ModelEMA(model, 0.75))


def test_linear_lr_scaling_rule(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="engine"):
        trainer = _toy_trainer(tmp_path, ims_per_batch=64, reference_batch_size=256, steps=[2])
    assert "learning rate 0.025 = solver.base_lr 0.1 x ims_per_batch 64 / reference_batch_size 256" in caplog.text
    trainer.train()
    # float64 products (base_lr x scale x gamma) in another order than the literals: an ulp (1e-16) apart.
    assert [h["lr"] for h in trainer.writer.history] == pytest.approx([0.025, 0.025, 0.0025, 0.0025])
    assert _toy_trainer(tmp_path / "off", ims_per_batch=64).lr_scale == 1.0  # 0: base_lr as given
    with pytest.raises(ConfigError, match="'solver.reference_batch_size' must be at least 0, got -1"):
        _toy_trainer(tmp_path / "bad", reference_batch_size=-1)


def test_ema_averages_weights_copies_buffers_and_is_checkpointed(tmp_path):
    trainer = _toy_trainer(tmp_path)
    ema, model = trainer.ema, trainer.model
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    trainer.train()  # 4 steps
    avg = ema.module
    assert not avg.training and not any(p.requires_grad for p in avg.parameters())
    assert not torch.equal(avg[0].weight, model[0].weight)  # an average, not a copy
    assert torch.equal(avg[1].running_mean, model[1].running_mean)  # buffers are copied
    assert avg[1].num_batches_tracked.item() == 4
    # One more step by hand: ema = decay * ema + (1 - decay) * weights.
    old = avg[2].weight.clone()
    with torch.no_grad():
        model[2].weight.add_(1.0)
    ema.update(model)
    # lerp_ rounds in its own order: a few u of weights of size ~1, within the float32 default (1.3e-6 relative).
    torch.testing.assert_close(avg[2].weight, 0.75 * old + 0.25 * model[2].weight)
    # Saved with the checkpoint and restored by Trainer.restore.
    path = trainer.save("model_0000004.pth", 4)
    fresh = _toy_trainer(tmp_path / "fresh")
    fresh.restore(torch.load(path, weights_only=True))
    assert all(torch.equal(fresh.ema.module.state_dict()[k], v) for k, v in ema.module.state_dict().items())
    assert not torch.equal(before["0.weight"], avg[0].weight)
    with pytest.raises(ConfigError, match=r"solver.ema_decay must be in \[0, 1\)"):
        ModelEMA(model, 1.0)


def test_missing_or_wrong_data_root_names_the_setting(crops, tmp_path):
    cfg = small_cfg(crops, tmp_path / "out")
    cfg.data.train.root = None
    with pytest.raises(ConfigError, match="config key 'data.train.root' is not set"):
        train_classifier(cfg)
    cfg.data.train.root = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=r"nowhere \(set by data.train.root"):
        train_classifier(cfg)
    assert not (tmp_path / "out").exists()  # nothing was started


def test_val_classes_that_differ_from_train_name_the_folder(crops, tmp_path):
    val = tmp_path / "val"
    shutil.copytree(crops / "val", val)
    shutil.copytree(val / "circle", val / "hexagon")
    cfg = small_cfg(crops, tmp_path / "out")
    cfg.data.val.root = str(val)
    with pytest.raises(DatasetError, match=rf"{val}: class folders do not match .*extra: \['hexagon'\]"):
        train_classifier(cfg)


def test_unreadable_training_image_is_named_or_skipped(crops, tmp_path, caplog):
    train = tmp_path / "train"
    shutil.copytree(crops / "train", train)
    bad = sorted((train / "circle").iterdir())[0]
    bad.write_text("not an image")
    cfg = small_cfg(crops, tmp_path / "out")
    cfg.data.train.root = str(train)
    with pytest.raises(DatasetError, match=rf"{bad}: not a readable image"):
        train_classifier(cfg)
    # data.skip_bad_images: the next readable image instead, and the file named in the log.
    cfg.data.skip_bad_images = True
    train_set, _ = build_cls_datasets(cfg)
    stream = iter(build_cls_train_loader(cfg, train_set))
    with caplog.at_level(logging.WARNING):
        epoch = [next(stream) for _ in range(3)]  # every image once
    assert [images.shape for images, _ in epoch] == [(8, 3, 32, 32)] * 3 and train_set.num_skipped == 1
    assert f"skipping unreadable image: {bad}" in caplog.text


def test_num_classes_must_match_folders(crops, tmp_path):
    cfg = small_cfg(crops, tmp_path)
    cfg.model.num_classes = 5
    with pytest.raises(ConfigError, match="model.num_classes=5 .* 3 class folders"):
        train_classifier(cfg)


def test_lr_schedules():
    cfg = Config.from_dict({"solver": {"base_lr": 0.1, "steps": [10, 20], "warmup_iters": 5,
                                       "warmup_factor": 0.2}}).solver
    # Python floats: the schedule and the literals round differently by an ulp (1e-17 here); approx's
    # default (1e-6 relative, 1e-12 absolute for 0) only absorbs that.
    assert lr_at(cfg, 0, 30) == pytest.approx(0.1 * 0.2)
    assert lr_at(cfg, 4, 30) == pytest.approx(0.1 * (0.2 * 0.2 + 0.8))  # linear from 0.2 to 1 over 5 iterations
    assert lr_at(cfg, 9, 30) == pytest.approx(0.1)
    assert lr_at(cfg, 10, 30) == pytest.approx(0.01)
    assert lr_at(cfg, 25, 30) == pytest.approx(0.001)
    assert lr_at(cfg, 25, 30, steps=[26]) == pytest.approx(0.1)
    cfg.lr_scheduler = "cosine"
    assert lr_at(cfg, 15, 30) == pytest.approx(0.05)
    assert lr_at(cfg, 30, 30) == pytest.approx(0.0)


def test_steps_must_increase(crops, tmp_path):
    cfg = small_cfg(crops, tmp_path)
    cfg.solver.steps = [2, 1]
    with pytest.raises(ConfigError, match=r"solver.steps must be increasing positive epochs, got \[2, 1\]"):
        train_classifier(cfg)


@pytest.mark.parametrize("name, expected", [("SGD", torch.optim.SGD), ("AdamW", torch.optim.AdamW)])
def test_optimizer_choice(name, expected):
    from engine.solver import build_optimizer

    cfg = Config.from_dict({"solver": {"optimizer": name, "base_lr": 0.003, "weight_decay": 0.02}})
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    model[0].requires_grad_(False)
    opt = build_optimizer(cfg, model)
    assert type(opt) is expected
    assert opt.param_groups[0]["lr"] == 0.003 and opt.param_groups[0]["weight_decay"] == 0.02
    assert [id(p) for p in opt.param_groups[0]["params"]] == [id(p) for p in model[1].parameters()]
    with pytest.raises(ConfigError, match="solver.optimizer"):
        Config.from_dict({"solver": {"optimizer": "Adam"}})


@pytest.mark.parametrize("scale", [[0.5], [0.0, 1.0], [0.9, 0.5], [0.5, 1.5]])
def test_bad_crop_scale_is_a_config_error(crops, tmp_path, scale):
    cfg = small_cfg(crops, tmp_path)
    cfg.input.crop_scale = scale
    with pytest.raises(ConfigError, match=r"input.crop_scale must be \[low, high\]"):
        train_classifier(cfg)


def test_crop_scale_reaches_random_resized_crop():
    cfg = Config.from_dict({"input": {"size": 32, "crop_scale": [0.5, 0.75]}})
    crop = next(t for t in cls_transform(cfg, True) if isinstance(t, A.RandomResizedCrop))
    assert tuple(crop.scale) == (0.5, 0.75)


IMAGENET_CONFIGS = {"cls_r18.yaml": "resnet18", "cls_r34.yaml": "resnet34", "cls_r50.yaml": "resnet50",
                    "cls_r101.yaml": "resnet101", "cls_r152.yaml": "resnet152",
                    "cls_x101_32x8d.yaml": "resnext101_32x8d"}


@pytest.mark.parametrize("name", IMAGENET_CONFIGS)
def test_imagenet_configs(name, monkeypatch):
    monkeypatch.setenv("DATASETS", "/data")
    cfg = load_config(REPO / "configs" / name)
    # The model, on the meta device (no memory): torchvision's architecture, parameter for parameter.
    with torch.device("meta"):
        ours = build_classifier(cfg)
        reference = getattr(torchvision.models, IMAGENET_CONFIGS[name])()
    assert [(k, v.shape) for k, v in ours.state_dict().items() if k.startswith("fc.")] == [
        ("fc.weight", (1000, reference.fc.in_features)), ("fc.bias", (1000,))]
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.parameters())
    # The recipe: ImageNet folders, SGD 0.1 per 256 images, 90 epochs, lr / 10 at 30, 60, 80.
    assert (cfg.data.train.root, cfg.data.val.root) == ("/data/imagenet/train", "/data/imagenet/val")
    s = cfg.solver
    assert (s.optimizer, s.momentum, s.weight_decay, s.epochs, s.steps, s.gamma) == ("SGD", 0.9, 1e-4, 90,
                                                                                     [30, 60, 80], 0.1)
    assert s.base_lr * s.ims_per_batch / s.reference_batch_size == pytest.approx(0.1)  # float64: up to an ulp
    assert cfg.output_dir == f"output/{name[:-5]}"
    # RandomResizedCrop 224 (8-100% of the area) + flip; resize 256 + centre crop 224.
    train = cls_transform(cfg, True).transforms
    assert isinstance(train[0], A.RandomResizedCrop) and train[0].size == (224, 224)
    assert tuple(train[0].scale) == (0.08, 1.0)
    assert isinstance(train[1], A.HorizontalFlip) and train[1].p == 0.5
    test = cls_transform(cfg, False).transforms
    assert isinstance(test[0], A.SmallestMaxSize) and test[0].max_size == 256
    assert isinstance(test[1], A.CenterCrop) and (test[1].height, test[1].width) == (224, 224)
