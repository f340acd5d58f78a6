"""Convert weights between other frameworks' names and this project's.

    python tools/convert_weights.py --from torchvision resnet50-tv.pth resnet50.pth
    python tools/convert_weights.py --from torchvision fasterrcnn_resnet50_fpn.pth frcnn_r50_fpn.pth
    python tools/convert_weights.py --from timm resnet50d-timm.pth resnet50d.pth
    python tools/convert_weights.py --from detectron2 model_final_f10217.pkl mrcnn_r50_fpn_d2.pth
    python tools/convert_weights.py --from detectron2 R-50.pkl resnet50_msra.pth
    python tools/convert_weights.py --to torchvision output/cls/backbone.pth resnet50-tv.pth
    python tools/convert_weights.py --to torchvision output/frcnn_r50/model_final.pth fasterrcnn-tv.pth

--check runs the other framework's model on its side of the conversion and ours on the other, on the same
random input, prints the largest difference and fails if it is larger than float32 rounding explains.
"""
import sys

from backbones.weights import convert_file, read_weights
from detection.conversion import CONVERTERS_IN, CONVERTERS_OUT
from detection.conversion.check import check_conversion, verify_conversion
from engine.cli import parser_for, run
from engine.errors import CheckpointError


def main(argv=None):
    parser = parser_for(__doc__)
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from", dest="from_format", choices=sorted(CONVERTERS_IN))
    direction.add_argument("--to", dest="to_format", choices=sorted(CONVERTERS_OUT))
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("--check", action="store_true",
                        help="compare the two models' outputs on a random input (needs the other framework)")
    args = parser.parse_args(argv)
    if args.from_format:
        converter, into_project_format = CONVERTERS_IN[args.from_format], True
    else:
        converter, into_project_format = CONVERTERS_OUT[args.to_format], False
    # Where the converter names the model its tensors are for, they are checked to fit it before anything is written.
    conversion = convert_file(args.input, args.output, converter, into_project_format, verify=verify_conversion)
    print(conversion.summary(args.input, args.output))
    if args.check:
        direction, framework = ("from", args.from_format) if args.from_format else ("to", args.to_format)
        result = check_conversion(direction, framework, read_weights(args.input), conversion.state_dict)
        print(result)
        if not result.ok:
            raise CheckpointError(f"--check: the converted model's outputs differ from {framework}'s (above)")


if __name__ == "__main__":
    sys.exit(run(main))
