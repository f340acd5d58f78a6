"""ImageNet-style classification training: the first half of the pretrain-then-transfer workflow.

`train_classifier(cfg, resume=False)` trains a ResNet on an ImageFolder layout with the shared
`engine.trainer.Trainer` and writes to `cfg.output_dir`: config.yaml, log.txt, metrics.jsonl (logged
iterations and every epoch's evaluation), tensorboard/, model_{iter}.pth checkpoints with a
`last_checkpoint` pointer, model_final.pth, backbone.pth, metrics.json (top-1/top-5 in percent on
data.val) and accuracy_curve.png.

backbone.pth is the trained network (the EMA weights when `solver.ema`) with its classifier `fc.*`, like an
ImageNet checkpoint: a detection config's `model.backbone.weights`, or torchvision's names with
`tools/convert_weights.py --to torchvision`. In classification configs `solver.steps` are epochs, and the
model is evaluated at the end of every epoch.

Under torchrun each process trains on its slice of every batch (solver.ims_per_batch is the total; the
processes together see the batches of a single-process run) and evaluates its share of data.val; rank 0
writes the files.
"""
import json
import logging
import os
from functools import partial

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from backbones.build import build_classifier, build_resnet
from backbones.weights import load_state_dict, read_weights, save_weights
from engine import distributed as dist
from engine.checkpoint import Checkpointer, safe_torch_load
from engine.compile import compile_model
from engine.config import save_config
from backbones.classification.imagefolder import ImageFolder, build_cls_transform, class_folders
from engine.data.paths import require_path
from engine.data.samplers import EpochBatchSampler
from engine.device import memory_format, pin_memory, setup_device
from engine.ema import ModelEMA
from engine.errors import CheckpointError, ConfigError
from engine.events import MetricsWriter, setup_logging
from engine.seeding import seed_worker
from engine.solver import build_optimizer, check_batch_divides, check_steps, solver_summary
from engine.trainer import FINAL, Trainer, close_run, start_run, weights_to_evaluate

logger = logging.getLogger("engine")

BACKBONE = "backbone.pth"


def compile_classifier(model, cfg):
    """`model.compile` for a classifier: the whole network, in place (the state dict keeps its keys). Its
    inputs have one size, `input.size` crops in batches of `solver.ims_per_batch`, so torch's default
    (`dynamic=None`) compiles for that size, and once more with a symbolic batch for a smaller last batch."""
    return compile_model(model, cfg, what="the classifier")


def check_cls_config(cfg):
    """The settings a run needs, checked before anything is built: fail in seconds, not after an epoch."""
    require_path(cfg.data.train.root, "data.train.root", "training ImageFolder (root/<class>/<image>)", folder=True)
    require_path(cfg.data.val.root, "data.val.root", "validation ImageFolder (root/<class>/<image>)", folder=True)
    scale = cfg.input.crop_scale
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ConfigError(f"input.crop_scale must be [low, high] with 0 < low <= high <= 1, got {scale}")


def check_num_classes(cfg, classes, root):
    if cfg.model.num_classes != len(classes):
        raise ConfigError(f"model.num_classes={cfg.model.num_classes} but {root} has {len(classes)} class "
                          f"folders; set model.num_classes={len(classes)}")


def cls_transform(cfg, train: bool):
    """Training: RandomResizedCrop of `input.size` (area `input.crop_scale`) + horizontal flip; evaluation:
    shorter side to 256/224 x `input.size`, centre crop of `input.size`."""
    if train:
        return build_cls_transform(True, cfg.input.size, scale=cfg.input.crop_scale)
    return build_cls_transform(False, cfg.input.size)


def build_cls_datasets(cfg):
    """(train, val) ImageFolders; val is labelled in train's class order and must hold the same classes."""
    d = cfg.data
    train = ImageFolder(d.train.root, cls_transform(cfg, True), skip_bad_images=d.skip_bad_images)
    check_num_classes(cfg, train.classes, d.train.root)
    val = ImageFolder(d.val.root, cls_transform(cfg, False), class_names=train.classes,
                      skip_bad_images=d.skip_bad_images)
    return train, val


def build_cls_train_loader(cfg, dataset, start_iter: int = 0) -> DataLoader:
    """Endless batches `(images, labels)` of `solver.ims_per_batch` images, epoch after epoch (see
    engine/data/samplers.py); `start_iter` skips the batches a resumed run has trained on."""
    check_batch_divides(cfg.solver.ims_per_batch, dist.world_size())
    batches = EpochBatchSampler(len(dataset), cfg.solver.ims_per_batch, cfg.seed, start_batch=start_iter,
                                rank=dist.rank(), world_size=dist.world_size())
    return _loader(cfg, dataset, batch_sampler=batches)


def build_cls_test_loader(cfg, dataset) -> DataLoader:
    """Every image once, in order, in batches of `solver.ims_per_batch` (per process); in a distributed
    run, this process's contiguous share of the images."""
    share = torch.utils.data.Subset(dataset, dist.shard(len(dataset))) if dist.world_size() > 1 else dataset
    batch = max(cfg.solver.ims_per_batch // dist.world_size(), 1)
    return _loader(cfg, share, batch_size=batch, shuffle=False)


def _loader(cfg, dataset, **batching) -> DataLoader:
    workers = cfg.data.num_workers
    return DataLoader(dataset, num_workers=workers, worker_init_fn=seed_worker, persistent_workers=workers > 0,
                      pin_memory=pin_memory(cfg), generator=torch.Generator().manual_seed(cfg.seed), **batching)


def classification_step(model, batch, label_smoothing: float = 0.0,
                        memory_format: torch.memory_format = torch.contiguous_format):
    images, labels = batch
    device = next(model.parameters()).device
    logits = model(images.to(device, non_blocking=True, memory_format=memory_format))
    return {"loss_cls": F.cross_entropy(logits, labels.to(device, non_blocking=True), label_smoothing=label_smoothing)}


@torch.no_grad()
def evaluate_classifier(model, loader, device) -> dict:
    """Top-1 and top-5 accuracy in percent (top-k capped at the number of classes). In a distributed run
    `loader` holds this process's share, the counts are summed over the processes, and every process
    evaluates rank 0's BN statistics."""
    dist.sync_buffers(model)
    model.eval()
    correct = torch.zeros(2)
    total = 0
    for images, labels in loader:
        logits = model(images.to(device))
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices.cpu()
        hit = top == labels[:, None]
        correct += torch.stack([hit[:, 0].sum(), hit.any(dim=1).sum()]).float()
        total += len(labels)
    counts = dist.all_reduce_sum(torch.cat([correct.double(), torch.tensor([float(total)], dtype=torch.float64)])
                                 .to(device)).cpu()
    correct, total = counts[:2], int(counts[2])
    top1, top5 = (100.0 * correct / max(total, 1)).tolist()
    logger.info("validation (%d images): top-1 %.2f%%, top-5 %.2f%%", total, top1, top5)
    return {"top1": top1, "top5": top5}


def plot_curves(history, iters_per_epoch: int, path: str):
    """Training loss and validation top-1/top-5 over epochs, side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    train = [h for h in history if "loss" in h]
    ax_loss.plot([(h["iter"] + 1) / iters_per_epoch for h in train], [h["loss"] for h in train])
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="loss")
    evals = [h for h in history if "top1" in h]
    epochs = [h["iter"] / iters_per_epoch for h in evals]
    ax_acc.plot(epochs, [h["top1"] for h in evals], "o-", label="top-1")
    ax_acc.plot(epochs, [h["top5"] for h in evals], "s--", label="top-5")
    ax_acc.set(xlabel="epoch", ylabel="validation accuracy (%)", title="accuracy", ylim=(0, 102))
    ax_acc.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _write_metrics(cfg, metrics):
    with open(os.path.join(cfg.output_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)


def save_backbone(cfg, model, classes, metrics):
    """The trained network in our key names, classifier included, as an ImageNet checkpoint is."""
    b = cfg.model.backbone
    meta = {"kind": "backbone", "depth": b.depth, "groups": b.groups, "width_per_group": b.width_per_group,
            "num_classes": cfg.model.num_classes, "classes": list(classes), "ema": cfg.solver.ema, **metrics}
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_weights(os.path.join(cfg.output_dir, BACKBONE), state, meta)


def train_classifier(cfg, resume: bool = False) -> dict:
    """Train, evaluating on data.val every epoch. Returns the final {"top1", "top5"} (percent)."""
    out, s = cfg.output_dir, cfg.solver
    check_cls_config(cfg)
    device = start_run(cfg, epochs=True)
    check_steps(s, s.epochs, "epochs")
    train_set, val_set = build_cls_datasets(cfg)
    iters_per_epoch = len(train_set) // s.ims_per_batch
    if iters_per_epoch == 0:
        raise ConfigError(f"solver.ims_per_batch={s.ims_per_batch} is larger than the {len(train_set)} "
                          f"training images in {cfg.data.train.root}")
    max_iter = s.epochs * iters_per_epoch
    save_config(cfg, out)
    # Compiled before the EMA copies it: the copy is eager (engine.compile), evaluated once an epoch.
    model = compile_classifier(build_classifier(cfg).to(device, memory_format=memory_format(cfg)), cfg)
    optimizer = build_optimizer(cfg, model)
    checkpointer = Checkpointer(out)
    state = {}
    if resume:
        state = checkpointer.resume(model, optimizer)
        logger.info("resumed from %s at iteration %d", state["path"], state["iteration"])
    start_iter = state.get("iteration", 0)
    if s.ema:
        dist.sync_buffers(model, parameters=True)  # every process's average starts from rank 0's weights
    ema = ModelEMA(model, s.ema_decay) if s.ema else None
    evaluated = ema.module if ema is not None else model  # what is evaluated and exported
    val_loader = build_cls_test_loader(cfg, val_set)
    writer = MetricsWriter(out, resume_from=start_iter if resume else None, enabled=dist.is_main())
    trainer = Trainer(cfg, model, optimizer, iter(build_cls_train_loader(cfg, train_set, start_iter)),
                      partial(classification_step, label_smoothing=s.label_smoothing,
                              memory_format=memory_format(cfg)), checkpointer, writer,
                      device, max_iter, steps=[epoch * iters_per_epoch for epoch in s.steps],
                      evaluate=lambda m: evaluate_classifier(evaluated, val_loader, device),
                      eval_period=iters_per_epoch, ema=ema)
    trainer.restore(state)
    logger.info("training %s-%d on %d images (%d classes), device %s%s: %s", type(model).__name__,
                cfg.model.backbone.depth, len(train_set), len(train_set.classes), device,
                ", EMA of the weights" if ema is not None else "",
                solver_summary(s, dist.world_size(), f"{s.epochs} epochs of {iters_per_epoch} iterations", "epochs",
                               dist.backend()))
    try:
        if start_iter < max_iter:
            trainer.train(start_iter)
            trainer.save(FINAL, max_iter)
        metrics = evaluate_classifier(evaluated, val_loader, device)
        writer.write({"iter": max_iter, **metrics}, prefix="val")
    finally:
        close_run(writer, lambda history: plot_curves(history, iters_per_epoch,
                                                      os.path.join(out, "accuracy_curve.png")))
    if dist.is_main():
        save_backbone(cfg, evaluated, train_set.classes, metrics)
        _write_metrics(cfg, metrics)
    return metrics


def read_eval_weights(path: str, use_ema: bool):
    """The state dict to evaluate from `path`: a checkpoint's EMA weights when `use_ema` and it has them,
    else its model weights (a checkpoint, backbone.pth or a bare state dict)."""
    if use_ema:
        obj = safe_torch_load(path, "weights file")
        if isinstance(obj, dict) and isinstance(obj.get("ema"), dict):
            return obj["ema"]
    return read_weights(path)


def evaluate_only(cfg, weights=None) -> dict:
    """`tools/train_cls.py --eval-only`: evaluate `weights`, else model.weights, else the run's final or
    last checkpoint, on data.val; writes metrics.json."""
    require_path(cfg.data.val.root, "data.val.root", "validation ImageFolder (root/<class>/<image>)", folder=True)
    device = setup_device(cfg)
    setup_logging(cfg.output_dir)
    save_config(cfg, cfg.output_dir)
    path = weights_to_evaluate(cfg, weights)
    # Labels follow the training set's class order; without the training set at hand, val's own sorted
    # folders are the same order whenever the two hold the same classes.
    train_root = cfg.data.train.root
    classes = class_folders(train_root) if train_root and os.path.isdir(train_root) else None
    val_set = ImageFolder(cfg.data.val.root, cls_transform(cfg, False), class_names=classes,
                          skip_bad_images=cfg.data.skip_bad_images)
    check_num_classes(cfg, val_set.classes, cfg.data.val.root)
    # The file to evaluate is the whole classifier: model.backbone.weights is not opened.
    model = compile_classifier(build_resnet(cfg, cfg.model.num_classes, init_weights=False).to(device).eval(), cfg)
    report = load_state_dict(model, read_eval_weights(path, cfg.solver.ema), source=path)
    if report.missing:
        raise CheckpointError(f"{path} lacks {len(report.missing)} of the model's tensors "
                              f"({', '.join(report.missing[:5])}, ...); is it a checkpoint of this config's model?")
    logger.info("evaluating %s", path)
    metrics = evaluate_classifier(model, build_cls_test_loader(cfg, val_set), device)
    if dist.is_main():
        _write_metrics(cfg, metrics)
    return metrics
