"""Normalisation layers selectable by name: BN, FrozenBN, SyncBN, GN.

Detection fine-tunes with batches of 1-2 images per device, where batch statistics are noise, so the
reference detectors freeze BN into a fixed affine transform (FrozenBN) or synchronise it across devices
(SyncBN) or use GroupNorm (Wu & He 2018), which does not depend on the batch at all.
"""
import torch
from torch import nn

from engine.errors import ConfigError

NORMS = ("BN", "FrozenBN", "SyncBN", "GN")


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine parameters, all stored as buffers.

    The state dict has the same keys as nn.BatchNorm2d (minus num_batches_tracked), so ImageNet
    checkpoints load into it unchanged.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A BatchNorm2d checkpoint carries a step counter that has no meaning once statistics are frozen.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def scale_and_shift(self):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return scale, self.bias - self.running_mean * scale

    def forward(self, x):
        scale, shift = self.scale_and_shift()
        return x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)

    @classmethod
    def convert_frozen_batchnorm(cls, module: nn.Module) -> nn.Module:
        """Replace every BatchNorm2d/SyncBatchNorm in `module` (or `module` itself) with a frozen copy."""
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            frozen = cls(module.num_features, module.eps)
            if module.affine:
                frozen.weight.copy_(module.weight.detach())
                frozen.bias.copy_(module.bias.detach())
            if module.track_running_stats:
                frozen.running_mean.copy_(module.running_mean)
                frozen.running_var.copy_(module.running_var)
            return frozen
        for name, child in module.named_children():
            new = cls.convert_frozen_batchnorm(child)
            if new is not child:
                setattr(module, name, new)
        return module

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}"


def get_norm(norm: str, channels: int, num_groups: int = 32) -> nn.Module:
    """A norm layer by name. `num_groups` is only used by GN (32 groups, Wu & He 2018)."""
    if norm == "BN":
        return nn.BatchNorm2d(channels)
    if norm == "FrozenBN":
        return FrozenBatchNorm2d(channels)
    if norm == "SyncBN":
        # Falls back to plain BN statistics when torch.distributed is not initialised.
        return nn.SyncBatchNorm(channels)
    if norm == "GN":
        if channels % num_groups:
            raise ConfigError(f"GroupNorm with {num_groups} groups needs channels divisible by it; "
                              f"got {channels} channels (set num_groups to a divisor)")
        return nn.GroupNorm(num_groups, channels)
    raise ConfigError(f"unknown norm {norm!r}; valid values: {', '.join(NORMS)}")
