"""The end-to-end demo behind `make demo`: synthetic shapes, a ResNet-18 classifier trained on their
crops, evaluated on a validation split generated from a different seed.

    python tools/demo.py --output output/demo
"""
import argparse
import os
import sys
import time

from detection.data.synthetic import VAL_SEED_OFFSET, make_crops
from engine.classification import train_classifier
from engine.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 0
# Many distinct training crops matter more than epochs: with a few hundred per class a ResNet-18 memorises
# the random backgrounds instead of learning the outlines. Crops are cheap (about 1 ms each).
TRAIN_CROPS_PER_CLASS = 3000
VAL_CROPS_PER_CLASS = 300


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="output/demo")
    parser.add_argument("--train-crops", type=int, default=TRAIN_CROPS_PER_CLASS, help="training crops per class")
    parser.add_argument("--val-crops", type=int, default=VAL_CROPS_PER_CLASS, help="validation crops per class")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE overrides of the classifier config")
    args = parser.parse_args(argv)
    start = time.time()
    data = os.path.join(args.output, "data")
    make_crops(data, "train", args.train_crops, SEED)
    make_crops(data, "val", args.val_crops, SEED + VAL_SEED_OFFSET)  # val never shares train's seed
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
