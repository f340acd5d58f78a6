"""Normalisation layers selectable by name: BN, FrozenBN, SyncBN, GN.

Detection fine-tunes with batches of 1-2 images per device, where batch statistics are noise, so the
reference detectors freeze BN into a fixed affine transform (FrozenBN) or synchronise it across devices
(SyncBN) or use GroupNorm (Wu & He 2018), which does not depend on the batch at all.
"""
import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import ConfigError
from engine.sync_batchnorm import SyncBatchNorm2d  # noqa: F401 (the SyncBN layer, by name)

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


def fixed_affine(norm: nn.Module):
    """(scale, shift) of a norm that is a fixed per-channel affine map: FrozenBN, or BatchNorm in eval mode
    with running statistics; None for any other (training BN, GN, none)."""
    if isinstance(norm, FrozenBatchNorm2d):
        return norm.scale_and_shift()
    if isinstance(norm, nn.modules.batchnorm._BatchNorm) and not norm.training and norm.track_running_stats:
        scale = (norm.running_var + norm.eps).rsqrt()
        shift = -norm.running_mean * scale
        if norm.affine:
            scale, shift = scale * norm.weight, shift * norm.weight + norm.bias
        return scale, shift
    return None


class FoldsNorms:
    """A module whose Conv2d -> norm pairs run as `conv_norm`. Folding is the module's own switch,
    `fold_norms` (on by default), set for a whole model by `set_norm_folding` or `unfolded_norms`."""

    fold_norms: bool = True


def set_norm_folding(model: nn.Module, enabled: bool) -> nn.Module:
    """Turn folding on or off in every FoldsNorms module of `model` (`model` itself included)."""
    for module in model.modules():
        if isinstance(module, FoldsNorms):
            module.fold_norms = enabled
    return model


@contextlib.contextmanager
def unfolded_norms(model: nn.Module):
    """Within the block, `model` runs each norm after its convolution as it is written, never folded: the
    arithmetic of frameworks that do not fold (torchvision, Detectron2), to the last bit, for tests that
    compare with them exactly. Each module's own setting comes back afterwards."""
    saved = [(m, m.fold_norms) for m in model.modules() if isinstance(m, FoldsNorms)]
    set_norm_folding(model, False)
    try:
        yield model
    finally:
        for module, fold in saved:
            module.fold_norms = fold


def conv_norm(conv: nn.Conv2d, norm: nn.Module, x: torch.Tensor, fold: bool = True) -> torch.Tensor:
    """norm(conv(x)). Where the norm is a fixed affine map (FrozenBN, BN in eval mode) and `fold` is on, it
    is folded into the convolution's weights and bias: one pass over the output instead of three (conv,
    multiply, add), in the forward pass and in the backward pass, and no extra activation kept for the
    gradient. The result is the same up to float rounding; when the convolution trains, its gradient is
    the folded weight's times the scale, the same gradient."""
    # A padding mode other than zeros pads the input before the convolution (nn.Conv2d does that itself):
    # such a convolution runs unfolded rather than repeat its padding here.
    if fold and conv.padding_mode == "zeros":
        affine = fixed_affine(norm)
        if affine is not None:
            scale, shift = affine
            weight = conv.weight * scale.view(-1, 1, 1, 1).to(conv.weight.dtype)
            bias = shift if conv.bias is None else conv.bias * scale + shift
            return F.conv2d(x, weight, bias.to(conv.weight.dtype), conv.stride, conv.padding, conv.dilation,
                            conv.groups)
    return norm(conv(x))


class FoldedSequential(FoldsNorms, nn.Sequential):
    """nn.Sequential whose Conv2d -> norm pairs run as `conv_norm` (same modules, same state dict keys)."""

    def forward(self, x):
        if torch.jit.is_scripting():
            # TorchScript passes no modules to functions: there, each module in turn, norms unfolded.
            for module in self:
                x = module(x)
            return x
        modules = list(self)
        i = 0
        while i < len(modules):
            if isinstance(modules[i], nn.Conv2d) and i + 1 < len(modules):
                x = conv_norm(modules[i], modules[i + 1], x, self.fold_norms)
                i += 2
            else:
                x = modules[i](x)
                i += 1
        return x


def get_norm(norm: str, channels: int, num_groups: int = 32) -> nn.Module:
    """A norm layer by name. `num_groups` is only used by GN (32 groups, Wu & He 2018)."""
    if norm == "BN":
        return nn.BatchNorm2d(channels)
    if norm == "FrozenBN":
        return FrozenBatchNorm2d(channels)
    if norm == "SyncBN":
        return SyncBatchNorm2d(channels)
    if norm == "GN":
        if channels % num_groups:
            raise ConfigError(f"GroupNorm with {num_groups} groups needs channels divisible by it; "
                              f"got {channels} channels (set num_groups to a divisor)")
        return nn.GroupNorm(num_groups, channels)
    raise ConfigError(f"unknown norm {norm!r}; valid values: {', '.join(NORMS)}")
