"""Time our detector against torchvision's, side by side: same weights, same images, same settings.

    python tools/benchmark.py configs/torchvision/frcnn_r50_fpn.yaml --task infer --vs torchvision --iters 10
    python tools/benchmark.py configs/torchvision/frcnn_r50_fpn.yaml --task infer --vs torchvision \\
        --memory-format channels_last --iters 10
    python tools/benchmark.py configs/torchvision/mrcnn_r50_fpn.yaml --task train --vs torchvision \\
        --image-size 512x683 --batch 2 --iters 5
    python tools/benchmark.py configs/frcnn_r50.yaml --task eval --vs pycocotools --num-images 2000
    python tools/benchmark.py configs/demo/mrcnn_shapes.yaml --task data --iters 20   # after make demo

Both sides run in one memory format, --memory-format (contiguous, i.e. NCHW, or channels_last), which
wins over the config's model.channels_last; without it, the config's (off: contiguous). The table and
JSON record it, and the machine (CPU model, the instruction set torch's kernels use, threads).

--task data times the training loader alone (seconds per batch, data.num_workers workers), the training
step alone, and the two together (how long each step waits for its batch): no peer.

Warm-up calls first, then --iters timed calls of each side, alternating the order; prints median, min,
max, peak memory and GFLOP/s, and writes the table as JSON (--output). On a GPU (device=cuda) calls are
timed with CUDA events and peak memory is the allocator's.
"""
import sys

import torch

from detection.benchmark.tasks import (MEMORY_FORMATS, data_benchmark, eval_sides, format_name, format_override, infer_sides,
                                train_sides)
from detection.weights import WEIGHTS_HELP
from detection.benchmark.harness import compare
from engine.cli import parser_for, run
from engine.config import as_config
from engine.device import resolve_device
from engine.errors import ConfigError

TASKS = ("infer", "train", "eval", "data")


def image_size(text: str):
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--image-size takes HxW, e.g. 800x1216, got {text!r}") from None
    return h, w


def main(argv=None):
    parser = parser_for(__doc__)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides")
    parser.add_argument("--task", choices=TASKS, required=True)
    parser.add_argument("--vs", choices=["torchvision", "pycocotools"], action="append", default=[],
                        help="the peer implementation to time against (eval: pycocotools)")
    parser.add_argument("--weights", help=f"{WEIGHTS_HELP} (default: the config's model, seeded)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--image-size", type=image_size, default=None,
                        help="HxW of the input image (default: 800x1216 for infer, 512x683 for train)")
    parser.add_argument("--batch", type=int, default=2, help="images per training step")
    parser.add_argument("--num-images", type=int, default=2000, help="eval: images of the synthetic COCO set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-format", choices=list(MEMORY_FORMATS), default=None,
                        help="infer/train/data: memory format of both sides' models and batches (default: the "
                             "config's model.channels_last; off: contiguous, i.e. NCHW)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs (CPU)")
    parser.add_argument("--floor", action="store_true",
                        help="infer/train: also time each side's convolutions and matrix products alone (same "
                             "shapes, fresh tensors), the floor no implementation with these kernels goes under, "
                             "and the speedup over the peer that ours' floor would allow")
    parser.add_argument("--output", default=None, help="JSON file for the table (default: OUTPUT_DIR/benchmark_TASK.json)")
    args = parser.parse_intermixed_args(argv)
    if args.task == "eval" and args.memory_format:
        raise ConfigError("--task eval times COCO evaluation (no model): it takes no --memory-format")
    overrides = list(args.overrides)
    if args.memory_format:  # last, so it wins over the config and any model.channels_last override
        overrides.append(format_override(args.memory_format))
    cfg = as_config(args.config, overrides)
    memory_format = format_name(cfg)
    device = resolve_device(cfg.device)
    size = args.image_size or ((800, 1216) if args.task == "infer" else (512, 683))
    # The image is given at the size to measure: both models resize it to itself.
    short, long = min(size), max(size)
    overrides += [f"input.min_size_test={short}", f"input.max_size_test={long}",
                  f"input.min_size_train=[{short}]", f"input.max_size_train={long}"]
    settings = {"config": args.config, "image_size": f"{size[0]}x{size[1]}", "memory_format": memory_format,
                "threads": torch.get_num_threads()}
    peers = {"eval": "pycocotools", "data": None}.get(args.task, "torchvision")
    wrong = [p for p in args.vs if p != peers]
    if wrong:
        raise ConfigError(f"--task {args.task} " + (f"compares with {peers}, not {', '.join(wrong)}" if peers else
                          "times the loader against the training step and takes no --vs"))
    if args.task == "data":
        report = data_benchmark(cfg, args.config, args.iters, args.warmup, device)
    elif args.task == "eval":
        settings = {"num_images": args.num_images, "detections": 14 * args.num_images}
        sides = eval_sides(args.num_images, args.seed, args.vs)
    elif args.task == "infer":
        sides = infer_sides(args.config, overrides, args.weights, size, args.seed, device, args.vs, memory_format)
    else:
        settings["batch"] = args.batch
        sides = train_sides(args.config, overrides, args.weights, size, args.batch, args.seed, device, args.vs,
                            memory_format)
    if args.task != "data":
        report = compare(args.task, sides, args.iters, args.warmup, device, settings, not args.no_memory,
                         floor=args.floor and args.task != "eval")
    print(report.table())
    output = args.output or f"{cfg.output_dir}/benchmark_{args.task}.json"
    report.write(output)
    print(f"wrote {output}")


if __name__ == "__main__":
    sys.exit(run(main))
