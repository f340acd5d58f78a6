"""Convert weights between other frameworks' names and this project's.

    python tools/convert_weights.py --from torchvision resnet50-tv.pth resnet50.pth
    python tools/convert_weights.py --from torchvision fasterrcnn_resnet50_fpn.pth frcnn_r50_fpn.pth
    python tools/convert_weights.py --from timm resnet50d-timm.pth resnet50d.pth
    python tools/convert_weights.py --from detectron2 model_final_f10217.pkl mrcnn_r50_fpn_d2.pth
    python tools/convert_weights.py --from detectron2 R-50.pkl resnet50_msra.pth
    python tools/convert_weights.py --to torchvision output/cls/backbone.pth resnet50-tv.pth
    python tools/convert_weights.py --to torchvision output/frcnn_r50/model_final.pth fasterrcnn-tv.pth

--check runs the other framework's model on its side of the conversion and ours on the other, on the same
input, prints the largest differences and fails if they are larger than float32 rounding explains, or if the
other framework is not importable. torchvision's and timm's models run on random input. Detectron2's
detectors (detectron2 importable: installed, or its source on PYTHONPATH) run as its DefaultPredictor runs
them, from its model-zoo config, on --check-images (default: a synthetic image), and their detections (and
masks) are compared with ours; Caffe2 ImageNet blobs run in Detectron2's ResNet.

    python tools/convert_weights.py --from detectron2 model_final_f10217.pkl mrcnn.pth --check --check-images a.jpg
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
                        help="compare the two models' outputs (needs the other framework)")
    parser.add_argument("--check-images", nargs="+", default=(),
                        help="images for --check to run Detectron2's detector and ours on")
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
        result = check_conversion(direction, framework, read_weights(args.input), conversion.state_dict,
                                  conversion.config, args.check_images)
        print(result)
        if not result.ok:
            raise CheckpointError("--check: " + (result.reason or
                                                 f"the converted model's outputs differ from {framework}'s (above)"))


if __name__ == "__main__":
    sys.exit(run(main))
