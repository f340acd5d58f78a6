"""Data-parallel training on torch.distributed, launched by `torchrun`.

`torchrun` starts one process per device and gives each its place in the job through the environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). `init_distributed` reads it and joins the
process group: NCCL between GPUs, gloo between CPU processes. Without torchrun (WORLD_SIZE unset or 1)
every helper here is the single-process identity, so the same code runs with and without it.

Rank 0 is the main process: it alone writes logs, checkpoints, metrics and TensorBoard files. The other
ranks compute and take part in the collectives.
"""
import os
from typing import Any, List, Optional

import torch
import torch.distributed as dist

from engine.errors import ConfigError, TrainingError

def launched() -> bool:
    """Whether this process is one of several started by torchrun (or another launcher that sets
    WORLD_SIZE and RANK the same way)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def backend() -> str:
    """The process group's backend ("nccl", "gloo"); "none" in a single process."""
    return str(dist.get_backend()) if is_initialized() else "none"


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def rank_prefix() -> str:
    """"rank N: " for messages in a distributed run, "" otherwise."""
    return f"rank {rank()}: " if world_size() > 1 else ""


def init_distributed(device: torch.device) -> torch.device:
    """Join the process group when launched by torchrun and return this process's device: `cuda:LOCAL_RANK`
    for CUDA (one GPU per process), the CPU otherwise. Single-process runs get `device` back unchanged."""
    if not launched():
        return device
    if device.type == "cuda":
        if device.index not in (None, local_rank()):
            raise ConfigError(f"device={device} under torchrun: each process uses the GPU of its local rank; "
                              "set device=cuda or device=auto")
        if local_rank() >= torch.cuda.device_count():
            raise ConfigError(f"local rank {local_rank()} has no GPU: this machine has "
                              f"{torch.cuda.device_count()}; start at most that many processes per node")
        torch.cuda.set_device(local_rank())
        device, backend = torch.device("cuda", local_rank()), "nccl"
    else:
        backend = "gloo"
    if not is_initialized():
        for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
            if key not in os.environ:
                raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} is set but {key} is not: start "
                                  "distributed runs with torchrun (see docs/training.md)")
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, **kwargs)
    return device


def shutdown():
    if is_initialized():
        dist.destroy_process_group()


def wrap_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model` for the training step: wrapped in DistributedDataParallel when there are several processes
    (it averages the gradients during backward), as is otherwise.

    Buffers are not broadcast before every step: frozen BN holds constants, SyncBN's statistics agree by
    construction, and `sync_buffers` makes plain BN's agree before evaluation and checkpoints."""
    if world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # Parameters and buffers are copied from rank 0 once, here; not again before every forward.
    return DistributedDataParallel(model, device_ids=ids, output_device=device.index if ids else None,
                                   forward_sync_buffers=False)


def sync_buffers(model: torch.nn.Module, parameters: bool = False):
    """Copy rank 0's buffers (BN running statistics), and its parameters when asked, to every rank, so
    that all ranks evaluate the weights that rank 0 saves."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for tensor in [*model.buffers(), *(model.parameters() if parameters else ())]:
            dist.broadcast(tensor, 0)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum over ranks (in place; returned for chaining)."""
    if world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


class _AllReduceSum(torch.autograd.Function):
    """y = sum over ranks of x; every rank's x contributes to every rank's y, so the gradient of x is the
    sum over ranks of the gradients of y."""

    @staticmethod
    def forward(ctx, tensor):
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def all_reduce_sum_differentiable(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks as a new tensor that autograd differentiates (SyncBN's statistics)."""
    return _AllReduceSum.apply(tensor) if world_size() > 1 else tensor


def gather_to_main(obj: Any) -> Optional[List[Any]]:
    """Every rank's `obj` in rank order on rank 0, None elsewhere. Objects travel pickled between the
    processes of this job; nothing read from outside goes through here."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn, *args):
    """`fn(*args)` run by rank 0 alone, its result returned on every rank. When it raises, rank 0 raises
    that error and the other ranks a TrainingError naming it, so that no process waits for a result that
    will not come."""
    if world_size() == 1:
        return fn(*args)
    result = error = None
    if is_main():
        try:
            result = fn(*args)
        except Exception as e:  # re-raised below, after the other ranks have been told
            error = e
    result, failed = broadcast_from_main((result, None if error is None else f"{type(error).__name__}: {error}"))
    if error is not None:
        raise error
    if failed is not None:
        raise TrainingError(f"rank 0 failed ({failed}); see its message above")
    return result


def barrier():
    if world_size() > 1:
        dist.barrier()


def shard(size: int, rank_: Optional[int] = None, world: Optional[int] = None) -> range:
    """Rank `rank_`'s contiguous share of `size` items (this process's by default): the shares differ by at
    most one item and, concatenated in rank order, are 0 .. size - 1, so gathered results keep the order."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    if not 0 <= rank_ < world:
        raise ValueError(f"rank {rank_} is not in [0, world_size={world})")
    share, extra = divmod(size, world)
    start = rank_ * share + min(rank_, extra)
    return range(start, start + share + (rank_ < extra))


def is_peer_failure(error: BaseException) -> bool:
    """Whether `error` is a collective that failed because another process of the job is gone (crashed,
    killed, unreachable) rather than a bug in this one."""
    if world_size() == 1:
        return False
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(s in text for s in (
        "Connection closed by peer", "Connection reset by peer", "gloo", "NCCL", "Broken pipe", "timed out"))
