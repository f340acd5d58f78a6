"""Same seed, same run: one place that seeds Python, NumPy, torch and albumentations.

albumentations 2.x draws from its own generators inside each Compose, which neither NumPy's nor torch's
global seed reaches, so datasets' transforms are seeded explicitly here, in the main process and in
every DataLoader worker.
"""
import random

import numpy as np
import torch


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seed_transforms(dataset, seed: int):
    transform = getattr(dataset, "transform", None)
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(seed)


def seed_worker(worker_id: int):
    """DataLoader `worker_init_fn`. torch gives each worker `base_seed + worker_id`, with `base_seed`
    drawn from the loader's generator, so seeding that generator from `cfg.seed` fixes every worker."""
    seed = torch.initial_seed() % 2 ** 32
    seed_everything(seed)
    seed_transforms(torch.utils.data.get_worker_info().dataset, seed)
