"""Mask R-CNN's RoI heads: Faster R-CNN's box branch plus the mask branch on the same features. In
training the mask branch sees the sampled positive RoIs (the boxes as proposed, not as regressed); at
inference it runs on the final detections, and each gets the probabilities of its predicted class."""
from typing import Dict

import torch

from backbones.base import ShapeSpec
from detection.poolers import MultiScaleRoIAlign
from detection.roi_heads import RoIHeads

from .mask_head import MaskHead, mask_loss, mask_targets


class MaskRoIHeads(RoIHeads):
    def __init__(self, input_shape: Dict[str, ShapeSpec], *, mask_input_shape: Dict[str, ShapeSpec],
                 mask_pooler_resolution: int = 14, mask_sampling_ratio: int = 2, mask_num_conv: int = 4,
                 mask_conv_dim: int = 256, mask_norm: str = "", class_agnostic_masks: bool = False, **kwargs):
        super().__init__(input_shape, **kwargs)
        p = self.pooler
        self.mask_pooler = MultiScaleRoIAlign(mask_input_shape, mask_pooler_resolution, mask_sampling_ratio,
                                              p.aligned, p.canonical_box_size, p.canonical_level,
                                              p.level_formula)
        channels = next(iter(mask_input_shape.values())).channels
        self.mask_head = MaskHead(channels, self.num_classes, mask_num_conv, mask_conv_dim, mask_norm,
                                  class_agnostic_masks)

    def branch_losses(self, features, proposals, labels, matched, targets):
        if any("masks" not in t for t in targets):
            raise ValueError("Mask R-CNN training needs 'masks' (N, H, W) in every target")
        counts = [len(p) for p in proposals]
        positive = labels > 0
        per_image = positive.split(counts)
        rois = [p[f] for p, f in zip(proposals, per_image)]
        matched = [m[f] for m, f in zip(matched.split(counts), per_image)]
        logits = self.mask_head(self.mask_pooler(features, rois), labels[positive])
        size = logits.shape[-1]
        targets = mask_targets([t["masks"] for t in targets], rois, matched, size, self.pooler.aligned)
        return {"loss_mask": mask_loss(logits, targets)}

    def branch_outputs(self, features, detections):
        """Adds `masks` (N, 1, M, M) probabilities over each detection's box."""
        labels = torch.cat([d["labels"] for d in detections])
        probs = self.mask_head(self.mask_pooler(features, [d["boxes"] for d in detections]), labels).sigmoid()[:, None]
        # One image needs no split, and torch.export cannot split at counts it does not know.
        parts = (probs,) if len(detections) == 1 else probs.split([len(d["boxes"]) for d in detections])
        for d, p in zip(detections, parts):
            d["masks"] = p
        return detections
