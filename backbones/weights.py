"""Reading, checking and converting weights.

Files are read with `torch.load(weights_only=True)`: tensors and plain containers only, never arbitrary
pickled objects. Loading reports missing and unexpected keys by name; a shape mismatch is an error.
The project's checkpoint format is `{"model": state_dict, "meta": {...}}`; a bare state dict also loads.
"""
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List

import torch
from torch import nn

from engine.checkpoint import atomic_torch_save, safe_torch_load
from engine.errors import CheckpointError

logger = logging.getLogger(__name__)

# torchvision ResNet key <-> our key, one line per kind of tensor. {s} is torchvision's layer index
# (layer1..layer4), {r} ours (res2..res5 = the paper's conv2_x..conv5_x), so r = s + 1.
TORCHVISION_RESNET_KEYS = [
    ("conv1.", "stem.conv1."),
    ("bn1.", "stem.norm1."),
    ("layer{s}.{b}.conv{k}.", "res{r}.{b}.conv{k}."),
    ("layer{s}.{b}.bn{k}.", "res{r}.{b}.norm{k}."),
    ("layer{s}.{b}.downsample.0.", "res{r}.{b}.shortcut.conv."),
    ("layer{s}.{b}.downsample.1.", "res{r}.{b}.shortcut.norm."),
    ("fc.", "fc."),
]


def _compile(fmt: str):
    """'layer{s}.{b}.' -> a regex with one integer group per {placeholder}."""
    pattern = re.sub(r"\\\{(\w+)\\\}", lambda m: f"(?P<{m[1]}>\\d+)", re.escape(fmt))
    return re.compile("^" + pattern)


def _rename(key: str, table, reverse: bool):
    for tv_fmt, our_fmt in table:
        src, dst = (our_fmt, tv_fmt) if reverse else (tv_fmt, our_fmt)
        m = _compile(src).match(key)
        if m:
            fields = {k: int(v) for k, v in m.groupdict().items()}
            if "s" in fields:
                fields["r"] = fields["s"] + 1
            if "r" in fields:
                fields["s"] = fields["r"] - 1
            return dst.format(**fields) + key[m.end():]
    return None


def convert_keys(state_dict: Dict[str, torch.Tensor], table=TORCHVISION_RESNET_KEYS, *,
                 reverse: bool = False, prefix_in: str = "", prefix_out: str = ""):
    """Rename keys from torchvision to ours (or back with `reverse`). Keys under `prefix_in` that no
    rule covers are returned separately as `skipped`, so the caller can report them."""
    converted, skipped = {}, []
    for key, value in state_dict.items():
        if not key.startswith(prefix_in):
            skipped.append(key)
            continue
        new = _rename(key[len(prefix_in):], table, reverse)
        if new is None:
            skipped.append(key)
        else:
            converted[prefix_out + new] = value
    return converted, skipped


def from_torchvision_resnet(state_dict):
    """A torchvision ResNet/ResNeXt/Wide-ResNet state dict in our names."""
    if "layer1.0.conv1.weight" not in state_dict or "conv1.weight" not in state_dict:
        raise CheckpointError("not a torchvision ResNet state dict (no 'conv1.weight' / "
                              "'layer1.0.conv1.weight'); keys start with "
                              f"{sorted(state_dict)[:5]}")
    converted, skipped = convert_keys(state_dict)
    if skipped:
        raise CheckpointError(f"torchvision ResNet state dict has keys no rule converts: {skipped[:10]}")
    return converted


def to_torchvision_resnet(state_dict):
    """Our ResNet state dict in torchvision's names (loads into torchvision's resnetXX, strict=True)."""
    converted, skipped = convert_keys(state_dict, reverse=True)
    if skipped:
        raise CheckpointError(f"keys with no torchvision equivalent: {skipped[:10]}")
    return converted


def read_weights(path: str) -> Dict[str, torch.Tensor]:
    """The state dict stored in `path` (our checkpoint format or a bare state dict)."""
    obj = safe_torch_load(path, "weights file")
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors (found {type(obj).__name__})")
    return obj


def save_weights(path: str, state_dict, meta=None):
    """Write `{"model": state_dict, "meta": meta}` atomically: a crash leaves no partial file at `path`."""
    atomic_torch_save({"model": dict(state_dict), "meta": dict(meta or {})}, path)


@dataclass
class LoadReport:
    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)

    def summary(self, what="weights"):
        lines = [f"loaded {len(self.loaded)} tensors of {what}"]
        if self.missing:
            lines.append(f"{len(self.missing)} missing (left at initialisation): {', '.join(self.missing)}")
        if self.unexpected:
            lines.append(f"{len(self.unexpected)} unexpected (ignored): {', '.join(self.unexpected)}")
        return "; ".join(lines)


def load_state_dict(module: nn.Module, state_dict, source: str = "weights") -> LoadReport:
    """Load what fits, report the rest by name, and refuse shape mismatches (naming every one)."""
    own = module.state_dict()
    # BatchNorm's step counter has no effect on the output and FrozenBN does not keep one.
    state_dict = {k: v for k, v in state_dict.items()
                  if not (k.endswith("num_batches_tracked") and k not in own)}
    mismatched = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        raise CheckpointError(f"{source} does not fit the model; shape mismatches:\n  " +
                              "\n  ".join(mismatched))
    report = LoadReport(
        loaded=[k for k in state_dict if k in own],
        missing=[k for k in own if k not in state_dict and not k.endswith("num_batches_tracked")],
        unexpected=[k for k in state_dict if k not in own],
    )
    module.load_state_dict(state_dict, strict=False)
    logger.info("%s: %s", source, report.summary())
    return report


def convert_file(in_path: str, out_path: str, converter, into_project_format: bool):
    """Read `in_path`, rename its keys with `converter`, write `out_path`: in the project's checkpoint
    format, or as the bare state dict other frameworks expect. Returns the number of tensors written."""
    converted = converter(read_weights(in_path))
    if into_project_format:
        save_weights(out_path, converted, {"source": os.path.basename(in_path)})
    else:
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        torch.save(converted, out_path)
    return len(converted)
