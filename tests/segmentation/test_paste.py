"""Mask pasting: torchvision's MaskRCNN geometry (padded mask, grown integer box, bilinear resize) on
random masks and boxes, including boxes that leave the image; chunking never changes a pixel."""
import pytest
import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image

from segmentation.paste import paste_masks


def _random(n, height, width, seed=0, mask_size=28):
    g = torch.Generator().manual_seed(seed)
    # Boxes that overlap the image, some reaching past its edges (torchvision's paste fails on others).
    corner = torch.rand(n, 2, generator=g) * torch.tensor([width + 20.0, height + 20.0]) - 20
    size = torch.rand(n, 2, generator=g) * torch.tensor([width / 2, height / 2]) + 21
    return torch.rand(n, 1, mask_size, mask_size, generator=g), torch.cat([corner, corner + size], 1)


@pytest.mark.parametrize("n,height,width,mask_size", [(60, 120, 170, 28), (25, 301, 97, 14), (3, 8, 9, 28)])
def test_equals_torchvision_paste(n, height, width, mask_size):
    masks, boxes = _random(n, height, width, mask_size=mask_size)
    theirs = paste_masks_in_image(masks, boxes, (height, width))
    ours = paste_masks(masks, boxes, (height, width))
    assert ours.shape == theirs.shape == (n, 1, height, width)
    # Our interpolation matrices and torchvision's F.interpolate compute each pixel's source position (0 to
    # M + 2 = 30 cells) in other float32 orders: a few ulps of 30 (2**-19 = 1.9e-6), which move a bilinear
    # value by as much times the neighbouring cells' difference (< 1). Measured 4.4e-6; 1e-5 is five ulps.
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    # A pixel within that 1e-5 of 0.5 may land on either side of the threshold: at most 1e-5 of them.
    assert ((ours >= 0.5) == (theirs >= 0.5)).float().mean() > 0.99999


def test_chunks_give_the_same_pixels():
    masks, boxes = _random(40, 90, 130, seed=3)
    one = paste_masks(masks, boxes, (90, 130), chunk=1)
    # Other chunks are matrix products of other shapes, which the BLAS may block or fuse (FMA) differently;
    # each pixel has 2 x 2 non-zero taps, so a few u of values <= 1: 1e-6 is 16 u.
    for chunk in (7, 40, 100):
        torch.testing.assert_close(paste_masks(masks, boxes, (90, 130), chunk=chunk), one, rtol=0, atol=1e-6)


def test_boxes_outside_the_image_and_no_masks():
    masks = torch.ones(2, 1, 28, 28)
    boxes = torch.tensor([[-50.0, -50.0, -20.0, -30.0], [200.0, 10.0, 260.0, 40.0]])
    assert paste_masks(masks, boxes, (60, 80)).abs().sum() == 0
    assert paste_masks(masks, boxes, (60, 80), chunk=2).abs().sum() == 0
    empty = paste_masks(torch.zeros(0, 1, 28, 28), torch.zeros(0, 4), (60, 80))
    assert empty.shape == (0, 1, 60, 80) and empty.dtype == torch.float32


def test_full_mask_covers_its_box():
    masks = torch.ones(1, 1, 28, 28)
    out = paste_masks(masks, torch.tensor([[10.0, 20.0, 50.0, 40.0]]), (64, 64))[0, 0] >= 0.5
    ys, xs = torch.nonzero(out, as_tuple=True)
    # The padded border fades out around the box edge, half a mask pixel from it.
    assert abs(xs.min().item() - 10) <= 1 and abs(xs.max().item() - 49) <= 1
    assert abs(ys.min().item() - 20) <= 1 and abs(ys.max().item() - 39) <= 1
