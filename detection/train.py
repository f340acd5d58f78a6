"""Detection training: `train_detector(cfg)` is what `tools/train_det.py` runs.

Writes to `cfg.output_dir`: config.yaml, log.txt, metrics.jsonl, tensorboard/, model_{iter}.pth
checkpoints with a `last_checkpoint` pointer, model_final.pth, loss_curve.png, and the final COCO
evaluation on data.val (metrics.json, eval/).

Under torchrun each process trains on its share of every batch (solver.ims_per_batch is the total) and
evaluates its share of data.val; rank 0 writes all the files.
"""
import logging
import os

from engine import distributed as dist
from engine.checkpoint import Checkpointer
from engine.config import save_config
from engine.data.paths import require_path
from engine.device import setup_device
from engine.errors import ConfigError
from engine.events import MetricsWriter, plot_losses, setup_logging
from engine.solver import build_optimizer, check_steps, solver_summary
from engine.trainer import FINAL, Trainer, close_run, start_run, flat_metrics, weights_to_evaluate

from .build import build_detector, compile_detector
from .data.build import build_detection_train_loader
from .evaluation import evaluate_detector

logger = logging.getLogger("detection")
RESUMED = ("model.weights=null", "model.backbone.weights=null")



def detection_step(model, batch):
    images, targets = batch
    device = next(model.parameters()).device
    images = [img.to(device, non_blocking=True) for img in images]
    targets = [{k: v.to(device, non_blocking=True) for k, v in t.items() if k in ("boxes", "labels", "masks")}
               for t in targets]
    return model(images, targets)


def _fill_categories(cfg, dataset):
    """Without `data.categories` in the config, the training set's own list becomes the label space, and
    it is written into config.yaml, so that evaluation, inference and later runs map labels the same way."""
    if cfg.data.categories:
        return
    cfg.data.categories = [{"id": int(c["id"]), "name": str(c["name"])} for c in dataset.categories]
    if len(cfg.data.categories) != cfg.model.num_classes:
        raise ConfigError(f"model.num_classes={cfg.model.num_classes} but {cfg.data.train.ann_file} has "
                          f"{len(cfg.data.categories)} categories; set model.num_classes="
                          f"{len(cfg.data.categories)} (or list the classes to train in data.categories)")


def train_detector(cfg, resume: bool = False):
    """Train, then evaluate on data.val. Returns the final {iou_type: CocoEvalResult}."""
    out = cfg.output_dir
    # Fail in seconds, not after hours of training, when a dataset path is wrong.
    for split in ("train", "val"):
        require_path(cfg.data[split].ann_file, f"data.{split}.ann_file", f"{split} annotation file")
        require_path(cfg.data[split].img_dir, f"data.{split}.img_dir", f"{split} image directory", folder=True)
    device = start_run(cfg)
    s = cfg.solver
    check_steps(s, s.max_iter)
    # Resuming loads every tensor from the checkpoint, so neither initialisation file is opened then.
    # Whether the loader or the model resizes training images, both take from input.train_resize.
    model = compile_detector(build_detector(cfg, RESUMED if resume else ()).to(device), cfg)
    optimizer = build_optimizer(cfg, model)
    checkpointer = Checkpointer(out)
    start_iter, state = 0, {}
    if resume:
        state = checkpointer.resume(model, optimizer)
        start_iter = state["iteration"]
        logger.info("resumed from %s at iteration %d", state["path"], start_iter)
    loader = build_detection_train_loader(cfg, start_iter=start_iter, rank=dist.rank(),
                                          world_size=dist.world_size())
    _fill_categories(cfg, loader.dataset)
    save_config(cfg, out)
    logger.info("training %s on %d images, device %s: %s", type(model).__name__, len(loader.dataset), device,
                solver_summary(s, dist.world_size(), f"{s.max_iter} iterations", backend=dist.backend()))
    writer = MetricsWriter(out, resume_from=start_iter if resume else None, enabled=dist.is_main())
    trainer = Trainer(cfg, model, optimizer, iter(loader), detection_step, checkpointer, writer, device,
                      s.max_iter, evaluate=lambda m: _metrics(evaluate_detector(cfg, m, device)))
    trainer.restore(state)
    try:
        if start_iter < s.max_iter:
            trainer.train(start_iter)
            trainer.save(FINAL, s.max_iter)
        reports = evaluate_detector(cfg, model, device)
        writer.write({"iter": s.max_iter, **flat_metrics(_metrics(reports))}, prefix="val")
    finally:
        close_run(writer, lambda history: plot_losses(history, os.path.join(out, "loss_curve.png")))
    return reports


def _metrics(reports):
    return {iou_type: report.metrics for iou_type, report in reports.items()}


def evaluate_only(cfg, weights=None):
    """`tools/train_det.py --eval-only`: evaluate `weights`, else model.weights, else the run's final or
    last checkpoint."""
    device = setup_device(cfg)
    setup_logging(cfg.output_dir)
    save_config(cfg, cfg.output_dir)
    path = weights_to_evaluate(cfg, weights)
    model = build_detector(cfg, weights=None if path == cfg.model.weights else path, for_inference=True).to(device)
    compile_detector(model.eval(), cfg)
    logger.info("evaluating %s", path)
    return evaluate_detector(cfg, model, device)
