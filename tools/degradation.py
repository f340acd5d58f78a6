"""The paper's Figure 6 (He et al. 2015, Sec. 4.2): plain and residual networks of several depths, trained
alike, their training and test error per epoch. Writes OUTPUT/degradation.png, OUTPUT/degradation.json
and OUTPUT/log.txt, and prints the final errors. Without --cifar it runs on scikit-learn's handwritten
digits, offline on a CPU in about five minutes; see backbones/experiments/degradation.py for the data and
the schedule. On a CPU shared with other jobs, OMP_NUM_THREADS=1 can be several times faster than
torch's default of one thread per core (these small convolutions gain little from a second thread and
lose much when it has to wait for a core).

    python tools/degradation.py --output output/degradation
    python tools/degradation.py --cifar data/cifar-10-batches-py --epochs 182 --batch-size 128 --lr 0.1 \\
        --depths 20 32 44 56 --device cuda --output output/degradation_cifar
"""
import sys

from engine.cli import parser_for, run
from backbones.experiments.degradation import check_settings, format_table, load_data, run_degradation
from engine.events import setup_logging


def main(argv=None):
    parser = parser_for(__doc__)
    parser.add_argument("--cifar", default=None, metavar="PATH",
                        help="CIFAR-10: the python batches folder or an ImageFolder root with train/ and "
                             "test/ (default: scikit-learn's digits)")
    parser.add_argument("--depths", type=int, nargs="+", default=[20, 56], help="depths, 6n+2 each")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.025, help="initial lr, divided by 10 at 50%% and 75%%")
    parser.add_argument("--output", default="output/degradation", metavar="DIR")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="use only the first N training and N/4 test images (quick checks)")
    args = parser.parse_args(argv)
    check_settings(args.depths, args.epochs, args.lr, args.limit)
    setup_logging(args.output)
    results = run_degradation(load_data(args.cifar), depths=args.depths, epochs=args.epochs,
                              batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device,
                              output=args.output, limit=args.limit)
    print(format_table(results))
    print(f"wrote {args.output}/degradation.png and {args.output}/degradation.json")


if __name__ == "__main__":
    sys.exit(run(main))
