"""The end-to-end demo behind `make demo`: the synthetic shapes dataset (train and val from different
seeds), a short ResNet-18 classification pretraining on synthetic crops, a Mask R-CNN initialised from
it and trained on the shapes, COCO box and mask evaluation on val, drawings of validation predictions
with their masks and the loss curve, and a table of the classifier's and the detector's numbers.

    python tools/demo.py --output output/demo
    python tools/demo.py --output output/demo solver.max_iter=200       # a shorter detector run
    python tools/demo.py --output output/demo --no-pretrain             # the detector from scratch
    python tools/demo.py --classifier --output output/demo              # the ResNet classifier demo
"""
import argparse
import os
import sys
import time

from engine.cli import run
from engine.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 0
TRAIN_IMAGES = 3000
VAL_IMAGES = 300
VISUALIZED = 12
# Classifier demo: many distinct crops matter more than epochs; with a few hundred per class a ResNet-18
# memorises the random backgrounds instead of learning the outlines. Crops are cheap (about 1 ms each).
TRAIN_CROPS_PER_CLASS = 3000
VAL_CROPS_PER_CLASS = 300
# `make demo`'s pretraining stage: one epoch of 4,800 crops (150 steps) is what fits next to the detector
# in the 10-minute budget on two cores.
PRETRAIN_CROPS_PER_CLASS = 1600
# Processes that draw the synthetic images (the files are the same for any number).
WORKERS = os.cpu_count() or 1


def pretrain_classifier(args, data, overrides=(), config="configs/demo/cls_shapes_pretrain.yaml"):
    """The ResNet-18 classifier on synthetic crops; its backbone.pth is the detector's initialisation."""
    from detection.data.synthetic import VAL_SEED_OFFSET, make_crops
    from backbones.classification.train import train_classifier

    make_crops(data, "train", args.train_crops or (TRAIN_CROPS_PER_CLASS if args.classifier else
                                                   PRETRAIN_CROPS_PER_CLASS), SEED, workers=WORKERS)
    make_crops(data, "val", args.val_crops, SEED + VAL_SEED_OFFSET, workers=WORKERS)  # val never shares train's seed
    cfg = load_config(os.path.join(REPO, config), [
        f"data.train.root={data}/crops/train", f"data.val.root={data}/crops/val",
        f"output_dir={args.output}/cls", *overrides])
    return cfg, train_classifier(cfg)


def detection_demo(args):
    from detection.data.synthetic import make_synthetic
    from detection.inference import infer_files
    from detection.train import train_detector

    data = os.path.join(args.output, "data")
    make_synthetic(data, num_train=args.train_images, num_val=args.val_images, seed=SEED, crops_per_class=0,
                   workers=WORKERS)
    overrides = list(args.overrides)
    if args.pretrain:
        cls_cfg, cls_metrics = pretrain_classifier(args, data, args.cls_overrides)
        overrides.insert(0, f"model.backbone.weights={cls_cfg.output_dir}/backbone.pth")
    ann = os.path.join(data, "annotations")
    cfg = load_config(os.path.join(REPO, "configs/demo/mrcnn_shapes.yaml"), [
        f"data.root={data}", f"data.train.ann_file={ann}/instances_train.json", f"data.train.img_dir={data}/train",
        f"data.val.ann_file={ann}/instances_val.json", f"data.val.img_dir={data}/val",
        f"output_dir={args.output}/det", *overrides])
    reports = train_detector(cfg)
    final = os.path.join(cfg.output_dir, "model_final.pth")
    val_images = sorted(os.listdir(os.path.join(data, "val")))[:VISUALIZED]
    vis = os.path.join(cfg.output_dir, "vis")
    infer_files(load_config(os.path.join(cfg.output_dir, "config.yaml"), ["test.score_thresh=0.5"]), final,
                [os.path.join(data, "val", f) for f in val_images], vis)
    if args.pretrain:
        print(f"\n{'pretraining: shape classification, val':<40}{'top-1 (%)':>10}{'top-5 (%)':>10}")
        print(f"{'ResNet-18 on synthetic crops':<40}{cls_metrics['top1']:>10.2f}{cls_metrics['top5']:>10.2f}")
    print(f"\n{'detection: synthetic shapes, val':<32}" + "".join(f"{k:>8}" for k in reports["bbox"].metrics))
    for iou_type, report in reports.items():
        # APl is undefined (NaN) when no validation object is large (over 96x96 pixels).
        print(f"{iou_type + ' (COCO, %)':<32}" + "".join(f"{v:>8.2f}" if v == v else f"{'-':>8}"
                                                        for v in report.metrics.values()))
    print(f"outputs in {cfg.output_dir}: metrics.json, loss_curve.png, vis/*.png, model_final.pth")


def classifier_demo(args):
    cfg, metrics = pretrain_classifier(args, os.path.join(args.output, "data"), args.overrides,
                                       "configs/demo/cls_shapes.yaml")
    print(f"\n{'task':<28}{'top-1 (%)':>10}{'top-5 (%)':>10}")
    print(f"{'shape classification (val)':<28}{metrics['top1']:>10.2f}{metrics['top5']:>10.2f}")
    print(f"outputs in {cfg.output_dir}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="output/demo")
    parser.add_argument("--classifier", action="store_true", help="the ResNet-18 crop classifier instead")
    parser.add_argument("--train-images", type=int, default=TRAIN_IMAGES, help="synthetic training images")
    parser.add_argument("--val-images", type=int, default=VAL_IMAGES, help="synthetic validation images")
    parser.add_argument("--no-pretrain", dest="pretrain", action="store_false",
                        help="train the detector from scratch, without the classification pretraining")
    parser.add_argument("--train-crops", type=int, default=None,
                        help=f"training crops per class (default {PRETRAIN_CROPS_PER_CLASS} for the pretraining, "
                             f"{TRAIN_CROPS_PER_CLASS} with --classifier)")
    parser.add_argument("--val-crops", type=int, default=VAL_CROPS_PER_CLASS, help="validation crops per class")
    parser.add_argument("--cls", dest="cls_overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="an override of the pretraining config (repeatable)")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE overrides of the detector config (with "
                        "--classifier: of the classifier config)")
    args = parser.parse_intermixed_args(argv)
    start = time.time()
    (classifier_demo if args.classifier else detection_demo)(args)
    print(f"demo finished in {time.time() - start:.0f} s")


if __name__ == "__main__":
    sys.exit(run(main))
