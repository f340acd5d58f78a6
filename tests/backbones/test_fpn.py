import pytest
import torch
from torchvision.models.detection import FasterRCNN, MaskRCNN

import backbones
from backbones import FPN, ResNet
from engine.errors import ConfigError


def test_resnet_fpn_levels_channels_strides():
    model = backbones.resnet_fpn(50).eval()
    shapes = model.output_shape()
    assert list(shapes) == ["0", "1", "2", "3", "pool"]
    assert [s.stride for s in shapes.values()] == [4, 8, 16, 32, 64]
    assert model.out_channels == 256 and all(s.channels == 256 for s in shapes.values())
    out = model(torch.randn(1, 3, 128, 192))
    assert list(out) == list(shapes)
    for name, spec in shapes.items():
        assert out[name].shape == (1, 256, 128 // spec.stride, 192 // spec.stride)


@pytest.mark.parametrize("size", [(97, 131), (33, 65), (200, 50)])
def test_any_input_size(size):
    model = backbones.resnet_fpn(18, out_channels=64).eval()
    out = model(torch.randn(1, 3, *size))
    # Each level is the lateral's size (ceil division through the strided convolutions).
    assert out["0"].shape[-2:] == model.bottom_up(torch.randn(1, 3, *size))["res2"].shape[-2:]
    assert all(torch.isfinite(v).all() for v in out.values())


def test_p6p7_top_block():
    model = backbones.resnet_fpn(18, in_features=("res3", "res4", "res5"), top_block="p6p7").eval()
    shapes = model.output_shape()
    assert list(shapes) == ["0", "1", "2", "p6", "p7"]
    assert [s.stride for s in shapes.values()] == [8, 16, 32, 64, 128]
    out = model(torch.randn(1, 3, 128, 128))
    assert out["p7"].shape == (1, 256, 1, 1)
    # ResNet-18's C5 has 512 channels, so P6 comes from C5 as in RetinaNet.
    assert model.top_block.uses_bottom_up and model.top_block.p6.in_channels == 512


def test_no_top_block_and_fpn_norm():
    model = backbones.resnet_fpn(18, top_block="none", fpn_norm="GN", out_channels=64).eval()
    assert list(model.output_shape()) == ["0", "1", "2", "3"]
    assert isinstance(model.lateral_convs[0].norm, torch.nn.GroupNorm)
    assert model.lateral_convs[0].conv.bias is None
    model(torch.randn(1, 3, 64, 64))


def test_top_down_pathway_uses_nearest_upsampling():
    model = backbones.resnet_fpn(18, out_channels=8, top_block="none").eval()
    for conv in model.output_convs:  # identity output convs expose the merged maps
        torch.nn.init.dirac_(conv.weight)
        torch.nn.init.zeros_(conv.bias)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        f = model.bottom_up(x)
        p5 = model.lateral_convs[3](f["res5"])
        expected_p4 = model.lateral_convs[2](f["res4"]) + p5.repeat_interleave(2, -1).repeat_interleave(2, -2)
        out = model(x)
    # A dirac 3x3 kernel multiplies by 1 and adds zeros, exact in a direct convolution; a Winograd or other
    # transformed algorithm (oneDNN's choice per CPU) would round by a few u of values up to ~7. allclose's
    # rtol 1e-5 (~170 u) holds that; measured: exact.
    assert torch.allclose(out["3"], p5, atol=1e-6)
    assert torch.allclose(out["2"], expected_p4, atol=1e-5)


def test_bad_fpn_inputs():
    body = ResNet(18, None, out_features=["res2", "res4"])
    with pytest.raises(ConfigError, match="strides double"):
        FPN(body)
    with pytest.raises(ConfigError, match="not produced by the backbone"):
        FPN(ResNet(18, None), in_features=["res2", "res6"])
    with pytest.raises(ConfigError, match="top_block"):
        FPN(ResNet(18, None), top_block="p6")


def test_drops_into_torchvision_faster_rcnn():
    torch.manual_seed(0)
    model = FasterRCNN(backbones.resnet_fpn(18, norm="FrozenBN"), num_classes=5, min_size=128,
                       max_size=192)
    images = [torch.rand(3, 120, 160), torch.rand(3, 140, 100)]
    targets = [dict(boxes=torch.tensor([[10.0, 20, 80, 100]]), labels=torch.tensor([1])),
               dict(boxes=torch.tensor([[5.0, 5, 50, 60], [30, 40, 90, 130]]), labels=torch.tensor([2, 3]))]
    losses = model.train()(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    with torch.no_grad():
        out = model.eval()(images)
    assert len(out) == 2 and out[0]["boxes"].shape[1] == 4


def test_drops_into_torchvision_mask_rcnn():
    torch.manual_seed(0)
    model = MaskRCNN(backbones.resnet_fpn(18), num_classes=3, min_size=128, max_size=192)
    masks = torch.zeros(1, 120, 160, dtype=torch.uint8)
    masks[0, 20:100, 10:80] = 1
    losses = model.train()([torch.rand(3, 120, 160)],
                           [dict(boxes=torch.tensor([[10.0, 20, 80, 100]]), labels=torch.tensor([1]),
                                 masks=masks)])
    assert "loss_mask" in losses and torch.isfinite(sum(losses.values()))
    with torch.no_grad():
        out = model.eval()([torch.rand(3, 120, 160)])
    assert "masks" in out[0]


def test_p6p7_from_p5_when_widths_match():
    model = backbones.resnet_fpn(18, in_features=("res3", "res4", "res5"), top_block="p6p7",
                                 out_channels=512).eval()
    assert not model.top_block.uses_bottom_up
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        out = model(x)
        assert torch.allclose(out["p6"], model.top_block.p6(out["2"]))  # the same conv on the same P5: bitwise
