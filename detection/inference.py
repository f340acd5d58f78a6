"""Running a detector over image files and turning its outputs into COCO results (a dataset with ground
truth: detection.evaluation)."""
import json
import logging
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import cv2
import numpy as np
import torch
from pycocotools import mask as mask_utils
from tqdm import tqdm

from engine.config import save_config
from engine.data.decode import read_image
from engine.data.paths import IMAGE_EXTENSIONS
from engine.device import resolve_device
from engine.errors import DatasetError

from .build import build_detector, category_ids, category_names, compile_detector
from .visualize import draw_detections

logger = logging.getLogger(__name__)

# A progress bar only when there are more images than a glance at the terminal covers.
PROGRESS_MIN_IMAGES = 5


def list_images(paths: Sequence[str]) -> List[str]:
    """Files as given, folders expanded to their images (sorted). Missing paths are kept, so that the
    caller reports them with the others that cannot be read."""
    files = []
    for p in paths:
        if os.path.isdir(p):
            files += sorted(str(f) for f in Path(p).rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)
        else:
            files.append(p)
    return files


def binary_masks(det: Dict[str, torch.Tensor], mask_thresh: float) -> Optional[np.ndarray]:
    """The detections' masks (N, H, W) bool, a pixel in where its probability is >= `mask_thresh`; None
    for a model without masks. `det["masks"]`: (N, 1, H, W) probabilities at the original image size."""
    if "masks" not in det:
        return None
    return (det["masks"][:, 0] >= mask_thresh).cpu().numpy()


def encode_masks(masks: np.ndarray) -> List[dict]:
    """(N, H, W) binary masks -> COCO compressed RLE {"size": [H, W], "counts": str}, JSON-ready."""
    # pycocotools reads masks column-major (H, W, N) Fortran order.
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    return [{"size": [int(v) for v in r["size"]], "counts": r["counts"].decode("ascii")} for r in rles]


def to_coco_results(det: Dict[str, torch.Tensor], label_to_id: Dict[int, int], masks: Optional[np.ndarray] = None,
                    **fields) -> List[dict]:
    """One COCO results entry per detection: bbox as [x, y, w, h] and the dataset's category id; with
    `masks` ((N, H, W) binary, `binary_masks`), also segmentation as compressed RLE."""
    boxes = det["boxes"].tolist()
    entries = [{**fields, "category_id": label_to_id[int(l)], "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(s)}
               for (x1, y1, x2, y2), s, l in zip(boxes, det["scores"].tolist(), det["labels"].tolist())]
    if masks is not None:
        for entry, rle in zip(entries, encode_masks(masks)):
            entry["segmentation"] = rle
    return entries


def load_model(cfg, weights, device=None):
    """(the detector of `cfg` for inference, with `weights` (else model.weights) as the whole detector, in
    eval mode on `device` (else cfg.device), compiled where model.compile says so; that device)."""
    device = resolve_device(device or cfg.device)
    model = build_detector(cfg, weights=weights, for_inference=True)
    return compile_detector(model.eval().to(device), cfg), device


def image_tensor(image: np.ndarray) -> torch.Tensor:
    """An HxWx3 RGB array as the (3, H, W) uint8 tensor the model takes (a view, as the dataset gives it)."""
    return torch.from_numpy(image).permute(2, 0, 1)


def detect(model, images: Sequence[torch.Tensor], device, mask_thresh: float):
    """The model's detections on (3, H, W) uint8 RGB images run as one batch: for each image, its
    detections on the CPU and their binary masks (None without)."""
    out = []
    for det in model([image.to(device) for image in images]):
        masks = binary_masks(det, mask_thresh)  # thresholded on the device: 4x less to copy than float masks
        out.append(({k: v.cpu() for k, v in det.items() if k != "masks"}, masks))
    return out


@torch.inference_mode()
def infer_files(cfg, weights: str, inputs: Sequence[str], output_dir: str, visualize: bool = True):
    """Detect on every image in `inputs`; write `output_dir/results.json` and one PNG per image (with the
    masks, thresholded at test.mask_thresh, when the model predicts them). Returns (results, failures)
    where failures maps file -> reason; unreadable files do not stop the run."""
    os.makedirs(output_dir, exist_ok=True)
    save_config(cfg, output_dir)
    model, device = load_model(cfg, weights)
    label_to_id, names = category_ids(cfg), category_names(cfg)
    files = list_images(inputs)
    results, failures = [], {}
    for path in tqdm(files, desc="infer", disable=len(files) <= PROGRESS_MIN_IMAGES or None):
        try:
            image = read_image(path)
        except DatasetError as e:
            failures[path] = str(e)
            logger.error("%s", e)
            continue
        det, masks = detect(model, [image_tensor(image)], device, cfg.test.mask_thresh)[0]
        entries = to_coco_results(det, label_to_id, masks, file_name=os.path.basename(path))
        results += entries
        if visualize:
            drawn = draw_detections(image, det["boxes"].numpy(), det["scores"].numpy(),
                                    [e["category_id"] for e in entries], names, masks)
            cv2.imwrite(os.path.join(output_dir, Path(path).stem + ".png"), drawn[:, :, ::-1])
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        f.write(json.dumps(results))  # json.dumps encodes in C; json.dump to a file encodes piece by piece in Python
    return results, failures
