"""Train a Faster R-CNN on a COCO-format dataset, then evaluate it on data.val with COCO AP.

    python tools/train_det.py configs/frcnn_r101.yaml
    python tools/train_det.py configs/demo/frcnn_shapes.yaml output_dir=output/shapes solver.max_iter=500
    python tools/train_det.py CONFIG --resume           # continue from output_dir/last_checkpoint
    python tools/train_det.py CONFIG --eval-only        # evaluate model.weights or the run's last weights
    torchrun --nproc_per_node=8 tools/train_det.py CONFIG   # 8 GPUs (solver.ims_per_batch is the total)
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
    from detection.train import evaluate_only, train_detector

    reports = evaluate_only(cfg) if args.eval_only else train_detector(cfg, resume=args.resume)
    if not is_main():  # under torchrun, rank 0 reports
        return
    for iou_type, report in reports.items():
        print(f"{iou_type} " + "  ".join(f"{k} {v:.2f}" for k, v in report.metrics.items()))
    print(f"wrote {cfg.output_dir}/metrics.json")


if __name__ == "__main__":
    sys.exit(run(main))
