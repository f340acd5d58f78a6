"""Run a detector on images or folders of images.

    python tools/infer.py configs/torchvision/frcnn_r50_fpn.yaml --weights frcnn.pth \\
        --input photos/ street.jpg --output out/ test.score_thresh=0.5

Writes OUTPUT/results.json ({"file_name", "category_id", "bbox": [x, y, w, h], "score"} per detection,
category ids as the dataset defines them; a Mask R-CNN adds "segmentation", compressed RLE of the mask
thresholded at test.mask_thresh) and OUTPUT/<image stem>.png with the detections (and masks) drawn.
A file that cannot be read is named and skipped; the exit status is then 1.
"""
import sys

from detection.weights import WEIGHTS_HELP
from detection.inference import infer_files
from engine.cli import parser_for, run
from engine.config import load_config


def main(argv=None):
    parser = parser_for(__doc__)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides")
    parser.add_argument("--weights", required=True, help=WEIGHTS_HELP)
    parser.add_argument("--input", nargs="+", required=True, help="images or folders")
    parser.add_argument("--output", required=True)
    parser.add_argument("--no-vis", action="store_true", help="skip the PNG visualisations")
    args = parser.parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides)
    results, failures = infer_files(cfg, args.weights, args.input, args.output, visualize=not args.no_vis)
    print(f"{len(results)} detections written to {args.output}/results.json")
    if failures:
        print(f"{len(failures)} file(s) could not be read:", file=sys.stderr)
        for path, reason in failures.items():
            print(f"  {reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
