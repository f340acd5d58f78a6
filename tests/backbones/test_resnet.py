import pytest
import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import backbones
from backbones import FrozenBatchNorm2d, ResNet
from backbones.norms import SyncBatchNorm2d
from backbones.resnet import Projection, ZeroPadShortcut
from engine.errors import ConfigError


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def macs(model, size=224):
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(torch.zeros(1, 3, size, size, device="meta"))
    return counter.get_total_flops() / 2


@pytest.mark.parametrize("name", sorted(backbones.ARCHITECTURES))
def test_parameter_counts_equal_torchvision(name):
    with torch.device("meta"):
        ours = backbones.ARCHITECTURES[name]()
        theirs = getattr(torchvision.models, name)()
    assert n_params(ours) == n_params(theirs)


# Table 1 of the paper: multiply-adds at 224x224 (the paper's "FLOPs"). The count itself is exact (meta
# tensors, integer arithmetic); 10% covers the paper's rounding to 0.1 G and our stride in the 3x3 of
# depths 50+ (torchvision's), which costs 6% over the paper's stride in the 1x1: 4.09 G vs 3.8 for R50.
@pytest.mark.parametrize("depth,paper_gmacs", [(18, 1.8), (34, 3.6), (50, 3.8), (101, 7.6), (152, 11.3)])
def test_flops_match_paper_table1(depth, paper_gmacs):
    with torch.device("meta"):
        model = ResNet(depth)
    assert macs(model) / 1e9 == pytest.approx(paper_gmacs, rel=0.10)


def test_stride_in_1x1_moves_the_stride_and_matches_original_flops():
    with torch.device("meta"):
        msra = ResNet(50, stride_in_1x1=True)
        torch_style = ResNet(50)
    assert msra.res3[0].conv1.stride == (2, 2) and msra.res3[0].conv2.stride == (1, 1)
    assert torch_style.res3[0].conv1.stride == (1, 1) and torch_style.res3[0].conv2.stride == (2, 2)
    # The original ResNet-50 is 3.8 GMACs; moving the stride into the 3x3 costs ~0.2 G more. An exact count
    # (3.858 G); 0.02 G allows for a FlopCounterMode that counts the fc or bias adds (0.002 G) differently.
    assert macs(msra) / 1e9 == pytest.approx(3.86, abs=0.02)
    assert macs(torch_style) > macs(msra)


@pytest.mark.parametrize("norm,cls", [("BN", nn.BatchNorm2d), ("FrozenBN", FrozenBatchNorm2d),
                                      ("SyncBN", SyncBatchNorm2d), ("GN", nn.GroupNorm)])
def test_norm_choices(norm, cls):
    model = ResNet(18, 10, norm=norm)
    assert isinstance(model.stem.norm1, cls) and isinstance(model.res4[1].norm2, cls)
    model.train()
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.sum().backward()
    if norm == "FrozenBN":
        assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        assert n_params(model) == n_params(ResNet(18, 10)) - sum(
            m.weight.numel() * 2 for m in ResNet(18, 10).modules() if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize("freeze_at", range(6))
def test_freeze_at(freeze_at):
    model = ResNet(18, None, freeze_at=freeze_at)
    units = ["stem", "res2", "res3", "res4", "res5"]
    for i, name in enumerate(units, start=1):
        unit = getattr(model, name)
        frozen = freeze_at >= i
        assert all(p.requires_grad != frozen for p in unit.parameters()), name
        has_bn = any(isinstance(m, nn.BatchNorm2d) for m in unit.modules())
        assert has_bn != frozen, name
    # Frozen stages keep their statistics in training mode.
    if freeze_at >= 1:
        before = model.stem.norm1.running_mean.clone()
        model.train()(torch.randn(2, 3, 64, 64) * 3 + 1)
        assert torch.equal(model.stem.norm1.running_mean, before)


def test_zero_init_residual_makes_blocks_start_as_identity():
    model = ResNet(50, zero_init_residual=True)
    for stage in (model.res2, model.res3, model.res4, model.res5):
        for block in stage:
            assert torch.count_nonzero(block.norm3.weight) == 0
    assert torch.count_nonzero(ResNet(50).res2[0].norm3.weight) > 0
    block = ResNet(18, zero_init_residual=True).res2[1].eval()
    x = torch.rand(1, 64, 8, 8)
    assert torch.allclose(block(x), x)  # exact: the branch is scaled by 0 and relu(x) = x for x >= 0


def test_dilation_keeps_resolution():
    model = ResNet(50, None, dilation=(False, True, True)).eval()
    shapes = model.output_shape()
    assert [shapes[f].stride for f in ("res2", "res3", "res4", "res5")] == [4, 8, 8, 8]
    out = model(torch.randn(1, 3, 64, 64))
    assert out["res5"].shape[-2:] == (8, 8) and out["res3"].shape[-2:] == (8, 8)
    assert model.res5[1].conv2.dilation == (4, 4) and model.res5[0].conv2.dilation == (2, 2)
    # Same parameters as the strided network: dilation changes no weight shape.
    assert n_params(model) == n_params(ResNet(50, None))


def test_dilation_matches_torchvision():
    tv = torchvision.models.resnet50(replace_stride_with_dilation=[False, True, True])
    ours = ResNet(50, dilation=(False, True, True))
    for (name, m) in tv.named_modules():
        if isinstance(m, nn.Conv2d) and name.startswith("layer"):
            stage, rest = name.split(".", 1)
            ours_name = f"res{int(stage[-1]) + 1}.{rest.replace('downsample.0', 'shortcut.conv')}"
            o = ours.get_submodule(ours_name)
            assert (o.dilation, o.stride, o.padding) == (m.dilation, m.stride, m.padding), name


def shortcut_kinds(model):
    blocks = [b for s in model.stage_names for b in getattr(model, s)]
    return [type(b.shortcut).__name__ if b.shortcut is not None else None for b in blocks]


def test_shortcut_options():
    a, b, c = (ResNet(34, shortcut=s) for s in "ABC")
    assert all(k in (None, "ZeroPadShortcut") for k in shortcut_kinds(a))
    assert shortcut_kinds(a).count("ZeroPadShortcut") == 3  # res3, res4, res5 entries
    assert shortcut_kinds(b).count("Projection") == 3 and shortcut_kinds(b).count(None) == 13
    assert all(k == "Projection" for k in shortcut_kinds(c))
    # Option A adds no parameters: ResNet-34 A has exactly plain-34's parameters (paper Sec. 4.1).
    plain = ResNet(34, plain=True)
    assert n_params(a) == n_params(plain) < n_params(b) < n_params(c)
    for model in (a, b, c):
        assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_zero_pad_shortcut_is_parameter_free_identity_plus_zeros():
    sc = ZeroPadShortcut(16, 32, 2)
    x = torch.randn(2, 16, 8, 8)
    y = sc(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, :16], x[:, :, ::2, ::2]) and torch.count_nonzero(y[:, 16:]) == 0


def test_plain_network_has_no_shortcut_path():
    plain = ResNet(18, 10, plain=True).eval()
    assert all(k is None for k in shortcut_kinds(plain))
    block = plain.res2[0]
    x = torch.rand(1, 64, 8, 8)
    # Without a shortcut the block output is exactly relu(norm2(conv2(relu(norm1(conv1 x))))).
    expected = torch.relu(block.norm2(block.conv2(torch.relu(block.norm1(block.conv1(x))))))
    # up to float rounding: the norms fold into the convs (two 3x3 convs of 576 products each); measured
    # at most 1.7e-6 on outputs up to 2.7, a sixth of the float32 default (1e-5 + 1.3e-6 relative)
    torch.testing.assert_close(block(x), expected)
    residual = ResNet(18, 10, shortcut="A").eval()
    residual.load_state_dict(plain.state_dict())
    assert not torch.allclose(residual.res2[0](x), expected)  # the shortcut adds x: far beyond rounding


def test_backbone_mode_output_shape():
    model = backbones.resnext50_32x4d(None, out_features=["res3", "res5"]).eval()
    out = model(torch.randn(1, 3, 96, 128))
    assert list(out) == ["res3", "res5"]
    for name, spec in model.output_shape().items():
        assert out[name].shape[1] == spec.channels
        assert out[name].shape[-1] == 128 // spec.stride


def test_unused_stages_are_not_built():
    model = ResNet(50, None, out_features=["res2", "res3", "res4"])
    assert not hasattr(model, "res5")


@pytest.mark.parametrize("kwargs,match", [
    (dict(depth=42), "unknown ResNet depth 42"),
    (dict(norm="LayerNorm"), "unknown norm 'LayerNorm'"),
    (dict(shortcut="D"), "unknown shortcut option 'D'"),
    (dict(freeze_at=7), "freeze_at"),
    (dict(dilation=(True,)), "dilation takes 3 flags"),
    (dict(out_features=["res6"]), "unknown out_features"),
    (dict(depth=18, groups=32, width_per_group=4), "BasicBlock"),
])
def test_bad_options_are_named(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ResNet(**kwargs)


@pytest.mark.parametrize("shape", [(3, 64, 64), (1, 1, 64, 64), (1, 4, 64, 64), (2, 3, 1, 64, 64)])
def test_bad_input_shapes_are_named(shape):
    with pytest.raises(ValueError, match=r"expects images of shape \(N, 3, H, W\)"):
        ResNet(18)(torch.zeros(shape))


def test_in_channels_option():
    assert ResNet(18, 5, in_channels=1)(torch.zeros(2, 1, 32, 32)).shape == (2, 5)
