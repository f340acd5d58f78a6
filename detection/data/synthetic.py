"""The synthetic shapes dataset: the project's built-in data for demos, tests and smoke training.

Its definition is fixed so that results stay comparable; do not make it easier:
- three categories: 1 circle, 2 triangle, 3 rectangle;
- 1-6 objects per image (uniform), each with a random colour, a size from 16 px up to half the image's
  shorter side and, for triangles and rectangles, a random rotation;
- objects overlap, later ones on top; masks, polygons, boxes and areas describe the visible part only;
- a textured background per image: low-frequency colour noise at two scales plus gaussian pixel noise.

To keep annotations fair, an object is never placed where it would hide an earlier one below 30 % of
its own area or below 40 px, or punch a hole in it (COCO polygons cannot describe holes). Such a
placement is re-drawn at another position and rotation; after a few failures the new object is left
out, so an image may hold fewer objects than were drawn for it, never fewer than one. Heavily hidden
objects therefore never appear as unannotated fragments.

Train and val are generated from different seeds (val uses `seed + VAL_SEED_OFFSET`), so val is
never a copy of train images. Every image has its own generator derived from (seed, index), so
image i does not depend on how many images are made, nor on how many processes (`workers`) draw them.
"""
import json
import os
import re
from concurrent.futures import ProcessPoolExecutor

import cv2
import numpy as np

from engine.errors import ConfigError

CATEGORIES = [
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 2, "name": "triangle", "supercategory": "shape"},
    {"id": 3, "name": "rectangle", "supercategory": "shape"},
]
CIRCLE, TRIANGLE, RECTANGLE = 1, 2, 3
MIN_SIZE = 16
MAX_OBJECTS = 6
MIN_VISIBLE_FRACTION = 0.3
MIN_VISIBLE_AREA = 40
VAL_SEED_OFFSET = 1_000_003
# Separate generator streams so that detection images and crops made from one seed are unrelated.
_IMAGE_STREAM, _CROP_STREAM = 0, 1
_PLACEMENT_TRIES = 20
_COLOUR_TRIES = 20
# Below this RGB distance an object could blend into what is under or around it.
_MIN_COLOUR_DISTANCE = 80.0
_SUBPIXEL_SHIFT = 4  # cv2 drawing with 1/16 px vertex precision, so small shapes keep their proportions
_GENERATED_PNG = re.compile(r"^\d{6}\.png$")


def _background(rng, height, width):
    """Float32 HxWx3 colour field: a coarse gradient plus finer blobs, different for every call."""
    coarse = rng.uniform(0, 255, (int(rng.integers(2, 5)), int(rng.integers(2, 5)), 3)).astype(np.float32)
    fine = rng.normal(0, 30, (int(rng.integers(6, 13)), int(rng.integers(6, 13)), 3)).astype(np.float32)
    field = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    field += cv2.resize(fine, (width, height), interpolation=cv2.INTER_CUBIC)
    return np.clip(field, 0, 255)


def _add_noise(rng, canvas):
    sigma = rng.uniform(2.0, 10.0)
    noisy = canvas + rng.standard_normal(canvas.shape, dtype=np.float32) * sigma
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def _outline(rng, category_id, size):
    """Vertices (N, 2) of a triangle or rectangle whose longer unrotated side is `size`, centred at 0 and
    rotated at random."""
    if category_id == TRIANGLE:
        h = size * rng.uniform(0.6, 1.0)
        points = np.array([[-size / 2, h / 3], [size / 2, h / 3], [0.0, -2 * h / 3]])
    else:
        h = size * rng.uniform(0.5, 1.0)
        points = np.array([[-size / 2, -h / 2], [size / 2, -h / 2], [size / 2, h / 2], [-size / 2, h / 2]])
    angle = rng.uniform(0, 2 * np.pi)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return points @ rotation.T


def _shape_mask(rng, category_id, size, height, width):
    """Boolean HxW mask of one shape at a random position that keeps it wholly inside the image."""
    mask = np.zeros((height, width), np.uint8)
    scale = 1 << _SUBPIXEL_SHIFT
    if category_id == CIRCLE:
        r = size / 2
        cx, cy = rng.uniform(r, width - 1 - r), rng.uniform(r, height - 1 - r)
        cv2.circle(mask, (round(cx * scale), round(cy * scale)), round(r * scale), 1, -1, shift=_SUBPIXEL_SHIFT)
    else:
        points = _outline(rng, category_id, size)
        low, high = points.min(0), points.max(0)
        centre = rng.uniform(-low, np.array([width - 1, height - 1]) - high)
        vertices = np.rint((points + centre) * scale).astype(np.int32)
        cv2.fillPoly(mask, [vertices], 1, shift=_SUBPIXEL_SHIFT)
    return mask.astype(bool)


def _has_hole(mask):
    _, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    return hierarchy is not None and bool((hierarchy[0][:, 3] >= 0).any())


def _keeps_earlier_fair(owner, full_areas, mask):
    """Whether drawing `mask` on top leaves every earlier object visible enough and without holes."""
    for j in np.unique(owner[mask]):
        if j < 0:
            continue
        visible = (owner == j) & ~mask
        area = int(visible.sum())
        if area < MIN_VISIBLE_AREA or area < MIN_VISIBLE_FRACTION * full_areas[j]:
            return False
        if _has_hole(visible):
            return False
    return True


def _pick_colour(rng, canvas, owner, colours, mask):
    """A random colour that stands out from the background and the objects under or next to `mask`."""
    ring = cv2.dilate(mask.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    background = ring & (owner < 0)
    references = [canvas[background].mean(0)] if background.any() else []
    references += [colours[j] for j in np.unique(owner[ring]) if j >= 0]
    best, best_distance = None, -1.0
    for _ in range(_COLOUR_TRIES):
        colour = rng.integers(0, 256, 3).astype(np.float32)
        distance = min((float(np.linalg.norm(colour - ref)) for ref in references), default=np.inf)
        if distance >= _MIN_COLOUR_DISTANCE:
            return colour
        if distance > best_distance:
            best, best_distance = colour, distance
    return best


def _polygons(mask):
    """COCO polygons (flat [x0, y0, x1, y1, ...] lists) of a boolean mask, one per connected piece.

    Contours of the mask upsampled 2x, mapped back with (c + 0.5) / 2, trace the pixel edges rather than
    the boundary pixel centres, so pycocotools rasterises them back to exactly the same pixels; contours
    through pixel centres would lose about half the boundary (~15 % of a 16 px circle).
    """
    up = cv2.resize(mask.astype(np.uint8), None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(up, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return [((c.reshape(-1, 2) + 0.5) / 2).ravel().tolist() for c in contours if len(c) >= 3]


def _annotation(category_id, mask):
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    return {
        "category_id": int(category_id),
        "bbox": [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0],
        "segmentation": _polygons(mask),
        "area": int(mask.sum()),
        "iscrowd": 0,
    }


def render_image(rng, height, width):
    """One image of the shapes dataset: (HxWx3 uint8 RGB, list of annotation dicts).

    Each dict has category_id, bbox [x, y, w, h] (pixel edges, covering every visible pixel),
    segmentation (COCO polygons of the visible part, several when an occluder splits the object),
    area (visible pixels) and iscrowd 0. `rng` is a numpy Generator.
    """
    if min(height, width) < 2 * MIN_SIZE:
        raise ConfigError(f"render_image: image size {height}x{width} is below {2 * MIN_SIZE} px, "
                         f"too small for objects of at least {MIN_SIZE} px")
    canvas = _background(rng, height, width)
    owner = np.full((height, width), -1, np.int16)
    categories, full_areas, colours = [], [], []
    for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
        category_id = int(rng.integers(1, len(CATEGORIES) + 1))
        size = rng.uniform(MIN_SIZE, min(height, width) / 2)
        for _ in range(_PLACEMENT_TRIES):
            mask = _shape_mask(rng, category_id, size, height, width)
            if _keeps_earlier_fair(owner, full_areas, mask):
                break
        else:
            continue
        colour = _pick_colour(rng, canvas, owner, colours, mask)
        canvas[mask] = colour
        owner[mask] = len(categories)
        categories.append(category_id)
        full_areas.append(int(mask.sum()))
        colours.append(colour)
    image = _add_noise(rng, canvas)
    return image, [_annotation(c, owner == j) for j, c in enumerate(categories)]


def render_crop(rng, category_id, crop_size):
    """A crop_size x crop_size RGB image with one object of `category_id` on a textured background.

    The object spans 30-70 % of the crop, so that even a rotated square fits inside it.
    """
    if crop_size < 2 * MIN_SIZE:
        raise ConfigError(f"render_crop: crop_size {crop_size} is below {2 * MIN_SIZE} px")
    canvas = _background(rng, crop_size, crop_size)
    owner = np.full((crop_size, crop_size), -1, np.int16)
    mask = _shape_mask(rng, category_id, rng.uniform(0.3, 0.7) * crop_size, crop_size, crop_size)
    canvas[mask] = _pick_colour(rng, canvas, owner, [], mask)
    return _add_noise(rng, canvas)


def _write_png(path, image):
    ok, data = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"{path}: PNG encoding failed")
    data.tofile(path)  # not cv2.imwrite: it fails on non-ASCII paths on Windows


def _check_seed(seed):
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"synthetic shapes: seed must be a non-negative integer, got {seed!r}")


def _prepare_folder(folder):
    """Create `folder` and remove earlier generated images (NNNNNN.png) from it, so that a smaller rerun
    leaves no stale files behind for ImageFolder to pick up. Other files are left alone."""
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):
        if _GENERATED_PNG.match(name):
            os.remove(os.path.join(folder, name))


def _run(fn, jobs, workers):
    """[fn(job) for job in jobs], in `workers` processes when more than one (the jobs are independent: each
    seeds its own generator), in order either way."""
    if workers <= 1 or len(jobs) < 2 * workers:
        return [fn(job) for job in jobs]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(fn, jobs, chunksize=max(1, len(jobs) // (8 * workers))))


def _write_coco_image(job):
    path, seed, i, height, width = job
    image, objects = render_image(np.random.default_rng([_IMAGE_STREAM, seed, i]), height, width)
    _write_png(path, image)
    return objects


def _write_crop(job):
    path, seed, category_id, i, crop_size = job
    _write_png(path, render_crop(np.random.default_rng([_CROP_STREAM, seed, category_id, i]), category_id, crop_size))


def make_coco_split(out_dir, split, num_images, seed, image_size=(128, 128), workers=1):
    """Write `out_dir/<split>/NNNNNN.png` and `out_dir/annotations/instances_<split>.json` (COCO format),
    drawing the images in `workers` processes (the files are the same for any number).

    Image ids start at 1 and follow the file numbering; annotation ids are unique and start at 1.
    Returns the path of the annotation file.
    """
    _check_seed(seed)
    height, width = image_size
    image_dir = os.path.join(out_dir, split)
    _prepare_folder(image_dir)
    os.makedirs(os.path.join(out_dir, "annotations"), exist_ok=True)
    names = [f"{i:06d}.png" for i in range(num_images)]
    drawn = _run(_write_coco_image, [(os.path.join(image_dir, name), seed, i, height, width)
                                     for i, name in enumerate(names)], workers)
    images, annotations = [], []
    for i, (file_name, objects) in enumerate(zip(names, drawn)):
        images.append({"id": i + 1, "file_name": file_name, "height": height, "width": width})
        for obj in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, **obj})
    dataset = {
        "info": {"description": f"synthetic shapes, split {split}, seed {seed}", "version": "1"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES,
    }
    json_path = os.path.join(out_dir, "annotations", f"instances_{split}.json")
    with open(json_path, "w") as f:
        f.write(json.dumps(dataset))  # json.dumps encodes in C: 4x faster than json.dump to a file here
    return json_path


def make_crops(out_dir, split, num_per_class, seed, crop_size=64, workers=1):
    """Write an ImageFolder of single-object crops, `out_dir/crops/<split>/<class_name>/NNNNNN.png`, in
    `workers` processes.

    Returns the split's folder.
    """
    _check_seed(seed)
    split_dir = os.path.join(out_dir, "crops", split)
    jobs = []
    for category in CATEGORIES:
        class_dir = os.path.join(split_dir, category["name"])
        _prepare_folder(class_dir)
        jobs += [(os.path.join(class_dir, f"{i:06d}.png"), seed, category["id"], i, crop_size)
                 for i in range(num_per_class)]
    _run(_write_crop, jobs, workers)
    return split_dir


def make_synthetic(out_dir, num_train=200, num_val=50, seed=0, image_size=(128, 128), crops_per_class=100,
                   crop_size=64, workers=1):
    """Write the whole dataset under `out_dir`: COCO train/val splits and train/val classification crops,
    in `workers` processes.

    Train uses `seed`, val uses `seed + VAL_SEED_OFFSET`. Returns {name: path} of what was written.
    """
    seeds = {"train": seed, "val": seed + VAL_SEED_OFFSET}
    counts = {"train": num_train, "val": num_val}
    written = {}
    for split, split_seed in seeds.items():
        written[f"{split}_images"] = os.path.join(out_dir, split)
        written[f"{split}_annotations"] = make_coco_split(out_dir, split, counts[split], split_seed, image_size,
                                                          workers)
        if crops_per_class > 0:
            written[f"{split}_crops"] = make_crops(out_dir, split, crops_per_class, split_seed, crop_size, workers)
    return written
