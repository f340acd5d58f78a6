"""The model options that reproduce Detectron2's inference (configs/detectron2/), against hand-computed facts."""
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from detection.anchors import cell_anchors
from detection.poolers import assign_levels
from detection.preprocess import Preprocessor
from detection.rcnn import drop_empty_boxes
from detection.resize import detectron2_resized_size
from segmentation.paste import paste_masks


def test_unrounded_anchors():
    exact = cell_anchors([32], [0.5, 1.0, 2.0], round=False)
    # ratio 0.5 = h / w at area 32^2: w = 32 sqrt(2) = 45.2548, h = 22.6274. The literals carry 8 digits,
    # within an ulp of float32 at 22 (1.9e-6); the float32 default (1.3e-6 relative) holds a few ulps.
    torch.testing.assert_close(exact[0], torch.tensor([-22.627417, -11.313708, 22.627417, 11.313708]))
    torch.testing.assert_close(exact[1], torch.tensor([-16.0, -16.0, 16.0, 16.0]))
    assert cell_anchors([32], [0.5])[0].tolist() == [-23.0, -11.0, 23.0, 11.0]  # the default rounds


def test_detectron2_resize_size():
    assert detectron2_resized_size(480, 640, 800, 1333) == (800, 1067)  # 853.33... -> 1066.67 -> 1067
    assert detectron2_resized_size(640, 427, 800, 1333) == (1199, 800)  # 640 * 800 / 427 = 1199.06
    assert detectron2_resized_size(200, 1000, 800, 1333) == (267, 1333)  # capped: 800 * 1333 / 4000 = 266.6


def test_pil_resize_mode_is_pil_bilinear_then_normalisation():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (3, 37, 50), dtype=np.uint8)
    pre = Preprocessor([103.53, 116.28, 123.675], [1.0, 1.0, 1.0], "BGR", 255.0, min_size_test=20,
                       max_size_test=1333, resize_mode="pil").eval()
    batch, _, _ = pre([torch.from_numpy(image)])
    size = detectron2_resized_size(37, 50, 20, 1333)
    assert batch.image_sizes == [size]
    # Bitwise: the same PIL resize of the same uint8 pixels, then the same float32 subtraction.
    pil = np.asarray(Image.fromarray(image.transpose(1, 2, 0)).resize(size[::-1], Image.BILINEAR))
    expected = torch.from_numpy(pil[:, :, ::-1].astype(np.float32).copy()).permute(2, 0, 1) - \
        torch.tensor([103.53, 116.28, 123.675]).view(3, 1, 1)
    assert torch.equal(batch.tensor[0, :, :size[0], :size[1]], expected)


def test_level_formula():
    boxes = torch.tensor([[0.0, 0.0, 224.0, 224.0], [0.0, 0.0, 112.0, 112.0], [0.0, 0.0, 224.0, 223.9999]])
    assert assign_levels(boxes, 2, 5).tolist() == [2, 1, 2]  # indices from level 2: k = 4, 3, 4
    # Detectron2's epsilon (2.2e-16) is lost in float32: a box a hair under 224 goes down a level.
    assert assign_levels(boxes, 2, 5, formula="detectron2").tolist() == [2, 1, 1]


def test_drop_empty_boxes_after_rescaling():
    det = {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 5.0, 9.0], [-3.0, 0.0, 0.0, 5.0]]),
           "scores": torch.tensor([0.9, 0.8, 0.7]), "labels": torch.tensor([1, 2, 3])}
    out = drop_empty_boxes(det, (8, 8))
    assert out["boxes"].tolist() == [[0.0, 0.0, 8.0, 8.0]] and out["labels"].tolist() == [1]


def test_detectron2_paste_is_grid_sample_over_the_box():
    ones = paste_masks(torch.ones(1, 1, 28, 28), torch.tensor([[10.0, 10.0, 20.0, 20.0]]), (32, 32), mode="detectron2")
    expected = torch.zeros(32, 32)
    expected[10:20, 10:20] = 1  # pixel centres 10.5..19.5 fall inside the mask's outer cell centres
    torch.testing.assert_close(ones[0, 0], expected)  # (1 - w) + w rounds to 1 within an ulp
    # Any mask, fractional boxes: grid_sample (align_corners=False, zero padding) at pixel centres mapped to
    # [-1, 1] over the box.
    masks = torch.rand(3, 1, 28, 28)
    boxes = torch.tensor([[3.3, 4.7, 25.1, 19.9], [-5.0, 10.2, 12.6, 40.0], [30.5, 1.0, 31.5, 2.0]])
    out = paste_masks(masks, boxes, (36, 33), mode="detectron2")
    xs, ys = torch.arange(33) + 0.5, torch.arange(36) + 0.5
    gx = (xs[None] - boxes[:, :1]) / (boxes[:, 2:3] - boxes[:, :1]) * 2 - 1
    gy = (ys[None] - boxes[:, 1:2]) / (boxes[:, 3:4] - boxes[:, 1:2]) * 2 - 1
    grid = torch.stack([gx[:, None, :].expand(-1, 36, -1), gy[:, :, None].expand(-1, -1, 33)], dim=3)
    # Our separable interpolation matrices and grid_sample compute the sample positions (0..28 cells) and
    # bilinear weights in other float32 orders: a few ulps of 28 (2**-19 = 1.9e-6) times the neighbouring
    # cells' difference (< 1). Measured 8e-7; 1e-5 is five such ulps.
    torch.testing.assert_close(out, F.grid_sample(masks, grid, align_corners=False), atol=1e-5, rtol=0)
