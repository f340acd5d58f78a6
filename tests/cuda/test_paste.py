"""segmentation.paste_masks on CUDA gives the CPU's pixels, in both paste modes. On a GPU the torchvision
mode pastes many masks at once over the union of their boxes, in chunks whose working memory stays under
CHUNK_BYTES; the masks here are enough for several chunks by default, and a small `chunk` makes many."""
import pytest
import torch

from segmentation.paste import CHUNK_BYTES, PASTE_MODES, paste_masks
from tests.segmentation.test_paste import _random

HEIGHT, WIDTH, N = 480, 640, 450
# Each pixel is a 2 x 2-tap bilinear sum of values <= 1, computed by the same elementwise operations (IEEE,
# the same on both devices) and batched matrix products that add the taps in another order, with or without
# fused multiply-adds: a few u (2**-24) apart. 1e-6 is 16 u, as tests/segmentation/test_paste.py allows
# between chunk sizes on the CPU. A pixel within that of 0.5 may land on either side of the threshold.
ATOL = 1e-6


@pytest.mark.parametrize("mode", PASTE_MODES)
def test_paste_on_cuda_equals_the_cpu(cuda, mode, float32_exact):
    masks, boxes = _random(N, HEIGHT, WIDTH, seed=5)
    expected = paste_masks(masks, boxes, (HEIGHT, WIDTH), mode=mode)
    assert (expected >= 0.5).flatten(1).any(1).float().mean() > 0.5, "most masks must reach the image"
    # The default chunk on a GPU holds at most CHUNK_BYTES / (H x W x 4 bytes) masks (their output alone):
    # N is more than twice that, so the default takes at least three chunks.
    assert N > 2 * CHUNK_BYTES // (HEIGHT * WIDTH * 4)
    # The detectron2 mode pastes one mask at a time on every device: `chunk` does not apply.
    chunks = [None, 7] if mode == "torchvision" else [None]
    for chunk in chunks:
        got = paste_masks(masks.to(cuda), boxes.to(cuda), (HEIGHT, WIDTH), chunk=chunk, mode=mode)
        assert got.device.type == cuda.type and got.dtype == expected.dtype
        got = got.cpu()
        torch.testing.assert_close(got, expected, rtol=0, atol=ATOL, msg=lambda m: f"chunk={chunk}: {m}")
        assert ((got >= 0.5) == (expected >= 0.5)).float().mean() > 0.99999, f"chunk={chunk}"
