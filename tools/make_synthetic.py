"""Write the synthetic shapes dataset (COCO train/val splits plus classification crops) to a folder.

    python tools/make_synthetic.py data/shapes --num-train 200 --num-val 50 --seed 0 --size 128 128
"""
import os
import sys

from detection.data.synthetic import VAL_SEED_OFFSET, make_synthetic
from engine.cli import parser_for, run


def main(argv=None):
    parser = parser_for(__doc__)
    parser.add_argument("out", help="output folder")
    parser.add_argument("--num-train", type=int, default=200, help="training images")
    parser.add_argument("--num-val", type=int, default=50, help="validation images")
    parser.add_argument("--seed", type=int, default=0,
                        help=f"train seed; val uses seed + {VAL_SEED_OFFSET} (must be >= 0)")
    parser.add_argument("--size", type=int, nargs=2, default=(128, 128), metavar=("H", "W"), help="image size")
    parser.add_argument("--crops-per-class", type=int, default=100,
                        help="single-object crops per class and split (0: none)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes that draw the images (default: one per CPU; the files are the same "
                             "for any number)")
    args = parser.parse_args(argv)
    if args.seed < 0:
        parser.error("--seed must be >= 0")
    written = make_synthetic(args.out, args.num_train, args.num_val, args.seed, tuple(args.size),
                             crops_per_class=args.crops_per_class, workers=max(1, args.workers))
    for name, path in written.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    sys.exit(run(main))
