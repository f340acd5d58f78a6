"""Faster R-CNN: pre-processing -> backbone -> RPN -> RoI heads -> post-processing.

Same contract as torchvision's detection models: in training, `model(images, targets)` returns a dict of
losses; in evaluation, `model(images)` returns one dict per image with `boxes` (xyxy, in the input
image's pixels), `scores` and `labels` (1..K; 0 is background).
"""
from typing import Dict, List, Optional

import torch
from torch import nn

from .preprocess import Preprocessor, check_targets
from .structures import clip_boxes


class FasterRCNN(nn.Module):
    def __init__(self, backbone: nn.Module, rpn: nn.Module, roi_heads: nn.Module, preprocessor: Preprocessor,
                 drop_empty_boxes: bool = False):
        super().__init__()
        # Detectron2 (modeling/postprocessing.py, detector_postprocess) clips the rescaled boxes to the input
        # image again and drops those of zero width or height.
        self.drop_empty_boxes = drop_empty_boxes
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
        detections = self.preprocessor.postprocess(detections, image_sizes, original_sizes)
        if self.drop_empty_boxes:
            detections = [drop_empty_boxes(d, size) for d, size in zip(detections, original_sizes)]
        return detections


def drop_empty_boxes(detections: Dict[str, torch.Tensor], image_size) -> Dict[str, torch.Tensor]:
    """One image's detections with boxes clipped to `image_size` (H, W), less those of zero width or height
    (and their scores, labels and any other per-detection field)."""
    boxes = clip_boxes(detections["boxes"][None], torch.tensor([image_size], dtype=torch.float32,
                                                               device=detections["boxes"].device))[0]
    keep = ((boxes[:, 2] - boxes[:, 0]) > 0) & ((boxes[:, 3] - boxes[:, 1]) > 0)
    return {k: (boxes if k == "boxes" else v)[keep] for k, v in detections.items()}
