"""TorchScript: our ResNet and ResNet-FPN script (torch.jit.script) and trace (torch.jit.trace), in training and
evaluation mode, and compute what the eager module computes.

Eager modules fold fixed-affine norms (FrozenBN always, BN in evaluation) into their convolutions; a scripted
module runs every norm after its convolution (TorchScript passes no modules to functions), so the two differ
by float32 rounding where a norm folds, and are equal where none does. A trace records the eager operations,
folding included, so it equals the eager module exactly.
"""
import io

import pytest
import torch

import backbones
from tests.conftest import randomize_norms

pytestmark = pytest.mark.usefixtures("one_thread")  # images of 64 pixels


def build(kind, norm):
    torch.manual_seed(0)
    if kind == "resnet":  # basic blocks, all four stages
        model = backbones.ResNet(18, num_classes=None, norm=norm)
    else:  # bottlenecks, projections and the FPN, as Detectron2 users build it
        model = backbones.resnet_fpn(50, norm=norm)
    return randomize_norms(model)


def assert_same(actual, expected, folds: bool):
    assert list(actual) == list(expected)
    for name, value in expected.items():
        if folds:
            # Folding scales the weights before the convolution instead of its output after it: one rounding of
            # ~6e-8 per layer, carried through at most ~50 layers, stays far below 1e-5 of the largest value
            # (measured: ~1e-6). A layer computed wrongly differs by O(1).
            atol = 1e-5 * value.abs().max().item()
            torch.testing.assert_close(actual[name], value, rtol=0, atol=atol, msg=name)
        else:
            assert torch.equal(actual[name], value), name


@pytest.mark.parametrize("norm", ["FrozenBN", "BN"])
@pytest.mark.parametrize("kind", ["resnet", "resnet_fpn"])
def test_script_and_trace_equal_eager_in_train_and_eval(kind, norm):
    model = build(kind, norm)
    images = torch.randn(2, 3, 64, 64)
    scripted = torch.jit.script(model)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)  # a scripted model is self-contained: it saves and loads without Python
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    for training in (True, False):
        for m in (model, scripted, loaded):
            m.train(training)
        folds = norm == "FrozenBN" or not training  # BN is a fixed affine map only in evaluation
        state = {k: v.clone() for k, v in model.state_dict().items()}

        def run(module):
            # BN in training updates its running statistics on every call: each call starts from the same state
            # (the scripted module shares the eager one's tensors, the loaded one has its own).
            model.load_state_dict(state)
            loaded.load_state_dict(state)
            with torch.no_grad():
                return module(images)

        expected = run(model)
        assert_same(run(scripted), expected, folds)
        assert_same(run(loaded), expected, folds)
        model.load_state_dict(state)
        traced = torch.jit.trace(model, images, strict=False, check_trace=False)
        assert_same(run(traced), expected, folds=False)


def test_scripted_resnet_fpn_trains():
    """Gradients flow through a scripted model in training mode as through the eager one."""
    model = build("resnet_fpn", "FrozenBN")
    scripted = torch.jit.script(model).train()
    images = torch.randn(1, 3, 64, 64)
    sum(v.sum() for v in scripted(images).values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    sum(v.sum() for v in model.train()(images).values()).backward()
    eager_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == eager_grads.keys() and grads
    for name, grad in grads.items():
        scale = eager_grads[name].abs().max().item()
        torch.testing.assert_close(grad, eager_grads[name], rtol=0, atol=1e-4 * scale + 1e-12, msg=name)
