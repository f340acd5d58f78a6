"""Train a ResNet classifier on an ImageFolder layout.

    python tools/train_cls.py configs/demo/cls_shapes.yaml output_dir=output/cls solver.epochs=5
"""
import sys

from engine.classification import train_classifier
from engine.cli import parser_for, run
from engine.config import load_config


def main(argv=None):
    parser = parser_for(__doc__)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides")
    args = parser.parse_intermixed_args(argv)
    metrics = train_classifier(load_config(args.config, args.overrides))
    print(f"top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%")


if __name__ == "__main__":
    sys.exit(run(main))
