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
    # x * scale + shift against BN's (x - mean) / sqrt(var + eps) * w + b: a few roundings of outputs up to
    # ~5, a few u (2**-24) relative; allclose's rtol 1e-5 is ~170 u (measured 5e-8 of the largest).
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


@pytest.mark.parametrize("kind", ["FrozenBN", "eval BN"])
def test_conv_norm_folds_a_fixed_norm_into_the_convolution(kind):
    """Without gradients a fixed affine norm is folded into the convolution: the same output up to float
    rounding, and the norm's own forward never runs."""
    from backbones.norms import FoldedSequential, conv_norm

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 16, 3, padding=1, bias=kind == "eval BN")
    norm = FrozenBatchNorm2d(16) if kind == "FrozenBN" else torch.nn.BatchNorm2d(16).eval()
    randomize_norms(norm)
    x = torch.randn(2, 8, 10, 12)
    expected = norm(conv(x))
    calls = []
    norm.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        folded = conv_norm(conv, norm, x)
        sequential = FoldedSequential(conv, norm, torch.nn.ReLU())(x)
    assert not calls
    # Folding rounds each weight x scale once, and the convolution sums 8 x 3 x 3 = 72 products in its own
    # order: about 72 u = 4e-6 of the terms (measured 3.3e-7 of the largest output, ~2.5); 1e-5 holds it.
    torch.testing.assert_close(folded, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sequential, expected.relu(), rtol=1e-5, atol=1e-5)
    # the arithmetic of frameworks that do not fold, exactly: the same conv and norm calls in one process
    with torch.no_grad():
        assert torch.equal(conv_norm(conv, norm, x, fold=False), expected) and len(calls) == 1
    calls.clear()
    # With gradients wanted (a trainable convolution before FrozenBN): folded as well, with the gradients
    # of the unfolded arithmetic up to float rounding, for the convolution and for a trainable norm.
    grads = []
    for fold in (True, False):
        conv.zero_grad()
        norm.zero_grad()
        out = conv_norm(conv, norm, x, fold=fold)
        assert out.requires_grad and bool(calls) != fold
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)  # folding's rounding, as above
        (out * torch.linspace(-1, 1, 12)).sum().backward()
        grads.append([p.grad.clone() for p in list(conv.parameters()) + list(norm.parameters())])
    # Each gradient sums over 2 x 10 x 12 = 240 positions, in another order when folded (and through
    # weight x scale): about 240 u = 1.4e-5 of its size (measured 7e-7 of the largest, ~33); 1e-4 is 7 times.
    for folded_grad, plain_grad in zip(*grads):
        torch.testing.assert_close(folded_grad, plain_grad, rtol=1e-4, atol=1e-4)


def test_conv_norm_leaves_training_batchnorm_alone():
    from backbones.norms import conv_norm

    conv, norm = torch.nn.Conv2d(4, 4, 1), torch.nn.BatchNorm2d(4)  # training: batch statistics
    x = torch.randn(3, 4, 5, 5)
    with torch.no_grad():
        out = conv_norm(conv, norm, x)
    # normalised by the batch: the batch mean and this mean are float32 sums of 75 values of size ~1, about
    # 75 u = 4.5e-6 at worst (measured 4.5e-8)
    assert torch.allclose(out.mean((0, 2, 3)), torch.zeros(4), atol=1e-5)


def test_conv_norm_leaves_a_padding_mode_other_than_zeros_unfolded():
    from backbones.norms import conv_norm

    conv = torch.nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect", bias=False)
    norm = randomize_norms(FrozenBatchNorm2d(6))
    x = torch.randn(2, 4, 7, 9)
    calls = []
    norm.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        # nn.Conv2d pads by reflection itself; folding would skip that, so the pair runs as written
        assert torch.equal(conv_norm(conv, norm, x), norm(conv(x))) and len(calls) == 2


def test_folding_is_each_models_own_setting():
    """`unfolded_norms(model)` and `set_norm_folding` act on the modules of the model they are given, and
    `unfolded_norms` gives back each module's own setting; another model is untouched (no global switch)."""
    import backbones
    from backbones.norms import FoldsNorms, set_norm_folding, unfolded_norms

    torch.manual_seed(0)
    model = randomize_norms(backbones.resnet18(norm="FrozenBN")).eval()
    other = backbones.resnet18(norm="FrozenBN").eval()
    folding = [m for m in model.modules() if isinstance(m, FoldsNorms)]
    assert len(folding) == 1 + 8 + 3  # the stem, 8 blocks, 3 projection shortcuts
    x = torch.randn(1, 3, 64, 64)
    calls = []
    model.stem.norm1.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        folded = model(x)
        assert not calls
        model.res2[0].fold_norms = False
        with unfolded_norms(model):
            assert all(not m.fold_norms for m in folding) and all(m.fold_norms for m in other.modules()
                                                                 if isinstance(m, FoldsNorms))
            unfolded = model(x)
            assert calls == [1]
        assert [m.fold_norms for m in folding] == [m is not model.res2[0] for m in folding]
        set_norm_folding(model, True)
        assert torch.equal(model(x), folded)
    # folding's rounding through 18 layers: logits of size ~10 agree to a few hundred u (measured 2e-6)
    torch.testing.assert_close(unfolded, folded, rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
@pytest.mark.parametrize("name", ["resnet50", "resnet_fpn"])
def test_torch_jit_script_gives_the_eager_outputs(name):
    """torch.jit.script of a classifier (BN, eval mode) and a FrozenBN FPN backbone, as Detectron2's backbone
    tests script theirs. Scripted code cannot pass modules to a function, so it runs each norm after its
    convolution: the eager model's arithmetic under `unfolded_norms`, the same kernels in the same order."""
    import backbones
    from backbones.norms import unfolded_norms

    torch.manual_seed(0)
    model = backbones.resnet50() if name == "resnet50" else backbones.resnet_fpn(50, norm="FrozenBN")
    model = randomize_norms(model).eval()
    scripted = torch.jit.script(model)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        eager, script = model(x), scripted(x)
        with unfolded_norms(model):
            unfolded = model(x)
    if name == "resnet50":
        eager, script, unfolded = {"logits": eager}, {"logits": script}, {"logits": unfolded}
    assert list(script) == list(eager)
    for key in eager:
        assert torch.equal(script[key], unfolded[key]), key
        # Against the folded eager model: folding rounds each weight x scale once per layer, through ~50
        # layers; measured 1.5e-6 of the largest output (~60-300), so 2e-5 of it is over 10 times that.
        torch.testing.assert_close(script[key], eager[key], rtol=0, atol=2e-5 * eager[key].abs().max().item())
