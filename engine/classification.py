"""ImageNet-style classification training: the first half of the pretrain-then-transfer workflow.

`train_classifier(cfg)` trains a ResNet on an ImageFolder layout and writes to `cfg.output_dir`:
config.yaml, log.txt, metrics.jsonl (one line per logged iteration and one per epoch's evaluation),
metrics.json (top-1/top-5 in percent on the validation set), model_final.pth, backbone.pth (the
ResNet without its classifier, loadable as `model.backbone.weights` of a detection config) and
accuracy_curve.png. In classification configs `solver.steps` are epochs.
"""
import json
import logging
import os
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from backbones.build import build_classifier
from backbones.weights import save_weights
from engine.config import save_config
from engine.data.imagefolder import ImageFolder, build_cls_transform
from engine.device import resolve_device
from engine.errors import ConfigError
from engine.events import setup_logging
from engine.solver import build_optimizer, check_steps, lr_at
from engine.seeding import seed_everything, seed_transforms, seed_worker

logger = logging.getLogger("engine")


def build_cls_data(cfg):
    d = cfg.data
    if not d.train.root or not d.val.root:
        raise ConfigError("classification needs data.train.root and data.val.root (ImageFolder layouts)")
    scale = cfg.input.crop_scale
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ConfigError(f"input.crop_scale must be [low, high] with 0 < low <= high <= 1, got {scale}")
    train = ImageFolder(d.train.root, build_cls_transform(True, cfg.input.size, scale=cfg.input.crop_scale))
    val = ImageFolder(d.val.root, build_cls_transform(False, cfg.input.size), class_names=train.classes)
    if cfg.model.num_classes != len(train.classes):
        raise ConfigError(f"model.num_classes={cfg.model.num_classes} but {d.train.root} has "
                          f"{len(train.classes)} class folders; set model.num_classes={len(train.classes)}")
    seed_transforms(train, cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    loader_args = dict(num_workers=d.num_workers, worker_init_fn=seed_worker,
                       persistent_workers=d.num_workers > 0)
    train_loader = DataLoader(train, batch_size=cfg.solver.ims_per_batch, shuffle=True, drop_last=True,
                              generator=g, **loader_args)
    val_loader = DataLoader(val, batch_size=cfg.solver.ims_per_batch, shuffle=False, **loader_args)
    if len(train_loader) == 0:
        raise ConfigError(f"solver.ims_per_batch={cfg.solver.ims_per_batch} is larger than the "
                          f"{len(train)} training images in {d.train.root}")
    return train_loader, val_loader


@torch.no_grad()
def evaluate_classifier(model, loader, device) -> dict:
    """Top-1 and top-5 accuracy in percent (top-k capped at the number of classes)."""
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
    top1, top5 = (100.0 * correct / max(total, 1)).tolist()
    return {"top1": top1, "top5": top5}


def plot_curves(history, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    its = [h["iter"] for h in history if "loss" in h]
    ax_loss.plot(its, [h["loss"] for h in history if "loss" in h])
    ax_loss.set(xlabel="iteration", ylabel="training loss", title="loss")
    evals = [h for h in history if "top1" in h]
    ax_acc.plot([h["epoch"] for h in evals], [h["top1"] for h in evals], "o-", label="top-1")
    ax_acc.plot([h["epoch"] for h in evals], [h["top5"] for h in evals], "s--", label="top-5")
    ax_acc.set(xlabel="epoch", ylabel="validation accuracy (%)", title="accuracy", ylim=(0, 100))
    ax_acc.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train_classifier(cfg) -> dict:
    out = cfg.output_dir
    setup_logging(out)
    save_config(cfg, out)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    train_loader, val_loader = build_cls_data(cfg)
    model = build_classifier(cfg).to(device)
    s = cfg.solver
    optimizer = build_optimizer(cfg, model)
    iters_per_epoch = len(train_loader)
    max_iter = s.epochs * iters_per_epoch
    check_steps(s, s.epochs, "epochs")
    logger.info("training %s on %d images (%d classes), %d epochs x %d iterations, device %s",
                type(model).__name__, len(train_loader.dataset), cfg.model.num_classes, s.epochs,
                iters_per_epoch, device)
    history = []
    it = 0
    with open(os.path.join(out, "metrics.jsonl"), "w") as log, \
            tqdm(total=max_iter, desc="train", dynamic_ncols=True, disable=None) as bar:
        for epoch in range(s.epochs):
            model.train()
            t_data = time.perf_counter()
            for images, labels in train_loader:
                t_start = time.perf_counter()
                lr = lr_at(cfg.solver, it, max_iter, [step * iters_per_epoch for step in s.steps])
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss = F.cross_entropy(model(images.to(device)), labels.to(device))
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss.item()} at iteration {it}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                now = time.perf_counter()
                record = {"iter": it, "epoch": epoch, "lr": lr, "loss": loss.item(),
                          "data_time": t_start - t_data, "time": now - t_data}
                history.append(record)
                log.write(json.dumps(record) + "\n")
                bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.4f}")
                bar.update()
                it += 1
                t_data = time.perf_counter()
            metrics = evaluate_classifier(model, val_loader, device)
            record = {"iter": it, "epoch": epoch + 1, **metrics}
            history.append(record)
            log.write(json.dumps(record) + "\n")
            log.flush()
            logger.info("epoch %d: top-1 %.2f%%, top-5 %.2f%%", epoch + 1, metrics["top1"], metrics["top5"])
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_weights(os.path.join(out, "model_final.pth"), state, {"kind": "classifier"})
    save_weights(os.path.join(out, "backbone.pth"),
                 {k: v for k, v in state.items() if not k.startswith("fc.")}, {"kind": "backbone"})
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    plot_curves(history, os.path.join(out, "accuracy_curve.png"))
    return metrics
