"""Faster R-CNN: pre-processing -> backbone -> RPN -> RoI heads -> post-processing.

Same contract as torchvision's detection models: in training, `model(images, targets)` returns a dict of
losses; in evaluation, `model(images)` returns one dict per image with `boxes` (xyxy, in the input
image's pixels), `scores` and `labels` (1..K; 0 is background).
"""
from typing import Dict, List, Optional

import torch
from torch import nn

from .preprocess import Preprocessor, check_targets


class FasterRCNN(nn.Module):
    def __init__(self, backbone: nn.Module, rpn: nn.Module, roi_heads: nn.Module, preprocessor: Preprocessor):
        super().__init__()
        self.preprocessor = preprocessor
        self.backbone = backbone
        self.rpn = rpn
        self.roi_heads = roi_heads

    def forward(self, images: List[torch.Tensor], targets: Optional[List[Dict[str, torch.Tensor]]] = None):
        if self.training:
            check_targets(targets, len(images))
        batch, targets, original_sizes = self.preprocessor(images, targets if self.training else None)
        features = self.backbone(batch.tensor)
        proposals, rpn_losses = self.rpn(batch, features, targets)
        detections, roi_losses = self.roi_heads(features, proposals, batch.sizes_tensor(), targets)
        if self.training:
            return {**rpn_losses, **roi_losses}
        return self.postprocess(detections, batch.image_sizes, original_sizes)

    def postprocess(self, detections, image_sizes, original_sizes):
        """Detections from the resized images back to the caller's pixels."""
        return self.preprocessor.postprocess(detections, image_sizes, original_sizes)
