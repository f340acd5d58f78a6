"""backbones.adapters against STAND-INS for Detectron2 and MMDetection.

Neither framework can be installed here (not on the package index this project uses), so the tests write
minimal stand-in packages into tmp_path and put them first on sys.path. Each stand-in reproduces only
the API surface the adapters use, with the behaviour documented in the real sources:

- detectron2.layers.ShapeSpec: keyword fields channels/height/width/stride (detectron2/layers/shape_spec.py)
- detectron2.modeling.Backbone: nn.Module with ABCMeta, abstract forward, size_divisibility 0,
  padding_constraints {}, output_shape() (detectron2/modeling/backbone/backbone.py)
- detectron2.modeling.BACKBONE_REGISTRY: fvcore's Registry, register() under obj.__name__ refusing a name
  twice, get() raising KeyError (fvcore/common/registry.py); build_backbone(cfg, input_shape=None) as in
  detectron2/modeling/backbone/build.py
- detectron2.config.get_cfg(): a CfgNode (dict with attribute access) holding the defaults of the keys the
  adapters read, values copied from detectron2/config/defaults.py
- mmengine.registry.Registry: register_module(name, force, module) refusing a name twice without force,
  module_dict, get, build(cfg) popping "type" (mmengine/registry/registry.py); mmdet.registry.MODELS

A pass here shows the adapters keep that contract; it is not a run of the real frameworks.
"""
import ast
import importlib
import sys
import textwrap
import time

import pytest
import torch

import backbones
from backbones import ResNet
from backbones.weights import save_weights, to_torchvision_resnet
from engine.errors import ConfigError, ToolkitError
from tests.conftest import REPO, randomize_norms

STANDINS = {
    "detectron2/__init__.py": "",
    "detectron2/layers/__init__.py": """
        from dataclasses import dataclass
        from typing import Optional

        @dataclass
        class ShapeSpec:
            channels: Optional[int] = None
            height: Optional[int] = None
            width: Optional[int] = None
            stride: Optional[int] = None
    """,
    "detectron2/modeling/__init__.py": """
        from abc import ABCMeta, abstractmethod
        from torch import nn
        from detectron2.layers import ShapeSpec

        class Registry:  # fvcore.common.registry.Registry
            def __init__(self, name):
                self._name = name
                self._obj_map = {}

            def _do_register(self, name, obj):
                assert name not in self._obj_map, (
                    f"An object named '{name}' was already registered in '{self._name}' registry!")
                self._obj_map[name] = obj

            def register(self, obj=None):
                if obj is None:
                    def deco(func_or_class):
                        self._do_register(func_or_class.__name__, func_or_class)
                        return func_or_class
                    return deco
                self._do_register(obj.__name__, obj)

            def get(self, name):
                ret = self._obj_map.get(name)
                if ret is None:
                    raise KeyError(f"No object named '{name}' found in '{self._name}' registry!")
                return ret

        class Backbone(nn.Module, metaclass=ABCMeta):
            def __init__(self):
                super().__init__()

            @abstractmethod
            def forward(self):
                pass

            @property
            def size_divisibility(self):
                return 0

            @property
            def padding_constraints(self):
                return {}

            def output_shape(self):
                return {name: ShapeSpec(channels=self._out_feature_channels[name],
                                        stride=self._out_feature_strides[name]) for name in self._out_features}

        BACKBONE_REGISTRY = Registry("BACKBONE")

        def build_backbone(cfg, input_shape=None):
            if input_shape is None:
                input_shape = ShapeSpec(channels=len(cfg.MODEL.PIXEL_MEAN))
            backbone = BACKBONE_REGISTRY.get(cfg.MODEL.BACKBONE.NAME)(cfg, input_shape)
            assert isinstance(backbone, Backbone)
            return backbone
    """,
    "detectron2/config/__init__.py": """
        class CfgNode(dict):  # yacs: a dict whose keys are also attributes
            def __getattr__(self, name):
                try:
                    return self[name]
                except KeyError:
                    raise AttributeError(name)

            def __setattr__(self, name, value):
                self[name] = value

        def _node(d):
            return CfgNode({k: _node(v) if isinstance(v, dict) else v for k, v in d.items()})

        def get_cfg():
            return _node({"MODEL": {
                "PIXEL_MEAN": [103.530, 116.280, 123.675],
                "BACKBONE": {"NAME": "build_resnet_backbone", "FREEZE_AT": 2},
                "FPN": {"IN_FEATURES": [], "OUT_CHANNELS": 256, "NORM": "", "FUSE_TYPE": "sum"},
                "RESNETS": {"DEPTH": 50, "OUT_FEATURES": ["res4"], "NUM_GROUPS": 1, "NORM": "FrozenBN",
                            "WIDTH_PER_GROUP": 64, "STRIDE_IN_1X1": True, "RES5_DILATION": 1,
                            "RES2_OUT_CHANNELS": 256, "STEM_OUT_CHANNELS": 64,
                            "DEFORM_ON_PER_STAGE": [False, False, False, False],
                            "DEFORM_MODULATED": False, "DEFORM_NUM_GROUPS": 1},
            }})
    """,
    "mmengine/__init__.py": "",
    "mmengine/registry/__init__.py": """
        import copy

        class Registry:  # mmengine.registry.Registry, without scopes, parents and lazy imports
            def __init__(self, name):
                self._name = name
                self._module_dict = {}

            @property
            def name(self):
                return self._name

            @property
            def module_dict(self):
                return self._module_dict

            def _register_module(self, module, module_name=None, force=False):
                if not callable(module):
                    raise TypeError(f"module must be Callable, but got {type(module)}")
                names = [module_name or module.__name__] if not isinstance(module_name, list) else module_name
                for name in names:
                    if not force and name in self._module_dict:
                        raise KeyError(f"{name} is already registered in {self.name} "
                                       f"at {self._module_dict[name].__module__}")
                    self._module_dict[name] = module

            def register_module(self, name=None, force=False, module=None):
                if not isinstance(force, bool):
                    raise TypeError(f"force must be a boolean, but got {type(force)}")
                if module is not None:
                    self._register_module(module=module, module_name=name, force=force)
                    return module

                def _register(module):
                    self._register_module(module=module, module_name=name, force=force)
                    return module
                return _register

            def get(self, key):
                return self._module_dict.get(key)

            def build(self, cfg, *args, **kwargs):
                args_ = copy.deepcopy(dict(cfg))
                obj_type = args_.pop("type")
                obj_cls = self.get(obj_type)
                if obj_cls is None:
                    raise KeyError(f"{obj_type} is not in the {self.name} registry")
                return obj_cls(**args_)

        MODELS = Registry("model")
    """,
    "mmdet/__init__.py": "",
    "mmdet/registry.py": """
        from mmengine.registry import Registry
        MODELS = Registry("model")
    """,
}
FRAMEWORKS = ("detectron2", "mmdet", "mmengine")
ADAPTERS = "backbones.adapters"


def _ours(name):
    return any(name == p or name.startswith(p + ".") for p in FRAMEWORKS + (ADAPTERS,))


def fresh_adapters():
    """Import backbones.adapters anew, so that its import-time registration runs again."""
    for name in [n for n in sys.modules if n == ADAPTERS or n.startswith(ADAPTERS + ".")]:
        del sys.modules[name]
    return importlib.import_module(ADAPTERS)


@pytest.fixture
def frameworks(tmp_path, monkeypatch):
    """The stand-in Detectron2 and MMDetection first on sys.path, and backbones.adapters imported with
    them; every module imported meanwhile is dropped afterwards."""
    for path, source in STANDINS.items():
        file = tmp_path / path
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(textwrap.dedent(source))
    saved = {n: m for n, m in sys.modules.items() if _ours(n)}
    for name in saved:
        del sys.modules[name]
    monkeypatch.syspath_prepend(str(tmp_path))  # also invalidates the import caches
    yield fresh_adapters()
    for name in [n for n in sys.modules if _ours(n)]:
        del sys.modules[name]
    sys.modules.update(saved)
    if ADAPTERS in saved:
        backbones.adapters = saved[ADAPTERS]


pytestmark = pytest.mark.usefixtures("one_thread")  # images of 64 pixels


def d2_cfg(**resnets):
    from detectron2.config import get_cfg

    cfg = get_cfg()
    cfg.MODEL.RESNETS.update(DEPTH=18, RES2_OUT_CHANNELS=64, STRIDE_IN_1X1=False,
                             OUT_FEATURES=["res2", "res3", "res4", "res5"], **resnets)
    cfg.MODEL.FPN.update(IN_FEATURES=["res2", "res3", "res4", "res5"], OUT_CHANNELS=64)
    return cfg


def test_import_needs_neither_framework_nor_registers_anything():
    # Neither framework is installed here, and the fixture of the other tests removes its stand-ins.
    assert not [m for m in sys.modules if m.split(".")[0] in FRAMEWORKS + ("fvcore",)]
    started = time.perf_counter()
    adapters = fresh_adapters()
    seconds = time.perf_counter() - started
    assert adapters.REGISTERED == {"detectron2": [], "mmdet": []}
    assert not [m for m in sys.modules if m.split(".")[0] in FRAMEWORKS + ("fvcore",)]
    assert seconds < 1.0  # the frameworks are looked up on sys.path, not imported: ~0.02 s
    # `import backbones` leaves the adapters alone: nothing in the package's __init__ imports them.
    tree = ast.parse((REPO / "backbones" / "__init__.py").read_text())
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if "adapters" in m], imported


def test_detectron2_fpn_names_shapes_and_outputs_equal_ours(frameworks):
    from detectron2.layers import ShapeSpec
    from detectron2.modeling import Backbone, build_backbone

    assert frameworks.REGISTERED["detectron2"] == [
        "build_resnet_det_backbone", "build_resnet_det_fpn_backbone", "build_resnet_det_retinanet_fpn_backbone"]
    cfg = d2_cfg(NORM="FrozenBN")
    cfg.MODEL.BACKBONE.NAME = "build_resnet_det_fpn_backbone"
    model = build_backbone(cfg).eval()
    assert isinstance(model, Backbone)
    shapes = model.output_shape()
    assert shapes == {f"p{k}": ShapeSpec(channels=64, stride=2 ** k) for k in range(2, 7)}
    assert model.size_divisibility == 32  # Detectron2's FPN: the stride of its coarsest input, res5

    ours = randomize_norms(backbones.resnet_fpn(18, out_channels=64, norm="FrozenBN", freeze_at=2)).eval()
    model.fpn.load_state_dict(ours.state_dict())
    images = torch.randn(2, 3, 64, 128)
    with torch.no_grad():
        theirs, expected = model(images), ours(images)
    assert list(theirs) == list(shapes)
    for (name, x), (our_name, y) in zip(theirs.items(), expected.items()):
        assert x.shape == (2, 64, 64 // shapes[name].stride, 128 // shapes[name].stride)
        assert torch.equal(x, y), (name, our_name)
    # FREEZE_AT=2: stem and res2 frozen, res3 trains, as Detectron2 freezes.
    assert not any(p.requires_grad for p in model.fpn.bottom_up.res2.parameters())
    assert all(p.requires_grad for p in model.fpn.bottom_up.res3.parameters())


def test_detectron2_resnet_with_weights_and_retinanet_levels(frameworks, tmp_path):
    from detectron2.layers import ShapeSpec
    from detectron2.modeling import build_backbone

    from backbones.adapters.detectron2_backbone import add_resnet_det_config

    ours = randomize_norms(backbones.resnet18()).eval()
    path = tmp_path / "r18_torchvision.pth"
    save_weights(str(path), to_torchvision_resnet(ours.state_dict()))  # torchvision's names, converted on load
    cfg = add_resnet_det_config(d2_cfg(NORM="BN"))
    cfg.MODEL.BACKBONE.update(NAME="build_resnet_det_backbone", WEIGHTS=str(path), FREEZE_AT=0)
    model = build_backbone(cfg).eval()
    assert model.output_shape() == {f"res{k}": ShapeSpec(channels=64 * 2 ** (k - 2), stride=2 ** k)
                                    for k in range(2, 6)}
    assert model.size_divisibility == 0
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        features = model(images)
        x = ours.stem(images)
        for name in ("res2", "res3", "res4", "res5"):
            x = getattr(ours, name)(x)
            assert torch.equal(features[name], x), name

    cfg = d2_cfg()
    cfg.MODEL.BACKBONE.NAME = "build_resnet_det_retinanet_fpn_backbone"
    cfg.MODEL.FPN.IN_FEATURES = ["res3", "res4", "res5"]
    model = build_backbone(cfg).eval()
    assert {n: s.stride for n, s in model.output_shape().items()} == {"p3": 8, "p4": 16, "p5": 32, "p6": 64,
                                                                     "p7": 128}
    assert model.fpn.top_block.uses_bottom_up  # P6 from C5, as Detectron2's RetinaNet
    assert [tuple(v.shape[-2:]) for v in model(torch.randn(1, 3, 128, 128)).values()] == [
        (16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]


@pytest.mark.parametrize("section, key, value", [
    ("RESNETS", "RES5_DILATION", 2),
    ("RESNETS", "DEFORM_ON_PER_STAGE", [False, True, True, True]),
    ("RESNETS", "NORM", "nnSyncBN"),
    ("RESNETS", "STEM_OUT_CHANNELS", 128),
    ("RESNETS", "DEPTH", 26),
    ("RESNETS", "RES2_OUT_CHANNELS", 256),
    ("FPN", "FUSE_TYPE", "avg"),
    ("FPN", "IN_FEATURES", []),
    ("FPN", "NORM", "LN"),
    ("BACKBONE", "FREEZE_AT", 7),
])
def test_detectron2_refuses_what_it_cannot_build_naming_the_key(frameworks, section, key, value):
    from detectron2.modeling import build_backbone

    cfg = d2_cfg()
    cfg.MODEL.BACKBONE.NAME = "build_resnet_det_fpn_backbone"
    cfg.MODEL[section][key] = value
    with pytest.raises(ConfigError, match=f"MODEL.{section}.{key}"):
        build_backbone(cfg)


def test_detectron2_registering_twice_or_after_reload(frameworks):
    from detectron2.modeling import BACKBONE_REGISTRY, Registry, build_backbone

    first = BACKBONE_REGISTRY.get("build_resnet_det_fpn_backbone")
    assert frameworks.register_all()["detectron2"] == frameworks.REGISTERED["detectron2"]
    fresh_adapters()  # a second load of the module: new function objects under the same names
    assert BACKBONE_REGISTRY.get("build_resnet_det_fpn_backbone") is first
    cfg = d2_cfg()
    cfg.MODEL.BACKBONE.NAME = "build_resnet_det_fpn_backbone"
    assert list(build_backbone(cfg).output_shape()) == ["p2", "p3", "p4", "p5", "p6"]

    from backbones.adapters import detectron2_backbone

    def build_resnet_det_backbone(cfg, input_shape):  # someone else's builder under our name
        return None

    taken = Registry("BACKBONE")
    taken.register(build_resnet_det_backbone)
    with pytest.raises(ToolkitError, match="'build_resnet_det_backbone' is already registered"):
        detectron2_backbone.register(taken)


def test_mmdet_resnet_outputs_equal_ours_with_pretrained_weights(frameworks, tmp_path):
    from mmdet.registry import MODELS

    assert frameworks.REGISTERED["mmdet"] == ["ResNetDet"]
    ours = randomize_norms(backbones.resnet18()).eval()
    path = tmp_path / "r18.pth"
    save_weights(str(path), to_torchvision_resnet(ours.state_dict()))  # what torchvision://resnet18 holds
    model = MODELS.build(dict(type="ResNetDet", depth=18, out_indices=(1, 2, 3), frozen_stages=1,
                              norm_cfg=dict(type="BN", requires_grad=True), norm_eval=True, style="pytorch",
                              init_cfg=dict(type="Pretrained", checkpoint=str(path))))
    assert not model.is_init
    model.init_weights()  # what MMEngine's BaseModule.init_weights calls on each child
    assert model.is_init
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        outs = model.eval()(images)
        expected = ResNet(18, None, out_features=["res3", "res4", "res5"], freeze_at=2)
        expected.load_state_dict(ours.state_dict(), strict=False)
        expected = expected.eval()(images)
    assert isinstance(outs, tuple) and [o.shape[1] for o in outs] == [128, 256, 512]
    assert [o.shape[-1] for o in outs] == [8, 4, 2]
    for out, ref in zip(outs, expected.values()):
        assert torch.equal(out, ref)

    # frozen_stages=1: the stem and res2 (mmdet's stage 0 and layer1) frozen; norm_eval keeps BN statistics.
    model.train()
    assert not any(p.requires_grad for p in model.res2.parameters())
    assert all(p.requires_grad for p in model.res3.parameters())
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    assert all(m.training for m in MODELS.build(dict(type="ResNetDet", depth=18, norm_eval=False)).train().modules()
               if isinstance(m, torch.nn.BatchNorm2d))


def test_mmdet_style_resnext_and_norm_options():
    from backbones.adapters import ResNetDet

    caffe = ResNetDet(50, style="caffe", groups=32, base_width=4, out_indices=(0, 1))
    assert caffe.res3[0].conv1.stride == (2, 2) and caffe.res3[0].conv2.stride == (1, 1)
    assert caffe.res2[0].conv2.groups == 32 and caffe.res2[0].conv2.out_channels == 128
    assert not hasattr(caffe, "res4")  # stages past the last output are not built
    pytorch = ResNetDet(50, groups=1, base_width=4, out_indices=(1,))  # one group: plain width, as mmdet
    assert pytorch.res3[0].conv2.stride == (2, 2) and pytorch.res2[0].conv2.out_channels == 64
    gn = ResNetDet(18, norm_cfg=dict(type="GN", num_groups=16, requires_grad=False), deep_stem=True, avg_down=True)
    assert isinstance(gn.res2[0].norm1, torch.nn.GroupNorm) and gn.res2[0].norm1.num_groups == 16
    assert not any(p.requires_grad for m in gn.modules() if isinstance(m, torch.nn.GroupNorm)
                   for p in m.parameters())
    assert hasattr(gn.stem, "conv3") and gn.res3[0].shortcut.pool is not None


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


def test_mmdet_registering_twice_or_after_reload(frameworks):
    from mmdet.registry import MODELS
    from mmengine.registry import Registry

    frameworks.register_all()
    frameworks.register_all()
    reloaded = fresh_adapters()  # a new ResNetDet class under the same qualified name replaces the old
    assert MODELS.module_dict["ResNetDet"] is reloaded.ResNetDet
    assert list(MODELS.module_dict) == ["ResNetDet"]

    taken = Registry("model")
    taken.register_module(name="ResNetDet", module=torch.nn.Identity)
    with pytest.raises(ToolkitError, match="'ResNetDet' is already registered in model by torch"):
        reloaded.mmdet_resnet.register(taken)
