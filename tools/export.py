"""Export a detector to ONNX or TorchScript: one file that takes a raw image of any size and returns its
detections in the image's pixels, checked against the eager model before the tool reports success.

    python tools/export.py configs/torchvision/frcnn_r50_fpn.yaml --weights frcnn.pth \\
        --format onnx --output frcnn.onnx --check-images photos/ street.jpg test.score_thresh=0.5

The file's input is one (3, H, W) RGB image, uint8 (or float32 in [0, 1] with --dtype float32), batch 1,
32 <= H, W <= 4096; its outputs are boxes (N, 4) xyxy, labels (N,), scores (N,) and for a Mask R-CNN
masks (N, 1, 28, 28): probabilities over each box, which segmentation.paste_masks pastes into the image.
The check runs both on every --check-images image (default: one synthetic image) and fails unless their
detections pair (the same label, boxes within 1e-3 relative, scores within 1e-3) but those within 1e-3 of
the score cutoff, and masks agree (IoU above 0.99); docs/tools.md says how.
"""
import sys

import torch

from detection.build import build_detector
from detection.weights import WEIGHTS_HELP
from detection.export.exporter import FORMATS, export_and_check, read_images
from engine.cli import parser_for, run
from engine.config import load_config


def main(argv=None):
    parser = parser_for(__doc__)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides")
    parser.add_argument("--weights", help=WEIGHTS_HELP)
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--output", required=True)
    parser.add_argument("--check-images", nargs="+", default=[], help="images or folders to compare on")
    parser.add_argument("--dtype", choices=["uint8", "float32"], default="uint8", help="the file's image type")
    args = parser.parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides)
    # On the CPU: the check compares with the eager model there.
    model = build_detector(cfg, weights=args.weights, for_inference=True)
    images = read_images(args.check_images) if args.check_images else ()
    checks = export_and_check(model, args.output, args.format, images, getattr(torch, args.dtype))
    for check in checks:
        print(check.line())
    print(f"wrote {args.output} ({args.format}); it agrees with the eager model on {len(checks)} image(s)")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
