"""Optimizers and learning-rate schedules for the trainers, built from `solver.*`."""
import logging
import math

import torch

from engine.config import overridden
from engine.distributed import is_main
from engine.errors import ConfigError

logger = logging.getLogger("engine")

OPTIMIZERS = ("SGD", "AdamW")


_NORM_TYPES = (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm,
               torch.nn.LocalResponseNorm)


def param_groups(model: torch.nn.Module, weight_decay: float, no_decay_norm_bias: bool):
    """Trainable parameters, as one group, or two when norm weights and biases skip weight decay."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            exempt = no_decay_norm_bias and (isinstance(module, _NORM_TYPES) or name == "bias")
            (no_decay if exempt else decay).append(p)
    groups = [{"params": decay}] if decay else []
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """`solver.optimizer` over the model's trainable parameters: SGD with `solver.momentum`, or AdamW
    (Loshchilov & Hutter: decoupled weight decay). Both take `solver.base_lr` and `solver.weight_decay`."""
    s = cfg.solver
    params = param_groups(model, s.weight_decay, s.no_weight_decay_norm_bias)
    if not params:
        raise ConfigError("the model has no trainable parameters; check model.backbone.freeze_at")
    if s.optimizer == "SGD":
        return torch.optim.SGD(params, lr=s.base_lr, momentum=s.momentum, weight_decay=s.weight_decay)
    if s.optimizer == "AdamW":
        return torch.optim.AdamW(params, lr=s.base_lr, weight_decay=s.weight_decay)
    raise ConfigError(f"unknown solver.optimizer {s.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")


def lr_at(solver_cfg, it: int, max_iter: int, steps=None) -> float:
    """Learning rate at iteration `it`: linear warm-up from `warmup_factor * base_lr` over `warmup_iters`,
    then step decay by `gamma` at each of `steps` (iterations; defaults to `solver.steps`) or a cosine
    from base_lr to zero at `max_iter`."""
    s = solver_cfg
    if s.lr_scheduler == "cosine":
        lr = 0.5 * s.base_lr * (1 + math.cos(math.pi * min(it, max_iter) / max(max_iter, 1)))
    else:
        steps = s.steps if steps is None else steps
        lr = s.base_lr * s.gamma ** sum(it >= step for step in steps)
    if it < s.warmup_iters:
        alpha = it / s.warmup_iters
        lr *= s.warmup_factor * (1 - alpha) + alpha
    return lr


def check_steps(solver_cfg, end: int, unit: str = "iterations") -> list:
    """`solver.steps` for a run of `end` iterations (or epochs: `unit`). Steps at or past the end would never
    lower the lr, so they are dropped from `solver_cfg.steps` with one warning that names them; this is what
    lets a short run of a full schedule (`solver.max_iter=3`, `solver.epochs=8`) start at all. Detectron2
    drops them with a warning too. Steps that do not increase, or are not positive, are an error: no
    schedule means that. Returns the steps kept."""
    steps = list(solver_cfg.steps)
    if steps != sorted(steps) or any(s <= 0 for s in steps):
        raise ConfigError(f"solver.steps must be increasing positive {unit}, got {steps}")
    kept = [s for s in steps if s < end]
    # The cosine schedule ignores steps; in a distributed run rank 0 says it for all processes.
    if len(kept) < len(steps) and solver_cfg.lr_scheduler == "step" and is_main():
        logger.warning("solver.steps: the lr steps at %s %s are at or past the end of this run (%d %s) and are "
                       "dropped", unit, steps[len(kept):], end, unit)
    solver_cfg.steps = kept
    return kept


def check_batch_divides(batch: int, world_size: int):
    """The batch is split evenly between the processes; otherwise an error that names a batch that is."""
    if batch % world_size:
        raise ConfigError(f"solver.ims_per_batch={batch} is not divisible by the {world_size} processes of this "
                          f"run (it is the batch of all of them together); set solver.ims_per_batch="
                          f"{max(world_size, batch // world_size * world_size)}")


# Lengths counted in iterations, which the linear scaling rule stretches when the batch shrinks. A
# classification config counts its length and steps in epochs, which a smaller batch lengthens by itself.
ITERATION_KEYS = ("solver.max_iter", "solver.steps", "solver.warmup_iters", "solver.checkpoint_period",
                  "test.eval_period")
EPOCH_RUN_ITERATION_KEYS = ("solver.warmup_iters", "solver.checkpoint_period")


def scale_to_world_size(cfg, world_size: int, epochs: bool = False):
    """The batch this run trains with, and the lr and lengths that go with it, for a config written for
    `solver.reference_world_size` processes (Detectron2's REFERENCE_WORLD_SIZE) run by `world_size` of them.

    What the command line sets (`engine.config.overridden`) is taken literally: `solver.ims_per_batch=N`
    there is the batch of this run, all processes together, and `solver.max_iter=3` is 3 iterations.
    Without it the batch keeps the config's images per process: ims_per_batch / reference_world_size x
    world_size. Whichever batch B that gives, the values the command line did not set follow the linear
    scaling rule (Goyal et al. 2017) from the batch B0 the files were written for: base_lr x B / B0 (unless
    `solver.reference_batch_size` ties it to the batch already), and max_iter, steps, warmup_iters,
    checkpoint_period and test.eval_period x B0 / B, so that training sees as many images with the same
    lr schedule per image. A classification config (`epochs`) keeps its epochs and steps; only warmup_iters
    and checkpoint_period are iterations there. reference_world_size 0 takes the config as written,
    ims_per_batch included. Afterwards reference_world_size is world_size, so the config.yaml written is
    the one that ran, and a second call changes nothing. Changes `cfg` in place."""
    s = cfg.solver
    given = overridden(cfg)
    ref = s.reference_world_size
    file_batch = given.get("solver.ims_per_batch", s.ims_per_batch)
    if "solver.ims_per_batch" in given or ref == 0:
        batch = s.ims_per_batch
    elif file_batch % ref:
        fits = f"solver.ims_per_batch={max(world_size, file_batch * world_size // ref // world_size * world_size)}"
        literal = (", or solver.reference_world_size=0 to take the config as written"
                   if file_batch % world_size == 0 else "")
        raise ConfigError(f"solver.ims_per_batch={file_batch} is written for solver.reference_world_size={ref} "
                          f"processes, which does not give a whole number of images per process; set the batch of "
                          f"this run with {fits}{literal}")
    else:
        batch = file_batch // ref * world_size
    check_batch_divides(batch, world_size)
    if ref == 0:
        return
    scale = batch / file_batch
    s.ims_per_batch = batch
    if scale != 1:
        def iters(n: int) -> int:
            return max(int(round(n / scale)), 1) if n > 0 else n

        lr = s.base_lr
        if s.reference_batch_size == 0 and "solver.base_lr" not in given:
            s.base_lr = s.base_lr * scale
        keys = EPOCH_RUN_ITERATION_KEYS if epochs else ITERATION_KEYS
        changed = []
        for key in keys:
            section, name = key.split(".")
            value = cfg[section][name]
            if key in given:
                continue
            if name == "warmup_iters":
                cfg[section][name] = int(round(value / scale))  # 0 stays 0: no warm-up
            else:
                cfg[section][name] = [iters(v) for v in value] if isinstance(value, list) else iters(value)
            if cfg[section][name] != value:
                changed.append(key)
        why = ("solver.ims_per_batch given" if "solver.ims_per_batch" in given else
               f"{file_batch // ref} per process as written for {ref} processes, on {world_size}")
        kept = [k for k in ("solver.base_lr",) + keys if k in given]
        logger.info("solver: %d images per batch instead of the config's %d (%s); linear scaling rule: base_lr "
                    "%.4g -> %.4g, %s x %g%s", batch, file_batch, why, lr, s.base_lr,
                    ", ".join(changed) or "no iteration counts", 1 / scale,
                    f"; as given: {', '.join(kept)}" if kept else "")
    s.reference_world_size = world_size
    if "solver.ims_per_batch" in given:
        given["solver.ims_per_batch"] = batch  # now the batch the config is written for: a second call keeps it


def solver_summary(solver_cfg, world_size: int, length: str, step_unit: str = "iterations",
                   backend: str = "") -> str:
    """One line for the start of training: the batch (in all and per process, `backend` the processes'),
    the lr used, the run's `length` and the lr schedule that remains of `solver.steps`."""
    s = solver_cfg
    lr = s.base_lr * (s.ims_per_batch / s.reference_batch_size if s.reference_batch_size else 1.0)
    split = (f", {s.ims_per_batch // world_size} in each of {world_size} processes ({backend})"
             if world_size > 1 else " (1 process)")
    if s.lr_scheduler == "cosine":
        schedule = "cosine decay to 0"
    elif s.steps:
        schedule = f"x{s.gamma:g} at {step_unit} {list(s.steps)}"
    else:
        schedule = "no lr steps"
    warmup = f" after {s.warmup_iters} warm-up iterations" if s.warmup_iters else ""
    return f"{s.ims_per_batch} images per batch{split}, lr {lr:.4g}{warmup}, {length}, {schedule}"
