"""Parameters and GFLOPs per stage of a named architecture or of a config's model.

    python tools/model_stats.py resnet50
    python tools/model_stats.py resnet_fpn --depth 101 --input-size 800 1216
    python tools/model_stats.py cifar_resnet56 --input-size 32 32
    python tools/model_stats.py configs/cls_demo.yaml
"""
import sys

import torch

import backbones
from detection.build import build_model
from backbones.stats import format_stats, model_stats
from engine.cli import parser_for, run
from engine.config import load_config
from engine.errors import ConfigError


def build_by_name(name: str, depth: int):
    if name in backbones.ARCHITECTURES:
        return backbones.ARCHITECTURES[name]()
    if name == "resnet_fpn":
        return backbones.resnet_fpn(depth)
    if name.startswith("cifar_resnet") and name[len("cifar_resnet"):].isdigit():
        return backbones.cifar_resnet(int(name[len("cifar_resnet"):]))
    raise ConfigError(f"unknown model {name!r}; give a config file or one of: "
                       f"{', '.join(backbones.ARCHITECTURES)}, resnet_fpn, cifar_resnet<6n+2>")


def main(argv=None):
    parser = parser_for(__doc__)
    parser.add_argument("model", help="architecture name or YAML config")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides")
    parser.add_argument("--input-size", type=int, nargs=2, default=None, metavar=("H", "W"))
    parser.add_argument("--depth", type=int, default=50, help="depth for resnet_fpn")
    args = parser.parse_intermixed_args(argv)
    with torch.device("meta"):  # count without allocating weights
        if args.model.endswith((".yaml", ".yml")):
            model = build_model(load_config(args.model, args.overrides))
        else:
            model = build_by_name(args.model, args.depth)
    size = args.input_size or ((32, 32) if args.model.startswith("cifar") else (224, 224))
    print(f"{args.model} at {size[0]}x{size[1]}")
    print(format_stats(model_stats(model, size)))


if __name__ == "__main__":
    sys.exit(run(main))
