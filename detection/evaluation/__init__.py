"""COCO evaluation: a detector run over data.val (`evaluate_detector`), results checking, box and mask AP
with pycocotools or faster-coco-eval, output files."""
from .coco_eval import (
    CocoEvalResult,
    check_categories,
    evaluate_coco,
    evaluate_results_file,
    format_per_category,
    iou_types_of,
    load_coco_gt,
    load_results,
    write_eval_outputs,
)
from .evaluator import evaluate_detector, evaluate_model, predict_coco

__all__ = [
    "CocoEvalResult",
    "check_categories",
    "evaluate_coco",
    "evaluate_detector",
    "evaluate_model",
    "evaluate_results_file",
    "format_per_category",
    "iou_types_of",
    "load_coco_gt",
    "load_results",
    "predict_coco",
    "write_eval_outputs",
]
