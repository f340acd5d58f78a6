"""SyncBN's two forms: the layer models are built with (engine.sync_batchnorm.SyncBatchNorm2d, its own
all-reduce for CPU processes; tests/engine/test_distributed.py runs it in 2 gloo processes) and torch's
nn.SyncBatchNorm that replaces it on GPUs (tests/cuda runs that under NCCL). Here, on the CPU, the
replacement itself: which layers, the same tensors, the same state dict and outputs."""
import torch
from torch import nn

from backbones.norms import FrozenBatchNorm2d
from backbones import resnet18
from engine import sync_batchnorm
from engine.sync_batchnorm import SyncBatchNorm2d, for_device, use_torch_sync_batchnorm


def test_every_syncbn_layer_becomes_torchs_with_the_same_tensors_and_outputs():
    torch.manual_seed(0)
    model = resnet18(num_classes=10, norm="SyncBN")
    model.add_module("kept", nn.Sequential(nn.BatchNorm2d(4), FrozenBatchNorm2d(4)))  # not SyncBN: left alone
    model.train()(torch.randn(2, 3, 64, 64))  # running statistics that differ from the initial ones
    model.eval()
    syncbn = [name for name, m in model.named_modules() if isinstance(m, SyncBatchNorm2d)]
    assert len(syncbn) == 20  # the stem's, 2 per basic block of 8, and 3 downsampling shortcuts
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(1, 3, 64, 64)
    expected = model(x)

    assert use_torch_sync_batchnorm(model) is model
    converted = dict(model.named_modules())
    assert all(type(converted[name]) is nn.SyncBatchNorm for name in syncbn)
    assert not any(isinstance(m, SyncBatchNorm2d) for m in model.modules())
    assert type(converted["kept.0"]) is nn.BatchNorm2d and type(converted["kept.1"]) is FrozenBatchNorm2d
    # The optimizer's tensors are the model's: it trains the replaced layers' parameters.
    assert {id(p) for p in model.parameters()} == {id(p) for g in optimizer.param_groups for p in g["params"]}
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not converted[syncbn[0]].training
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_only_cuda_runs_of_several_processes_get_torchs_layers(monkeypatch):
    model = nn.Sequential(nn.Conv2d(3, 4, 1), SyncBatchNorm2d(4))
    for device, world in [("cpu", 1), ("cpu", 2), ("cuda", 1)]:
        monkeypatch.setattr(sync_batchnorm, "world_size", lambda: world)
        assert type(for_device(model, torch.device(device))[1]) is SyncBatchNorm2d
    monkeypatch.setattr(sync_batchnorm, "world_size", lambda: 2)
    assert type(for_device(model, torch.device("cuda"))[1]) is nn.SyncBatchNorm
    assert type(use_torch_sync_batchnorm(SyncBatchNorm2d(4))) is nn.SyncBatchNorm
