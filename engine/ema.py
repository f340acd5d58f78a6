"""An exponential moving average (EMA) of a model's weights, evaluated and exported instead of the raw
weights when `solver.ema` is on.

Averaging the iterates (Polyak & Juditsky 1992) in its exponential form, as ImageNet recipes use it
(Szegedy et al. 2016, "Rethinking the Inception Architecture"; Tan & Le 2019, EfficientNet, decay 0.9999):
after every optimizer step, ema = decay * ema + (1 - decay) * weights. Buffers (BatchNorm running
statistics, counters) are copied rather than averaged: they are already averages of the current weights'
activations, and averaging them again would mix in statistics of weights the EMA has moved away from.
"""
import copy
from typing import Dict

import torch

from engine.errors import ConfigError


class ModelEMA:
    """`module` is a copy of the model holding the averaged weights; it never trains (eval mode, no
    gradients). With `decay` 0.9999 it averages over roughly the last 10,000 steps."""

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"solver.ema_decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module):
        for avg, current in zip(self.module.parameters(), model.parameters()):
            avg.lerp_(current.detach(), 1.0 - self.decay)
        for avg, current in zip(self.module.buffers(), model.buffers()):
            avg.copy_(current)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()}

    def load_state_dict(self, state: Dict[str, torch.Tensor]):
        self.module.load_state_dict(state)
