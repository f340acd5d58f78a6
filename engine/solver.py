"""Optimizers and learning-rate schedules for the trainers, built from `solver.*`."""
import logging
import math

import torch

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


def check_steps(solver_cfg, max_iter: int, unit: str = "iterations"):
    steps = list(solver_cfg.steps)
    if steps != sorted(steps) or any(s <= 0 or s > max_iter for s in steps):
        raise ConfigError(f"solver.steps must be increasing {unit} within (0, {max_iter}], got {steps}")


def scale_to_world_size(cfg, world_size: int, epochs: bool = False):
    """Adapt a config written for `solver.reference_world_size` processes to `world_size` of them, keeping
    the images per process (Detectron2's REFERENCE_WORLD_SIZE; the linear scaling rule of Goyal et al.
    2017): ims_per_batch and base_lr scale by world_size / reference_world_size (base_lr only when
    `solver.reference_batch_size` does not already tie it to the batch), iteration counts by the inverse,
    so that training sees as many images, with the same lr schedule per image. A classification config
    (`epochs`) counts its length and steps in epochs; only warmup_iters and checkpoint_period are
    iterations there. Afterwards reference_world_size is world_size, so the config.yaml written is the one
    that ran. Changes `cfg` in place; nothing happens when reference_world_size is 0 or already world_size."""
    s = cfg.solver
    ref = s.reference_world_size
    if ref == 0 or ref == world_size:
        return
    if s.ims_per_batch % ref:
        raise ConfigError(f"solver.ims_per_batch={s.ims_per_batch} is not divisible by "
                          f"solver.reference_world_size={ref}")
    scale = world_size / ref
    old = (s.ims_per_batch, s.base_lr, s.max_iter)

    def iters(n: int) -> int:
        return max(int(round(n / scale)), 1) if n > 0 else n

    s.ims_per_batch = s.ims_per_batch // ref * world_size
    if s.reference_batch_size == 0:
        s.base_lr = s.base_lr * scale
    s.warmup_iters = int(round(s.warmup_iters / scale))
    s.checkpoint_period = iters(s.checkpoint_period)
    if not epochs:
        s.max_iter = iters(s.max_iter)
        s.steps = [iters(step) for step in s.steps]
        cfg.test.eval_period = iters(cfg.test.eval_period)
    s.reference_world_size = world_size
    logger.info("solver.reference_world_size %d -> %d processes: ims_per_batch %d -> %d, base_lr %.4g -> %.4g%s",
                ref, world_size, old[0], s.ims_per_batch, old[1], s.base_lr,
                "" if epochs else f", max_iter {old[2]} -> {s.max_iter}, steps {list(s.steps)}")
