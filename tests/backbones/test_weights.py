import os
import pickle

import pytest
import torch
import torchvision

import backbones
from backbones.weights import (convert_file, from_torchvision_resnet, load_state_dict, read_weights,
                               save_weights, to_torchvision_resnet)
from engine.errors import CheckpointError
from tests.conftest import randomize_norms


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2"])
def test_torchvision_conversion_gives_same_logits(name):
    torch.manual_seed(0)
    tv = randomize_norms(getattr(torchvision.models, name)()).eval()
    ours = getattr(backbones, name)().eval()
    report = load_state_dict(ours, from_torchvision_resnet(tv.state_dict()))
    assert not report.missing and not report.unexpected
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        expected, got = tv(x), ours(x)
    # Our ResNet folds the norms into the convolutions and sums in its own order through up to 50 layers (sums
    # of up to 3 x 3 x 512 products): measured at most 9e-7 of the largest logit; 1e-5 of it is ten times that.
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    # And back: torchvision loads our state dict strictly and gives the same logits.
    back = getattr(torchvision.models, name)()
    back.load_state_dict(to_torchvision_resnet(ours.state_dict()), strict=True)
    with torch.no_grad():  # torchvision's own code on bit-identical weights and input: bitwise
        assert torch.equal(back.eval()(x), expected)


def test_convert_file_round_trip(tmp_path):
    tv = randomize_norms(torchvision.models.resnet18())
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    conversion = convert_file(str(tmp_path / "tv.pth"), str(tmp_path / "ours.pth"), from_torchvision_resnet, True)
    assert len(conversion.state_dict) == len(tv.state_dict())
    ours = backbones.resnet18()
    report = load_state_dict(ours, read_weights(str(tmp_path / "ours.pth")))
    assert not report.missing and not report.unexpected
    convert_file(str(tmp_path / "ours.pth"), str(tmp_path / "back.pth"), to_torchvision_resnet, False)
    torchvision.models.resnet18().load_state_dict(torch.load(tmp_path / "back.pth", weights_only=True))


def test_shape_mismatch_names_every_key():
    state = backbones.resnet18(num_classes=10).state_dict()
    with pytest.raises(CheckpointError, match=r"fc.weight: file \(10, 512\) vs model \(1000, 512\)"):
        load_state_dict(backbones.resnet18(), state)


def test_missing_and_unexpected_are_reported_by_name():
    state = backbones.resnet18().state_dict()
    state.pop("fc.bias")
    state["extra.weight"] = torch.zeros(1)
    report = load_state_dict(backbones.resnet18(), state)
    assert report.missing == ["fc.bias"] and report.unexpected == ["extra.weight"]
    assert "fc.bias" in report.summary() and "extra.weight" in report.summary()


def test_backbone_mode_reports_classifier_as_unexpected():
    report = load_state_dict(backbones.resnet18(None), backbones.resnet18().state_dict())
    assert report.unexpected == ["fc.weight", "fc.bias"] and not report.missing


def test_read_weights_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_weights(str(tmp_path / "nope.pth"))
    good = tmp_path / "good.pth"
    save_weights(str(good), backbones.resnet18().state_dict())
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot read weights file .*truncated.pth"):
        read_weights(str(truncated))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pth"):
        read_weights(str(garbage))


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/pwned_by_checkpoint",))


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": Exploit()}, path)
    if os.path.exists("/tmp/pwned_by_checkpoint"):
        os.remove("/tmp/pwned_by_checkpoint")
    with pytest.raises(CheckpointError, match="refusing to load"):
        read_weights(str(path))
    assert not os.path.exists("/tmp/pwned_by_checkpoint")


def test_non_tensor_payload_is_refused(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        read_weights(str(path))


def test_not_a_torchvision_state_dict():
    with pytest.raises(CheckpointError, match="not a torchvision ResNet"):
        from_torchvision_resnet(backbones.resnet18().state_dict())
