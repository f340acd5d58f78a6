"""Hostile and broken image files, as the data sets (CocoDetection, ImageFolder), the training transforms,
the model's preprocessing and inference (infer_files) meet them. Each test feeds the broken file and checks
the exact outcome: a DatasetError whose message starts with the file's path, a counted skip with
data.skip_bad_images, or the decoded RGB pixels the pipeline works with."""
import json
import logging
import struct
import warnings
import zlib

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from detection.data.coco import CocoDetection
from detection.data.mapper import transform_from_config
from detection.preprocess import Preprocessor
from engine.config import load_config
from engine.data.decode import MAX_IMAGE_PIXELS, read_image
from backbones.classification.imagefolder import ImageFolder, build_cls_transform
from engine.errors import DatasetError
from tests.conftest import REPO

# ---------------------------------------------------------------------------------------------- files


def _textured(height=64, width=64, seed=0):
    """Smooth random RGB content: JPEG-compressible like a photo, so damage shows up in the entropy data."""
    noise = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return cv2.GaussianBlur(noise, (9, 9), 3)


def _jpeg_bytes(rgb, quality=95):
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return data.tobytes()


def _png_bytes(array):
    """PNG of an RGB(A) uint8/uint16 array (channels in RGB order) or a 2-D grey array."""
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR if array.shape[2] == 3 else cv2.COLOR_RGBA2BGRA)
    ok, data = cv2.imencode(".png", array)
    assert ok
    return data.tobytes()


def _png_chunk(kind, payload):
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _constant_png(width, height):
    """A black 1-bit grey PNG of any size, written row by row (a few KB, no full-size array in memory)."""
    row = b"\x00" * (1 + (width + 7) // 8)
    deflate = zlib.compressobj(9)
    idat = b"".join(deflate.compress(row) for _ in range(height)) + deflate.flush()
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b""))


def _exif_jpeg(rgb, orientation):
    """A JPEG of `rgb` (as stored) with an EXIF APP1 segment holding only Orientation = `orientation`."""
    ifd = struct.pack(">H", 1) + struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack(">I", 0)
    payload = b"Exif\x00\x00" + b"MM\x00\x2a\x00\x00\x00\x08" + ifd
    app1 = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    data = _jpeg_bytes(rgb, 98)
    app0_end = 4 + struct.unpack(">H", data[4:6])[0]  # JFIF APP0 first; EXIF right after it
    return data[:app0_end] + app1 + data[app0_end:]


def _broken_bytes(kind):
    """The bytes of each broken file kind (None: the file does not exist)."""
    if kind == "truncated_jpeg":
        data = _jpeg_bytes(_textured())
        return data[: len(data) // 2]
    if kind == "truncated_png":
        data = _png_bytes(_textured())
        return data[: len(data) // 2]
    if kind == "corrupt_jpeg":
        # 64 random bytes over the middle of the entropy-coded data: libjpeg decodes the rest as garbage and
        # reports "Corrupt JPEG data: ... extraneous bytes before marker 0xd9".
        data = bytearray(_jpeg_bytes(_textured(256, 256)))
        middle = len(data) // 2
        data[middle:middle + 64] = np.random.default_rng(0).integers(0, 256, 64, dtype=np.uint8).tobytes()
        return bytes(data)
    if kind == "empty":
        return b""
    if kind == "text":
        return b"this is a text file, not a picture\n"
    assert kind == "missing"
    return None


# Each broken kind: the file's name and how the DatasetError's message goes on after "<path>: ". Only our
# own words are pinned: the decoder's reason that may follow them is its own wording and changes between
# releases (OpenCV 4.x passes libpng's "IDAT: ..." on for a truncated PNG, 5.x says nothing).
BROKEN = {
    "truncated_jpeg": ("cut.jpg", "not a readable image (corrupt, truncated or not an image format"),
    "truncated_png": ("cut.png", "not a readable image (corrupt, truncated or not an image format"),
    "corrupt_jpeg": ("damaged.jpg", "corrupt JPEG ("),
    "empty": ("empty.jpg", "image file is empty (0 bytes); re-copy or delete it"),
    "text": ("notes.jpg", "not a readable image (corrupt, truncated or not an image format"),
    "missing": ("gone.jpg", "image file does not exist"),
}


def _write_broken(folder, kind):
    name, expected = BROKEN[kind]
    path = folder / name
    data = _broken_bytes(kind)
    if data is not None:
        path.write_bytes(data)
    return path, f"{path}: {expected}"


def _raises_exactly(start, call):
    """`call()` raises DatasetError and its message starts with `start` (the path first)."""
    with pytest.raises(DatasetError) as info:
        call()
    assert str(info.value).startswith(start), str(info.value)
    return info.value


def _coco(tmp_path, files, sizes, boxes=None):
    """An annotation file with one image per (file name, (height, width)) and one box per image (default:
    the whole image), in `tmp_path/img`."""
    images, annotations = [], []
    for i, (name, (height, width)) in enumerate(zip(files, sizes), start=1):
        images.append({"id": i, "file_name": name, "height": height, "width": width})
        box = boxes[i - 1] if boxes else [0, 0, width, height]
        annotations.append({"id": i, "image_id": i, "category_id": 1, "bbox": box, "area": box[2] * box[3],
                            "iscrowd": 0})
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations,
                               "categories": [{"id": 1, "name": "thing"}]}))
    return str(ann), str(tmp_path / "img")


# ------------------------------------------------------------------------------- broken: read_image


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_read_image_names_the_file_and_what_is_wrong(tmp_path, kind):
    path, expected = _write_broken(tmp_path, kind)
    _raises_exactly(expected, lambda: read_image(path))


def test_truncated_jpeg_without_its_end_marker_is_refused(tmp_path):
    # Only the final two bytes (EOI) missing: every pixel may be there, but the file is cut.
    path = tmp_path / "no_eoi.jpg"
    path.write_bytes(_jpeg_bytes(_textured())[:-2])
    _raises_exactly(f"{path}: not a readable image", lambda: read_image(path))


def test_undamaged_jpeg_decodes_without_a_corrupt_data_report(tmp_path, capfd):
    path = tmp_path / "fine.jpg"
    path.write_bytes(_jpeg_bytes(_textured(256, 256)))
    assert read_image(path).shape == (256, 256, 3)
    assert "Corrupt" not in capfd.readouterr().err


# ----------------------------------------------------------------- broken: the data sets, strict and skip


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_coco_detection_raises_or_skips_and_counts(tmp_path, kind):
    (tmp_path / "img").mkdir()
    bad, expected = _write_broken(tmp_path / "img", kind)
    (tmp_path / "img" / "good.png").write_bytes(_png_bytes(np.full((20, 30, 3), 90, np.uint8)))
    ann, img = _coco(tmp_path, [bad.name, "good.png"], [(64, 64), (20, 30)])

    strict = CocoDetection(ann, img)
    _raises_exactly(expected, lambda: strict[0])
    assert strict.num_skipped == 0

    lenient = CocoDetection(ann, img, skip_bad_images=True)
    image, target = lenient[0]
    assert target["image_id"] == 2 and tuple(image.shape) == (3, 20, 30)  # the next readable image
    assert lenient.num_skipped == 1
    lenient[0], lenient[1]
    assert lenient.num_skipped == 1  # one bad file, counted once


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_image_folder_raises_or_skips_and_counts(tmp_path, kind):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "good.png").write_bytes(_png_bytes(np.full((8, 8, 3), 50, np.uint8)))
    if kind == "missing":
        # Listed when the data set was built, deleted before it is read (a network share losing a file).
        path, expected = tmp_path / "a" / "gone.jpg", f"{tmp_path / 'a' / 'gone.jpg'}: image file does not exist"
        path.write_bytes(_jpeg_bytes(_textured()))
        strict, lenient = ImageFolder(tmp_path), ImageFolder(tmp_path, skip_bad_images=True)
        path.unlink()
    else:
        path, expected = _write_broken(tmp_path / "a", kind)
        strict, lenient = ImageFolder(tmp_path), ImageFolder(tmp_path, skip_bad_images=True)
    index = [p for p, _ in strict.samples].index(str(path))
    _raises_exactly(expected, lambda: strict[index])

    image, label = lenient[index]
    next_path, next_label = lenient.samples[(index + 1) % len(lenient)]
    assert next_path != str(path) and label == next_label and tuple(image.shape) == (3, 224, 224)
    assert lenient.num_skipped == 1
    lenient[index]
    assert lenient.num_skipped == 1


def test_skip_bad_images_logs_each_skipped_file_once(tmp_path, caplog):
    (tmp_path / "img").mkdir()
    bad, expected = _write_broken(tmp_path / "img", "corrupt_jpeg")
    (tmp_path / "img" / "good.png").write_bytes(_png_bytes(np.full((20, 30, 3), 90, np.uint8)))
    ann, img = _coco(tmp_path, [bad.name, "good.png"], [(256, 256), (20, 30)])
    ds = CocoDetection(ann, img, skip_bad_images=True)
    with caplog.at_level(logging.WARNING, logger="engine.data.decode"):
        ds[0], ds[0]
    skipped = [r.getMessage() for r in caplog.records if "skipping unreadable image" in r.getMessage()]
    assert len(skipped) == 1 and skipped[0].startswith(f"skipping unreadable image: {expected}")


# --------------------------------------------------------------------------------- broken: inference


@pytest.fixture(scope="module")
def small_detector_cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer")
    cfg = load_config(REPO / "configs/_base_/models/faster_rcnn_fpn.yaml", [
        "model.backbone.depth=18", "model.backbone.norm=BN", "model.backbone.freeze_at=0",
        "model.backbone.weights=null", "model.fpn.out_channels=32", "model.roi_heads.fc_dim=64",
        "model.num_classes=1", "input.min_size_test=64", "input.max_size_test=64", "device=cpu",
        f"output_dir={root / 'out'}"])
    return cfg


def test_infer_files_reports_each_broken_file_and_goes_on(tmp_path, small_detector_cfg):
    from detection.inference import infer_files

    expected = {}
    for kind in sorted(BROKEN):
        path, start = _write_broken(tmp_path, kind)
        expected[str(path)] = start
    good, tiny = tmp_path / "good.png", tmp_path / "tiny.png"
    good.write_bytes(_png_bytes(_textured(48, 64)))
    tiny.write_bytes(_png_bytes(np.full((1, 1, 3), 200, np.uint8)))  # 1x1 through the model's preprocessing
    torch.manual_seed(0)
    results, failures = infer_files(small_detector_cfg, None, [str(good), str(tiny), *expected],
                                    str(tmp_path / "out"), visualize=False)
    assert set(failures) == set(expected)
    for path, start in expected.items():
        assert failures[path].startswith(start), failures[path]
    assert {r["file_name"] for r in results} <= {"good.png", "tiny.png"}
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == results


# ----------------------------------------------------------------------------------- tiny and huge


def test_one_pixel_image_through_the_training_transforms_and_preprocessing(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "dot.png").write_bytes(_png_bytes(np.full((1, 1, 3), 200, np.uint8)))
    ann, img = _coco(tmp_path, ["dot.png"], [(1, 1)], boxes=[[0, 0, 1, 1]])
    cfg = load_config(REPO / "configs/frcnn_r50.yaml")
    lsj = load_config(REPO / "configs/frcnn_r50.yaml", ["input.lsj_size=1024"])
    for config, train in ((cfg, True), (cfg, False), (lsj, True)):
        ds = CocoDetection(ann, img, mapper=transform_from_config(config, train), train=train)
        image, target = ds[(0, 7)]
        side = image.shape[1]
        assert tuple(image.shape) == (3, side, side) and image.dtype == torch.uint8
        if config is lsj:  # scaled to 1024 x [0.1, 2], cropped or zero-padded to 1024 x 1024
            assert side == 1024 and set(image.unique().tolist()) <= {0, 200} and len(target["boxes"]) == 1
        else:  # the square scaled to the drawn shorter side, its box with it
            assert side in (cfg.input.min_size_train if train else [cfg.input.min_size_test])
            assert target["boxes"].tolist() == [[0.0, 0.0, float(side), float(side)]]
            assert (image == 200).all()
        i = config.input
        # As the trainer runs it: the mapper has resized already.
        pre = Preprocessor(i.pixel_mean, i.pixel_std, i.format, i.pixel_scale, i.min_size_train, i.max_size_train,
                           i.min_size_test, i.max_size_test, i.size_divisibility,
                           resize_in_training=False).train(train)
        batch, targets, sizes = pre([image], [target])
        assert batch.tensor.shape[-1] % i.size_divisibility == 0 and torch.isfinite(batch.tensor).all()
        assert sizes == [tuple(image.shape[1:])]
    # The model's own test-time resize of the raw 1x1 image.
    batch, _, _ = Preprocessor(cfg.input.pixel_mean, cfg.input.pixel_std).eval()(
        [torch.full((3, 1, 1), 200, dtype=torch.uint8)])
    assert batch.image_sizes == [(800, 800)]


def test_one_pixel_image_through_the_classification_transforms(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "dot.png").write_bytes(_png_bytes(np.full((1, 1, 3), 200, np.uint8)))
    cfg = load_config(REPO / "configs/cls_r50.yaml")
    for train in (True, False):
        image, label = ImageFolder(tmp_path, build_cls_transform(train, cfg.input.size))[(0, 3)]
        assert tuple(image.shape) == (3, cfg.input.size, cfg.input.size) and label == 0
        assert torch.isfinite(image).all()


def test_ten_thousand_squared_is_read_without_any_pixel_limit_warning(tmp_path):
    # 1e8 pixels: over PIL's MAX_IMAGE_PIXELS (89,478,485; PIL would warn), under OpenCV's 2**30. PIL does
    # not decode here, so nothing warns; the file is read in full.
    assert Image.MAX_IMAGE_PIXELS < 10000 * 10000 < MAX_IMAGE_PIXELS == 1 << 30
    path = tmp_path / "big.png"
    path.write_bytes(_constant_png(10000, 10000))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = read_image(path)
    assert image.shape == (10000, 10000, 3) and image.dtype == np.uint8
    assert not image[::97, ::89].any() and not image[-1, -1].any()


@pytest.mark.parametrize("kind", ["png", "jpeg"])
def test_more_pixels_than_the_decoder_limit_names_the_file_size_and_limit(tmp_path, kind):
    if kind == "png":  # header and a few bytes of data: never decoded, refused on the header
        width, height = 40000, 40000
        data = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + _png_chunk(b"IEND", b""))
    else:  # a small JPEG whose frame header claims 65535 x 65000
        data = bytearray(_jpeg_bytes(_textured(16, 16)))
        sof = data.index(b"\xff\xc0")
        data[sof + 5:sof + 9] = struct.pack(">HH", 65000, 65535)
        data, (width, height) = bytes(data), (65535, 65000)
    path = tmp_path / f"huge.{kind}"
    path.write_bytes(data)
    _raises_exactly(f"{path}: image is {width}x{height} (WxH) = {width * height:,} pixels, over the decoder's "
                    f"limit of {MAX_IMAGE_PIXELS:,} pixels (OPENCV_IO_MAX_IMAGE_PIXELS)", lambda: read_image(path))


# ------------------------------------------------------------------------------ unusual but valid


def test_grey_becomes_three_equal_channels(tmp_path):
    grey = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    path = tmp_path / "grey.png"
    path.write_bytes(_png_bytes(grey))
    np.testing.assert_array_equal(read_image(path), np.repeat(grey[..., None], 3, axis=2))


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_dropped_and_the_stored_colour_kept(tmp_path, mode):
    # Alpha 0 (fully transparent) and 128: the colour comes out as stored, not blended with any background.
    colour = (30, 60, 90) if mode == "RGBA" else (70, 70, 70)
    pil = Image.new(mode, (4, 2), (*colour, 0) if mode == "RGBA" else (70, 0))
    pil.putpixel((3, 1), (*colour, 128) if mode == "RGBA" else (70, 128))
    path = tmp_path / f"{mode}.png"
    pil.save(path)
    image = read_image(path)
    assert image.shape == (2, 4, 3) and (image == colour).all()


@pytest.mark.parametrize("channels", [1, 3])
def test_16_bit_is_scaled_not_truncated_or_wrapped(tmp_path, channels):
    values = np.array([0, 255, 257, 32768, 65280, 65535], np.uint16)  # 255: its high byte is 0
    expected = np.round(values / 257.0).astype(np.uint8)  # x * 255 / 65535 = x / 257
    assert expected.tolist() == [0, 1, 1, 128, 254, 255]  # >> 8 would give 65280 -> 255, % 256 255 -> 255
    array = values.reshape(1, 6) if channels == 1 else np.stack([values, values[::-1], values], axis=1)[None]
    path = tmp_path / "deep.png"
    path.write_bytes(_png_bytes(array))
    image = read_image(path)
    assert image.dtype == np.uint8 and image.shape == (1, 6, 3)
    if channels == 1:
        for c in range(3):
            np.testing.assert_array_equal(image[0, :, c], expected)
    else:
        np.testing.assert_array_equal(image[0], np.stack([expected, expected[::-1], expected], axis=1))


def test_cmyk_jpeg_matches_pils_conversion(tmp_path):
    path = tmp_path / "cmyk.jpg"
    pil = Image.new("CMYK", (16, 8), (0, 128, 255, 30))
    for x in range(8, 16):
        for y in range(8):
            pil.putpixel((x, y), (200, 20, 60, 0))
    pil.save(path, quality=95)
    reference = np.asarray(Image.open(path).convert("RGB")).astype(int)
    image = read_image(path)
    assert image.shape == (8, 16, 3)
    # PIL and OpenCV each bring their own libjpeg build and CMYK -> RGB rounding: a few levels apart.
    assert np.abs(image.astype(int) - reference).max() <= 3
    assert np.abs(image[4, 2].astype(int) - (225, 112, 0)).max() <= 3  # C0 M128 Y255 K30: orange


def _quadrants():
    """32x64 (HxW): four flat quadrants red, green / blue, yellow, so any rotation shows."""
    image = np.zeros((32, 64, 3), np.uint8)
    image[:16, :32], image[:16, 32:], image[16:, :32], image[16:, 32:] = (255, 0, 0), (0, 255, 0), (0, 0, 255), (
        255, 255, 0)
    return image


@pytest.mark.parametrize("orientation, rotate", [(6, lambda a: np.rot90(a, -1)), (8, lambda a: np.rot90(a, 1))])
def test_exif_rotated_jpeg_is_upright_and_fits_upright_coco_annotations(tmp_path, orientation, rotate):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "turned.jpg").write_bytes(_exif_jpeg(_quadrants(), orientation))
    upright = rotate(_quadrants())  # 64x32 (HxW) as viewers show it
    # JPEG's 4:2:0 chroma and quantisation smear the colour edges: mean 3.7 levels at quality 98 (other
    # libjpeg builds round their IDCT a level differently); a wrong rotation is off by ~100.
    assert np.abs(read_image(tmp_path / "img" / "turned.jpg").astype(int) - upright).mean() < 8
    # The red quadrant's box, in the upright frame the annotation file uses.
    red = np.argwhere((upright == (255, 0, 0)).all(axis=2))
    (y0, x0), (y1, x1) = red.min(axis=0), red.max(axis=0) + 1
    ann, img = _coco(tmp_path, ["turned.jpg"], [(64, 32)], boxes=[[int(x0), int(y0), int(x1 - x0), int(y1 - y0)]])
    image, target = CocoDetection(ann, img)[0]
    assert tuple(image.shape) == (3, 64, 32) and target["orig_size"] == (64, 32)
    bx0, by0, bx1, by1 = (int(v) for v in target["boxes"][0])
    inside = image[:, by0 + 2:by1 - 2, bx0 + 2:bx1 - 2].float().mean(dim=(1, 2))
    # The flat interior decodes to within a few levels (254, 0, 0 here; libjpeg builds differ by a level or
    # two); a misplaced box would see another quadrant, 255 levels away in some channel.
    assert torch.allclose(inside, torch.tensor([255.0, 0.0, 0.0]), atol=12)


def test_exif_rotated_jpeg_with_annotations_in_the_stored_frame_is_an_error(tmp_path):
    # Width and height written from the stored pixels (64x32) though the image reads upright as 32x64:
    # the boxes would be misaligned, so the item is refused, naming the file and both sizes.
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "turned.jpg").write_bytes(_exif_jpeg(_quadrants(), 6))
    ann, img = _coco(tmp_path, ["turned.jpg"], [(32, 64)])
    ds = CocoDetection(ann, img)
    _raises_exactly(f"{tmp_path / 'img' / 'turned.jpg'}: image is 32x64 (WxH) but {ann} says 64x32 for image 1",
                    lambda: ds[0])
    # A size mismatch is a wrong annotation, not an unreadable file: skip_bad_images does not hide it.
    _raises_exactly(f"{tmp_path / 'img' / 'turned.jpg'}: image is 32x64 (WxH)",
                    lambda: CocoDetection(ann, img, skip_bad_images=True)[0])


def test_unusual_files_in_both_data_sets_come_out_as_rgb(tmp_path):
    """Grey, RGBA, 16-bit grey and colour, CMYK and an EXIF-rotated JPEG side by side in one data set."""
    colour = np.array([40, 120, 200], np.uint8)
    files = {
        "grey.png": _png_bytes(np.full((8, 8), 120, np.uint8)),
        "rgba.png": _png_bytes(np.concatenate([np.full((8, 8, 3), colour), np.zeros((8, 8, 1), np.uint8)], 2)),
        "deep_grey.png": _png_bytes(np.full((8, 8), 120 * 257, np.uint16)),
        "deep_rgb.png": _png_bytes(np.full((8, 8, 3), colour.astype(np.uint16) * 257)),
        "turned.jpg": _exif_jpeg(np.full((8, 8, 3), colour), 6),
    }
    expected = {"grey.png": (120, 120, 120), "rgba.png": colour, "deep_grey.png": (120, 120, 120),
                "deep_rgb.png": colour, "turned.jpg": colour}
    (tmp_path / "img").mkdir()
    for name, data in files.items():
        (tmp_path / "img" / name).write_bytes(data)
        (tmp_path / "cls" / name.split(".")[0]).mkdir(parents=True)
        (tmp_path / "cls" / name.split(".")[0] / name).write_bytes(data)
    ann, img = _coco(tmp_path, list(files), [(8, 8)] * len(files))
    coco = CocoDetection(ann, img)
    # < 3 levels: the JPEG quantises its flat colour by a level or two; the PNGs (16-bit / 257) are exact.
    for i, name in enumerate(files):
        image, _ = coco[i]
        assert tuple(image.shape) == (3, 8, 8)
        assert (image.float().mean(dim=(1, 2)) - torch.tensor(expected[name], dtype=torch.float)).abs().max() < 3
    identity = build_cls_transform(False, size=8, resize=8, mean=(0, 0, 0), std=(1, 1, 1))
    folder = ImageFolder(tmp_path / "cls", transform=identity)
    for i, (path, _) in enumerate(folder.samples):
        image, _ = folder[i]
        target = torch.tensor(expected[path.split("/")[-1]], dtype=torch.float) / 255
        assert tuple(image.shape) == (3, 8, 8) and (image.mean(dim=(1, 2)) - target).abs().max() < 3 / 255
