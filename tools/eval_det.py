"""COCO box (and mask) AP of a results file, or of a checkpoint, against data.val.ann_file.

    python tools/eval_det.py CONFIG --results output/frcnn/eval/results.json
    python tools/eval_det.py CONFIG --weights model_final.pth test.evaluator_backend=faster_coco_eval

Writes to output_dir: config.yaml, metrics.json ({"bbox": {"AP": ...}, "segm": ...}, percent) and
eval/ (results.json, summary_<type>.txt, per_category_<type>.txt and .json).
"""
import sys

from detection.weights import WEIGHTS_HELP
from detection.evaluation import evaluate_model, evaluate_results_file, format_per_category
from engine.cli import parser_for, run
from engine.config import load_config, save_config


def main(argv=None):
    parser = parser_for(__doc__)
    parser.add_argument("config")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--results", help="COCO results json (image_id, category_id, score, bbox[, segmentation])")
    source.add_argument("--weights", help=f"checkpoint to run on data.val and evaluate: {WEIGHTS_HELP}")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides")
    # Intermixed: `CONFIG --results R.json KEY=VALUE` would otherwise reject the overrides after the option.
    args = parser.parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides)
    save_config(cfg, cfg.output_dir)
    reports = evaluate_model(cfg, args.weights) if args.weights else evaluate_results_file(cfg, args.results)
    for iou_type, report in reports.items():
        print(f"{iou_type}:\n{report.summary}\n\n{format_per_category(report.per_category)}\n")
    for iou_type, report in reports.items():
        print(f"{iou_type} " + "  ".join(f"{k} {v:.3f}" for k, v in report.metrics.items()))
    print(f"wrote {cfg.output_dir}/metrics.json and {cfg.output_dir}/eval/")


if __name__ == "__main__":
    sys.exit(run(main))
