"""Exactness proof for export: our R50-FPN Faster R-CNN and Mask R-CNN checkpoints, converted with
`tools/convert_weights.py --to torchvision`, load into torchvision's models with strict=True and give our
detections there (the criterion of test_torchvision_frcnn: >= 98% matched with IoU > 0.99, the same label
and a score within 1e-3; masks as in test_torchvision_mrcnn), and convert back bit for bit."""
import json

import numpy as np
import pytest
import torch
import torchvision

from backbones.weights import read_weights, save_weights
from detection.build import build_detector
from detection.conversion import to_torchvision
from detection.conversion.check import check_torchvision_fit
from engine.errors import CheckpointError
from tests.conftest import REPO, randomize_norms, run_tool
from tests.parity.test_torchvision_frcnn import both_on, mask_ious, match_fraction, matches

# Both sides at 512 px (torchvision's min_size/max_size): half the time of 800 px, the same comparison.
MIN_SIZE, MAX_SIZE = 512, 853
SIZE = [f"input.min_size_test={MIN_SIZE}", f"input.max_size_test={MAX_SIZE}"]


def random_detector(name, path):
    """Ours from configs/torchvision/NAME_r50_fpn.yaml with random weights and FrozenBN statistics, saved at
    `path` as our checkpoint. Scores spread over about 0.6-0.8 with the classifier scaled by 1.5 (about
    0.35-0.45 unscaled); mask logits scaled by 100 stay away from the 0.5 threshold."""
    torch.manual_seed(0)
    model = randomize_norms(build_detector(REPO / "configs" / "torchvision" / f"{name}_r50_fpn.yaml", SIZE))
    with torch.no_grad():
        model.roi_heads.predictor.cls_score.weight.mul_(1.5)
        if name == "mrcnn":
            model.roi_heads.mask_head.predictor.weight.mul_(100.0)
    save_weights(path, model.state_dict())
    return model.state_dict()


@pytest.mark.slow
@pytest.mark.parametrize("name, builder", [("frcnn", "fasterrcnn_resnet50_fpn"), ("mrcnn", "maskrcnn_resnet50_fpn")])
def test_torchvision_gives_our_detections_and_converts_back(name, builder, shared_data, tmp_path, capsys):
    original = random_detector(name, tmp_path / "ours.pth")
    result = run_tool(capsys, "convert_weights.py", "--to", "torchvision", tmp_path / "ours.pth", tmp_path / "tv.pth")
    assert result.returncode == 0, result.stderr
    assert f"converted {len(original)} tensors (53 added, 0 skipped)" in result.stdout
    assert f"{builder}(weights=None, weights_backbone=None, num_classes=91)" in result.stdout

    tv = getattr(torchvision.models.detection, builder)(weights=None, weights_backbone=None, num_classes=91,
                                                        min_size=MIN_SIZE, max_size=MAX_SIZE)
    tv.load_state_dict(torch.load(tmp_path / "tv.pth", weights_only=True), strict=True)

    back = run_tool(capsys, "convert_weights.py", "--from", "torchvision", tmp_path / "tv.pth", tmp_path / "back.pth")
    assert back.returncode == 0, back.stderr
    assert "skipped 53: BatchNorm step counters" in back.stdout
    returned = read_weights(str(tmp_path / "back.pth"))
    assert sorted(returned) == sorted(original)
    changed = [k for k, v in original.items() if v.dtype != returned[k].dtype or not torch.equal(v, returned[k])]
    assert not changed, f"not bitwise equal after the round trip: {changed}"

    image = sorted((shared_data / "tiny_coco" / "val2017").glob("*.jpg"))[0]
    infer = run_tool(capsys, "infer.py", REPO / "configs" / "torchvision" / f"{name}_r50_fpn.yaml", *SIZE,
                     "--weights", tmp_path / "ours.pth", "--input", image, "--output", tmp_path / "infer",
                     "--no-vis", "device=cpu")
    assert infer.returncode == 0, infer.stderr
    theirs, mine = both_on(tv.eval(), json.loads((tmp_path / "infer" / "results.json").read_text()), image)
    assert len(theirs["boxes"]) > 0
    assert theirs["scores"].max() - theirs["scores"].min() > 0.1, "scores must spread for the test to mean something"
    assert match_fraction(theirs, mine) >= 0.98
    if name == "mrcnn":
        assert (theirs["masks"] >= 0.5).flatten(1).any(dim=1).float().mean() > 0.5, "most masks must be non-empty"
        assert np.mean(mask_ious(theirs, mine)) >= 0.98


def our_detector_state(name, overrides=()):
    """The state dict of ours from configs/torchvision/NAME_r50_fpn.yaml plus `overrides`, as meta tensors
    (shapes without data): the conversion renames and checks shapes, and needs no more."""
    with torch.device("meta"):
        return build_detector(REPO / "configs" / "torchvision" / f"{name}_r50_fpn.yaml", overrides).state_dict()


@pytest.mark.parametrize("name, builder, norm, counters_added", [
    ("frcnn", "fasterrcnn_resnet50_fpn", "BN", 11),  # BatchNorm has counters, but freeze_at: 2 freezes res2
    ("mrcnn", "maskrcnn_resnet50_fpn", "FrozenBN", 53),
])
def test_every_tensor_has_its_place_in_torchvision(name, builder, norm, counters_added):
    """What the slow test above shows with detections, without shared data: strict=True loading."""
    conversion = to_torchvision(our_detector_state(name, [f"model.backbone.norm={norm}"]))
    assert sum(map(len, conversion.added.values())) == counters_added and not conversion.skipped
    with torch.device("meta"):
        tv = getattr(torchvision.models.detection, builder)(weights=None, weights_backbone=None, num_classes=91)
    tv.load_state_dict(conversion.state_dict, strict=True, assign=True)


@pytest.mark.parametrize("override, message", [
    ("model.mask_head.norm=GN", r"have no place there: roi_heads\.mask_head\.norm1\.weight"),
    ("model.mask_head.class_agnostic=true",
     r"shape mismatches:\s+roi_heads\.mask_head\.predictor\.weight: file \(1, 256, 1, 1\) vs model \(91, "),
    ("model.backbone.depth=101", r"have no place there: backbone\.bottom_up\.res4\.6\."),
    ("model.backbone.norm=GN", r"of the model's are not in it: backbone\.bottom_up\.stem\.norm1\.running_mean"),
])
def test_detector_torchvision_cannot_hold_is_refused_by_name(override, message):
    with pytest.raises(CheckpointError, match=r"^our Mask R-CNN, converted for torchvision's maskrcnn_resnet50_fpn"
                                              r"\(weights=None, weights_backbone=None, num_classes=91\), does not "
                                              r"fit the model[,;] .*" + message):
        check_torchvision_fit(to_torchvision(our_detector_state("mrcnn", [override])))  # the converter, then the check


def test_file_neither_detector_nor_classifier_is_refused(tmp_path, capsys):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "tv.pth")
    result = run_tool(capsys, "convert_weights.py", "--to", "torchvision", tmp_path / "tv.pth", tmp_path / "o.pth")
    assert result.returncode == 2 and "tv.pth: neither our detector" in result.stderr
    assert "in torchvision's names already" in result.stderr
    with pytest.raises(CheckpointError, match=r"keys start with \['head.weight'\]"):
        to_torchvision({"head.weight": torch.zeros(1)})
