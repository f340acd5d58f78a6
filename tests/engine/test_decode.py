"""read_image: channel order, grey/alpha/16-bit handling, EXIF orientation and the errors for bad files."""
import struct

import cv2
import numpy as np
import pytest

from engine.data.decode import read_image
from engine.errors import DatasetError


def _write(path, bgr_or_grey, ext=".png"):
    ok, data = cv2.imencode(ext, bgr_or_grey)
    assert ok
    data.tofile(str(path))
    return path


def _exif_app1(orientation):
    """A minimal big-endian EXIF APP1 segment with one IFD0 entry: Orientation (0x0112, SHORT)."""
    ifd = struct.pack(">H", 1) + struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack(">I", 0)
    payload = b"Exif\x00\x00" + b"MM\x00\x2a\x00\x00\x00\x08" + ifd
    return b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload


def _jpeg_with_orientation(rgb, orientation):
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 98])
    assert ok
    data = data.tobytes()
    assert data[2:4] == b"\xff\xe0"  # the JFIF APP0 segment comes first; EXIF goes right after it
    app0_end = 4 + struct.unpack(">H", data[4:6])[0]
    return data[:app0_end] + _exif_app1(orientation) + data[app0_end:]


def _quadrants():
    """32x64 RGB image with four flat quadrants of distinct colours, so any rotation or flip shows."""
    image = np.zeros((32, 64, 3), np.uint8)
    image[:16, :32] = (255, 0, 0)
    image[:16, 32:] = (0, 255, 0)
    image[16:, :32] = (0, 0, 255)
    image[16:, 32:] = (255, 255, 0)
    return image


def test_colour_png_is_rgb(tmp_path):
    rgb = np.zeros((5, 7, 3), np.uint8)
    rgb[..., 0] = 200  # red
    rgb[..., 2] = 10
    path = _write(tmp_path / "red.png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    image = read_image(path)
    assert image.shape == (5, 7, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, rgb)


def test_grey_png_becomes_three_equal_channels(tmp_path):
    grey = np.arange(35, dtype=np.uint8).reshape(5, 7) * 7
    image = read_image(_write(tmp_path / "grey.png", grey))
    assert image.shape == (5, 7, 3)
    for c in range(3):
        np.testing.assert_array_equal(image[..., c], grey)


def test_rgba_png_drops_alpha(tmp_path):
    bgra = np.zeros((4, 6, 4), np.uint8)
    bgra[..., :3] = (30, 60, 90)
    bgra[..., 3] = 0  # fully transparent: the colour must survive untouched, not be blended
    image = read_image(_write(tmp_path / "rgba.png", bgra))
    assert image.shape == (4, 6, 3)
    assert (image == (90, 60, 30)).all()


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_16bit_png_is_scaled_not_truncated(tmp_path, channels):
    # 65280 >> 8 == 255 but 65280 * 255 / 65535 == 254: only scaling gives 254.
    values = np.array([0, 257, 32768, 65280, 65535], np.uint16)
    expected = np.array([0, 1, 128, 254, 255], np.uint8)
    array = values.reshape(1, 5) if channels == 1 else np.repeat(values.reshape(1, 5, 1), channels, axis=2)
    image = read_image(_write(tmp_path / "deep.png", array))
    assert image.dtype == np.uint8 and image.shape == (1, 5, 3)
    for c in range(3):
        np.testing.assert_array_equal(image[0, :, c], expected)


@pytest.mark.parametrize("orientation, rotate", [(1, lambda a: a), (3, lambda a: np.rot90(a, 2)),
                                                 (6, lambda a: np.rot90(a, -1)), (8, lambda a: np.rot90(a, 1))])
def test_exif_orientation_is_applied(tmp_path, orientation, rotate):
    path = tmp_path / f"exif{orientation}.jpg"
    path.write_bytes(_jpeg_with_orientation(_quadrants(), orientation))
    image = read_image(path)
    expected = rotate(_quadrants())
    assert image.shape == expected.shape
    # JPEG's chroma subsampling smears the quadrant edges (mean 3.7 levels at quality 98); a wrong
    # orientation is off by ~100.
    assert np.abs(image.astype(int) - expected).mean() < 8


def test_non_ascii_path(tmp_path):
    folder = tmp_path / "bilder_äöü_图像"
    folder.mkdir()
    path = _write(folder / "ß.png", np.full((3, 3, 3), 77, np.uint8))
    assert (read_image(path) == 77).all()


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jpg"
    with pytest.raises(DatasetError, match="nope.jpg.*does not exist"):
        read_image(path)


def test_folder_instead_of_file(tmp_path):
    with pytest.raises(DatasetError, match=str(tmp_path.name)):
        read_image(tmp_path)


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(DatasetError, match="empty.jpg.*0 bytes"):
        read_image(path)


def test_text_file(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not an image\n")
    with pytest.raises(DatasetError, match="notes.jpg.*not a readable image"):
        read_image(path)


def test_truncated_jpeg(tmp_path):
    rng = np.random.default_rng(0)
    data = cv2.imencode(".jpg", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))[1].tobytes()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="cut.jpg"):
        read_image(path)
