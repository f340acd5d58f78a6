"""Training checkpoints: everything a run needs to continue (model, optimizer, AMP scaler, iteration,
RNG states), written atomically, plus a `last_checkpoint` pointer that never names a partial file.

Files hold tensors, numbers, strings and plain containers only, so they load with
`torch.load(weights_only=True)`; the RNG states are stored as tensors and ints for that reason.
"""
import os
import pickle
import random
from typing import Any, Dict, Optional

import numpy as np
import torch

from engine.errors import CheckpointError

LAST_CHECKPOINT = "last_checkpoint"


def atomic_write(path: str, write):
    """Call `write(file)` on a temporary file next to `path`, fsync it, then rename it over `path`: a
    crash at any point leaves either the old file or the new one, never a partial file."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    # The rename itself is durable only once the directory entry is on disk.
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_torch_save(obj, path: str):
    atomic_write(path, lambda f: torch.save(obj, f))


def safe_torch_load(path: str, what: str = "checkpoint"):
    """`torch.load(weights_only=True)` on CPU: tensors and plain containers only. Any failure is one
    CheckpointError naming the file; a file with pickled code is refused."""
    if not path or not os.path.isfile(path):
        raise CheckpointError(f"{what} not found: {path!r}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refusing to load {path}: it holds Python objects beyond tensors and plain "
                              f"containers, which could run code ({str(e).splitlines()[0]})") from None
    except Exception as e:  # truncated or foreign files raise RuntimeError, EOFError, ...
        raise CheckpointError(f"cannot read {what} {path}: {type(e).__name__}: {e}") from None


def load_checkpoint_file(path: str) -> Dict[str, Any]:
    """A training checkpoint dict, read with `safe_torch_load`."""
    obj = safe_torch_load(path)
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        raise CheckpointError(f"{path} is not a training checkpoint (no 'model' state dict)")
    return obj


def rng_state() -> Dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": (py[0], list(py[1]), py[2]),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """Saves `model_{iteration:07d}.pth` files under `output_dir` and points `last_checkpoint` at the
    newest one. Only `keep` periodic checkpoints are kept (0 keeps all)."""

    def __init__(self, output_dir: str, keep: int = 0):
        self.output_dir = output_dir
        self.keep = keep

    def path(self, name: str) -> str:
        return os.path.join(self.output_dir, name)

    def save(self, name: str, model: torch.nn.Module, iteration: int, optimizer=None, scaler=None,
             **extra) -> str:
        state = {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                 "iteration": int(iteration), "rng": rng_state(), **extra}
        if optimizer is not None:
            state["optimizer"] = optimizer.state_dict()
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        path = self.path(name)
        atomic_torch_save(state, path)
        atomic_write(self.path(LAST_CHECKPOINT), lambda f: f.write(name.encode()))
        self._prune(name)
        return path

    def _prune(self, newest: str):
        if self.keep <= 0:
            return
        periodic = sorted(f for f in os.listdir(self.output_dir)
                          if f.startswith("model_") and f.endswith(".pth") and f[6:-4].isdigit())
        for name in periodic[:-self.keep]:
            if name != newest:
                os.remove(self.path(name))

    def last(self) -> Optional[str]:
        """Path of the checkpoint `last_checkpoint` names, or None when there is none."""
        pointer = self.path(LAST_CHECKPOINT)
        if not os.path.isfile(pointer):
            return None
        with open(pointer) as f:
            name = f.read().strip()
        path = self.path(name)
        if not name or os.sep in name or not os.path.isfile(path):
            raise CheckpointError(f"{pointer} names {name!r}, which is not a checkpoint file in {self.output_dir}; "
                                  "delete the pointer to start over, or point it at an existing model_*.pth")
        return path

    def resume(self, model: torch.nn.Module, optimizer=None, scaler=None) -> Dict[str, Any]:
        """Load the last checkpoint into model/optimizer/scaler and restore the RNG states. Returns the
        checkpoint dict (its `iteration` is where training continues); CheckpointError when there is none."""
        path = self.last()
        if path is None:
            raise CheckpointError(f"--resume: no {LAST_CHECKPOINT} in {self.output_dir}; nothing to resume "
                                  "(drop --resume to start a new run)")
        state = load_checkpoint_file(path)
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as e:
            raise CheckpointError(f"{path} does not fit the configured model: {e}") from None
        if optimizer is not None and "optimizer" in state:
            optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        if "rng" in state:
            set_rng_state(state["rng"])
        state["path"] = path
        return state
