"""Mask R-CNN on top of `detection`: mask head, mask targets, mask pasting. Built by
`detection.build_detector` for configs with `model.name: mask_rcnn`:

    import detection
    model = detection.build_detector("configs/torchvision/mrcnn_r50_fpn.yaml", weights="mrcnn.pth", for_inference=True)
"""
from .mask_head import MaskHead
from .mask_rcnn import MaskRCNN
from .paste import paste_masks
from .roi_heads import MaskRoIHeads

__all__ = ["MaskHead", "MaskRCNN", "MaskRoIHeads", "paste_masks"]
