"""Config -> data loaders: dataset (decode, targets) -> mapper (albumentations) -> grouped batches."""
import torch
from torch.utils.data import DataLoader

from engine.device import pin_memory
from engine.seeding import seed_worker
from engine.solver import check_batch_divides

from .coco import CocoDetection
from .mapper import transform_from_config
from .samplers import AspectRatioGroupedBatchSampler, InferenceSampler, TrainingSampler, sample_seed


def collate_lists(batch):
    """Images of different sizes stay a list; the model pads them into one tensor."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def wants_masks(cfg) -> bool:
    """Whether the configured model predicts instance masks: then datasets carry masks and evaluation
    scores "segm" next to "bbox"."""
    return cfg.model.name == "mask_rcnn"


def build_dataset(cfg, split: str, train: bool, mapper=None) -> CocoDetection:
    """`data.<split>` as a CocoDetection with the config's categories, label space and filters, with
    instance masks when the model predicts them."""
    d = cfg.data
    return CocoDetection(d[split].ann_file, d[split].img_dir, categories=d.categories,
                         label_space=cfg.model.label_space, train=train, filter_empty=d.filter_empty,
                         skip_bad_images=d.skip_bad_images, mapper=mapper, ann_setting=f"data.{split}.ann_file",
                         img_setting=f"data.{split}.img_dir", with_masks=wants_masks(cfg))


def _loader(cfg, dataset, batch_sampler) -> DataLoader:
    # The generator fixes the workers' base seed (seed_worker), which seeds anything in a worker that
    # does not take the per-sample seed.
    workers = cfg.data.num_workers
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers, collate_fn=collate_lists,
                      worker_init_fn=seed_worker, persistent_workers=workers > 0, pin_memory=pin_memory(cfg),
                      generator=torch.Generator().manual_seed(cfg.seed))


def build_detection_train_loader(cfg, start_iter: int = 0, rank: int = 0, world_size: int = 1) -> DataLoader:
    """Endless batches `(images, targets)` of `solver.ims_per_batch / world_size` images of `data.train`,
    augmented by the training transform (`input.*`); `start_iter` skips the batches a resumed run has
    already trained on. images: uint8 (3, H, W) tensors; targets: CocoDetection's dicts."""
    check_batch_divides(cfg.solver.ims_per_batch, world_size)
    dataset = build_dataset(cfg, "train", True, transform_from_config(cfg, train=True))
    sampler = TrainingSampler(len(dataset), cfg.seed, rank=rank, world_size=world_size)
    batches = AspectRatioGroupedBatchSampler(sampler, dataset.landscape, cfg.solver.ims_per_batch // world_size,
                                             sample_seed(cfg.seed, rank), start_batch=start_iter)
    return _loader(cfg, dataset, batches)


def build_detection_test_loader(cfg, batch_size: int = 1, resize: bool = False, rank: int = 0,
                                world_size: int = 1) -> DataLoader:
    """Every image of `data.val` once (images without annotations too), in batches of `batch_size`
    `(images, targets)`; rank `rank` of `world_size` gets its contiguous share, so that the shards in rank
    order are the images in id order. What evaluation runs the model on (detection.evaluation).

    resize=False (the default): decoded only, because at test time the model resizes and maps its boxes
    back to the original pixels itself. resize=True applies the test transform (shorter side to
    `input.min_size_test`), with the targets' boxes in the resized pixels."""
    dataset = build_dataset(cfg, "val", False, transform_from_config(cfg, train=False) if resize else None)
    indices = list(InferenceSampler(len(dataset), rank, world_size))
    batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    return _loader(cfg, dataset, batches)
