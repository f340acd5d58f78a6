"""Instance masks, independent of any detector: the mask head of Mask R-CNN, its training targets and
loss, and pasting RoI masks into full images. `detection.mask_rcnn` composes these with the box heads
(`detection` imports `segmentation`, never the reverse):

    import detection
    model = detection.build_detector("configs/torchvision/mrcnn_r50_fpn.yaml", weights="mrcnn.pth", for_inference=True)
"""
from .mask_head import MaskHead, mask_loss, mask_targets
from .paste import PASTE_MODES, paste_masks

__all__ = ["MaskHead", "mask_loss", "mask_targets", "PASTE_MODES", "paste_masks"]
