"""Faster R-CNN with FPN on the backbones package: model, data, evaluation.

    import detection
    model = detection.build_detector("configs/torchvision/frcnn_r50_fpn.yaml", weights="frcnn.pth", for_inference=True)
    predictor = detection.Predictor("configs/torchvision/frcnn_r50_fpn.yaml", weights="frcnn.pth")
    result = predictor(rgb_uint8_array)     # {"boxes", "scores", "labels"}
"""
from .build import build_detector, build_model
from .predictor import Predictor
from .rcnn import FasterRCNN

__all__ = ["build_detector", "build_model", "Predictor", "FasterRCNN"]
