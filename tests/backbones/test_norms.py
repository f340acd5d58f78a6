import pytest
import torch
from torch import nn

from backbones.norms import FrozenBatchNorm2d, get_norm
from engine.errors import ConfigError
from tests.conftest import randomize_norms


def test_frozen_bn_equals_bn_in_eval():
    bn = randomize_norms(nn.Sequential(nn.BatchNorm2d(8)))[0].eval()
    frozen = FrozenBatchNorm2d.convert_frozen_batchnorm(nn.Sequential(bn))[0]
    assert isinstance(frozen, FrozenBatchNorm2d)
    x = torch.randn(2, 8, 5, 5)
    assert torch.allclose(frozen(x), bn(x), atol=1e-6)
    assert not list(frozen.parameters())


def test_frozen_bn_loads_batchnorm_state_dict():
    bn = randomize_norms(nn.Sequential(nn.BatchNorm2d(4)))[0]
    frozen = FrozenBatchNorm2d(4)
    frozen.load_state_dict(bn.state_dict())  # strict, despite num_batches_tracked
    assert torch.equal(frozen.running_var, bn.running_var)


def test_get_norm_errors():
    with pytest.raises(ConfigError, match="unknown norm 'IN'"):
        get_norm("IN", 8)
    with pytest.raises(ConfigError, match="divisible"):
        get_norm("GN", 30, num_groups=32)
