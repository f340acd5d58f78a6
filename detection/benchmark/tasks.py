"""What tools/benchmark.py times: our detector against torchvision's with the same weights, images and
settings. Each side is set up by a module-level function (picklable, so peak memory on the CPU can be
measured in a fresh process), from a seed, so every process builds identical weights and inputs.

Weights: `--weights` if given, else the config's model seeded with `seed` (FrozenBN statistics made
non-trivial). A model with random weights scores no class above test.score_thresh, so without --weights
the threshold is 0 on both sides: every image keeps its test.detections_per_img detections, which is the
load a trained model has on a busy image (and what the mask branch of Mask R-CNN then works on).

Memory format: both sides run in the one `memory_format` given ("contiguous", i.e. NCHW, or
"channels_last", i.e. NHWC): their parameters, the padded batch and so every convolution's input. oneDNN's
convolutions differ by up to 1.3x between the two on a CPU, so sides in different formats would time the
format, not the implementation.
"""
import functools
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from engine.config import as_config
from engine.errors import ConfigError

from ..build import build_detector
from ..data.build import wants_masks
from ..weights import load_detector_weights
from .harness import Side

MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def random_image(size: Tuple[int, int], seed: int) -> torch.Tensor:
    """A smooth random (3, H, W) float image in [0, 1]: large-scale structure, like a photograph, so that
    proposals are not all noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, max(2, size[0] // 40), max(2, size[1] // 40), generator=g)
    return torch.nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=False)[0]


def _seeded(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("running_var"):
                buf.copy_(torch.rand(buf.shape, generator=g) * 0.5 + 0.75)
            elif name.endswith("running_mean"):
                buf.copy_(torch.rand(buf.shape, generator=g) * 0.2 - 0.1)
    return model


def _check_format(memory_format: str):
    if memory_format not in MEMORY_FORMATS:
        raise ConfigError(f"memory format {memory_format!r}: use one of {', '.join(MEMORY_FORMATS)}")


def format_override(memory_format: str) -> str:
    """The config override that puts our model in `memory_format` (a MEMORY_FORMATS name)."""
    _check_format(memory_format)
    return f"model.channels_last={'true' if memory_format == 'channels_last' else 'false'}"


def format_name(cfg) -> str:
    """The MEMORY_FORMATS name of a config's model.channels_last."""
    return "channels_last" if cfg.model.channels_last else "contiguous"


def our_detector(config, overrides: Sequence[str], weights: Optional[str], seed: int,
                 memory_format: str = "contiguous"):
    """Ours in `memory_format`, whatever the config's model.channels_last says (it is overridden here, so
    the two sides cannot differ through the config)."""
    torch.manual_seed(seed)
    overrides = list(overrides) + ["model.backbone.weights=null", "model.weights=null",
                                   format_override(memory_format)]
    if not weights:
        overrides.append("test.score_thresh=0.0")
    model = build_detector(config, overrides)
    if weights:
        load_detector_weights(model, weights)
    else:
        _seeded(model, seed)
    return model


def _batch_in_format(memory_format: torch.memory_format, module, args):
    return (args[0].contiguous(memory_format=memory_format),) + tuple(args[1:])


def torchvision_detector(config, overrides: Sequence[str], weights: Optional[str], seed: int,
                         memory_format: str = "contiguous"):
    """torchvision's model of the same kind, holding our model's weights (converted), with the config's
    test settings, in `memory_format`. Only configs torchvision can express convert
    (configs/torchvision/*.yaml)."""
    from torchvision.models import detection

    from ..conversion.torchvision import TORCHVISION_BUILDERS, to_torchvision_detector

    ours = our_detector(config, overrides, weights, seed, memory_format)
    cfg = as_config(config, list(overrides) + ([] if weights else ["test.score_thresh=0.0"]))
    mask = wants_masks(cfg)
    builder = getattr(detection, TORCHVISION_BUILDERS[mask])
    r, t, i = cfg.model.rpn, cfg.test, cfg.input
    model = builder(weights=None, weights_backbone=None, num_classes=cfg.model.num_classes + 1,
                    min_size=i.min_size_test, max_size=i.max_size_test, image_mean=[0.485, 0.456, 0.406],
                    image_std=[0.229, 0.224, 0.225], rpn_pre_nms_top_n_test=r.pre_nms_topk_test,
                    rpn_post_nms_top_n_test=r.post_nms_topk_test, rpn_nms_thresh=r.nms_thresh,
                    box_score_thresh=t.score_thresh, box_nms_thresh=t.nms_thresh,
                    box_detections_per_img=t.detections_per_img)
    model.load_state_dict(to_torchvision_detector(ours.state_dict()).state_dict, strict=True)
    fmt = MEMORY_FORMATS[memory_format]
    model.to(memory_format=fmt)
    # torchvision pads the batch into a fresh NCHW tensor (GeneralizedRCNNTransform.batch_images), where
    # ours pads it in the model's format; without this copy its first convolution alone would run on an
    # NCHW input. One copy of a 3xHxW batch: milliseconds against seconds.
    model.backbone.register_forward_pre_hook(functools.partial(_batch_in_format, fmt))
    return model


BUILDERS = {"ours": our_detector, "torchvision": torchvision_detector}


def setup_infer(impl: str, config, overrides, weights, size, seed, device,
                memory_format: str = "contiguous") -> Callable[[], object]:
    model = BUILDERS[impl](config, overrides, weights, seed, memory_format).eval().to(device)
    image = random_image(size, seed).to(device)

    def infer():
        with torch.inference_mode():
            return model([image])

    return infer


def count_flops(fn: Callable[[], object]) -> float:
    """FLOPs of one call (2 x multiply-adds of convolutions and matrix products; torchvision's RoIAlign
    and NMS are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def infer_sides(config, overrides, weights, size, seed, device, peers: List[str],
                memory_format: str = "contiguous") -> List[Side]:
    sides = []
    for impl in ["ours"] + peers:
        setup = functools.partial(setup_infer, impl, config, list(overrides), weights, tuple(size), seed, device,
                                  memory_format)
        sides.append(Side(impl, setup, flops=count_flops(setup()), images=1))
    return sides


def synthetic_targets(size: Tuple[int, int], n: int, num_classes: int, seed: int, masks: bool):
    """`n` random boxes (and their filled-box masks) in an image of `size`, labels 1..num_classes."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
    wh = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3]) + 16
    boxes = torch.cat([xy, (xy + wh).minimum(torch.tensor([w - 1.0, h - 1.0]))], 1)
    target = {"boxes": boxes, "labels": torch.randint(1, num_classes + 1, (n,), generator=g)}
    if masks:
        m = torch.zeros(n, h, w, dtype=torch.uint8)
        for k, (x0, y0, x1, y1) in enumerate(boxes.round().long().tolist()):
            m[k, y0:y1, x0:x1] = 1
        target["masks"] = m
    return target


def _freeze_torchvision(model, freeze_at: int):
    """torchvision built without weights has trainable BatchNorm everywhere; for equal settings, frozen BN
    (torchvision's own FrozenBatchNorm2d with the same statistics) and the stem and res2..res{freeze_at}
    frozen, as ours."""
    from torchvision.ops import FrozenBatchNorm2d

    def swap(module):
        for name, child in module.named_children():
            if isinstance(child, torch.nn.BatchNorm2d):
                frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
                for key in ("weight", "bias", "running_mean", "running_var"):
                    getattr(frozen, key).copy_(getattr(child, key).detach())
                setattr(module, name, frozen)
            else:
                swap(child)

    swap(model.backbone.body)
    frozen = ["conv1"] + [f"layer{k}" for k in range(1, freeze_at)]
    for name, p in model.backbone.body.named_parameters():
        if name.split(".")[0] in frozen:
            p.requires_grad_(False)
    return model


def setup_train(impl: str, config, overrides, weights, size, batch, seed, device,
                memory_format: str = "contiguous") -> Callable[[], object]:
    """One SGD step (forward with targets, backward, update) on a fixed batch."""
    cfg = as_config(config, overrides)
    if cfg.model.backbone.norm != "FrozenBN":
        raise ConfigError("the training benchmark compares frozen-BN models (model.backbone.norm=FrozenBN), "
                          f"got {cfg.model.backbone.norm}")
    # Both sides resize inside the model, as torchvision does (its side ignores the key).
    model = BUILDERS[impl](config, list(overrides) + ["input.train_resize=model"], weights, seed, memory_format)
    if impl == "torchvision":
        _freeze_torchvision(model, cfg.model.backbone.freeze_at)
    model.train().to(device)
    masks = wants_masks(cfg)
    images = [random_image(size, seed + k).to(device) for k in range(batch)]
    targets = [{k: v.to(device) for k, v in synthetic_targets(size, 8, cfg.model.num_classes, seed + k, masks).items()}
               for k in range(batch)]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9)

    def step():
        losses = model(images, targets)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    return step


def train_sides(config, overrides, weights, size, batch, seed, device, peers: List[str],
                memory_format: str = "contiguous") -> List[Side]:
    return [Side(impl, functools.partial(setup_train, impl, config, list(overrides), weights, tuple(size),
                                         batch, seed, device, memory_format), images=batch)
            for impl in ["ours"] + peers]


def synthetic_coco(num_images: int, seed: int, per_image: int = 7, categories: int = 80):
    """A COCO ground truth of `num_images` 640x480 images with `per_image` boxes each, and detections as a
    detector makes them: every object found with a jittered box and a score, plus as many false positives."""
    g = torch.Generator().manual_seed(seed)
    images, annotations, detections = [], [], []
    for i in range(1, num_images + 1):
        images.append({"id": i, "width": 640, "height": 480, "file_name": f"{i:012d}.jpg"})
        xy = torch.rand(per_image, 2, generator=g) * torch.tensor([500.0, 350.0])
        wh = torch.rand(per_image, 2, generator=g) * torch.tensor([130.0, 120.0]) + 8
        labels = torch.randint(1, categories + 1, (per_image,), generator=g)
        jitter = torch.randn(per_image, 4, generator=g) * 4
        scores = torch.rand(2 * per_image, generator=g)
        false_xy = torch.rand(per_image, 2, generator=g) * torch.tensor([500.0, 350.0])
        for k in range(per_image):
            x, y, w, h = xy[k, 0].item(), xy[k, 1].item(), wh[k, 0].item(), wh[k, 1].item()
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": int(labels[k]),
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
            jx, jy, jw, jh = jitter[k].tolist()
            detections.append({"image_id": i, "category_id": int(labels[k]), "score": float(scores[k]),
                               "bbox": [x + jx, y + jy, max(1.0, w + jw), max(1.0, h + jh)]})
            detections.append({"image_id": i, "category_id": int(labels[(k + 1) % per_image]),
                               "score": float(scores[per_image + k]),
                               "bbox": [false_xy[k, 0].item(), false_xy[k, 1].item(), w, h]})
    gt = {"images": images, "annotations": annotations,
          "categories": [{"id": c, "name": str(c)} for c in range(1, categories + 1)]}
    return gt, detections


def setup_eval(impl: str, num_images: int, seed: int) -> Callable[[], object]:
    """COCO bbox evaluation of `synthetic_coco`: ours (evaluate_coco with faster-coco-eval underneath) or
    pycocotools' COCOeval as users call it (loadRes, evaluate, accumulate, summarize)."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from ..evaluation.coco_eval import evaluate_coco

    dataset, detections = synthetic_coco(num_images, seed)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = dataset
        gt.createIndex()

    def ours():
        return evaluate_coco(gt, detections, "bbox", backend="faster_coco_eval").stats

    def pycocotools():
        with contextlib.redirect_stdout(io.StringIO()):
            coco_eval = COCOeval(gt, gt.loadRes([dict(d) for d in detections]), "bbox")
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        return [float(s) for s in coco_eval.stats]

    return ours if impl == "ours" else pycocotools


def eval_sides(num_images: int, seed: int, peers: List[str]) -> List[Side]:
    """The two must give the same 12 numbers: checked here once, before anything is timed."""
    sides = [Side(impl, functools.partial(setup_eval, impl, num_images, seed), images=num_images)
             for impl in ["ours"] + peers]
    results = [side.setup()() for side in sides]
    for side, stats in zip(sides[1:], results[1:]):
        if [round(float(s), 12) for s in stats] != [round(float(s), 12) for s in results[0]]:
            raise ConfigError(f"COCO evaluation: ours and {side.name} disagree: {results[0]} vs {stats}")
    return sides


def data_benchmark(cfg, config_name: str, iters: int, warmup: int, device: torch.device):
    """Does the training data pipeline keep up? Three measurements, in this order, on `cfg` as training
    runs it (its data.train, transform, batch and data.num_workers):

    1. the loader alone: seconds per batch fetched back to back after `warmup` blocks (the workers'
       start-up included in the warm-up): what the pipeline can deliver;
    2. the training step alone (Trainer.run_step: forward, backward, optimizer; AMP and clipping as
       configured), repeated on one batch: what training consumes;
    3. training as it runs, the step fed by the loader: seconds per step and how much of it was spent
       waiting for the next batch (the trainer's data_time).

    Returns a Report whose two sides are (1) and (2), so its ratio is how many times faster the loader
    delivers batches than the step consumes them; (3) is in `extra`."""
    import statistics
    import time

    from .harness import Report, SideResult, synchronize, time_call
    from engine.solver import build_optimizer
    from engine.trainer import Trainer

    from ..data.build import build_detection_train_loader
    from ..train import _fill_categories, detection_step

    loader = build_detection_train_loader(cfg)
    _fill_categories(cfg, loader.dataset)
    batches = iter(loader)
    # The workers keep up to `block` batches ready; single fetches would time that buffer, so the loader
    # is timed over blocks of that many batches (seconds per batch = block time / block).
    block = max(1, loader.num_workers * (loader.prefetch_factor or 1))

    def fetch_block():
        for _ in range(block):
            next(batches)

    for _ in range(warmup):
        fetch_block()
    fetch = [time_call(fetch_block, torch.device("cpu")) / block for _ in range(iters)]

    model = build_detector(cfg).to(device)  # as train_detector's: input.train_resize decides who resizes
    trainer = Trainer(cfg, model, build_optimizer(cfg, model), batches, detection_step, None, None, device,
                      cfg.solver.max_iter)
    model.train()
    batch = next(batches)
    for it in range(warmup):
        trainer.run_step(it, batch)
    step = [time_call(lambda: trainer.run_step(0, batch), device) for _ in range(iters)]

    waits, totals = [], []
    for it in range(iters):
        start = time.perf_counter()
        fed = next(batches)
        waits.append(time.perf_counter() - start)
        trainer.run_step(it, fed)
        synchronize(device)
        totals.append(time.perf_counter() - start)
    del batches, loader  # stops the workers
    settings = {"config": config_name, "memory_format": format_name(cfg),
                "num_workers": cfg.data.num_workers, "loader_batches_per_time": block,
                "ims_per_batch": cfg.solver.ims_per_batch, "threads": torch.get_num_threads()}
    extra = {"training_s_per_step": statistics.median(totals), "waiting_for_data_s_per_step": statistics.median(waits),
             "waiting_for_data_fraction": sum(waits) / sum(totals)}
    per_batch = cfg.solver.ims_per_batch
    return Report("data", settings, [SideResult("loader", fetch, images=per_batch),
                                     SideResult("train step", step, images=per_batch)], extra)
