"""backbones.adapters inside the real mmdet, mmengine and mmcv-lite, and importing it without any framework.

The Detectron2 adapter is tested inside the real Detectron2 in test_adapters_detectron2.py. These tests skip
without mmdet; with mmcv-lite (no compiled ops) they cover registration, custom_imports and equality with
mmdet's own ResNet, and pin what building through the registry needs (full mmcv).
"""
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import types
import warnings
from pathlib import Path

import pytest
import torch

import backbones
from backbones.norms import FrozenBatchNorm2d
from engine.errors import ConfigError, ToolkitError
from tests.conftest import REPO, randomize_norms

ADAPTERS = "backbones.adapters"


def fresh_adapters():
    """Import backbones.adapters anew, so that its import-time registration runs again."""
    for name in [n for n in sys.modules if n == ADAPTERS or n.startswith(ADAPTERS + ".")]:
        del sys.modules[name]
    return importlib.import_module(ADAPTERS)


pytestmark = pytest.mark.usefixtures("one_thread")  # images of 64 pixels


def run_python(code: str, *args) -> dict:
    """`python -c code args` from the repository root, in a fresh interpreter (a registry nobody filled yet);
    the JSON object the code prints last."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


NO_FRAMEWORKS = """
    import json, sys, warnings

    HIDDEN = ("detectron2", "fvcore", "mmcv", "mmdet", "mmengine")

    def loaded():
        return sorted(n for n, m in sys.modules.items() if m is not None and n.split(".")[0] in HIDDEN)

    import backbones
    result = {"by_backbones": loaded() + [n for n in sys.modules if n.startswith("backbones.adapters")]}
    # None in sys.modules: `import mmdet` raises ModuleNotFoundError and importlib.util.find_spec answers
    # None, as for a package that is not installed (the import system's own way to hide a module).
    for name in HIDDEN:
        sys.modules[name] = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import backbones.adapters
    result.update(registered=backbones.adapters.REGISTERED, warnings=[str(w.message) for w in caught],
                  loaded=loaded(), resnet_det=type(backbones.adapters.ResNetDet(18)).__name__)
    print(json.dumps(result))
"""


def test_import_needs_neither_framework_nor_registers_anything():
    # In a fresh interpreter: this one may hold the frameworks, installed or put on sys.path by fixtures.
    run = run_python(NO_FRAMEWORKS)
    assert run["by_backbones"] == []  # `import backbones` imports neither the adapters nor a framework
    assert run["registered"] == {"detectron2": [], "mmdet": []}
    assert run["warnings"] == []
    assert run["loaded"] == []
    assert run["resnet_det"] == "ResNetDet"  # usable on its own


# MMDetection 3.x: the real mmdet, mmengine and mmcv (mmcv-lite suffices: nothing here imports mmdet.models).


@pytest.fixture(scope="module")
def mmdet_models():
    """mmdet.registry.MODELS, or a skip saying what to install."""
    try:
        from mmdet.registry import MODELS
    except (ImportError, AssertionError) as e:  # mmdet asserts its mmcv and mmengine versions on import
        pytest.skip(f"mmdet 3.x with mmengine and mmcv is not importable ({e}); the Makefile installs "
                    "mmdet, mmengine and mmcv-lite (FRAMEWORK_PINS)")
    return MODELS


@pytest.fixture
def restored_adapters(mmdet_models):
    """backbones.adapters' modules and the 'ResNetDet' entry of mmdet's MODELS put back after the test."""
    def ours():
        return {n: m for n, m in sys.modules.items() if n == ADAPTERS or n.startswith(ADAPTERS + ".")}

    saved, entry = ours(), mmdet_models.module_dict.get("ResNetDet")
    yield
    for name in ours():
        del sys.modules[name]
    sys.modules.update(saved)
    if ADAPTERS in saved:
        backbones.adapters = saved[ADAPTERS]
    mmdet_models.module_dict.pop("ResNetDet", None)
    if entry is not None:
        mmdet_models.register_module(name="ResNetDet", module=entry)


def test_mmdet_registering_twice_after_reload_and_over_another_class(mmdet_models, restored_adapters):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # without mmcv's ops: pinned by test_mmdet_build_needs_full_mmcv
        adapters = fresh_adapters()
    assert adapters.REGISTERED["mmdet"] == ["ResNetDet"]
    assert mmdet_models.module_dict["ResNetDet"] is adapters.ResNetDet
    entries = dict(mmdet_models.module_dict)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert adapters.register_all()["mmdet"] == ["ResNetDet"]
        assert dict(mmdet_models.module_dict) == entries  # a no-op
        old = adapters.ResNetDet
        importlib.reload(adapters.mmdet_resnet)  # a new class object under the same qualified name
        assert adapters.mmdet_resnet.ResNetDet is not old
        assert adapters.register_mmdet() == ["ResNetDet"]
        assert mmdet_models.module_dict["ResNetDet"] is adapters.mmdet_resnet.ResNetDet  # replaced its old self
    assert not caught  # the warning about mmcv's ops, if any, came with the first registration only

    mmdet_models.register_module(name="ResNetDet", module=torch.nn.Identity, force=True)
    with pytest.raises(ToolkitError, match="'ResNetDet' is already registered in model by torch"):
        adapters.register_mmdet()
    assert mmdet_models.module_dict["ResNetDet"] is torch.nn.Identity  # left alone


CUSTOM_IMPORTS = """
    import json, sys, warnings
    import torch
    from mmengine.config import Config
    from mmdet.registry import MODELS

    result = {"before": "ResNetDet" in MODELS.module_dict}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = Config.fromfile(sys.argv[1])  # imports the config's custom_imports
        import backbones.adapters
        backbones.adapters.register_all()  # again: no second warning
    cls = MODELS.module_dict.get("ResNetDet")
    result.update(registered=cls and f"{cls.__module__}.{cls.__qualname__}",
                  warnings=[str(w.message) for w in caught if "mmcv" in str(w.message)],
                  build_problem=backbones.adapters.mmdet_resnet.build_problem())
    try:
        model = MODELS.build(cfg.model)
    except Exception as e:
        result["error"] = [type(e).__name__, getattr(e, "name", None), str(e)]
    else:
        with torch.no_grad():
            outs = model.eval()(torch.zeros(1, 3, 64, 64))
        result["built"] = [type(model).__qualname__, [list(o.shape) for o in outs]]
    print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def custom_imports_run(mmdet_models, tmp_path_factory):
    """A config with custom_imports, loaded by mmengine's Config.fromfile in a fresh interpreter, whose
    model is then built through mmdet's MODELS."""
    config = tmp_path_factory.mktemp("mmdet") / "resnet_det.py"
    config.write_text('custom_imports = dict(imports=["backbones.adapters"], allow_failed_imports=False)\n'
                      'model = dict(type="ResNetDet", depth=18, out_indices=(3,))\n')
    return run_python(CUSTOM_IMPORTS, config)


def test_mmdet_custom_imports_registers_resnet_det(custom_imports_run):
    assert custom_imports_run["before"] is False
    assert custom_imports_run["registered"] == "backbones.adapters.mmdet_resnet.ResNetDet"


def test_mmdet_build_needs_full_mmcv(custom_imports_run):
    run = custom_imports_run
    if run["build_problem"] is None:  # full mmcv: the registry builds ResNetDet
        assert run["warnings"] == [] and "error" not in run, run
        assert run["built"] == ["ResNetDet", [[1, 512, 2, 2]]]
        return
    # mmcv-lite: mmengine's Registry.get imports mmdet.models, which imports mmcv.ops and its compiled
    # extension. Registration said so, once, naming full mmcv.
    assert run["error"][:2] == ["ModuleNotFoundError", "mmcv._ext"], run
    assert run["warnings"] == [run["build_problem"]]
    import mmdet

    for words in ("mmcv._ext", "mmdet.models", "mmcv.ops", "Install full mmcv", "ResNetDet(...) itself works",
                  f"mmcv>={mmdet.mmcv_minimum_version},<{mmdet.mmcv_maximum_version}"):  # what mmdet asks
        assert words in run["build_problem"]


# mmdet's ResNet and ResNeXt, loaded from mmdet's files without importing mmdet.models (which needs mmcv's
# compiled ops): its files under a package of another name, with their relative imports satisfied.
MMDET_REFERENCE = "_mmdet_reference"
MMDET_FILES = {"models.layers.res_layer": "models/layers/res_layer.py",
               "models.backbones.resnet": "models/backbones/resnet.py",
               "models.backbones.resnext": "models/backbones/resnext.py"}


@pytest.fixture(scope="module")
def mmdet_reference(mmdet_models):
    import mmcv.cnn  # noqa: F401  (what the files import; mmcv-lite has it)
    import mmdet
    import mmdet.utils  # noqa: F401
    from mmengine.registry import Registry

    root = Path(mmdet.__file__).parent
    # The files register their classes in mmdet.registry.MODELS: a registry of their own here, so that
    # mmdet's (maybe holding them already, from mmdet.models) is left alone.
    stand_in = types.ModuleType("mmdet.registry")
    stand_in.MODELS = Registry("model")
    saved = sys.modules["mmdet.registry"]
    sys.modules["mmdet.registry"] = stand_in
    loaded = {}
    try:
        for name in ("", ".models", ".models.layers", ".models.backbones"):
            sys.modules[MMDET_REFERENCE + name] = types.ModuleType(MMDET_REFERENCE + name)
            sys.modules[MMDET_REFERENCE + name].__path__ = []
        for name, file in MMDET_FILES.items():
            spec = importlib.util.spec_from_file_location(f"{MMDET_REFERENCE}.{name}", root / file)
            module = loaded[name] = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            if name.endswith("res_layer"):  # resnet.py: from ..layers import ResLayer
                sys.modules[f"{MMDET_REFERENCE}.models.layers"].ResLayer = module.ResLayer
    finally:
        sys.modules["mmdet.registry"] = saved
        for name in [n for n in sys.modules if n.split(".")[0] == MMDET_REFERENCE]:
            del sys.modules[name]
    return types.SimpleNamespace(ResNet=loaded["models.backbones.resnet"].ResNet,
                                 ResNeXt=loaded["models.backbones.resnext"].ResNeXt)


NORM_TYPES = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm, FrozenBatchNorm2d)


def conv_and_norm_layers(model):
    """Convolutions and norms in the order they were built: the stem, then per block its main path and its
    shortcut. mmdet's ResNet and ours build in that order, whatever their names."""
    return [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d,) + NORM_TYPES)]


def layer_spec(m):
    if isinstance(m, torch.nn.Conv2d):
        return ("conv", m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                m.bias is None)
    if isinstance(m, torch.nn.GroupNorm):
        return ("GN", m.num_channels, m.num_groups, m.eps)
    return ("BN", m.num_features, m.eps)  # BatchNorm2d, or our FrozenBatchNorm2d of a frozen stage


def copy_by_structure(theirs, ours):
    """mmdet's weights into ours layer by layer, each pair checked to be the same layer; the pairs."""
    pairs = list(zip(conv_and_norm_layers(theirs), conv_and_norm_layers(ours)))
    assert len(pairs) == len(conv_and_norm_layers(ours))  # ours stops at its last output stage, mmdet does not
    for a, b in pairs:
        assert layer_spec(a) == layer_spec(b), (a, b)
        # Frozen (frozen_stages, norm_cfg requires_grad=False) in both or in neither.
        assert any(p.requires_grad for p in a.parameters()) == any(p.requires_grad for p in b.parameters())
        source = a.state_dict()
        for key, tensor in b.state_dict().items():
            tensor.copy_(source[key])
    return pairs


def assert_close_after(layers: int, actual, expected):
    """float32 through `layers` conv+norm layers. Ours folds fixed norms into the convolution and mmdet does
    not: a few ulp of difference per layer, adding up along the path; BatchNorm with batch statistics
    divides by the batch's std, which can enlarge them a few times. 32 ulp per layer covers both; a wrong
    weight or a wrong norm shows as a difference of the order of the values themselves."""
    tolerance = 32 * layers * torch.finfo(torch.float32).eps * expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=0, atol=tolerance)


MMDET_CASES = {
    "r18-pytorch-norm_eval": dict(depth=18, style="pytorch", frozen_stages=1, norm_eval=True),
    "r50-caffe-batch_stats": dict(depth=50, style="caffe", frozen_stages=2, norm_eval=False, out_indices=(1, 2)),
    "x50_32x4d-deep_stem-avg_down-gn": dict(depth=50, groups=32, base_width=4, deep_stem=True, avg_down=True,
                                            frozen_stages=0,
                                            norm_cfg=dict(type="GN", num_groups=32, requires_grad=False)),
}


@pytest.mark.parametrize("case", MMDET_CASES)
def test_mmdet_resnet_det_computes_what_mmdets_resnet_computes(mmdet_reference, case):
    from backbones.adapters import ResNetDet

    kwargs = MMDET_CASES[case]
    torch.manual_seed(0)
    theirs = randomize_norms((mmdet_reference.ResNeXt if "groups" in kwargs else mmdet_reference.ResNet)(**kwargs))
    ours = ResNetDet(**kwargs)
    pairs = copy_by_structure(theirs, ours)
    depth = sum(isinstance(a, torch.nn.Conv2d) for a, _ in pairs)
    images = torch.randn(2, 3, 64, 64)
    for training in (False, True):  # train(): frozen stages and norm_eval keep their norms fixed in both
        theirs.train(training)  # mmdet's train() returns None
        with torch.no_grad():
            expected, outs = theirs(images), ours.train(training)(images)
        assert isinstance(outs, tuple) and len(outs) == len(expected)
        for out, ref in zip(outs, expected):
            assert_close_after(depth, out, ref)
    for a, b in pairs:  # the statistics one training step moved (only where norm_eval=False), moved alike
        if hasattr(a, "running_mean"):
            assert_close_after(depth, b.running_mean, a.running_mean)
            assert_close_after(depth, b.running_var, a.running_var)


def test_mmdet_resnet_det_loads_the_file_mmdets_resnet_loads(mmdet_reference, tmp_path):
    trained = randomize_norms(mmdet_reference.ResNet(depth=18))
    path = tmp_path / "resnet18_mmdet.pth"
    torch.save(trained.state_dict(), path)  # mmdet's ResNet names its tensors as torchvision does
    kwargs = dict(depth=18, out_indices=(1, 3), frozen_stages=1,
                  init_cfg=dict(type="Pretrained", checkpoint=str(path)))
    from backbones.adapters import ResNetDet

    theirs, ours = mmdet_reference.ResNet(**kwargs), ResNetDet(**kwargs)
    assert not ours.is_init
    theirs.init_weights()  # MMEngine's BaseModule.init_weights: loads the checkpoint of init_cfg
    ours.init_weights()
    assert ours.is_init
    images = torch.randn(1, 3, 64, 64)
    theirs.eval()  # returns None
    with torch.no_grad():
        expected, outs = theirs(images), ours.eval()(images)
    assert [o.shape[1] for o in outs] == [128, 512]
    for out, ref in zip(outs, expected):
        assert_close_after(20, out, ref)  # ResNet-18: 17 convolutions and 3 shortcut projections


@pytest.mark.parametrize("kwargs, key", [
    (dict(foo=1), "foo"),
    (dict(dcn=dict(type="DCNv2", deform_groups=1)), "dcn"),
    (dict(stage_with_dcn=(False, True, True, True)), "stage_with_dcn"),
    (dict(dilations=(1, 1, 1, 2), strides=(1, 2, 2, 1)), "strides"),
    (dict(dilations=(1, 1, 1, 2)), "dilations"),
    (dict(norm_cfg=dict(type="LN")), "norm_cfg.type"),
    (dict(norm_cfg=dict(type="BN", eps=1e-3)), "eps"),
    (dict(norm_cfg=dict(type="GN")), "num_groups"),
    (dict(style="tf"), "style"),
    (dict(out_indices=(4,)), "out_indices"),
    (dict(frozen_stages=5), "frozen_stages"),
    (dict(with_cp=True), "with_cp"),
    (dict(init_cfg=dict(type="Kaiming", layer="Conv2d")), "init_cfg"),
    (dict(init_cfg=dict(type="Pretrained", checkpoint="torchvision://resnet18")), "init_cfg.checkpoint"),
    (dict(init_cfg=dict(type="Pretrained", checkpoint="x.pth", prefix="backbone.")), "prefix"),
])
def test_mmdet_refuses_unknown_and_unsupported_arguments_by_name(kwargs, key):
    from backbones.adapters import ResNetDet

    with pytest.raises(ConfigError, match=key):
        ResNetDet(18, **kwargs)
