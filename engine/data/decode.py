"""Decode an image file into an HxWx3 uint8 RGB array, the one format the data pipeline works with.

Decoding is OpenCV's alone (PIL is not involved, so PIL's MAX_IMAGE_PIXELS decompression-bomb limit of
89,478,485 pixels does not apply). What happens to unusual files:
- grey (1 channel): three equal channels; grey + alpha and RGBA: the alpha channel is dropped, the stored
  colour kept as it is (not blended with any background);
- 16-bit (grey or colour): scaled to 0..255 by value * 255 / 65535, rounded, never truncated to the high byte;
- CMYK JPEG (Adobe inverted or not): converted to RGB by OpenCV's libjpeg reader;
- EXIF orientation: applied, the array is the upright image as viewers display it;
- more pixels than OpenCV's limit (`OPENCV_IO_MAX_IMAGE_PIXELS`, 2**30 = 1,073,741,824 by default, read
  when cv2 is imported): DatasetError naming the file, its size and the limit. 10000x10000 (1e8) is read.
- missing, empty, truncated, corrupt or not an image: DatasetError naming the file and, where the decoding
  library said why, its words. JPEG data has no checksum: a corrupt JPEG is caught when libjpeg notices
  (it then reports "Corrupt JPEG data: ..." or "Premature end of JPEG file" and would fill the damaged
  part with grey or garbage), which is refused here as well. Damage that still decodes as valid JPEG
  data (bytes overwritten with zeros, say) cannot be told from a real picture by any decoder. PNG chunks
  carry CRCs, so any damage to a PNG is caught.
"""
import contextlib
import json
import logging
import os
import re
import struct
import tempfile
import threading

import cv2
import numpy as np

from engine.errors import DatasetError

logger = logging.getLogger(__name__)

# IMREAD_UNCHANGED would keep 16-bit depth but skips the EXIF orientation; IMREAD_COLOR applies the
# orientation but truncates 16-bit to its high byte. ANYDEPTH|ANYCOLOR keeps the depth, applies the
# orientation and drops alpha, so only grey, 16-bit and BGR are left to handle here.
_FLAGS = cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR
# OpenCV's own default; the variable is read once, when cv2 loads, as this module does.
try:
    MAX_IMAGE_PIXELS = int(os.environ.get("OPENCV_IO_MAX_IMAGE_PIXELS", 1 << 30))
except ValueError:  # OpenCV's own parser reads more forms; the message then shows the variable as given
    MAX_IMAGE_PIXELS = os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"]
# What libjpeg says (on stderr only: neither OpenCV nor PIL passes it on) when it decodes damaged data and
# fills the rest of the image in by itself.
_LIBJPEG_DAMAGE = ("Corrupt JPEG data", "Premature end of JPEG file")
_MAX_REASON = 300
# "[ WARN:0@6.816] global grfmt_png.cpp:793 readFromStreamOrBuffer " before OpenCV's own log lines.
_OPENCV_LOG_PREFIX = re.compile(r"^\[\s*[A-Z]+:[^\]]*\]\s+(global\s+)?\S+:\d+\s+\S+\s+")
_stderr_lock = threading.Lock()
_sink = None  # (process id, temporary file) collecting fd 2 while decoding; one per process


def _sink_file():
    global _sink
    if _sink is None or _sink[0] != os.getpid():  # a forked worker must not share its parent's file offset
        if _sink is not None:
            _sink[1].close()
        _sink = (os.getpid(), tempfile.TemporaryFile())
    sink = _sink[1]
    sink.seek(0)
    sink.truncate()
    return sink


@contextlib.contextmanager
def _native_stderr():
    """Collects what native code (libjpeg, libpng, OpenCV) writes to file descriptor 2 inside the block into
    the yielded bytearray. Without a usable descriptor 2 nothing is collected. Process-wide, so one thread
    at a time (the DataLoader decodes in worker processes, not threads)."""
    collected = bytearray()
    with _stderr_lock:
        try:
            saved = os.dup(2)
        except OSError:
            yield collected
            return
        try:
            sink = _sink_file()
            os.dup2(sink.fileno(), 2)
            try:
                yield collected
            finally:
                os.dup2(saved, 2)
                sink.seek(0)
                collected += sink.read()
        finally:
            os.close(saved)


def header_size(data: np.ndarray):
    """(width, height) from a PNG's IHDR or a JPEG's frame header, without decoding; None for other formats
    or a header that cannot be parsed."""
    head = data[:16].tobytes()
    if head.startswith(b"\x89PNG\r\n\x1a\n") and data.size >= 24 and head[12:16] == b"IHDR":
        return struct.unpack(">II", data[16:24].tobytes())
    if not head.startswith(b"\xff\xd8"):
        return None
    # JPEG: walk the marker segments up to the first start-of-frame (SOF0..SOF15 except DHT, JPG, DAC).
    pos, n = 2, min(int(data.size), 1 << 20)
    buf = data[:n].tobytes()
    while pos + 4 <= n:
        if buf[pos] != 0xFF:
            return None
        marker = buf[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):
            pos += 2
            continue
        length = struct.unpack(">H", buf[pos + 2:pos + 4])[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if pos + 9 > n:
                return None
            height, width = struct.unpack(">HH", buf[pos + 5:pos + 9])
            return width, height
        if marker in (0xD9, 0xDA) or length < 2:
            return None
        pos += 2 + length
    return None


def _pixels(n) -> str:
    return f"{n:,}" if isinstance(n, int) else str(n)


def _decode(path: str, data: np.ndarray) -> np.ndarray:
    """cv2.imdecode, every failure a DatasetError naming `path` and the decoder's reason."""
    error = None
    with _native_stderr() as said:
        try:
            image = cv2.imdecode(data, _FLAGS)
        except cv2.error as e:
            image, error = None, e
    said = bytes(said)
    messages = [_OPENCV_LOG_PREFIX.sub("", line).strip() for line in said.decode("utf-8", "replace").splitlines()
                if line.strip()]
    size = header_size(data)
    too_many = size and isinstance(MAX_IMAGE_PIXELS, int) and size[0] * size[1] > MAX_IMAGE_PIXELS
    if image is None and (too_many or
                          (error is not None and "CV_IO_MAX_IMAGE_PIXELS" in str(error))):
        shape = f"{size[0]}x{size[1]} (WxH) = {size[0] * size[1]:,} pixels" if size else "larger"
        raise DatasetError(f"{path}: image is {shape}, over the decoder's limit of {_pixels(MAX_IMAGE_PIXELS)} "
                           "pixels (OPENCV_IO_MAX_IMAGE_PIXELS); downscale it, or raise the limit by setting "
                           "that environment variable before starting")
    reason = "; ".join(messages)[:_MAX_REASON]
    if image is None:
        raise DatasetError(f"{path}: not a readable image (corrupt, truncated or not an image format"
                           f"{': ' + reason if reason else ''}); replace or delete it")
    damage = [m for m in messages if m.startswith(_LIBJPEG_DAMAGE)]
    if damage:
        raise DatasetError(f"{path}: corrupt JPEG ({'; '.join(damage)[:_MAX_REASON]}): the decoder would fill "
                           "the damaged part with grey or garbage; replace or delete it")
    if said:  # harmless decoder warnings (or another thread's output): passed on as they came
        os.write(2, said)
    return image


def read_image(path):
    """Return the image at `path` as an HxWx3 uint8 RGB array, upright according to its EXIF tag.

    Grey images become three equal channels, alpha is dropped and 16-bit values are scaled to 0..255 (see
    the module's docstring for every case). Raises DatasetError naming `path` when the file is missing,
    empty, too large, corrupt or cannot be decoded.
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
    image = _decode(path, data)
    if image.dtype == np.uint16:
        # x * 255 / 65535 rounded, without a float copy of the image (x / 257 is never exactly k + 0.5).
        image = cv2.convertScaleAbs(image, alpha=255.0 / 65535.0)
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
    except RecursionError:  # json's parser gives up on very deep nesting with this, not a JSONDecodeError
        raise DatasetError(f"{path} is not a usable {what}: its JSON is nested too deeply") from None
