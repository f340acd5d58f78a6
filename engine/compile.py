"""`model.compile`: torch.compile (TorchDynamo capturing the graph, Inductor generating its kernels) for
training and inference, with the same outputs and the same checkpoints as the eager model.

The module is compiled in place with `nn.Module.compile`: its `__call__` goes through the compiled
function, while the module, its submodules and so its `state_dict` keys stay what they are. (Wrapping it
in `torch.compile(module)` would give an OptimizedModule whose keys all gain an `_orig_mod.` prefix, and
checkpoints of compiled and eager runs would no longer load into each other.) A deep copy of the module
(engine.ema.ModelEMA) or a pickle of it is eager again: `nn.Module.__getstate__` leaves the compiled
function out. Compiling is lazy: the first call of each kind (training, evaluation; new input shapes
unless they are dynamic) traces and compiles, which takes from seconds to minutes, and later calls of
that kind reuse the result. torch keeps the compiled code of every module compiled this way under one
function, so in one process they share torch._dynamo.config.recompile_limit (8 compilations; past it,
new kinds of call run eagerly, with a warning from torch).

Compile after the model is on its device and in its memory format, and before DistributedDataParallel
wraps it (engine.distributed.wrap_model): DDP stays eager and averages the gradients as usual. Export
records the eager model: tools/export.py builds its own and never compiles, and detection/export
records a compiled one inside `eager`.
"""
import contextlib
import logging
from typing import Iterator, Optional

from torch import nn

from .distributed import world_size
from .errors import ConfigError
from .sync_batchnorm import SyncBatchNorm2d

logger = logging.getLogger(__name__)


def compile_model(model: nn.Module, cfg, part: Optional[str] = None, dynamic: Optional[bool] = None,
                  what: str = "the model") -> nn.Module:
    """With `model.compile` on, compile `model`, or its submodule `part` (a dotted name), in place with
    `model.compile_mode`; returns `model`, compiled or not. Compile a model for inference after `.eval()`:
    a module in training mode is compiled for training, which SyncBN layers across processes refuse.

    `dynamic` is torch.compile's: None compiles for the first input shapes seen and, when a later call
    brings other shapes, compiles once more with the sizes that changed symbolic (fixed-size inputs such
    as a classifier's crops: one or two compilations); True makes every size symbolic from the first
    call (inputs whose size changes all the time, as detection images do: one compilation, unless
    Inductor fixes a size while compiling, as it does for convolutions' backward). `what` names the
    compiled part in the log."""
    if not cfg.model.compile:
        return model
    module = model.get_submodule(part) if part else model
    if module.training and world_size() > 1 and any(isinstance(m, (SyncBatchNorm2d, nn.SyncBatchNorm))
                                                    for m in module.modules()):
        # Dynamo fails while tracing SyncBN's all-reduce (torch 2.14).
        raise ConfigError("model.compile cannot compile SyncBN layers that train across processes (torch.compile "
                          "fails on their all-reduce); set model.compile=false, or another norm (model.backbone.norm, "
                          "model.fpn.norm)")
    module.compile(mode=cfg.model.compile_mode, dynamic=dynamic)
    shapes = {None: "shapes made dynamic when they change", True: "dynamic shapes", False: "static shapes"}[dynamic]
    logger.info("model.compile: %s (%s) compiled with torch.compile, mode %s, %s; its first calls compile it",
                what, type(module).__name__, cfg.model.compile_mode, shapes)
    return model


@contextlib.contextmanager
def eager(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, `model` and its submodules run their eager forward, compiled or not; after it,
    those compiled run compiled again. For graph recorders (torch.jit.trace refuses compiled code) and
    anything else that must see the model's own operations."""
    # nn.Module.compile keeps the compiled function in `_compiled_call_impl` (None: eager).
    compiled = {m: m._compiled_call_impl for m in model.modules() if m._compiled_call_impl is not None}
    for m in compiled:
        m._compiled_call_impl = None
    try:
        yield model
    finally:
        for m, fn in compiled.items():
            m._compiled_call_impl = fn
