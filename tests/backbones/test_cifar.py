import pytest
import torch

from backbones import cifar_resnet
from engine.errors import ConfigError


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# Paper Table 6 (CIFAR-10): parameters of ResNet-20/32/44/56/110/1202, in millions as printed.
@pytest.mark.parametrize("depth,paper,digits", [(20, 0.27, 2), (32, 0.46, 2), (44, 0.66, 2),
                                                (56, 0.85, 2), (110, 1.7, 1), (1202, 19.4, 1)])
def test_parameter_counts_match_paper(depth, paper, digits):
    with torch.device("meta"):
        model = cifar_resnet(depth)
    assert round(n_params(model) / 1e6, digits) == paper


def test_plain_and_option_a_have_equal_parameters():
    assert n_params(cifar_resnet(20, plain=True)) == n_params(cifar_resnet(20))
    assert n_params(cifar_resnet(20, shortcut="B")) > n_params(cifar_resnet(20))


def test_forward_shapes():
    model = cifar_resnet(20).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    widths = [model.output_shape()[s].channels for s in ("res2", "res3", "res4")]
    assert widths == [16, 32, 64]
    assert len(model.res2) == 3  # n = (20 - 2) / 6


@pytest.mark.parametrize("depth", [19, 4, 0])
def test_bad_depth(depth):
    with pytest.raises(ConfigError, match="6n\\+2"):
        cifar_resnet(depth)
