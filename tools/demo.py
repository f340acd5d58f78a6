"""The end-to-end demo behind `make demo`: synthetic shapes, a ResNet-18 classifier trained on their
crops, evaluated on a validation split generated from a different seed.

    python tools/demo.py --output output/demo
"""
import argparse
import os
import sys
import time

from detection.data.synthetic import make_synthetic
from engine.classification import train_classifier
from engine.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="output/demo")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE overrides of the classifier config")
    args = parser.parse_args(argv)
    start = time.time()
    data = os.path.join(args.output, "data")
    make_synthetic(data, num_train=0, num_val=0, seed=0, crops_per_class=400)
    cfg = load_config(os.path.join(REPO, "configs/demo/cls_shapes.yaml"), [
        f"data.train.root={data}/crops/train", f"data.val.root={data}/crops/val",
        f"output_dir={args.output}/cls", *args.overrides])
    metrics = train_classifier(cfg)
    print(f"\nDemo finished in {time.time() - start:.0f} s; outputs in {cfg.output_dir}")
    print(f"{'task':<28}{'top-1 (%)':>10}{'top-5 (%)':>10}")
    print(f"{'shape classification (val)':<28}{metrics['top1']:>10.2f}{metrics['top5']:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
