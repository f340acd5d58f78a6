"""Decode an image file into an HxWx3 uint8 RGB array, the one format the data pipeline works with."""
import json
import logging
import os

import cv2
import numpy as np

from engine.errors import DatasetError

logger = logging.getLogger(__name__)

# IMREAD_UNCHANGED would keep 16-bit depth but skips the EXIF orientation; IMREAD_COLOR applies the
# orientation but truncates 16-bit to its high byte. ANYDEPTH|ANYCOLOR keeps the depth, applies the
# orientation and drops alpha, so only grey, 16-bit and BGR are left to handle here.
_FLAGS = cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR


def read_image(path):
    """Return the image at `path` as an HxWx3 uint8 RGB array, upright according to its EXIF tag.

    Grey images become three equal channels, alpha is dropped and 16-bit values are scaled to 0..255.
    Raises DatasetError naming `path` when the file is missing, empty or cannot be decoded.
    """
    path = os.fspath(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)  # not cv2.imread: it fails on non-ASCII paths on Windows
    except FileNotFoundError:
        raise DatasetError(f"{path}: image file does not exist") from None
    except OSError as e:
        raise DatasetError(f"{path}: cannot read image file ({e.strerror or e})") from None
    if data.size == 0:
        raise DatasetError(f"{path}: image file is empty (0 bytes); re-copy or delete it")
    try:
        image = cv2.imdecode(data, _FLAGS)
    except cv2.error:
        image = None
    if image is None:
        raise DatasetError(f"{path}: not a readable image (corrupt, truncated or not an image format); "
                           "replace or delete it")
    if image.dtype == np.uint16:
        image = (image.astype(np.float32) * (255.0 / 65535.0) + 0.5).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise DatasetError(f"{path}: unsupported pixel type {image.dtype}; convert it to 8- or 16-bit")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


class ImageReader:
    """Reads the image of item `index`, or, with `skip_bad=True`, of the next readable item: an unreadable
    file is logged once, remembered and counted (`num_skipped`, per process: DataLoader workers keep their
    own count). Without `skip_bad` the DatasetError naming the file is raised."""

    def __init__(self, skip_bad: bool = False):
        self.skip_bad = skip_bad
        self.bad_files = set()

    @property
    def num_skipped(self) -> int:
        return len(self.bad_files)

    def first_readable(self, index: int, count: int, path_of):
        """(index actually read, HxWx3 uint8 RGB image), trying index, index + 1, ... (wrapping)."""
        for offset in range(count):
            i = (index + offset) % count
            path = path_of(i)
            if path in self.bad_files:
                continue
            try:
                return i, read_image(path)
            except DatasetError as e:
                if not self.skip_bad:
                    raise
                self.bad_files.add(path)
                logger.warning("skipping unreadable image: %s", e)
        raise DatasetError(f"none of the {count} images can be read (first: {path_of(0)})")


def read_json(path, what: str):
    """The parsed JSON file at `path`; a DatasetError naming `what` and the file otherwise (never a bare
    json or OS traceback)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise DatasetError(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read {what} {path}: {getattr(e, 'strerror', None) or e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
