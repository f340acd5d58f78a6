"""Our ResNet and ResNet-FPN as backbones of other detection frameworks, without copying code.

- torchvision: native. `backbones.resnet_fpn(...)` has `out_channels` and returns torchvision's
  feature names, so it goes straight into `torchvision.models.detection.FasterRCNN`.
- Detectron2: importing this package registers three builders in `detectron2.modeling.BACKBONE_REGISTRY`
  (see `detectron2_backbone.py`); select one with `cfg.MODEL.BACKBONE.NAME`.
- MMDetection 3.x: importing this package registers `ResNetDet` in `mmdet.registry.MODELS` (see
  `mmdet_resnet.py`); select it with `backbone=dict(type="ResNetDet", ...)`, or let the config import
  it with `custom_imports = dict(imports=["backbones.adapters"], allow_failed_imports=False)`.
  Building through the registry needs full mmcv (its compiled ops); without them registration warns once
  (`mmdet_resnet.build_problem`).

Registration is a side effect of `import backbones.adapters`, which is how both frameworks expect
third-party modules to register. Each framework is registered only when it is installed: neither is
needed to import `backbones` or `backbones.adapters`, and `import backbones` does not import this
package at all. Registering again (`register_all()`, a reload) replaces nothing and raises nothing.
"""
import importlib
import importlib.util
import warnings
from typing import Dict, List

from .mmdet_resnet import ResNetDet

# framework -> the names registered in it by this process (empty when the framework is not installed).
REGISTERED: Dict[str, List[str]] = {"detectron2": [], "mmdet": []}


def _installed(package: str) -> bool:
    # find_spec looks on sys.path without importing, so a missing framework costs nothing.
    return importlib.util.find_spec(package) is not None


def register_detectron2() -> List[str]:
    """Register the Detectron2 builders if detectron2 is installed; the names registered (or [])."""
    if not _installed("detectron2"):
        return []
    try:
        module = importlib.import_module(f"{__name__}.detectron2_backbone")
    except ImportError as e:
        # Installed but broken (a compiled op built for another torch, a missing dependency): say so,
        # and leave the rest of the package usable, e.g. for MMDetection.
        warnings.warn(f"detectron2 is installed but cannot be imported ({e}); the Detectron2 backbones "
                      "of backbones.adapters are not registered")
        return []
    REGISTERED["detectron2"] = module.register()
    return REGISTERED["detectron2"]


def register_mmdet() -> List[str]:
    """Register `ResNetDet` in MMDetection's MODELS if mmdet is installed; the names registered (or [])."""
    if not _installed("mmdet"):
        return []
    try:
        from mmdet.registry import MODELS
    except (ImportError, AssertionError) as e:  # mmdet asserts its mmcv and mmengine versions on import
        warnings.warn(f"mmdet is installed but mmdet.registry cannot be imported ({e}); ResNetDet is not "
                      "registered (backbones.adapters needs MMDetection 3.x)")
        return []
    from .mmdet_resnet import MMDET_NAME, build_problem, register

    # Said once per process: when the name first enters the registry, not on a reload or register_all().
    first = MMDET_NAME not in MODELS.module_dict
    REGISTERED["mmdet"] = register(MODELS)
    problem = build_problem() if first else None
    if problem:
        warnings.warn(problem)
    return REGISTERED["mmdet"]


def register_all() -> Dict[str, List[str]]:
    register_detectron2()
    register_mmdet()
    return REGISTERED


register_all()

__all__ = ["ResNetDet", "REGISTERED", "register_all", "register_detectron2", "register_mmdet"]
