"""Mask R-CNN (He et al. 2017): Faster R-CNN whose RoI heads also predict a mask per detection.

Same contract as torchvision's `MaskRCNN`: in training `model(images, targets)` with `masks` (N, H, W)
uint8 in each target returns the losses, `loss_mask` included; in evaluation each image's dict also has
`masks` (N, 1, H, W) float probabilities in [0, 1] at the input image's size.

The mask parts (head, targets, loss, pasting) are `segmentation`'s, which needs nothing of `detection`;
this module composes them with the box heads, as torchvision and Detectron2 keep masks beside them.

Its RoI heads are Faster R-CNN's box branch plus the mask branch on the same features. In training the
mask branch sees the sampled positive RoIs (the boxes as proposed, not as regressed); at inference it
runs on the final detections, and each gets the probabilities of its predicted class."""
import torch

from engine.errors import DatasetError
from segmentation.mask_head import MaskHead, mask_loss, mask_targets
from segmentation.paste import paste_masks

from .poolers import MultiScaleRoIAlign
from .rcnn import FasterRCNN
from .roi_heads import RoIHeads


class MaskRoIHeads(RoIHeads):
    """`RoIHeads` (whose keyword arguments it takes) plus the mask branch: `mask_head` on the
    `mask_pooler`'s features. `aligned_mask_targets` is RoIAlign's half-pixel setting for resampling the
    ground-truth masks into the RoIs, which should be the poolers'. `binary_mask_targets`: the resampled
    masks are thresholded at 0.5 (Detectron2's BitMasks.crop_and_resize), not kept as the fractions in
    [0, 1] (torchvision's targets). `detection.build.build_roi_heads` makes the parts from a config."""

    def __init__(self, *, mask_pooler: MultiScaleRoIAlign, mask_head: MaskHead, aligned_mask_targets: bool,
                 binary_mask_targets: bool = False, **box_heads):
        super().__init__(**box_heads)
        self.mask_pooler = mask_pooler
        self.mask_head = mask_head
        self.aligned_mask_targets = aligned_mask_targets
        self.binary_mask_targets = binary_mask_targets

    def branch_losses(self, features, proposals, labels, matched, targets):
        if any("masks" not in t for t in targets):
            raise DatasetError("Mask R-CNN training needs 'masks' (N, H, W) in every target")
        counts = [len(p) for p in proposals]
        positive = labels > 0
        per_image = positive.split(counts)
        rois = [p[f] for p, f in zip(proposals, per_image)]
        matched = [m[f] for m, f in zip(matched.split(counts), per_image)]
        logits = self.mask_head(self.mask_pooler(features, rois), labels[positive])
        size = logits.shape[-1]
        targets = mask_targets([t["masks"] for t in targets], rois, matched, size, self.aligned_mask_targets)
        if self.binary_mask_targets:
            targets = (targets >= 0.5).to(targets.dtype)
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


class MaskRCNN(FasterRCNN):
    def __init__(self, *args, paste_mode: str = "torchvision", **kwargs):
        super().__init__(*args, **kwargs)
        self.paste_mode = paste_mode  # segmentation.paste.PASTE_MODES

    def render(self, detections, original_sizes):
        """Each detection's mask probabilities (N, 1, M, M) over its box pasted into its image."""
        for d, size in zip(detections, original_sizes):
            d["masks"] = paste_masks(d["masks"], d["boxes"], size, mode=self.paste_mode)
        return detections
