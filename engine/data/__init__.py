"""Data loading shared by classification and detection: image decoding, dataset paths, samplers."""
from .decode import read_image
from .paths import IMAGE_EXTENSIONS, require_path

__all__ = ["read_image", "IMAGE_EXTENSIONS", "require_path"]
