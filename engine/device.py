"""The `device` setting: "auto" picks CUDA when it is there, so one config runs on a laptop and a cluster."""
import os

import torch

from .errors import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device: {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} requested but CUDA is not available; use device=auto or cpu")
    return device


def setup_device(cfg) -> torch.device:
    """This process's device for training or evaluation. Under torchrun it joins the process group first
    (engine.distributed) and is the GPU of its local rank. cuDNN autotuning (`cudnn_benchmark`) is set for
    CUDA: worth it for fixed input sizes (classification); with varying detection image sizes each new size
    is tuned again."""
    from .distributed import init_distributed

    if cfg.deterministic:
        deterministic()
    device = init_distributed(resolve_device(cfg.device))
    if device.type == "cuda" and not cfg.deterministic:  # deterministic() has turned autotuning off
        torch.backends.cudnn.benchmark = bool(cfg.cudnn_benchmark)
    return device


def deterministic():
    """Deterministic algorithms only (`deterministic: true`), for runs that repeat bit for bit: an op
    without a deterministic implementation raises instead of running (torchvision's RoIAlign then takes
    its deterministic form on CUDA). cuBLAS needs its workspace setting before its first call, so this
    runs before the process touches the GPU; cuDNN picks deterministic kernels and does not autotune."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def pin_memory(cfg) -> bool:
    """Page-locked loader batches (`data.pin_memory`): faster, non-blocking host-to-GPU copies; nothing
    to gain without CUDA."""
    return bool(cfg.data.pin_memory) and resolve_device(cfg.device).type == "cuda"


def memory_format(cfg) -> torch.memory_format:
    """`model.channels_last`: NHWC activations, which convolution kernels (CUDA tensor cores, oneDNN on
    CPUs) run faster; the model's outputs are the same."""
    return torch.channels_last if cfg.model.channels_last else torch.contiguous_format
