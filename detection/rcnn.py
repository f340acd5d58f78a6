"""Faster R-CNN: pre-processing -> backbone -> RPN -> RoI heads -> post-processing.

Same contract as torchvision's detection models: in training, `model(images, targets)` returns a dict of
losses; in evaluation, `model(images)` returns one dict per image with `boxes` (xyxy, in the input
image's pixels), `scores` and `labels` (1..K; 0 is background). `predict` is evaluation without the last
step, `render` (Mask R-CNN's mask pasting): what the exported graph (detection/export) records.
"""
from typing import Dict, List, Optional

import torch
from torch import nn

from .preprocess import Preprocessor, check_targets, sizes_tensor
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
        if not self.training:
            detections, original_sizes = self.predict(images)
            return self.render(detections, original_sizes)
        check_targets(targets, len(images))
        batch, targets, _ = self.preprocessor(images, targets)
        return self.detect(batch, targets)[1]

    def detect(self, batch, targets=None):
        """Backbone -> RPN -> RoI heads on a pre-processed batch: (detections in the batch's pixels, losses)."""
        features = self.backbone(batch.tensor)
        proposals, rpn_losses = self.rpn(batch, features, targets)
        detections, roi_losses = self.roi_heads(features, proposals, batch.sizes_tensor(), targets)
        return detections, {**rpn_losses, **roi_losses}

    def predict(self, images: List[torch.Tensor]):
        """Evaluation up to `render`: (one dict per image in the caller's pixels, the images' sizes)."""
        batch, _, original_sizes = self.preprocessor(images)
        detections, _ = self.detect(batch)
        return self.postprocess(detections, batch.image_sizes, original_sizes), original_sizes

    def postprocess(self, detections, image_sizes, original_sizes):
        """Detections from the resized images back to the caller's pixels."""
        detections = self.preprocessor.postprocess(detections, image_sizes, original_sizes)
        if self.drop_empty_boxes:
            detections = [drop_empty_boxes(d, size) for d, size in zip(detections, original_sizes)]
        return detections

    def render(self, detections, original_sizes):
        """Per-detection outputs drawn at each image's size; Faster R-CNN has none (Mask R-CNN pastes its
        masks). Left out of the exported graph, whose outputs are per detection."""
        return detections


def drop_empty_boxes(detections: Dict[str, torch.Tensor], image_size) -> Dict[str, torch.Tensor]:
    """One image's detections with boxes clipped to `image_size` (H, W), less those of zero width or height
    (and their scores, labels and any other per-detection field)."""
    boxes = detections["boxes"]
    boxes = clip_boxes(boxes[None], sizes_tensor([image_size], boxes))[0]
    keep = ((boxes[:, 2] - boxes[:, 0]) > 0) & ((boxes[:, 3] - boxes[:, 1]) > 0)
    return {k: (boxes if k == "boxes" else v)[keep] for k, v in detections.items()}
