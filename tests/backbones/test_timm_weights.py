"""timm's ResNets in our names (`tools/convert_weights.py --from timm`): the same logits as timm's model, and
what this backbone cannot compute refused by name. timm is a test dependency only; no weights are downloaded
(every model is built with pretrained=False, and any network access fails the test)."""
import socket

import pytest
import timm
import torch

import backbones
from backbones.build import build_classifier
from backbones.weights import check_timm_resnet_fit, from_timm_resnet, load_state_dict
from detection.conversion import CONVERTERS_IN
from engine.config import Config
from engine.errors import CheckpointError, ConfigError
from tests.conftest import randomize_norms, run_tool


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:2]}")

    for name in ("create_connection", "getaddrinfo"):
        monkeypatch.setattr(socket, name, refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_the_network_guard_catches_a_download(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # nothing cached
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(Exception, match="network access attempted"):
        timm.create_model("resnet18", pretrained=True)


def timm_model(name, **kwargs):
    torch.manual_seed(0)
    return randomize_norms(timm.create_model(name, pretrained=False, **kwargs)).eval()


def overrides(conversion):
    """The config overrides the conversion prints for the ResNet that loads it."""
    return conversion.what.split(", for ", 1)[1].split()


def assert_same_logits(ours, theirs, x):
    """Our ResNet folds the norms into its convolutions, and timm's layers (ResNeXt's grouped convs, ResNet-D's
    average-pooled shortcut) sum in their own orders: float32 rounding through ~50 layers, measured at most
    1e-6 of the largest logit. 1e-4 of it is far from that and far from a wrong mapping (> 1e-2)."""
    with torch.no_grad():
        expected, got = theirs(x), ours.eval()(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


# 72 x 72: res4 and res5 see odd sizes (9 -> 5 -> 3), where ResNet-D's ceil-mode average pool matters.
@pytest.mark.parametrize("name,settings", [
    ("resnet50", []),
    ("resnext50_32x4d", ["model.backbone.groups=32", "model.backbone.width_per_group=4"]),
    ("resnet50d", ["model.backbone.stem_type=deep", "model.backbone.avg_down=true"]),
])
def test_timm_conversion_gives_same_logits(name, settings):
    theirs = timm_model(name)
    conversion = CONVERTERS_IN["timm"](theirs.state_dict())
    assert len(conversion.state_dict) == len(theirs.state_dict()) and not conversion.skipped
    assert overrides(conversion) == ["model.backbone.depth=50", *settings, "model.num_classes=1000"]
    ours = build_classifier(Config.from_dict({"model": {"name": "classifier"}}, overrides(conversion)))
    report = load_state_dict(ours, conversion.state_dict)
    assert not report.missing and not report.unexpected
    assert_same_logits(ours, theirs, torch.randn(1, 3, 72, 72))


def test_resnet_d_needs_both_options():
    """Without avg_down (or the deep stem) the converted ResNet-D computes something else: the option is
    what makes the comparison above pass, not the key names alone."""
    theirs = timm_model("resnet18d")
    converted = from_timm_resnet(theirs.state_dict()).state_dict
    ours = backbones.resnet18(stem_type="deep")  # timm's resnet18c: the same tensors
    report = load_state_dict(ours, converted)
    assert not report.missing and not report.unexpected
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = theirs(x)
        assert (ours.eval()(x) - expected).abs().max() > 1e-2 * expected.abs().max()
    with pytest.raises(CheckpointError, match=r"stem.conv1.weight: file \(32, 3, 3, 3\) vs model \(64, 3, 7, 7\)"):
        load_state_dict(backbones.resnet18(), converted)


def test_convert_weights_cli_from_timm(tmp_path, capsys):
    theirs = timm_model("resnet18d")
    torch.save(theirs.state_dict(), tmp_path / "timm.pth")
    result = run_tool(capsys, "convert_weights.py", "--from", "timm", tmp_path / "timm.pth", tmp_path / "ours.pth")
    assert result.returncode == 0, result.stderr
    settings = ("model.backbone.depth=18 model.backbone.stem_type=deep model.backbone.avg_down=true "
                "model.num_classes=1000")
    assert f"converted {len(theirs.state_dict())} tensors of timm's ResNet, for {settings}:" in result.stdout
    cfg = Config.from_dict({"model": {"name": "classifier", "weights": str(tmp_path / "ours.pth")}},
                           settings.split())
    assert_same_logits(build_classifier(cfg), theirs, torch.randn(1, 3, 72, 72))


def test_timm_backbone_without_classifier():
    theirs = timm_model("resnet18", num_classes=0)
    conversion = from_timm_resnet(theirs.state_dict())
    assert conversion.what.endswith("model.backbone.depth=18 (no classifier: a backbone)")
    report = load_state_dict(backbones.resnet18(None), conversion.state_dict)
    assert not report.missing and not report.unexpected


def meta_state(name, **kwargs):
    with torch.device("meta"):  # shapes are all a refusal looks at
        return timm.create_model(name, pretrained=False, **kwargs).state_dict()


@pytest.mark.parametrize("name,kwargs,match", [
    ("seresnet50", {}, r"64 tensors this backbone has no module for \(squeeze-and-excitation or ECA attention "
                       r".*\): layer1.0.se.fc1.weight, layer1.0.se.fc1.bias, .*refused"),
    ("ecaresnet50d", {}, r"16 tensors .*ECA attention.*: layer1.0.se.conv.weight"),
    ("resnetrs50", {}, r"a convolution in place of the stem's max pool .*: maxpool.0.weight"),
    ("resnet26t", {}, r"timm deep stem of \[24, 32, 64\] channels \(conv1.0, conv1.3, conv1.6\) is not supported "
                      r".*tiered stem"),
    ("resnet50s", {}, r"timm deep stem of \[64, 64, 128\] channels"),
    ("resnet26d", {}, r"Bottleneck blocks \(2, 2, 2, 2\) in res2..res5: no depth of this ResNet has them "
                      r"\(50: \(3, 4, 6, 3\)"),
    ("resnet18", {"global_pool": "catavgmax"}, r"fc.weight: file \(1000, 1024\) vs model \(1000, 512\)"),
])
def test_what_this_backbone_cannot_compute_is_refused_by_name(name, kwargs, match):
    with pytest.raises(CheckpointError, match=match):
        check_timm_resnet_fit(from_timm_resnet(meta_state(name, **kwargs)))  # the converter, then the fit check


def test_missing_tensors_are_named_as_the_file_would_name_them():
    state = meta_state("resnet18d")
    del state["conv1.4.weight"], state["layer1.0.bn1.running_var"]
    with pytest.raises(CheckpointError, match=r"avg_down=true model.num_classes=1000\); "
                                              r"2 missing: conv1.4.weight, layer1.0.bn1.running_var$"):
        check_timm_resnet_fit(from_timm_resnet(state))


def test_refusal_through_the_cli(tmp_path, capsys):
    torch.save(timm.create_model("seresnet18", pretrained=False).state_dict(), tmp_path / "se.pth")
    result = run_tool(capsys, "convert_weights.py", "--from", "timm", tmp_path / "se.pth", tmp_path / "o.pth")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "se.pth: timm ResNet with" in result.stderr and "layer1.0.se.fc1.weight" in result.stderr
    assert not (tmp_path / "o.pth").exists()


def test_not_a_timm_resnet():
    with pytest.raises(CheckpointError, match="not a timm ResNet state dict .*keys start with"):
        from_timm_resnet(backbones.resnet18().state_dict())


def test_resnet_d_options():
    with torch.device("meta"):
        ours, theirs = backbones.resnet50(stem_type="deep", avg_down=True), timm.create_model("resnet50d")
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    assert [type(m).__name__ for m in ours.stem] == ["Conv2d", "BatchNorm2d", "ReLU"] * 3 + ["MaxPool2d"]
    assert ours.res2[0].shortcut.pool is None and ours.res3[0].shortcut.conv.stride == (1, 1)
    assert ours.res3[0].shortcut.pool.stride == 2
    assert backbones.resnet18(None, stem_type="deep").output_shape() == backbones.resnet18(None).output_shape()
    with pytest.raises(ConfigError, match="unknown stem_type 'tiered'; valid values: basic, deep"):
        backbones.resnet18(stem_type="tiered")
    with pytest.raises(ConfigError, match="avg_down pools in projection shortcuts.*shortcut A has none"):
        backbones.resnet18(shortcut="A", avg_down=True)
