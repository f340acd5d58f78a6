"""Train a ResNet classifier on an ImageFolder layout (ImageNet pretraining), evaluating top-1/top-5 on
data.val every epoch.

    python tools/train_cls.py configs/cls_r50.yaml                          # ImageNet, 90 epochs
    python tools/train_cls.py configs/demo/cls_shapes.yaml output_dir=output/cls solver.epochs=5
    python tools/train_cls.py CONFIG --resume          # continue from output_dir/last_checkpoint
    python tools/train_cls.py CONFIG --eval-only       # evaluate model.weights or the run's last weights
    torchrun --nproc_per_node=8 tools/train_cls.py CONFIG  # 8 GPUs (solver.ims_per_batch is the total)
"""
import sys

from engine.cli import parser_for, run
from engine.config import load_config
from engine.distributed import is_main


def main(argv=None):
    parser = parser_for(__doc__)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides")
    parser.add_argument("--resume", action="store_true", help="continue from output_dir/last_checkpoint")
    parser.add_argument("--eval-only", action="store_true", help="only evaluate (model.weights, else the "
                        "run's model_final.pth or last checkpoint)")
    args = parser.parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides)
    from backbones.classification.train import evaluate_only, train_classifier

    metrics = evaluate_only(cfg) if args.eval_only else train_classifier(cfg, resume=args.resume)
    if not is_main():  # under torchrun, rank 0 reports
        return
    print(f"top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%")
    print(f"wrote {cfg.output_dir}/metrics.json")


if __name__ == "__main__":
    sys.exit(run(main))
