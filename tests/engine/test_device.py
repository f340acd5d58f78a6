"""The GPU-oriented switches, checked on the CPU where the CPU supports them: channels_last gives the
same detector and classifier outputs as NCHW; pinned memory and cuDNN autotuning stay off without CUDA."""
import os

import torch

from backbones.build import build_classifier
from backbones.classification.train import classification_step
from engine.config import Config
from engine.device import memory_format, pin_memory, setup_device
from tests.detection.test_rpn_roi_heads import _batch, _targets, small_model


def test_channels_last_detector_gives_the_same_detections_and_trains():
    nchw, nhwc = small_model(), small_model("model.channels_last=true")
    assert nhwc.backbone.bottom_up.stem.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(nchw.state_dict().values(), nhwc.state_dict().values()):
        assert torch.equal(a, b)  # the same seed, the same weights: only their layout differs
    images = _batch(7, ((96, 128), (120, 90)))
    with torch.no_grad():
        nchw.roi_heads.predictor.cls_score.weight.mul_(30)
        nhwc.roi_heads.predictor.cls_score.weight.mul_(30)
        ours, theirs = nhwc.eval()(images), nchw.eval()(images)
    # channels_last runs other oneDNN kernels, which sum in other orders: the boxes (up to 128 px) move by
    # ~1e-5 px and the scores by ~1e-6 (measured at most 1.1e-5 and 1.3e-6). The tolerances are far above
    # that and far below a layout bug, which moves boxes by pixels.
    for a, b in zip(ours, theirs):
        assert len(b["boxes"]) > 0 and len(a["boxes"]) == len(b["boxes"])
        torch.testing.assert_close(a["boxes"], b["boxes"], rtol=1e-3, atol=1e-2)
        torch.testing.assert_close(a["scores"], b["scores"], rtol=1e-3, atol=1e-4)
    nhwc.train()
    losses = nhwc(images, _targets([[10, 12, 60, 70]], [[5, 5, 80, 100]]))
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()


def test_channels_last_classifier_step_equals_nchw():
    cfg = Config.from_dict({"model": {"name": "classifier", "num_classes": 3, "backbone": {"depth": 18},
                                      "channels_last": True}})
    torch.manual_seed(0)
    model = build_classifier(cfg)
    batch = (torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 1]))
    nchw = classification_step(model, batch)["loss_cls"]
    nhwc = classification_step(model.to(memory_format=memory_format(cfg)), batch,
                               memory_format=memory_format(cfg))["loss_cls"]
    # A loss of size ~1 after 18 layers summed in other orders (measured at most 1e-6): 1e-4 relative.
    torch.testing.assert_close(nhwc, nchw, rtol=1e-4, atol=1e-5)


def test_cuda_only_switches_are_off_on_the_cpu():
    cfg = Config.from_dict({"device": "cpu", "cudnn_benchmark": True})
    before = torch.backends.cudnn.benchmark
    assert setup_device(cfg).type == "cpu" and torch.backends.cudnn.benchmark == before
    assert cfg.data.pin_memory and not pin_memory(cfg)
    assert memory_format(cfg) == torch.contiguous_format


def test_deterministic_switch_and_a_detector_training_step_under_it(monkeypatch):
    """`deterministic: true` turns deterministic algorithms on before the device is touched (cuBLAS's
    workspace setting included, which must precede its first call); every op of a detector's training step
    has a deterministic form (none raises), and two steps from the same state give the same bits."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    cfg = Config.from_dict({"device": "cpu", "deterministic": True, "cudnn_benchmark": True})
    try:
        setup_device(cfg)
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        runs = []
        for _ in range(2):
            torch.manual_seed(0)
            model = small_model().train()
            images, targets = _batch(), _targets([[10, 12, 60, 70], [40, 20, 120, 90]])
            losses = model(images, targets)
            sum(losses.values()).backward()
            runs.append(([v.detach() for v in losses.values()], [p.grad for p in model.parameters() if p.grad is not None]))
        assert all(torch.equal(a, b) for a, b in zip(runs[0][0] + runs[0][1], runs[1][0] + runs[1][1]))
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = False
