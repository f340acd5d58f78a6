"""Mask R-CNN (He et al. 2017): Faster R-CNN whose RoI heads also predict a mask per detection.

Same contract as torchvision's `MaskRCNN`: in training `model(images, targets)` with `masks` (N, H, W)
uint8 in each target returns the losses, `loss_mask` included; in evaluation each image's dict also has
`masks` (N, 1, H, W) float probabilities in [0, 1] at the input image's size."""
from detection.rcnn import FasterRCNN

from .paste import paste_masks


class MaskRCNN(FasterRCNN):
    def __init__(self, *args, paste_mode: str = "torchvision", **kwargs):
        super().__init__(*args, **kwargs)
        self.paste_mode = paste_mode  # segmentation.paste.PASTE_MODES

    def postprocess(self, detections, image_sizes, original_sizes):
        detections = super().postprocess(detections, image_sizes, original_sizes)
        for d, size in zip(detections, original_sizes):
            d["masks"] = paste_masks(d["masks"], d["boxes"], size, mode=self.paste_mode)
        return detections
