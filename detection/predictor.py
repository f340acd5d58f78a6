"""Single-image inference on numpy arrays, the way applications call a detector."""
import numpy as np
import torch

from engine.config import as_config
from engine.errors import DatasetError

from .inference import load_model


class Predictor:
    """`Predictor(config_path, weights=path)(image)` with an HxWx3 uint8 RGB array returns that image's
    dict of `boxes` (xyxy in the image's pixels), `scores` and `labels` (and for Mask R-CNN `masks`,
    (N, 1, H, W) probabilities), as CPU tensors."""

    def __init__(self, config, weights=None, overrides=(), device=None):
        self.cfg = as_config(config, overrides)
        # `weights`, else model.weights, is the whole detector, used as it is: it must cover the model.
        self.model, self.device = load_model(self.cfg, weights, device)

    @torch.inference_mode()
    def __call__(self, image: np.ndarray):
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            desc = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
            raise DatasetError(f"Predictor takes an HxWx3 uint8 RGB array, got {desc}")
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).to(self.device)
        return {k: v.cpu() for k, v in self.model([tensor])[0].items()}
