"""Convert weights between other frameworks' names and this project's.

    python tools/convert_weights.py --from torchvision resnet50-tv.pth resnet50.pth
    python tools/convert_weights.py --from torchvision fasterrcnn_resnet50_fpn.pth frcnn_r50_fpn.pth
    python tools/convert_weights.py --from timm resnet50d-timm.pth resnet50d.pth
    python tools/convert_weights.py --to torchvision output/cls/backbone.pth resnet50-tv.pth
    python tools/convert_weights.py --to torchvision output/frcnn_r50/model_final.pth fasterrcnn-tv.pth
"""
import sys

from backbones.weights import convert_file
from detection.weights import CONVERTERS_IN, CONVERTERS_OUT
from engine.cli import parser_for, run


def main(argv=None):
    parser = parser_for(__doc__)
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from", dest="from_format", choices=sorted(CONVERTERS_IN))
    direction.add_argument("--to", dest="to_format", choices=sorted(CONVERTERS_OUT))
    parser.add_argument("input")
    parser.add_argument("output")
    args = parser.parse_args(argv)
    if args.from_format:
        converter, into_project_format = CONVERTERS_IN[args.from_format], True
    else:
        converter, into_project_format = CONVERTERS_OUT[args.to_format], False
    conversion = convert_file(args.input, args.output, converter, into_project_format)
    print(conversion.summary(args.input, args.output))


if __name__ == "__main__":
    sys.exit(run(main))
