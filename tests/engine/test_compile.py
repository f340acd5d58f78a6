"""model.compile: torch.compile with Inductor on the CPU gives the eager model's detections, losses,
gradients and logits; checkpoints of compiled and eager models load into each other; export records
the eager model; bad values, and SyncBN training across processes, are config errors.

The compiled tests compile for real (Inductor generating and building C++ kernels) and are slow: on 2
cores with a cold cache, about 25 s for the detector's inference graph, 80 to 110 s for its training
graphs (forward and backward) and 8 to 15 s for the classifier; 1 to 12 s once torch's on-disk cache
(/tmp/torchinductor_$USER) holds them.

Tolerances, from the differences measured on a 2-core x86 CPU: compiled and eager backbone+FPN features
differ by at most 2e-5 on values up to 18 in NCHW (Inductor fuses BN, ReLU and the additions, and may
run the convolutions in another layout) and not at all in channels_last; detections by 1.5e-5 px and
scores by 6e-8; losses by 2.2e-7 relative; a parameter's gradient by 1.1e-5 of its norm; BN statistics
by 1.1e-6; the classifier's logits by 1.5e-6 on values up to 1.2. The bounds below leave one to two
orders of magnitude for other CPUs' kernels.
"""
import copy
import logging

import numpy as np
import pytest
import torch

from backbones.build import build_classifier
from backbones.classification.train import compile_classifier
from backbones.weights import save_weights
from detection import Predictor
from detection.build import build_detector, compile_detector
from detection.export.exporter import export, load
from engine.checkpoint import Checkpointer
from engine.compile import compile_model, eager
from engine.config import Config
from engine.ema import ModelEMA
from engine.errors import ConfigError
from tests.detection.test_train import TINY

DETECTOR = dict(TINY, data={}, test={"score_thresh": 0.0})  # an untrained head's scores sit near 1/4: keep them
# One training step whose losses cannot change with the order of near-equal scores: every proposal is kept
# and every anchor and proposal is in the losses' sample, so no top-k or random draw depends on an ordering
# that a 1e-6 difference could flip.
TAKE_ALL = ["model.rpn.pre_nms_topk_train=100000", "model.rpn.post_nms_topk_train=100000",
            "model.rpn.batch_size_per_image=1000000", "model.roi_heads.batch_size_per_image=1000000"]
BOX_PX, SCORE = 1e-3, 1e-5


def graphs() -> int:
    """Graphs compiled in this process so far (Dynamo's counter)."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Compiled modules share one code cache and its recompilation limit (nn.Module.compile compiles one
    wrapper function for all of them): each test starts and ends with it empty."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled(module) -> bool:
    return module._compiled_call_impl is not None


def assert_same_detections(ref, out):
    """The same number of detections, each of `ref` found in `out` with its label, its box within BOX_PX
    and its score within SCORE (in any order: scores within SCORE of each other may swap places)."""
    assert len(ref["boxes"]) == len(out["boxes"]) > 0
    torch.testing.assert_close(out["scores"].sort().values, ref["scores"].sort().values, rtol=0, atol=SCORE)
    close = ((ref["boxes"][:, None] - out["boxes"][None]).abs().amax(-1) <= BOX_PX) \
        & ((ref["scores"][:, None] - out["scores"][None]).abs() <= SCORE) \
        & (ref["labels"][:, None] == out["labels"][None])
    assert close.any(1).all(), f"{int((~close.any(1)).sum())} detections have no compiled counterpart"


def test_schema_rejects_bad_values():
    with pytest.raises(ConfigError, match="'model.compile' expects bool"):
        Config.from_dict({}, ["model.compile=maybe"])
    with pytest.raises(ConfigError, match="'model.compile_mode' must be one of 'default', 'reduce-overhead'"):
        Config.from_dict({}, ["model.compile_mode=fast"])
    cfg = Config.from_dict({})
    assert cfg.model.compile is False and cfg.model.compile_mode == "default"


def test_checkpoints_load_across_compiled_and_eager(tmp_path):
    """Compiling is in place: the same state dict keys, checkpoints load strictly both ways (through the
    training checkpointer), the EMA copy is eager; model.compile off leaves the model as it is."""
    eager_model = build_detector(Config.from_dict(DETECTOR))
    assert not _compiled(eager_model.backbone)
    assert compile_detector(eager_model, Config.from_dict(DETECTOR)) is eager_model
    assert not any(_compiled(m) for m in eager_model.modules())
    cfg = Config.from_dict(DETECTOR, ["model.compile=true"])
    model = compile_detector(build_detector(cfg), cfg)
    assert _compiled(model.backbone) and not _compiled(model) and not _compiled(model.roi_heads)
    assert list(model.state_dict()) == list(eager_model.state_dict())
    for source, target, name in ((model, eager_model, "compiled"), (eager_model, model, "eager")):
        checkpointer = Checkpointer(str(tmp_path / name))
        checkpointer.save("model_0000001.pth", source, 1)
        checkpointer.resume(target)  # load_state_dict, strict
        for key, value in source.state_dict().items():
            assert torch.equal(target.state_dict()[key], value), key
    ema = ModelEMA(model, 0.9)
    assert not any(_compiled(m) for m in ema.module.modules()) and list(ema.state_dict()) == list(model.state_dict())

    cls_cfg = Config.from_dict({"model": {"name": "classifier", "num_classes": 5, "backbone": {"depth": 18},
                                          "compile": True}})
    classifier = build_classifier(cls_cfg)
    keys = list(classifier.state_dict())
    assert compile_classifier(classifier, cls_cfg) is classifier and _compiled(classifier)
    assert list(classifier.state_dict()) == keys and not any(k.startswith("_orig_mod") for k in keys)


def test_syncbn_training_across_processes_is_refused(monkeypatch):
    """Dynamo fails on SyncBN's all-reduce: a clear error instead, in training only (in evaluation SyncBN
    is plain BN), and not for one process."""
    cfg = Config.from_dict(DETECTOR, ["model.compile=true", "model.backbone.norm=SyncBN"])
    assert _compiled(compile_detector(build_detector(cfg), cfg).backbone)  # one process
    monkeypatch.setattr("engine.compile.world_size", lambda: 2)
    with pytest.raises(ConfigError, match="model.compile cannot compile SyncBN layers that train across"):
        compile_detector(build_detector(cfg), cfg)
    assert _compiled(compile_detector(build_detector(cfg).eval(), cfg).backbone)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_detector_inference_equals_eager_on_two_sizes(tmp_path, caplog):
    """Predictor with model.compile=true (channels_last) on the eager model's weights file: the same
    detections on two image sizes from one compilation; its TorchScript export records the eager model."""
    torch.manual_seed(0)
    overrides = ["model.channels_last=true"]
    weights = str(tmp_path / "detector.pth")
    save_weights(weights, build_detector(Config.from_dict(DETECTOR, overrides)).state_dict())
    reference = Predictor(Config.from_dict(DETECTOR, overrides), weights=weights)
    with caplog.at_level(logging.INFO, logger="engine.compile"):
        compiled = Predictor(Config.from_dict(DETECTOR, overrides + ["model.compile=true"]), weights=weights)
    assert "model.compile: the detector's backbone and FPN (FPN) compiled" in caplog.text
    rng = np.random.default_rng(0)
    before = graphs()
    images = [rng.integers(0, 256, size, dtype=np.uint8) for size in ((128, 96, 3), (96, 128, 3))]
    for image in images:  # padded to 128x96 and 96x128
        assert_same_detections(reference(image), compiled(image))
    # Height and width are symbolic. (Inductor may still choose kernels by thresholds on the pixel count,
    # which these two sizes share: a size across such a threshold compiles once more.)
    assert graphs() == before + 1, "the second image size compiled again"

    path = str(tmp_path / "detector.pt")
    tensor = torch.from_numpy(images[1]).permute(2, 0, 1).contiguous()
    export(compiled.model, path, "torchscript", tensor)
    assert _compiled(compiled.model.backbone)  # compiled again after the export
    boxes, labels, scores = load(path, "torchscript")(tensor)
    assert_same_detections(reference(images[1]), {"boxes": boxes, "labels": labels, "scores": scores})


@pytest.mark.slow
def test_detector_training_step_equals_eager(tmp_path):
    """One training step (NCHW): the same losses, gradients and BN statistics; the compiled model's
    checkpoint after it resumes into an eager model."""
    torch.manual_seed(0)
    reference = build_detector(Config.from_dict(DETECTOR, TAKE_ALL)).train()
    cfg = Config.from_dict(DETECTOR, TAKE_ALL + ["model.compile=true"])
    model = compile_detector(copy.deepcopy(reference), cfg)
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 128, 96), dtype=torch.uint8, generator=g) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 60.0, 90.0], [40.0, 30.0, 90.0, 120.0]]),
                "labels": torch.tensor([1, 2])},
               {"boxes": torch.tensor([[5.0, 5.0, 50.0, 40.0]]), "labels": torch.tensor([3])}]
    results, before = [], graphs()
    for m in (reference, model):
        torch.manual_seed(1)
        losses = m(images, targets)
        sum(losses.values()).backward()
        results.append((losses, {k: p.grad for k, p in m.named_parameters()}, dict(m.named_buffers())))
    assert graphs() > before
    (ref_losses, ref_grads, ref_buffers), (losses, grads, buffers) = results
    assert set(losses) == set(ref_losses) and len(losses) == 4
    for k, v in ref_losses.items():
        torch.testing.assert_close(losses[k], v, rtol=1e-5, atol=1e-8, msg=k)
    for k, grad in ref_grads.items():
        assert grads[k] is not None and (grads[k] - grad).norm() <= 1e-3 * grad.norm() + 1e-8, k
    for k, buffer in ref_buffers.items():
        torch.testing.assert_close(buffers[k], buffer, rtol=1e-4, atol=1e-5, msg=k)

    checkpointer = Checkpointer(str(tmp_path))
    checkpointer.save("model_0000001.pth", model, 1)
    fresh = build_detector(Config.from_dict(DETECTOR, TAKE_ALL))
    checkpointer.resume(fresh)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())


@pytest.mark.slow
def test_classifier_logits_equal_eager():
    torch.manual_seed(0)
    cfg = Config.from_dict({"model": {"name": "classifier", "num_classes": 5, "backbone": {"depth": 18},
                                      "compile": True}})
    reference = build_classifier(cfg).eval()
    model = compile_classifier(copy.deepcopy(reference), cfg)
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    before = graphs()
    with torch.no_grad():
        expected = reference(images)
        logits = model(images)
        with eager(model):
            assert torch.equal(model(images), expected)  # eager inside the block
    assert graphs() == before + 1
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
