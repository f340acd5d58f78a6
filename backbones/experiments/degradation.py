"""The degradation experiment of He et al. 2015 (Sec. 4.2, Figure 6): plain and residual CIFAR networks
of several depths trained on the same data with the same schedule, their training and test error per
epoch, one figure and one JSON file.

    results = run_degradation(load_data(None), depths=(20, 56), epochs=12, output="out/")
    print(format_table(results))

What the paper shows on CIFAR-10 (182 epochs): plain-56 has a higher *training* error than plain-20 (the
degradation problem, which is not overfitting), while ResNet-56 trains to a lower error than ResNet-20.

Data (`load_data`):
- `None`: scikit-learn's handwritten digits (1,797 real 8x8 scans, 10 classes), upsampled bilinearly to
  `DIGITS_SIZE` pixels and replicated to 3 channels, split 80/20 stratified by class with a fixed seed
  (`DIGITS_SPLIT_SEED`, independent of the training seed, so every run sees the same split). It is
  shipped with the package, so the experiment runs offline on a CPU in minutes.
- a CIFAR-10 folder: the python batches (`data_batch_1`..`data_batch_5`, `test_batch`), read with a
  restricted unpickler that builds only numpy arrays, bytes, str, numbers, lists and dicts; or an
  ImageFolder layout (`train/<class>/*.png`, `test/<class>/*.png`) read with `engine.data.ImageFolder`.

Training (`train_network`), as in the paper where a short run allows it:
- SGD, momentum 0.9, weight decay 1e-4 on every weight (the schema's solver defaults; paper Sec. 4.2),
  built by `engine.solver.build_optimizer`; lr `lr` divided by 10 at 50% and 75% of the epochs
  (`engine.solver.lr_at`): the paper divides at 32k and 48k of 64k iterations, the same fractions.
- Paper: lr 0.1 at batch 128, 391 iterations per epoch, 64k iterations. The digits have 1,437 training
  images, 11 batches of 128 per epoch, too few steps for a short run; the defaults are batch 32 and lr
  0.025, the paper's lr per image (linear scaling), 44 iterations per epoch, 12 epochs (528 iterations,
  about 5 minutes for the four networks on 2 CPU cores). lr 0.05 was tried too: ResNet-56 then trains
  far more slowly than ResNet-20 (11% training error after 12 epochs instead of 1.4%), much as the
  paper's lr 0.1 was too large for ResNet-110 to start converging.
- Augmentation, the paper's: pad by 1/8 of the image side (4 px at 32), take a random crop of the
  original size, and flip horizontally for CIFAR only (a mirrored digit is another symbol or none).
  Inputs are standardised by the training set's per-channel mean and standard deviation (the paper
  subtracts the per-pixel mean; either centres the inputs, and this one also suits the digits).
- Every network starts from the same seed and sees the same batches in the same order.
- Training error is the running error of the mini-batches during each epoch (training mode, augmented
  images, the weights as they are at each step), what a training log reports; the paper does not say
  how its curves were measured, and a separate pass would cost another epoch of forward passes. Test
  error is a full pass over the test set in evaluation mode after each epoch.
"""
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from backbones.cifar import cifar_resnet
from engine.config import Config
from engine.device import resolve_device
from engine.errors import ConfigError, DatasetError, TrainingError
from engine.pickles import restricted_load
from engine.seeding import seed_everything
from engine.solver import build_optimizer, check_steps, lr_at

logger = logging.getLogger("engine")

# The scans have 8x8 pixels, so 32 px would add no information and cost 4x the compute of 16 px; at 16
# px the last stage still works on 4x4 maps (8x8 for CIFAR's 32 px).
DIGITS_SIZE = 16
DIGITS_SPLIT_SEED = 0
CIFAR_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR_TEST_BATCH = "test_batch"
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR_SIZE = 32
EVAL_BATCH = 500


@dataclass
class ImageSet:
    """One split held in memory: uint8 images (N, 3, H, W) and int64 labels (N,)."""
    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self):
        return len(self.labels)

    def subset(self, n: int) -> "ImageSet":
        return ImageSet(self.images[:n], self.labels[:n])


@dataclass
class DegradationData:
    name: str
    train: ImageSet
    test: ImageSet
    classes: List[str]
    flip: bool  # horizontal flips are a valid augmentation for this data


# ---------------------------------------------------------------------------------------------- data


def load_data(cifar: Optional[str] = None) -> DegradationData:
    """CIFAR-10 from `cifar` (either layout), or the digits when `cifar` is None."""
    return load_digits() if cifar is None else load_cifar(cifar)


def load_digits(size: int = DIGITS_SIZE, test_fraction: float = 0.2) -> DegradationData:
    try:
        from sklearn.datasets import load_digits as sklearn_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise ConfigError("the default dataset needs scikit-learn (pip install scikit-learn), "
                          "or give --cifar PATH") from None
    digits = sklearn_digits()
    # Pixels are ink counts 0..16; scale to 0..255 and upsample smoothly to the network's input size.
    images = torch.from_numpy(digits.images.astype(np.float32) * (255.0 / 16.0))[:, None]
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = images.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(digits.target.astype(np.int64))
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=test_fraction,
                                           stratify=digits.target, random_state=DIGITS_SPLIT_SEED)
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    return DegradationData("sklearn digits", ImageSet(images[train_idx], labels[train_idx]),
                           ImageSet(images[test_idx], labels[test_idx]), [str(c) for c in range(10)],
                           flip=False)


def load_cifar(path: str) -> DegradationData:
    path = os.fspath(path)
    nested = os.path.join(path, "cifar-10-batches-py")  # the folder the official archive unpacks to
    if not os.path.exists(os.path.join(path, CIFAR_TEST_BATCH)) and os.path.isdir(nested):
        path = nested
    batches = [os.path.join(path, name) for name in CIFAR_BATCHES + [CIFAR_TEST_BATCH]]
    if all(os.path.isfile(b) for b in batches):
        train = _concat([_read_cifar_batch(b) for b in batches[:-1]])
        return DegradationData("CIFAR-10", train, _read_cifar_batch(batches[-1]), list(CIFAR_CLASSES),
                               flip=True)
    if os.path.isdir(os.path.join(path, "train")) and os.path.isdir(os.path.join(path, "test")):
        return _load_cifar_imagefolder(path)
    problem = "not a CIFAR-10 folder" if os.path.isdir(path) else "no such folder"
    raise DatasetError(f"{path}: {problem}; expected the python batches "
                       f"({', '.join(CIFAR_BATCHES)}, {CIFAR_TEST_BATCH}) or an ImageFolder layout "
                       "(train/<class>/*.png and test/<class>/*.png)")


def _read_cifar_batch(path: str) -> ImageSet:
    # Written by Python 2: its str objects are read as bytes, the keys are b"data" and b"labels".
    batch = restricted_load(path, DatasetError, encoding="bytes")
    data = batch.get(b"data", batch.get("data")) if isinstance(batch, dict) else None
    labels = batch.get(b"labels", batch.get("labels")) if isinstance(batch, dict) else None
    if not isinstance(data, np.ndarray) or labels is None:
        raise DatasetError(f"{path}: not a CIFAR-10 batch; expected a dict with b'data' (N x 3072 uint8) "
                           "and b'labels'")
    try:
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (ValueError, TypeError):
        raise DatasetError(f"{path}: b'labels' must be a list of integers 0..9") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * CIFAR_SIZE ** 2 \
            or len(labels) != len(data):
        raise DatasetError(f"{path}: b'data' must be N x 3072 uint8 with N labels, got {data.dtype} "
                           f"{data.shape} and {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(CIFAR_CLASSES)):
        raise DatasetError(f"{path}: labels must be 0..9, got {labels.min()}..{labels.max()}")
    # Rows are 1024 red, 1024 green, 1024 blue values, each plane row-major: exactly (3, 32, 32).
    images = torch.from_numpy(data.reshape(-1, 3, CIFAR_SIZE, CIFAR_SIZE).copy())
    return ImageSet(images, torch.from_numpy(labels))


def _concat(sets: Sequence[ImageSet]) -> ImageSet:
    return ImageSet(torch.cat([s.images for s in sets]), torch.cat([s.labels for s in sets]))


def _load_cifar_imagefolder(path: str) -> DegradationData:
    import albumentations as A

    from backbones.classification.imagefolder import ImageFolder

    # Decoding through the project's reader; images of another size are resized to the CIFAR 32x32.
    resize = A.Compose([A.Resize(CIFAR_SIZE, CIFAR_SIZE)])
    train = ImageFolder(os.path.join(path, "train"), transform=resize)
    test = ImageFolder(os.path.join(path, "test"), transform=resize, class_names=train.classes)

    def to_set(folder):
        images, labels = zip(*(folder[i] for i in range(len(folder))))  # HxWx3 uint8 RGB, int
        return ImageSet(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(),
                        torch.tensor(labels, dtype=torch.int64))

    return DegradationData(f"CIFAR-10 ImageFolder {path}", to_set(train), to_set(test),
                           list(train.classes), flip=True)


# ------------------------------------------------------------------------------------------ training


class Normalizer:
    """uint8 images -> float, standardised per channel with the training set's statistics."""

    def __init__(self, images: torch.Tensor, device):
        # In chunks: CIFAR-10's training set as float64 would take 1.2 GB at once.
        total = torch.zeros(2, images.shape[1], dtype=torch.float64)
        for chunk in images.split(5000):
            x = chunk.to(torch.float64) / 255.0
            total += torch.stack([x.sum(dim=(0, 2, 3)), x.square().sum(dim=(0, 2, 3))])
        count = images.numel() // images.shape[1]
        mean = total[0] / count
        std = (total[1] / count - mean.square()).clamp_min(1e-6).sqrt()
        self.mean = mean.float().view(1, -1, 1, 1).to(device)
        self.std = std.float().view(1, -1, 1, 1).to(device)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() / 255.0 - self.mean) / self.std


def augment(images: torch.Tensor, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """The paper's CIFAR augmentation on a normalised batch: zero-pad by 1/8 of the side (4 px at 32;
    zero is the mean pixel after normalisation), crop the original size at a random offset per image,
    and with `flip` mirror half of the images."""
    n, _, h, w = images.shape
    pad = max(h // 8, 1)
    padded = F.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator).to(images.device)
    dx = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator).to(images.device)
    rows = (dy + torch.arange(h, device=images.device))[:, None, :, None]
    cols = (dx + torch.arange(w, device=images.device))[:, None, None, :]
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    channel = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    out = padded[batch, channel, rows, cols]
    if flip:
        mirror = (torch.rand(n, generator=generator) < 0.5).to(images.device)
        out = torch.where(mirror[:, None, None, None], out.flip(3), out)
    return out


def network_name(depth: int, plain: bool) -> str:
    return f"{'plain' if plain else 'ResNet'}-{depth}"


def solver_config(lr: float, epochs: int) -> Config:
    """The paper's solver (the schema's defaults: SGD, momentum 0.9, weight decay 1e-4) with lr divided
    by 10 at 50% and 75% of training, where the paper divides it (32k and 48k of 64k iterations)."""
    steps = sorted({s for s in (epochs // 2, (3 * epochs) // 4) if 0 < s < epochs})
    cfg = Config.from_dict({"solver": {"optimizer": "SGD", "base_lr": lr, "momentum": 0.9,
                                       "weight_decay": 1e-4, "steps": steps, "gamma": 0.1,
                                       "lr_scheduler": "step", "epochs": epochs}})
    check_steps(cfg.solver, epochs, "epochs")
    return cfg


@torch.no_grad()
def error_rate(model, images: torch.Tensor, labels: torch.Tensor, normalize) -> float:
    """Top-1 error in percent, in evaluation mode (images and labels on the model's device)."""
    model.eval()
    wrong = 0
    for start in range(0, len(labels), EVAL_BATCH):
        logits = model(normalize(images[start:start + EVAL_BATCH]))
        wrong += (logits.argmax(1) != labels[start:start + EVAL_BATCH]).sum().item()
    return 100.0 * wrong / max(len(labels), 1)


def train_network(depth: int, plain: bool, data: DegradationData, *, epochs: int, batch_size: int,
                  lr: float, device, seed: int) -> dict:
    """Train plain-`depth` or ResNet-`depth` and return its record: parameters and per-epoch errors."""
    name = network_name(depth, plain)
    seed_everything(seed)  # same initialisation stream and the same batches for every network
    generator = torch.Generator().manual_seed(seed)
    model = cifar_resnet(depth, num_classes=len(data.classes), plain=plain).to(device)
    cfg = solver_config(lr, epochs)
    optimizer = build_optimizer(cfg, model)
    normalize = Normalizer(data.train.images, device)
    # Whole splits go to the device once (CIFAR-10 is 150 MB of uint8); batches are indexed there.
    train_images, train_labels = data.train.images.to(device), data.train.labels.to(device)
    test_images, test_labels = data.test.images.to(device), data.test.labels.to(device)
    n = len(data.train)
    iters_per_epoch = n // batch_size
    max_iter = epochs * iters_per_epoch
    steps = [s * iters_per_epoch for s in cfg.solver.steps]
    record = {"name": name, "depth": depth, "residual": not plain,
              "parameters": sum(p.numel() for p in model.parameters()),
              "iterations_per_epoch": iters_per_epoch, "train_error": [], "test_error": []}
    start = time.perf_counter()
    it = 0
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(n, generator=generator).to(device)
        wrong = seen = 0
        for b in range(iters_per_epoch):
            idx = order[b * batch_size:(b + 1) * batch_size]
            images = augment(normalize(train_images[idx]), data.flip, generator)
            labels = train_labels[idx]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(cfg.solver, it, max_iter, steps)
            logits = model(images)
            loss = F.cross_entropy(logits, labels)
            if not torch.isfinite(loss):
                raise TrainingError(f"{name}: loss became {loss.item()} at iteration {it} (epoch {epoch + 1}); "
                                    f"lower --lr (now {lr})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            wrong += (logits.detach().argmax(1) != labels).sum().item()
            seen += len(labels)
            it += 1
        record["train_error"].append(100.0 * wrong / seen)
        record["test_error"].append(error_rate(model, test_images, test_labels, normalize))
        logger.info("%s epoch %d/%d: train error %.2f%%, test error %.2f%% (%.0f s)", name, epoch + 1,
                    epochs, record["train_error"][-1], record["test_error"][-1], time.perf_counter() - start)
    record["seconds"] = round(time.perf_counter() - start, 1)
    return record


def check_settings(depths: Sequence[int], epochs: int, lr: float, limit: Optional[int] = None):
    """The settings that do not depend on the data, checked before any is loaded."""
    for depth in depths:
        if depth < 8 or (depth - 2) % 6:
            raise ConfigError(f"--depths: {depth} is not 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110)")
    if epochs < 1:
        raise ConfigError(f"--epochs must be at least 1, got {epochs}")
    if lr <= 0:
        raise ConfigError(f"--lr must be positive, got {lr}")
    if limit is not None and limit < 8:
        raise ConfigError(f"--limit must be at least 8 images, got {limit}")


def run_degradation(data: DegradationData, *, depths: Sequence[int] = (20, 56), epochs: int = 12,
                    batch_size: int = 32, lr: float = 0.025, seed: int = 0, device: str = "auto",
                    output: Optional[str] = None, limit: Optional[int] = None) -> dict:
    """Plain and residual networks of each depth on `data`; writes `output/degradation.json` and
    `output/degradation.png` when `output` is given. `limit` keeps the first `limit` training images and
    `limit // 4` test images (quick checks)."""
    depths = list(depths)
    check_settings(depths, epochs, lr, limit)
    if limit is not None:
        data = DegradationData(data.name, data.train.subset(limit), data.test.subset(max(limit // 4, 1)),
                               data.classes, data.flip)
    if not 2 <= batch_size <= len(data.train):
        raise ConfigError(f"--batch-size must be between 2 and the {len(data.train)} training images, "
                          f"got {batch_size}")
    dev = resolve_device(device)
    logger.info("%s: %d training and %d test images of %s, %d classes; device %s", data.name,
                len(data.train), len(data.test), "x".join(map(str, data.train.images.shape[1:])),
                len(data.classes), dev)
    networks = [train_network(depth, plain, data, epochs=epochs, batch_size=batch_size, lr=lr, device=dev,
                              seed=seed)
                for plain in (True, False) for depth in depths]
    cfg = solver_config(lr, epochs)
    results = {
        "dataset": data.name, "train_images": len(data.train), "test_images": len(data.test),
        "image_size": list(data.train.images.shape[1:]), "epochs": epochs, "batch_size": batch_size,
        "lr": lr, "lr_steps_epochs": list(cfg.solver.steps), "momentum": cfg.solver.momentum,
        "weight_decay": cfg.solver.weight_decay, "seed": seed, "device": str(dev),
        "train_error_measure": "running error of the augmented mini-batches during each epoch (train mode)",
        "test_error_measure": "full test set after each epoch (eval mode)",
        "networks": networks,
    }
    if output is not None:
        os.makedirs(output, exist_ok=True)
        with open(os.path.join(output, "degradation.json"), "w") as f:
            json.dump(results, f, indent=2)
        plot_degradation(results, os.path.join(output, "degradation.png"))
    return results


# ------------------------------------------------------------------------------------------- reports


def plot_degradation(results: dict, path: str):
    """Figure 6's layout: plain nets left, ResNets right; dashed training error, bold test error."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths = sorted({net["depth"] for net in results["networks"]})
    colors = dict(zip(depths, plt.get_cmap("tab10").colors))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, residual in zip(axes, (False, True)):
        nets = [n for n in results["networks"] if n["residual"] == residual]
        # Like the paper's 0-20% axes: room for the final errors, the first epochs' high ones clipped.
        final = max(max(net["train_error"][-1], net["test_error"][-1]) for net in nets)
        top = min(100.0, 5.0 * math.ceil(max(10.0, 3.0 * final) / 5.0))
        for net in nets:
            epochs = range(1, len(net["test_error"]) + 1)
            color = colors[net["depth"]]
            ax.plot(epochs, net["train_error"], "--", color=color, linewidth=1)
            ax.plot(epochs, net["test_error"], "-", color=color, linewidth=2.2, label=net["name"])
        for step in results["lr_steps_epochs"]:
            ax.axvline(step, color="grey", linestyle=":", linewidth=0.8)  # lr divided by 10 after it
        ax.set(title=f"{'ResNets' if residual else 'plain networks'} ({results['dataset']})",
               xlabel="epoch", ylim=(0, top))
        ax.grid(alpha=0.3)
        ax.legend(title="dashed: training, bold: test")
        ax.set_ylabel("error (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_table(results: dict) -> str:
    lines = [f"{'network':<12}{'parameters':>12}{'train err %':>13}{'test err %':>12}{'time s':>9}"]
    for net in results["networks"]:
        lines.append(f"{net['name']:<12}{net['parameters']:>12,}{net['train_error'][-1]:>13.2f}"
                     f"{net['test_error'][-1]:>12.2f}{net['seconds']:>9.0f}")
    return "\n".join(lines)
