"""Exactness proof: torchvision's Faster R-CNN weights, converted, give torchvision's detections through
our model and tools/infer.py (issue criterion: >= 98% of torchvision's detections matched by one of ours
with IoU > 0.99, the same category and a score within 1e-3)."""
import json

import pytest
import torch
import torchvision
from torchvision.ops import box_iou

from engine.data.decode import read_image
from tests.conftest import REPO, run_tool

CONFIG = REPO / "configs" / "torchvision" / "frcnn_r50_fpn.yaml"


def random_torchvision_frcnn(seed=0, score_scale=1.0, model_class=torchvision.models.detection.FasterRCNN):
    """fasterrcnn_resnet50_fpn (or, with `model_class` MaskRCNN, maskrcnn_resnet50_fpn) as torchvision
    builds it around pretrained weights (FrozenBatchNorm2d, res2 and the stem frozen), with random weights,
    non-trivial BN statistics, and the classifier scaled by `score_scale` so that the scores spread out
    instead of saturating at 1."""
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import FrozenBatchNorm2d

    torch.manual_seed(seed)
    body = torchvision.models.resnet50(norm_layer=FrozenBatchNorm2d)
    model = model_class(_resnet_fpn_extractor(body, 3), num_classes=91)
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            n = m.weight.numel()
            m.running_mean.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.5)
            m.bias.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight.mul_(score_scale)
    return model.eval()


def matches(theirs, ours):
    """(T, O) bool: torchvision's detection t and ours o agree (IoU > 0.99, same label, score within 1e-3)."""
    iou = box_iou(theirs["boxes"], ours["boxes"])
    same = theirs["labels"][:, None] == ours["labels"][None, :]
    close = (theirs["scores"][:, None] - ours["scores"][None, :]).abs() < 1e-3
    return (iou > 0.99) & same & close


def mask_ious(theirs, mine):
    """IoU of each matched pair's binary masks (torchvision's thresholded at 0.5, ours decoded from the
    RLE of our results entries, `mine["entries"]`)."""
    from pycocotools import mask as mask_utils

    their_masks = (theirs["masks"][:, 0] >= 0.5).numpy()
    ious = []
    for i, j in torch.nonzero(matches(theirs, mine)).tolist():
        a, b = their_masks[i], mask_utils.decode(mine["entries"][j]["segmentation"]).astype(bool)
        union = (a | b).sum()
        ious.append((a & b).sum() / union if union else 1.0)
    return ious


def match_fraction(theirs, ours):
    if len(theirs["boxes"]) == 0:
        return 1.0 if len(ours["boxes"]) == 0 else 0.0
    if len(ours["boxes"]) == 0:
        return 0.0
    return matches(theirs, ours).any(dim=1).float().mean().item()


def both_on(tv, results, path):
    """torchvision's output on the image at `path`, and our results.json entries for it as tensors (plus
    the entries themselves under "entries")."""
    with torch.no_grad():
        theirs = tv([torch.from_numpy(read_image(path)).permute(2, 0, 1).float() / 255])[0]
    mine = [r for r in results if r["file_name"] == path.name]
    boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in mine)]).reshape(-1, 4)
    return theirs, {"boxes": boxes, "scores": torch.tensor([r["score"] for r in mine]),
                    "labels": torch.tensor([r["category_id"] for r in mine], dtype=torch.long), "entries": mine}


def convert_and_infer(capsys, tv, config, images, tmp_path):
    """torchvision model -> state dict file -> tools/convert_weights.py -> tools/infer.py on `images`:
    the results.json entries, and the output folder."""
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    conv = run_tool(capsys, "convert_weights.py", "--from", "torchvision", tmp_path / "tv.pth", tmp_path / "ours.pth")
    assert conv.returncode == 0, conv.stderr
    out = tmp_path / "infer"
    result = run_tool(capsys, "infer.py", config, "--weights", tmp_path / "ours.pth", "--input", *images,
                      "--output", out, "device=cpu")
    assert result.returncode == 0, result.stderr
    return json.loads((out / "results.json").read_text()), out


@pytest.mark.slow
def test_infer_tool_reproduces_torchvision_detections(shared_data, tmp_path, capsys):
    tv = random_torchvision_frcnn(score_scale=30.0)
    images = sorted((shared_data / "tiny_coco" / "val2017").glob("*.jpg"))[:3]
    ours, out = convert_and_infer(capsys, tv, CONFIG, images, tmp_path)
    total = matched = 0
    spread = []
    for path in images:
        theirs, mine = both_on(tv, ours, path)
        assert len(theirs["boxes"]) > 0
        total += len(theirs["boxes"])
        matched += match_fraction(theirs, mine) * len(theirs["boxes"])
        spread += theirs["scores"].tolist()
        assert (out / f"{path.stem}.png").is_file()
    assert max(spread) - min(spread) > 0.1, "scores must spread out for the comparison to mean something"
    assert matched / total >= 0.98, f"{matched}/{total} torchvision detections matched"
