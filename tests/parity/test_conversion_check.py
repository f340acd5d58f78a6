"""tools/convert_weights.py --check: the other framework's model against ours on a random input."""
import pytest
import torch
import torchvision

from detection import conversion as detection_weights
from detection.conversion.check import check_conversion, verify_conversion
from tests.conftest import randomize_norms, run_tool


def torchvision_resnet18():
    torch.manual_seed(0)
    return randomize_norms(torchvision.models.resnet18(num_classes=10)).eval()


def test_check_passes_for_a_right_conversion_both_ways(tmp_path, capsys):
    torch.save(torchvision_resnet18().state_dict(), tmp_path / "tv.pth")
    result = run_tool(capsys, "convert_weights.py", "--from", "torchvision", tmp_path / "tv.pth",
                      tmp_path / "ours.pth", "--check")
    assert result.returncode == 0, result.stderr
    assert "--check against torchvision's model:\n  logits on random 2x3x160x160 input: max |ours - theirs| = " \
           in result.stdout
    result = run_tool(capsys, "convert_weights.py", "--to", "torchvision", tmp_path / "ours.pth",
                      tmp_path / "back.pth", "--check")
    assert result.returncode == 0, result.stderr
    assert "--check against torchvision's model:" in result.stdout


def test_check_catches_a_wrong_conversion(tmp_path, capsys, monkeypatch):
    """A converter that swaps two same-shaped tensors writes a file that loads, and --check fails it."""
    right = detection_weights.CONVERTERS_IN["torchvision"]

    def swapping(state):
        conversion = right(state)
        sd = conversion.state_dict
        sd["res2.0.conv1.weight"], sd["res2.1.conv1.weight"] = sd["res2.1.conv1.weight"], sd["res2.0.conv1.weight"]
        return conversion

    monkeypatch.setitem(detection_weights.CONVERTERS_IN, "torchvision", swapping)
    torch.save(torchvision_resnet18().state_dict(), tmp_path / "tv.pth")
    result = run_tool(capsys, "convert_weights.py", "--from", "torchvision", tmp_path / "tv.pth",
                      tmp_path / "ours.pth", "--check")
    assert result.returncode != 0
    assert "--check: the converted model's outputs differ from torchvision's" in result.stderr


def test_check_timm_resnet_d():
    timm = pytest.importorskip("timm")
    from backbones.weights import from_timm_resnet

    torch.manual_seed(0)
    theirs = randomize_norms(timm.create_model("resnet18d", pretrained=False, num_classes=0)).state_dict()
    result = check_conversion("from", "timm", theirs, from_timm_resnet(theirs).state_dict)
    assert result.ok, str(result)
    assert "res5 features" in str(result)  # no classifier: the last stage is compared


def test_check_without_the_framework_says_so(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "timm" else real(name, *a))
    result = check_conversion("from", "timm", {}, {})
    assert result.ok and "timm is not importable here" in str(result)


def test_converters_build_no_model(monkeypatch):
    """The converters are key tables and tensor edits: what builds a model to see that the tensors fit is the
    verify step (verify_conversion, which tools/convert_weights.py runs before writing)."""
    timm = pytest.importorskip("timm")
    from backbones.weights import from_timm_resnet
    from detection.conversion import from_detectron2, from_torchvision
    from detection.conversion.torchvision import to_torchvision_detector
    from tests.parity.test_detectron2_weights import detectron2_r50_fpn
    from tests.parity.test_torchvision_export import our_detector_state

    with torch.device("meta"):
        timm_state = timm.create_model("resnet18d", pretrained=False).state_dict()
        tv_state = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).state_dict()
    inputs = [(from_timm_resnet, timm_state), (to_torchvision_detector, our_detector_state("mrcnn")),
              (from_detectron2, {k: torch.from_numpy(v) for k, v in detectron2_r50_fpn(mask=True).items()}),
              (from_torchvision, tv_state)]
    built, init = [], torch.nn.Module.__init__

    def counting_init(self, *args, **kwargs):
        built.append(type(self).__name__)
        init(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "__init__", counting_init)
    conversions = [converter(state) for converter, state in inputs]
    monkeypatch.undo()
    assert built == []
    # What each names for the verify step to build: a Conversion.target or a config (from_torchvision: neither).
    assert [(c.target[:1], c.config[:1]) for c in conversions] == [
        (("timm_resnet",), ()), (("torchvision",), ()), ((), ("configs/detectron2/mrcnn_r50_fpn.yaml",)), ((), ())]
    for conversion in conversions:
        verify_conversion(conversion)  # each fits the model it names
