"""Box coder: parity with torchvision's BoxCoder, round trips, the exp() clamp, batched leading dims."""
import math

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder as TVBoxCoder

from detection.box_coder import DEFAULT_SCALE_CLAMP, BoxCoder

WEIGHTS = [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)]
# Parity with torchvision: our coder runs torchvision's float32 operations in torchvision's order on tensors
# of the same shapes, so each element takes the same kernel path (SIMD body or scalar tail of log/exp) on
# every CPU and thread count: the same bits (measured difference 0). 1e-6 is below an ulp of most values
# (coordinates and deltas reach ~3000): it is there for the bit-identical comparison, not for drift.
SAME_OPS = dict(rtol=0, atol=1e-6)


def random_boxes(n, seed, max_xy=500.0, min_wh=1.0, max_wh=300.0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * max_xy
    wh = torch.rand(n, 2, generator=g) * (max_wh - min_wh) + min_wh
    return torch.cat([xy, xy + wh], dim=1)


def test_default_clamp_is_torchvisions():
    assert DEFAULT_SCALE_CLAMP == TVBoxCoder((1, 1, 1, 1)).bbox_xform_clip == math.log(1000.0 / 16)


@pytest.mark.parametrize("weights", WEIGHTS)
def test_encode_equals_torchvision(weights):
    targets, references = random_boxes(1000, 0), random_boxes(1000, 1)
    theirs = TVBoxCoder(weights).encode_single(targets, references)
    ours = BoxCoder(weights).encode(targets, references)
    assert ours.shape == (1000, 4)
    torch.testing.assert_close(ours, theirs, **SAME_OPS)


@pytest.mark.parametrize("weights", WEIGHTS)
def test_decode_equals_torchvision(weights):
    g = torch.Generator().manual_seed(2)
    references = random_boxes(500, 3)
    deltas = torch.randn(500, 3 * 4, generator=g)  # three classes' deltas per reference
    theirs = TVBoxCoder(weights).decode(deltas, [references[:200], references[200:]])
    ours = BoxCoder(weights).decode(deltas, references)
    assert ours.shape == (500, 3, 4)
    torch.testing.assert_close(ours, theirs, **SAME_OPS)
    # Single-class deltas (the RPN's) keep a class axis of one.
    one = BoxCoder(weights).decode(deltas[:, :4], references)
    assert one.shape == (500, 1, 4)
    # exp() over 500 instead of 1500 values: an element may fall in the SIMD body in one call and the
    # scalar tail in the other, an ulp apart; the float32 default (1.3e-6 relative) covers a few ulps.
    torch.testing.assert_close(one[:, 0], ours[:, 0])


@pytest.mark.parametrize("weights", WEIGHTS)
def test_decode_inverts_encode(weights):
    coder = BoxCoder(weights)
    # Sizes within a factor of 30 of each other: below the 1000/16 clamp, so the round trip is exact.
    targets, references = random_boxes(1000, 4, min_wh=10.0), random_boxes(1000, 5, min_wh=10.0)
    roundtrip = coder.decode(coder.encode(targets, references), references)[:, 0]
    # ... up to float32 rounding: log, exp and the centre arithmetic each round by ~u of coordinates up to
    # 800 px (5e-5 px; measured 9e-5 px in all). 1e-3 px is ten times that.
    torch.testing.assert_close(roundtrip, targets, rtol=0, atol=1e-3)
    # Encoding a box against itself is the zero delta: the same float32 values subtract to exactly 0, log(1) = 0.
    assert coder.encode(targets, targets).abs().max() < 1e-6


@pytest.mark.parametrize("weights", WEIGHTS)
def test_huge_scale_deltas_are_clamped_like_torchvision(weights):
    references = random_boxes(6, 6)
    deltas = torch.tensor([[0.0, 0.0, 1e4, 1e4], [0.0, 0.0, 100.0, -100.0], [1.0, -1.0, 88.0, 90.0],
                           [0.0, 0.0, -1e4, 1e4], [0.5, 0.5, 5.0, 5.0], [0.0, 0.0, 0.0, 0.0]])
    ours = BoxCoder(weights).decode(deltas, references)[:, 0]
    theirs = TVBoxCoder(weights).decode(deltas, [references])[:, 0]
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, theirs, **SAME_OPS)
    # A huge width delta gives exactly the clamped width: 1000/16 times the reference's, up to float32:
    # exp(log(62.5)) and two corners of ~10^4 px subtracted, a few u (2**-24) relative; 1e-5 is ~170 u.
    ref_w = references[0, 2] - references[0, 0]
    torch.testing.assert_close(ours[0, 2] - ours[0, 0], ref_w * 1000 / 16, rtol=1e-5, atol=0)


def test_custom_scale_clamp_is_used():
    references = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    box = BoxCoder(scale_clamp=math.log(2.0)).decode(torch.tensor([[0.0, 0.0, 5.0, 5.0]]), references)[0, 0]
    torch.testing.assert_close(box, torch.tensor([-5.0, -5.0, 15.0, 15.0]))  # exp(log 2) = 2 to an ulp


def test_batched_leading_dims_equal_flat():
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    targets = random_boxes(2 * 50, 7).reshape(2, 50, 4)
    references = random_boxes(2 * 50, 8).reshape(2, 50, 4)
    encoded = coder.encode(targets, references)
    assert encoded.shape == (2, 50, 4)
    # Bitwise: the same elementwise ops on the same 100 contiguous values (TensorIterator collapses the
    # leading dims), so each value takes the same kernel path.
    assert torch.equal(encoded.reshape(-1, 4), coder.encode(targets.reshape(-1, 4), references.reshape(-1, 4)))
    deltas = torch.randn(2, 50, 8, generator=torch.Generator().manual_seed(9))
    decoded = coder.decode(deltas, references)
    assert decoded.shape == (2, 50, 2, 4)
    assert torch.equal(decoded.reshape(-1, 2, 4), coder.decode(deltas.reshape(-1, 8), references.reshape(-1, 4)))


def test_decode_follows_the_deltas_dtype():
    references = random_boxes(10, 10)
    out = BoxCoder().decode(torch.zeros(10, 4, dtype=torch.float64), references)
    assert out.dtype == torch.float64
    # (x0 + w / 2) - w / 2 in float64 is x0 to an ulp; the float64 default (1e-7) is ample
    torch.testing.assert_close(out[:, 0], references.double())


def test_decode_of_zero_boxes_is_empty():
    out = BoxCoder((10.0, 10.0, 5.0, 5.0)).decode(torch.zeros(0, 4 * 91), torch.zeros(0, 4))
    assert out.shape == (0, 91, 4)
