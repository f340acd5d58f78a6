"""Normalisation layers selectable by name: BN, FrozenBN, SyncBN, GN.

Detection fine-tunes with batches of 1-2 images per device, where batch statistics are noise, so the
reference detectors freeze BN into a fixed affine transform (FrozenBN) or synchronise it across devices
(SyncBN) or use GroupNorm (Wu & He 2018), which does not depend on the batch at all.
"""
import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from engine.distributed import all_reduce_sum_differentiable as all_reduce, world_size
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


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics are those of the whole batch, over every process of a
    distributed run (SyncBN). On GPUs it runs torch's fused SyncBatchNorm kernels. Between CPU processes
    (gloo), for which torch has none, the per-channel sums are added up with a differentiable all-reduce,
    so gradients flow through the shared statistics as through one process's BN over the whole batch.
    Alone (one process, or evaluation) it is plain BatchNorm; the state dict is BatchNorm2d's.

    It is not an nn.SyncBatchNorm, which DistributedDataParallel refuses on the CPU."""

    process_group = None  # what nn.SyncBatchNorm.forward reads: the default group, all processes
    _check_non_zero_input_channels = nn.SyncBatchNorm._check_non_zero_input_channels

    def forward(self, x):
        if not self.training or world_size() == 1:
            return super().forward(x)
        if x.device.type != "cpu":
            return nn.SyncBatchNorm.forward(self, x)

        self._check_input_dim(x)
        channels = x.shape[1]
        dims = [0, 2, 3]
        shape = (1, -1, 1, 1)
        sums = all_reduce(torch.cat([x.sum(dims), x.new_tensor([x.numel() / channels])]))
        count = sums[channels]
        mean = sums[:channels] / count
        centred = x - mean.view(shape)
        var = all_reduce(centred.square().sum(dims)) / count  # two passes: no E[x^2] - E[x]^2 cancellation
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(var.detach() * count / (count - 1).clamp(min=1), momentum)
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


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
