import json

import pytest
import torch

from backbones.build import build_model
from detection.data.synthetic import make_crops
from engine.classification import train_classifier
from engine.solver import lr_at
from engine.config import Config, load_config
from engine.errors import ConfigError


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    make_crops(str(root), "train", 8, seed=0, crop_size=32)
    make_crops(str(root), "val", 4, seed=1, crop_size=32)
    return root / "crops"


def small_cfg(crops, out, **extra):
    return Config.from_dict({
        "model": {"name": "classifier", "num_classes": 3, "backbone": {"depth": 18}},
        "input": {"size": 32},
        "data": {"num_workers": 0, "train": {"root": str(crops / "train")}, "val": {"root": str(crops / "val")}},
        "solver": {"ims_per_batch": 8, "epochs": 2, "base_lr": 0.01},
        "output_dir": str(out), **extra})


def test_training_writes_every_output(crops, tmp_path):
    metrics = train_classifier(small_cfg(crops, tmp_path))
    assert set(metrics) == {"top1", "top5"} and 0 <= metrics["top1"] <= 100
    assert metrics["top5"] == 100.0  # 3 classes: the top-5 always holds the label
    for name in ("config.yaml", "log.txt", "metrics.jsonl", "metrics.json", "model_final.pth",
                 "backbone.pth", "accuracy_curve.png"):
        assert (tmp_path / name).is_file(), name
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum("loss" in l for l in lines) == 2 * 3  # 24 crops / batch 8 = 3 iterations per epoch
    assert sum("top1" in l for l in lines) == 2
    assert load_config(tmp_path / "config.yaml").model.num_classes == 3
    # backbone.pth is the hand-over to detection: it loads as model.backbone.weights.
    det_cfg = Config.from_dict({"model": {"name": "resnet_fpn", "backbone": {
        "depth": 18, "weights": str(tmp_path / "backbone.pth")}}})
    body = build_model(det_cfg).bottom_up
    final = torch.load(tmp_path / "model_final.pth", weights_only=True)["model"]
    assert torch.equal(body.res5[1].conv2.weight, final["res5.1.conv2.weight"])


@pytest.mark.parametrize("workers", [0, 2])
def test_same_seed_same_weights(crops, tmp_path, workers):
    for run in ("a", "b"):
        cfg = small_cfg(crops, tmp_path / run)
        cfg.data.num_workers = workers
        train_classifier(cfg)
    a = torch.load(tmp_path / "a" / "model_final.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "model_final.pth", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_num_classes_must_match_folders(crops, tmp_path):
    cfg = small_cfg(crops, tmp_path)
    cfg.model.num_classes = 5
    with pytest.raises(ConfigError, match="model.num_classes=5 .* 3 class folders"):
        train_classifier(cfg)


def test_lr_schedules():
    cfg = Config.from_dict({"solver": {"base_lr": 0.1, "steps": [10, 20], "warmup_iters": 5,
                                       "warmup_factor": 0.2}}).solver
    assert lr_at(cfg, 0, 30) == pytest.approx(0.1 * 0.2)
    assert lr_at(cfg, 4, 30) == pytest.approx(0.1 * (0.2 * 0.2 + 0.8))  # linear from 0.2 to 1 over 5 iterations
    assert lr_at(cfg, 9, 30) == pytest.approx(0.1)
    assert lr_at(cfg, 10, 30) == pytest.approx(0.01)
    assert lr_at(cfg, 25, 30) == pytest.approx(0.001)
    assert lr_at(cfg, 25, 30, steps=[26]) == pytest.approx(0.1)
    cfg.lr_scheduler = "cosine"
    assert lr_at(cfg, 15, 30) == pytest.approx(0.05)
    assert lr_at(cfg, 30, 30) == pytest.approx(0.0)


def test_steps_must_lie_inside_the_run(crops, tmp_path):
    cfg = small_cfg(crops, tmp_path)
    cfg.solver.steps = [3]
    with pytest.raises(ConfigError, match=r"solver.steps must be increasing epochs within \(0, 2\]"):
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
    import albumentations as A

    from engine.data.imagefolder import build_cls_transform

    crop = next(t for t in build_cls_transform(True, 32, scale=(0.5, 0.75)) if isinstance(t, A.RandomResizedCrop))
    assert tuple(crop.scale) == (0.5, 0.75)
