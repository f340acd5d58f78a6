"""Training checkpoints: everything a run needs to continue (model, optimizer, AMP scaler, iteration,
RNG states), written atomically, plus a `last_checkpoint` pointer that never names a partial file.

Files hold tensors, numbers, strings and plain containers only, so they load with
`torch.load(weights_only=True)`; the RNG states are stored as tensors and ints for that reason.

Checksums: `Checkpointer.save` writes `<file>.sha256` (sha256sum's format) next to each checkpoint, and a
weights file named `<name>-<8 to 64 hex digits, at least one a letter>.pth` (the convention of published
weights) carries the start of its sha256 in its name. `verify_checksum`, which every loader calls before reading a file, checks
both where present.
"""
import hashlib
import os
import pickle
import random
import re
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


SIDECAR_SUFFIX = ".sha256"
# torchvision's and timm's published weights: resnet50-0676ba61.pth, the digits the start of the sha256.
# At least one of them a letter: a date or a run number (model-20240115.pth) is not a hash. (A real
# 8-digit prefix has no letter one time in 43; that file is then simply not checked.)
_HASH_IN_NAME = re.compile(r"-((?=[0-9a-fA-F]*[a-fA-F])[0-9a-fA-F]{8,64})\.pth$")
_CHUNK = 1 << 20


def sha256_file(path: str) -> str:
    """The file's sha256 in hex, read in 1 MB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_checksum(path: str) -> str:
    """Write `<path>.sha256` in sha256sum's format (`<hex>  <name>`, checkable with `sha256sum -c` in the
    file's folder) and return the hash."""
    path = os.fspath(path)
    digest = sha256_file(path)
    line = f"{digest}  {os.path.basename(path)}\n"
    atomic_write(path + SIDECAR_SUFFIX, lambda f: f.write(line.encode()))
    return digest


def verify_checksum(path: str, what: str = "checkpoint") -> None:
    """CheckpointError when `path` does not have the sha256 its name (`name-<hex>.pth`) or its
    `<path>.sha256` sidecar records; nothing to check (and nothing read) when it has neither."""
    path = os.fspath(path)
    in_name = _HASH_IN_NAME.search(os.path.basename(path))
    sidecar = path + SIDECAR_SUFFIX
    recorded = None
    if os.path.isfile(sidecar):
        try:
            with open(sidecar, encoding="ascii") as f:
                fields = f.read().split()
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"cannot read the checksum file {sidecar} of {what} {path}: "
                                  f"{getattr(e, 'strerror', None) or e}") from None
        if not fields or not re.fullmatch(r"[0-9a-fA-F]{64}", fields[0]):
            raise CheckpointError(f"{sidecar}, the checksum file of {what} {path}, does not start with a "
                                  "sha256 (64 hex digits); delete it to load the file unchecked")
        recorded = fields[0].lower()
    if in_name is None and recorded is None:
        return
    actual = sha256_file(path)
    if in_name is not None:
        expected = in_name[1].lower()
        if not actual.startswith(expected):
            raise CheckpointError(
                f"checksum mismatch for {what} {path}: its name says its sha256 starts with {expected}, the "
                f"file's starts with {actual[:len(expected)]}; the file is damaged or incomplete (download "
                "it again), or it was renamed: names ending in -<hex digits>.pth carry the start of the "
                "file's sha256")
    if recorded is not None and actual != recorded:
        raise CheckpointError(
            f"checksum mismatch for {what} {path}: its sha256 is {actual}, but {sidecar} records {recorded}; "
            "the file was changed or damaged after it was written")


def _torch_load_problem(message: str) -> str:
    """The line of torch's weights_only refusal that names what was refused."""
    lines = [l.strip() for l in message.splitlines() if l.strip()]
    named = [l for l in lines if "GLOBAL" in l or "nsupported" in l]
    return (named or lines or ["no detail"])[0]


def _sniff(path: str, what: str) -> None:
    """CheckpointError for files that are plainly not torch.save's: empty, text, a Git LFS pointer."""
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        raise CheckpointError(f"{what} {path} is empty (0 bytes): an interrupted download, copy or save?")
    if head.startswith(b"version https://git-lfs"):
        raise CheckpointError(f"{what} {path} is a Git LFS pointer, not the weights: fetch the file "
                              "(git lfs pull) or download it again")
    # torch.save writes a zip archive; files from before PyTorch 1.6 are pickles (protocol 2+: 0x80).
    if not head.startswith((b"PK\x03\x04", b"\x80")):
        raise CheckpointError(f"{what} {path} is not a PyTorch file (neither a zip archive nor a pickle): it "
                              f"starts with {head[:24]!r}")


def safe_torch_load(path: str, what: str = "checkpoint"):
    """`torch.load(weights_only=True)` on CPU: tensors and plain containers only, after `verify_checksum`.
    Any failure is one CheckpointError naming the file; a file with pickled code is refused unrun.
    Every torch.load of the toolkit goes through here."""
    if not path or not os.path.isfile(path):
        raise CheckpointError(f"{what} not found: {path!r}")
    try:
        _sniff(path, what)
        verify_checksum(path, what)
    except OSError as e:
        raise CheckpointError(f"cannot read {what} {path}: {e.strerror or e}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refusing to load {what} {path}: it holds Python objects beyond tensors and "
                              f"plain containers, which could run code ({_torch_load_problem(str(e))})") from None
    except Exception as e:  # truncated or foreign files raise RuntimeError, EOFError, ...
        detail = " ".join(str(e).split())
        raise CheckpointError(f"cannot read {what} {path} (truncated or not a PyTorch file?): "
                              f"{type(e).__name__}: {detail[:300]}") from None


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
        # The old checksum goes first: a crash before the new one is written leaves no sidecar (the file
        # loads unchecked), never one that does not match.
        if os.path.exists(path + SIDECAR_SUFFIX):
            os.remove(path + SIDECAR_SUFFIX)
        atomic_torch_save(state, path)
        write_checksum(path)
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
                if os.path.exists(self.path(name) + SIDECAR_SUFFIX):
                    os.remove(self.path(name) + SIDECAR_SUFFIX)

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
