"""SyncBN: BatchNorm whose training statistics are those of the whole batch, over every process of a
distributed run.

Between GPUs the layers are torch's own `nn.SyncBatchNorm`, with its fused CUDA kernels:
`use_torch_sync_batchnorm` swaps them in (through `nn.SyncBatchNorm.convert_sync_batchnorm`) when the
trainer wraps a model for DistributedDataParallel on CUDA. Torch has no SyncBatchNorm for CPU processes
(gloo) and DistributedDataParallel refuses `nn.SyncBatchNorm` on the CPU, so the layer the model is built
with, `SyncBatchNorm2d`, computes the statistics with two differentiable all-reduces of its own. It is kept
off the CUDA path, where torch's kernels do the same in fewer passes.
"""
import torch
from torch import nn

from engine.distributed import all_reduce_sum_differentiable as all_reduce, world_size


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d over the whole batch of every process. The per-channel sums are added up across the
    processes with a differentiable all-reduce, so gradients flow through the shared statistics as through
    one process's BN over the whole batch. Alone (one process, or evaluation) it is plain BatchNorm; the
    state dict is BatchNorm2d's, and nn.SyncBatchNorm's."""

    def forward(self, x):
        if not self.training or world_size() == 1:
            return super().forward(x)
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


def use_torch_sync_batchnorm(model: nn.Module) -> nn.Module:
    """`model` with every SyncBatchNorm2d replaced, in place, by torch's nn.SyncBatchNorm holding the same
    parameter and buffer tensors (an optimizer built on `model` keeps training them; the state dict is
    unchanged). Other norms stay as they are. Returns the model (the new layer when `model` is one)."""
    if isinstance(model, SyncBatchNorm2d):
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, SyncBatchNorm2d):
                setattr(parent, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
    return model


def for_device(model: nn.Module, device: torch.device) -> nn.Module:
    """The model the trainer wraps: on CUDA with several processes, with torch's SyncBatchNorm
    (`use_torch_sync_batchnorm`); otherwise as it is."""
    if device.type == "cuda" and world_size() > 1:
        return use_torch_sync_batchnorm(model)
    return model
