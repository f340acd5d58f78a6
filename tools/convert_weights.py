"""Convert weights between other frameworks' names and this project's.

    python tools/convert_weights.py --from torchvision resnet50-tv.pth resnet50.pth
    python tools/convert_weights.py --to torchvision output/cls/backbone.pth resnet50-tv.pth
"""
import sys

from backbones.weights import CONVERTERS_IN, CONVERTERS_OUT, convert_file
from engine.cli import parser_for, run


def main(argv=None):
    parser = parser_for(__doc__)
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from", dest="from_format", choices=sorted(CONVERTERS_IN))
    direction.add_argument("--to", dest="to_format", choices=sorted(CONVERTERS_OUT))
    parser.add_argument("input")
    parser.add_argument("output")
    args = parser.parse_args(argv)
    n = convert_file(args.input, args.output, from_format=args.from_format, to_format=args.to_format)
    print(f"converted {n} tensors: {args.input} -> {args.output}")


if __name__ == "__main__":
    sys.exit(run(main))
