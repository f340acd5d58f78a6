"""Reading, checking and converting weights.

Files are read with `torch.load(weights_only=True)`: tensors and plain containers only, never arbitrary
pickled objects. Loading reports missing and unexpected keys by name; a shape mismatch is an error.
The project's checkpoint format is `{"model": state_dict, "meta": {...}}`; a bare state dict also loads.
"""
import inspect
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from engine.checkpoint import atomic_torch_save, safe_torch_load, verify_checksum
from engine.errors import CheckpointError
from engine.pickles import restricted_load

from .checkpoint_kind import Kind, checkpoint_kind
from .resnet import DEPTHS, STAGE_NAMES, BasicBlock, Bottleneck, ResNet

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


# timm's ResNet family (timm.models.resnet) keeps torchvision's names where the networks agree. Its deep stem
# (ResNet-C/D) is a Sequential `conv1` (conv, BN, ReLU, conv, BN, ReLU, conv) whose last norm keeps the name
# bn1; its ResNet-D shortcut is `downsample` = (AvgPool2d, 1x1 conv, BN).
TIMM_DEEP_STEM_KEYS = [
    ("conv1.0.", "stem.conv1."),
    ("conv1.1.", "stem.norm1."),
    ("conv1.3.", "stem.conv2."),
    ("conv1.4.", "stem.norm2."),
    ("conv1.6.", "stem.conv3."),
    ("bn1.", "stem.norm3."),
]
TIMM_AVG_DOWN_KEYS = [
    ("layer{s}.{b}.downsample.1.", "res{r}.{b}.shortcut.conv."),
    ("layer{s}.{b}.downsample.2.", "res{r}.{b}.shortcut.norm."),
]
# What timm ResNets have and this one does not, by a part of their keys: refused, never dropped.
TIMM_UNSUPPORTED = {
    ".se.": "squeeze-and-excitation or ECA attention (timm's seresnet*, ecaresnet*, resnetrs*)",
    "maxpool.": "a convolution in place of the stem's max pool (timm's resnetrs*)",
}


def timm_resnet_keys(deep_stem: bool, avg_down: bool):
    """TORCHVISION_RESNET_KEYS with the rows of timm's deep stem and average-pool shortcut in place of
    the rows of the parts they replace."""
    replaced = ("conv1.", "bn1.") if deep_stem else ()
    if avg_down:
        replaced += ("layer{s}.{b}.downsample.0.", "layer{s}.{b}.downsample.1.")
    return ((TIMM_DEEP_STEM_KEYS if deep_stem else []) + (TIMM_AVG_DOWN_KEYS if avg_down else []) +
            [row for row in TORCHVISION_RESNET_KEYS if row[0] not in replaced])


def resnet_config(state_dict) -> dict:
    """The `ResNet` arguments of the network a state dict in our names is from: depth, num_classes (None
    without a classifier), groups, width_per_group, norm (GN where there are no running statistics)
    and stem_type. GN's num_groups (32 in timm), dilation, stride_in_1x1 and avg_down change no tensor's
    name or shape, so no state dict tells them."""
    blocks = tuple(len({k.split(".")[1] for k in state_dict if k.startswith(f"{stage}.")})
                   for stage in STAGE_NAMES)
    block = Bottleneck if "res2.0.conv3.weight" in state_dict else BasicBlock
    depth = next((d for d, (b, n) in DEPTHS.items() if b is block and tuple(n) == blocks), None)
    if depth is None:
        known = ", ".join(f"{d}: {n}" for d, (b, n) in DEPTHS.items() if b is block)
        raise CheckpointError(f"{block.__name__} blocks {blocks} in res2..res5: no depth of this ResNet has "
                              f"them ({known})")
    # res2's 3x3 is (width, width / groups, 3, 3), and its width is groups x width_per_group.
    conv2 = state_dict["res2.0.conv2.weight"]
    groups = conv2.shape[0] // conv2.shape[1]
    fc = state_dict.get("fc.weight")
    return dict(depth=depth, num_classes=None if fc is None else len(fc),
                groups=groups, width_per_group=conv2.shape[0] // groups,
                norm="BN" if any(k.endswith(".running_mean") for k in state_dict) else "GN",
                stem_type="deep" if "stem.conv3.weight" in state_dict else "basic")


def config_overrides(config: dict) -> str:
    """`resnet_config`'s arguments as the config overrides that build that ResNet (defaults left out)."""
    defaults = {name: p.default for name, p in inspect.signature(ResNet).parameters.items()}
    settings = [f"model.backbone.{k}={str(v).lower() if isinstance(v, bool) else v}"
                for k, v in config.items() if k == "depth" or (k != "num_classes" and v != defaults[k])]
    return " ".join(settings + [f"model.num_classes={config['num_classes']}" if config["num_classes"]
                                else "(no classifier: a backbone)"])


def from_timm_resnet(state_dict) -> "Conversion":
    """A timm ResNet, ResNeXt or Wide ResNet state dict in our names, the 7x7 stem or ResNet-C/D (deep
    stem, average-pool shortcuts). What this ResNet cannot compute is refused and named: attention, other
    stems, depths it does not have. Anti-aliasing (timm's resnetaa*, resnetblur*) leaves no tensor in
    the file, so it cannot be detected: such a file converts, and our network computes something else.
    Builds nothing: `check_timm_resnet_fit` sees that the tensors fit the ResNet they describe."""
    deep_stem = "conv1.0.weight" in state_dict
    if "layer1.0.conv2.weight" not in state_dict or not (deep_stem or "conv1.weight" in state_dict):
        raise CheckpointError("not a timm ResNet state dict (that has 'layer1.0.conv2.weight', and "
                              "'conv1.weight' or a deep stem's 'conv1.0.weight'); keys start with "
                              f"{sorted(state_dict)[:5]}")
    if deep_stem:
        widths = [len(state_dict[f"conv1.{i}.weight"]) if f"conv1.{i}.weight" in state_dict else None
                  for i in (0, 3, 6)]
        if widths != [32, 32, 64]:
            raise CheckpointError(
                f"timm deep stem of {widths} channels (conv1.0, conv1.3, conv1.6) is not supported by this "
                "backbone, whose stem_type=deep has [32, 32, 64] (timm's resnet*c, resnet*d); [24, 32, 64] "
                "is timm's tiered stem (resnet*t), [64, 64, 128] its resnet*s")
    avg_down = any(re.match(r"layer\d+\.\d+\.downsample\.2\.", k) for k in state_dict)
    table = timm_resnet_keys(deep_stem, avg_down)
    converted, skipped = convert_keys(state_dict, table)
    if skipped:
        kinds = [what for part, what in TIMM_UNSUPPORTED.items() if any(part in k for k in skipped)]
        raise CheckpointError(
            f"timm ResNet with {len(skipped)} tensors this backbone has no module for "
            f"({'; '.join(kinds) or 'unknown layers'}): {', '.join(skipped[:8])}"
            f"{', ...' if len(skipped) > 8 else ''}; refused, since the network without them computes "
            "something else")
    config = dict(resnet_config(converted), avg_down=avg_down)
    return Conversion(converted, f"timm's ResNet, for {config_overrides(config)}", target=("timm_resnet", config))


def check_timm_resnet_fit(conversion: "Conversion"):
    """The tensors `from_timm_resnet` converted fit the ResNet of the arguments it read from them
    (`Conversion.target`), and that ResNet lacks none: shapes only, the network is built on the meta device.
    Problems are named as the timm file names them."""
    config = conversion.target[1]
    settings = config_overrides(config)
    with torch.device("meta"):  # nothing is allocated or initialised
        target = ResNet(**config)
    fit = check_fit(target.state_dict(), conversion.state_dict, f"timm ResNet ({settings})")
    if fit.missing or fit.unexpected:
        table = timm_resnet_keys(config["stem_type"] == "deep", config["avg_down"])
        problems = []
        for keys, what in ((fit.missing, "missing"), (fit.unexpected, "with no place in it")):
            theirs = list(convert_keys(dict.fromkeys(keys), table, reverse=True)[0])  # named as in the file
            if theirs:
                problems.append(f"{len(theirs)} {what}: {', '.join(theirs[:8])}{', ...' * (len(theirs) > 8)}")
        raise CheckpointError(f"timm ResNet that does not fit the network its tensors describe ({settings}); "
                              + "; ".join(problems))


def _read_pickle(path: str):
    """The weights in a Detectron2 or Caffe2 `.pkl` file, read by `restricted_load` (numpy arrays and plain
    containers only: a pickle that names any other global is refused unread), numpy arrays as tensors.
    Detectron2's model zoo files are {"model": {name: array}, "__author__": ...}; Caffe2/MSRA ImageNet
    files {"blobs": {name: array}} or the blobs themselves."""
    if not os.path.isfile(path):
        raise CheckpointError(f"weights file not found: {path!r}")
    try:
        verify_checksum(path, "weights file")
    except OSError as e:
        raise CheckpointError(f"cannot read weights file {path}: {e.strerror or e}") from None
    obj = restricted_load(path, CheckpointError, encoding="latin1")
    for key in ("model", "blobs"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        return obj
    # A copy, so that each tensor owns its storage (torch.from_numpy would share the array's).
    return {k: torch.from_numpy(np.array(v, copy=True)) if isinstance(v, (np.ndarray, np.generic)) else v
            for k, v in obj.items()}


def key_list(keys, most: int = 8) -> str:
    """Keys for a message: the first `most`, then how many more."""
    keys = list(keys)
    return ", ".join(keys[:most]) + (f" and {len(keys) - most} more" if len(keys) > most else "")


def read_weights(path: str) -> Dict[str, torch.Tensor]:
    """The state dict stored in `path`: our checkpoint format or a bare state dict (`torch.load` with
    weights_only=True), or a `.pkl` of numpy arrays from Detectron2 or Caffe2 (`_read_pickle`)."""
    obj = _read_pickle(path) if str(path).endswith(".pkl") else safe_torch_load(path, "weights file")
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


def check_fit(own: Dict[str, torch.Tensor], state_dict, source: str = "weights") -> LoadReport:
    """Which tensors of `state_dict` a model whose state dict is `own` would load, which it lacks and
    which it has no place for; a shape mismatch is an error naming every one."""
    # BatchNorm's step counter has no effect on the output and FrozenBN does not keep one.
    state_dict = {k: v for k, v in state_dict.items()
                  if not (k.endswith("num_batches_tracked") and k not in own)}
    mismatched = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        raise CheckpointError(f"{source} does not fit the model; shape mismatches:\n  " +
                              "\n  ".join(mismatched))
    return LoadReport(
        loaded=[k for k in state_dict if k in own],
        missing=[k for k in own if k not in state_dict and not k.endswith("num_batches_tracked")],
        unexpected=[k for k in state_dict if k not in own],
    )


def load_state_dict(module: nn.Module, state_dict, source: str = "weights", complete: str = "") -> LoadReport:
    """Load what fits, report the rest by name, and refuse shape mismatches (naming every one).
    `complete`: the state dict must hold every tensor of the module and no other; anything else is an error
    naming the tensors, before anything is loaded, and ending with this text (why, and what to do)."""
    report = check_fit(module.state_dict(), state_dict, source)
    if complete and (report.missing or report.unexpected):
        problems = [f"{len(keys)} {what}: {key_list(keys)}" for what, keys in (
            ("of the model's tensors are not in it", report.missing),
            ("of its tensors have no place in the model", report.unexpected)) if keys]
        raise CheckpointError(f"{source} does not cover the model: " + "; ".join(problems) + f". {complete}")
    module.load_state_dict(state_dict, strict=False)
    logger.info("%s: %s", source, report.summary())
    return report


@dataclass(frozen=True)
class Accepts:
    """What one setting (model.backbone.weights, a classifier's model.weights, a detector's --weights) takes:
    the kinds of file, as `checkpoint_kind` tells them, each with its converter to our names (None: in our
    names already). A file of another kind is refused, saying what it is, what the setting takes, where such a
    file goes instead and how to convert it."""
    expected: str  # "a ResNet classifier", for the refusal
    converters: Dict[Tuple[str, str], Optional[Callable]]  # (kind.source, kind.model) -> converter
    model: str = "model"  # "ResNet": "{setting}={path} has no tensor this ResNet uses"
    # kind.model of a file of ours or torchvision's -> where that file goes, for the refusal
    elsewhere: Dict[str, str] = field(default_factory=dict)

    def refusal(self, name: str, kind: Kind) -> CheckpointError:
        where = self.elsewhere.get(kind.model, "") if kind.source in ("ours", "torchvision") else ""
        return CheckpointError(f"{name} is {kind.description}, not {self.expected}{where}{kind.hint()}")


def load_weights(module: nn.Module, path: str, setting: str, accepts: Accepts, *,
                 missing_file: Optional[CheckpointError] = None, adapt=None, complete: str = "") -> LoadReport:
    """The one loading sequence of every weights setting: read `path` (given as `setting`), tell its kind,
    convert it to our names or refuse it (`accepts`), check that it fits `module` (a shape mismatch is an
    error naming every one), load it and log what was loaded and what was not.

    `missing_file`: the error for a path that is not a file (default: "{setting}={path} not found").
    `adapt(state_dict, kind, own_state_dict)`: the caller's rules between conversion and loading (a
    detector's class count and mask head); returns the state dict to load.
    `complete`: as in `load_state_dict`, for weights used as they are."""
    name = f"{setting}={path}"
    if not os.path.isfile(path):
        raise missing_file or CheckpointError(f"{name} not found")
    state = read_weights(path)
    kind = checkpoint_kind(state)
    if (kind.source, kind.model) not in accepts.converters:
        raise accepts.refusal(name, kind)
    convert = accepts.converters[kind.source, kind.model]
    state = convert(state) if convert else state
    own = module.state_dict()
    if adapt:
        state = adapt(state, kind, own)
    if not any(k in own for k in state):
        raise CheckpointError(f"{name} has no tensor this {accepts.model} uses: it is {kind.description}")
    return load_state_dict(module, state, name, complete)


@dataclass
class Conversion:
    """What a converter made of a state dict: the tensors to write, what the file was and is for, and the
    tensors it left out or filled in, grouped by the reason."""
    state_dict: Dict[str, torch.Tensor]
    what: str = ""
    skipped: Dict[str, List[str]] = field(default_factory=dict)  # reason -> input keys not written
    added: Dict[str, List[str]] = field(default_factory=dict)  # reason -> written keys the input lacks
    # The config file (relative to the repository) and overrides that build the model the tensors are for, where
    # the converter names one: detection.conversion.check.check_config_fit builds it to see that they fit.
    config: Tuple[str, ...] = ()
    # The model the tensors are for, where the converter names one by other than a config: (kind, arguments), as
    # ("timm_resnet", ResNet's arguments). detection.conversion.check.FIT_CHECKS[kind] builds it to see that they fit.
    target: Tuple = ()

    def summary(self, source: str, target: str) -> str:
        """One line of counts, then one line per reason naming every skipped key (added ones are counted)."""
        added, skipped = (sum(map(len, d.values())) for d in (self.added, self.skipped))
        line = f"converted {len(self.state_dict) - added} tensors"
        if added or skipped:
            line += f" ({added} added, {skipped} skipped)"
        lines = [line + (f" of {self.what}" if self.what else "") + f": {source} -> {target}"]
        lines += [f"  added {len(keys)}: {reason}" for reason, keys in self.added.items()]
        lines += [f"  skipped {len(keys)}: {reason}: {', '.join(keys)}" for reason, keys in self.skipped.items()]
        return "\n".join(lines)


def convert_file(in_path: str, out_path: str, converter, into_project_format: bool, verify=None) -> Conversion:
    """Read `in_path`, rename its keys with `converter` (which returns a state dict or a `Conversion`),
    `verify(conversion)` where given (raising CheckpointError, so that nothing is written), and write
    `out_path`: in the project's checkpoint format, or as the bare state dict other frameworks expect."""
    try:
        conversion = converter(read_weights(in_path))
        if not isinstance(conversion, Conversion):
            conversion = Conversion(conversion)
        if verify:
            verify(conversion)
    except CheckpointError as e:
        raise CheckpointError(f"{in_path}: {e}") from None
    if into_project_format:
        save_weights(out_path, conversion.state_dict, {"source": os.path.basename(in_path)})
    else:
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        torch.save(conversion.state_dict, out_path)
    return conversion
