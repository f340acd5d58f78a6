"""tools/convert_weights.py --check: the other framework's model against ours on a random input."""
import functools

import pytest
import torch
import torchvision

from detection import conversion as detection_weights
from detection.conversion.check import RTOL, check_conversion, compare_detections, verify_conversion
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


def test_check_without_the_framework_fails_and_says_why(tmp_path, capsys, monkeypatch):
    """A check that cannot run is not a check that passed: the tool exits non-zero, naming the framework."""
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchvision" else real(name, *a))
    result = check_conversion("from", "torchvision", {}, {})
    assert not result.ok and "torchvision is not importable here" in result.reason
    torch.save(torchvision_resnet18().state_dict(), tmp_path / "tv.pth")
    result = run_tool(capsys, "convert_weights.py", "--from", "torchvision", tmp_path / "tv.pth",
                      tmp_path / "ours.pth", "--check")
    assert result.returncode == 2
    assert "error: --check: torchvision is not importable here, so the conversion cannot be run against " \
           "torchvision's own model" in result.stderr


def _detections(n=6, seed=0, size=200):
    """`n` detections with boxes, descending scores from 0.9 to 0.06, labels 1..n and box-filling masks."""
    g = torch.Generator().manual_seed(seed)
    corner = torch.rand(n, 2, generator=g) * size / 2
    boxes = torch.cat([corner, corner + torch.rand(n, 2, generator=g) * size / 2 + 10], 1)
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    for mask, (x1, y1, x2, y2) in zip(masks, boxes.int().tolist()):
        mask[y1:y2, x1:x2] = True
    return {"boxes": boxes, "scores": torch.linspace(0.9, 0.06, n), "labels": torch.arange(1, n + 1), "masks": masks}


def _pick(det, rows):
    return {k: v[rows] for k, v in det.items()}


def test_compare_detections_boundaries_on_principle():
    """Same detections in another order and off by rounding match; a detection on one side only is excused only
    within the score tolerance of the threshold or of the lowest score kept at the cap."""
    ours, compare = _detections(), functools.partial(compare_detections, image_size=(200, 200), score_thresh=0.05)
    theirs = _pick(ours, torch.arange(5, -1, -1))  # reversed
    theirs = dict(theirs, boxes=theirs["boxes"] + 1e-3, scores=theirs["scores"] - 1e-6)
    lines, ok = compare(ours, theirs, max_detections=100)
    assert ok and "6 detections of ours, 6 of theirs: 6 the same" in lines[0]

    extra = {k: torch.cat([v, _detections(1, seed=1)[k]]) for k, v in theirs.items()}
    for score, excused in ((0.05 + 0.5 * RTOL, True), (0.05 + 2 * RTOL, False)):
        extra["scores"][-1] = score
        lines, ok = compare(ours, extra, max_detections=100)
        assert ok is excused and ("1 on one side only" in lines[0]) is excused, lines
    # At the cap (6): theirs kept another detection in place of our lowest, with a score within rounding of it.
    capped = _pick(extra, torch.arange(1, 7))
    capped["scores"][-1] = ours["scores"].min() + 0.5 * RTOL
    assert compare(ours, capped, max_detections=6)[1]
    assert not compare(ours, capped, max_detections=100)[1]


def test_compare_detections_catches_labels_boxes_and_masks():
    ours = _detections()
    for field, wrong in (("labels", lambda v: v.roll(1)), ("boxes", lambda v: v + 200 * 2 * RTOL),
                         ("masks", lambda v: v.roll(3, dims=2))):
        theirs = dict(ours, **{field: wrong(ours[field])})
        lines, ok = compare_detections(ours, theirs, image_size=(200, 200), score_thresh=0.05, max_detections=100)
        assert not ok, field
        assert field != "masks" or "masks:" in lines[-1]
        assert field == "masks" or ("only ours: label" in lines[1] and any("only theirs" in l for l in lines))


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
