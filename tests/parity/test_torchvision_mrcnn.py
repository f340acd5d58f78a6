"""Exactness proof for masks: torchvision's Mask R-CNN weights, converted, give torchvision's detections
and masks through our model and tools/infer.py (issue criteria: >= 98% of torchvision's detections
matched as for Faster R-CNN, and the matched binary masks with mean IoU >= 0.98)."""
import numpy as np
import pytest
import torchvision

from tests.conftest import REPO
from tests.parity.test_torchvision_frcnn import (both_on, convert_and_infer, mask_ious, matches,
                                                 random_torchvision_frcnn)

CONFIG = REPO / "configs" / "torchvision" / "mrcnn_r50_fpn.yaml"


@pytest.mark.slow
def test_infer_tool_reproduces_torchvision_masks(shared_data, tmp_path, capsys):
    tv = random_torchvision_frcnn(score_scale=30.0, model_class=torchvision.models.detection.MaskRCNN)
    images = sorted((shared_data / "tiny_coco" / "val2017").glob("*.jpg"))[:2]
    ours, _ = convert_and_infer(capsys, tv, CONFIG, images, tmp_path)
    total = matched = 0
    ious = []
    for path in images:
        theirs, mine = both_on(tv, ours, path)
        assert len(theirs["boxes"]) > 0 and len(mine["boxes"]) > 0
        good = matches(theirs, mine)
        total += len(good)
        matched += int(good.any(dim=1).sum())
        ious += mask_ious(theirs, mine)
        their_masks = (theirs["masks"][:, 0] >= 0.5).numpy()
        nonempty = their_masks.reshape(len(their_masks), -1).any(axis=1).mean()
        assert nonempty > 0.5, "most masks must be non-empty for the comparison to mean something"
    assert matched / total >= 0.98, f"{matched}/{total} torchvision detections matched"
    assert np.mean(ious) >= 0.98, f"mean mask IoU {np.mean(ious):.4f} over {len(ious)} matched detections"
