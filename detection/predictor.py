"""Single-image inference on numpy arrays, the way applications call a detector."""
import numpy as np
import torch

from engine.device import resolve_device
from engine.config import as_config
from engine.errors import DatasetError

from .build import build_detector, compile_detector


class Predictor:
    """`Predictor(config_path, weights=path)(image)` with an HxWx3 uint8 RGB array returns that image's
    dict of `boxes` (xyxy in the image's pixels), `scores` and `labels` (and for Mask R-CNN `masks`,
    (N, 1, H, W) probabilities), as CPU tensors."""

    def __init__(self, config, weights=None, overrides=(), device=None):
        self.cfg = as_config(config, overrides)
        self.device = resolve_device(device or self.cfg.device)
        # `weights`, else model.weights, is the whole detector, used as it is: it must cover the model.
        self.model = build_detector(self.cfg, weights=weights, for_inference=True)
        self.model.eval().to(self.device)
        compile_detector(self.model, self.cfg)

    @torch.inference_mode()
    def __call__(self, image: np.ndarray):
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            desc = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
            raise DatasetError(f"Predictor takes an HxWx3 uint8 RGB array, got {desc}")
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).to(self.device)
        return {k: v.cpu() for k, v in self.model([tensor])[0].items()}
