"""Data loading shared by classification and detection: image decoding and the ImageFolder dataset."""
from .decode import read_image
from .imagefolder import IMAGE_EXTENSIONS, ImageFolder, build_cls_transform

__all__ = ["read_image", "ImageFolder", "build_cls_transform", "IMAGE_EXTENSIONS"]
