"""Every config key the toolkit reads: its type, default, allowed values and a one-line description.

`engine.config` derives the defaults, the validation and the "did you mean" suggestions from `SCHEMA`,
so adding a key is one `Opt` line here and nothing else. Search this file for a key to find what it
means; search the code for the dotted key to find where it is used.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

NoneType = type(None)


@dataclass(frozen=True)
class Opt:
    """One config key.

    `type` is a type or a tuple of types; `None` in the tuple makes the key optional (`(str, None)`).
    `elem` is the element type of a list. `choices`, when given, lists every accepted value.
    """

    type: type | tuple
    default: Any
    choices: tuple | None = None
    elem: type | None = None
    help: str = ""

    def __post_init__(self):
        # A set would make the order of the values in error messages change from run to run.
        if self.choices is not None:
            object.__setattr__(self, "choices", tuple(self.choices))

    @property
    def types(self) -> tuple[type, ...]:
        spec = self.type if isinstance(self.type, tuple) else (self.type,)
        return tuple(NoneType if t is None else t for t in spec)


_NORMS = ("BN", "FrozenBN", "SyncBN", "GN")


def _split(name: str) -> dict:
    return {
        "root": Opt((str, None), None, help=f"directory of the {name} split; null: the default under data.root"),
        "ann_file": Opt((str, None), None, help=f"annotation file of the {name} split; null: the dataset's default"),
        "img_dir": Opt((str, None), None, help=f"image directory of the {name} split; null: the dataset's default"),
    }


SCHEMA: dict = {
    "model": {
        "name": Opt(str, "resnet_fpn", choices=("classifier", "resnet_fpn"), help="which model the builder makes"),
        "num_classes": Opt(int, 1000, help="number of classes of the classifier or detector head"),
        "weights": Opt((str, None), None, help="checkpoint for the whole model; null: none"),
        "backbone": {
            "depth": Opt(int, 50, choices=(18, 34, 50, 101, 152), help="ResNet depth"),
            "groups": Opt(int, 1, help="ResNeXt cardinality; 1 is a plain ResNet"),
            "width_per_group": Opt(int, 64, help="bottleneck width per group (64 = ResNet, 128 = wide ResNet)"),
            "norm": Opt(str, "BN", choices=_NORMS, help="normalization layer of the backbone"),
            "num_groups": Opt(int, 32, help="number of groups when norm is GN"),
            "freeze_at": Opt(int, 0, help="1 freezes the stem, k = 2..5 the stem and res2..res{k}; 0 trains all"),
            "stride_in_1x1": Opt(bool, False, help="put the bottleneck stride in the 1x1 conv (Caffe/MSRA style)"),
            "zero_init_residual": Opt(bool, False, help="zero the last norm of each residual branch (Goyal et al.)"),
            "dilation": Opt(list, [False, False, False], elem=bool, help="dilate, not stride, in res3, res4, res5"),
            "shortcut": Opt(str, "B", choices=("A", "B", "C"), help="shortcut option of He et al. 2016, Table 3"),
            "plain": Opt(bool, False, help="drop the shortcuts (the 'plain' networks of He et al. 2016)"),
            "out_features": Opt(list, ["res2", "res3", "res4", "res5"], elem=str, help="stages the backbone returns"),
            "weights": Opt((str, None), None, help="checkpoint for the backbone only; null: random init"),
        },
        "fpn": {
            "out_channels": Opt(int, 256, help="channels of every FPN output"),
            "norm": Opt(str, "", choices=("",) + _NORMS, help="normalization after FPN convs; '' for none"),
            "top_block": Opt(str, "maxpool", choices=("maxpool", "p6p7", "none"), help="levels above the last stage"),
        },
    },
    "input": {
        "size": Opt(int, 224, help="classification crop size"),
        "min_size_train": Opt(list, [800], elem=int, help="shorter side at training, one drawn per image"),
        "max_size_train": Opt(int, 1333, help="cap on the longer side at training"),
        "min_size_test": Opt(int, 800, help="shorter side at test"),
        "max_size_test": Opt(int, 1333, help="cap on the longer side at test"),
    },
    "data": {
        "root": Opt(str, "datasets", help="directory that holds the datasets"),
        "num_workers": Opt(int, 2, help="DataLoader worker processes"),
        "train": _split("training"),
        "val": _split("validation"),
    },
    "solver": {
        "base_lr": Opt(float, 0.1, help="learning rate for ims_per_batch images"),
        "momentum": Opt(float, 0.9, help="SGD momentum"),
        "weight_decay": Opt(float, 1e-4, help="SGD weight decay"),
        "ims_per_batch": Opt(int, 16, help="images per step, summed over all processes"),
        "max_iter": Opt(int, 1000, help="training length in iterations (detection)"),
        "epochs": Opt(int, 90, help="training length in epochs (classification)"),
        "steps": Opt(list, [], elem=int, help="iterations or epochs at which the step schedule multiplies lr by gamma"),
        "gamma": Opt(float, 0.1, help="lr factor at each of solver.steps"),
        "warmup_iters": Opt(int, 0, help="linear lr warm-up length in iterations; 0: none"),
        "lr_scheduler": Opt(str, "step", choices=("step", "cosine"), help="lr schedule"),
        "checkpoint_period": Opt(int, 5000, help="save a checkpoint every this many iterations"),
        "amp": Opt(bool, False, help="mixed-precision training"),
    },
    "test": {
        "eval_period": Opt(int, 0, help="evaluate every this many iterations; 0: only at the end"),
    },
    "output_dir": Opt(str, "output/default", help="where checkpoints, logs and config.yaml go"),
    "seed": Opt(int, 0, help="random seed"),
    "device": Opt(str, "auto", help="torch device; 'auto': cuda when available, else cpu"),
}


def defaults(schema: dict = SCHEMA) -> dict:
    """The default config as a fresh nested dict (list defaults are copied, so callers may mutate them)."""
    return {key: defaults(spec) if isinstance(spec, dict) else copy.deepcopy(spec.default)
            for key, spec in schema.items()}


def all_keys(include_sections: bool = False, schema: dict = SCHEMA, prefix: str = "") -> list[str]:
    """Every dotted key ("model.backbone.depth", ...); with `include_sections`, also "model", "model.backbone", ..."""
    keys = []
    for key, spec in schema.items():
        dotted = prefix + key
        if isinstance(spec, dict):
            if include_sections:
                keys.append(dotted)
            keys.extend(all_keys(include_sections, spec, dotted + "."))
        else:
            keys.append(dotted)
    return keys
