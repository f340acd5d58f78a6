import logging
from pathlib import Path

import pytest
import torch
import torchvision

from backbones import FrozenBatchNorm2d
from backbones.build import build_model
from engine.config import Config, load_config
from engine.errors import CheckpointError, ConfigError
from tests.conftest import randomize_norms

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name,depth,groups", [("r50_fpn", 50, 1), ("r101_fpn", 101, 1),
                                               ("x101_32x8d_fpn", 101, 32), ("r50_fpn_gn", 50, 1)])
def test_backbone_configs_build(name, depth, groups):
    cfg = load_config(CONFIGS / "backbones" / f"{name}.yaml")
    assert cfg.model.backbone.depth == depth and cfg.model.backbone.groups == groups
    with torch.device("meta"):
        model = build_model(cfg)
    assert model.bottom_up.depth == depth
    assert model.bottom_up.res3[0].conv2.groups == groups
    assert [s.stride for s in model.output_shape().values()] == [4, 8, 16, 32, 64]


def test_config_keys_reach_constructor_arguments():
    cfg = load_config(CONFIGS / "backbones" / "r50_fpn.yaml",
                      ["model.backbone.depth=18", "model.backbone.stride_in_1x1=true",
                       "model.fpn.out_channels=64",
                       "model.fpn.top_block=none"])
    model = build_model(cfg)
    assert isinstance(model.bottom_up.stem.norm1, FrozenBatchNorm2d)  # norm: FrozenBN in the base
    assert not any(p.requires_grad for p in model.bottom_up.res2.parameters())  # freeze_at: 2
    assert all(p.requires_grad for p in model.bottom_up.res3.parameters())
    assert model.bottom_up.res3[0].conv1.stride == (2, 2)
    assert list(model.output_shape()) == ["0", "1", "2", "3"] and model.out_channels == 64


def test_backbone_weights_from_torchvision_file(tmp_path):
    tv = randomize_norms(torchvision.models.resnet18())
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    cfg = Config.from_dict({"model": {"name": "resnet_fpn",
                                      "backbone": {"depth": 18, "weights": str(tmp_path / "tv.pth")}}})
    model = build_model(cfg)
    assert torch.equal(model.bottom_up.res4[1].norm2.running_var, tv.layer3[1].bn2.running_var)
    assert torch.equal(model.bottom_up.stem.conv1.weight, tv.conv1.weight)


def test_classifier_weights_that_do_not_fit(tmp_path):
    torch.save(torchvision.models.resnet18(num_classes=7).state_dict(), tmp_path / "tv.pth")
    cfg = Config.from_dict({"model": {"name": "classifier", "num_classes": 5,
                                      "backbone": {"depth": 18, "weights": str(tmp_path / "tv.pth")}}})
    with pytest.raises(CheckpointError, match=r"fc.weight: file \(7, 512\) vs model \(5, 512\)"):
        build_model(cfg)


def test_missing_weights_file_is_named():
    cfg = Config.from_dict({"model": {"backbone": {"depth": 18, "weights": "/nonexistent/r18.pth"}}})
    with pytest.raises(CheckpointError, match="/nonexistent/r18.pth"):
        build_model(cfg)


def test_classifier_weights_make_the_backbone_file_unneeded(tmp_path):
    """model.weights is the whole classifier: model.backbone.weights is not opened, even where it is missing."""
    torch.save(torchvision.models.resnet18(num_classes=5).state_dict(), tmp_path / "tv.pth")
    model = {"name": "classifier", "num_classes": 5, "backbone": {"depth": 18, "weights": str(tmp_path / "gone.pth")}}
    with pytest.raises(CheckpointError, match="gone.pth not found"):
        build_model(Config.from_dict({"model": model}))
    classifier = build_model(Config.from_dict({"model": {**model, "weights": str(tmp_path / "tv.pth")}}))
    assert torch.equal(classifier.fc.weight, torch.load(tmp_path / "tv.pth", weights_only=True)["fc.weight"])


def test_unknown_option_value_from_config():
    with pytest.raises(ConfigError, match="model.backbone.depth"):
        load_config(CONFIGS / "backbones" / "r50_fpn.yaml", ["model.backbone.depth=42"])


def test_dilated_backbone_cannot_feed_fpn():
    cfg = load_config(CONFIGS / "backbones" / "r50_fpn.yaml", ["model.backbone.dilation=[false,false,true]"])
    with pytest.raises(ConfigError, match="strides double"):
        build_model(cfg)


def test_backbone_weights_report_what_was_not_loaded_and_refuse_a_detector(tmp_path, caplog):
    """The hand-over from classification: a classifier's weights (ours, with fc) load into the detection
    backbone; the log counts the tensors loaded and names the classifier's, which are not."""
    from backbones.weights import save_weights

    classifier = randomize_norms(build_model(Config.from_dict({"model": {"name": "classifier", "num_classes": 3,
                                                                           "backbone": {"depth": 18}}})))
    save_weights(str(tmp_path / "backbone.pth"), classifier.state_dict())
    cfg = Config.from_dict({"model": {"name": "resnet_fpn", "backbone": {
        "depth": 18, "norm": "BN", "freeze_at": 1, "weights": str(tmp_path / "backbone.pth")}}})
    with caplog.at_level(logging.INFO):
        model = build_model(cfg)
    assert torch.equal(model.bottom_up.res5[1].conv2.weight, classifier.res5[1].conv2.weight)
    assert torch.equal(model.bottom_up.stem.norm1.running_mean, classifier.stem.norm1.running_mean)
    assert "loaded 119 tensors" in caplog.text  # 20 convs, 20 norms x 4, 19 BN step counters (the stem is frozen) and "2 unexpected (ignored): fc.weight, fc.bias" in caplog.text
    assert not any(p.requires_grad for p in model.bottom_up.stem.parameters())  # freeze_at still applies
    detector = {"backbone.bottom_up." + k: v for k, v in classifier.state_dict().items()}
    save_weights(str(tmp_path / "det.pth"), detector)
    cfg = Config.from_dict({"model": {"name": "resnet_fpn", "backbone": {"depth": 18,
                                                                          "weights": str(tmp_path / "det.pth")}}})
    with pytest.raises(CheckpointError, match=r"ResNet-FPN backbone checkpoint, not a ResNet .*goes in model.weights"):
        build_model(cfg)
