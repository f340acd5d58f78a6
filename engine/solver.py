"""Optimizers and learning-rate schedules for the trainers, built from `solver.*`."""
import math

import torch

from engine.errors import ConfigError

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
