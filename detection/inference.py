"""Running a detector over files or a dataset and turning its outputs into COCO results."""
import json
import logging
import os
from pathlib import Path
from typing import Dict, List, Sequence

import cv2
import numpy as np
import torch
from tqdm import tqdm

from engine.config import save_config
from engine.data.decode import read_image
from engine.data.imagefolder import IMAGE_EXTENSIONS
from engine.device import resolve_device
from engine.errors import DatasetError

from .data.coco import require_path
from .build import build_detector, category_ids, category_names, load_detector_weights
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


def to_coco_results(det: Dict[str, torch.Tensor], label_to_id: Dict[int, int], **fields) -> List[dict]:
    """One COCO results entry per detection: bbox as [x, y, w, h] and the dataset's category id."""
    boxes = det["boxes"].tolist()
    return [{**fields, "category_id": label_to_id[int(l)], "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(s)}
            for (x1, y1, x2, y2), s, l in zip(boxes, det["scores"].tolist(), det["labels"].tolist())]


def load_model(cfg, weights):
    device = resolve_device(cfg.device)
    model = build_detector(cfg)
    if weights:
        load_detector_weights(model, weights)
    return model.eval().to(device), device


def image_tensor(image: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1).to(device)


@torch.inference_mode()
def infer_files(cfg, weights: str, inputs: Sequence[str], output_dir: str, visualize: bool = True):
    """Detect on every image in `inputs`; write `output_dir/results.json` and one PNG per image.
    Returns (results, failures) where failures maps file -> reason; unreadable files do not stop the run."""
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
        det = {k: v.cpu() for k, v in model([image_tensor(image, device)])[0].items()}
        entries = to_coco_results(det, label_to_id, file_name=os.path.basename(path))
        results += entries
        if visualize:
            drawn = draw_detections(image, det["boxes"].numpy(), det["scores"].numpy(),
                                    [e["category_id"] for e in entries], names)
            cv2.imwrite(os.path.join(output_dir, Path(path).stem + ".png"), drawn[:, :, ::-1])
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump(results, f)
    return results, failures


@torch.inference_mode()
def predict_coco(model, device, gt, img_dir: str, label_to_id: Dict[int, int]) -> List[dict]:
    """COCO results (image_id, category_id, bbox, score) for every image of a COCO ground truth."""
    results = []
    img_ids = sorted(gt.getImgIds())
    for img_id in tqdm(img_ids, desc="eval", disable=len(img_ids) <= PROGRESS_MIN_IMAGES or None):
        image = read_image(os.path.join(img_dir, gt.imgs[img_id]["file_name"]))
        det = {k: v.cpu() for k, v in model([image_tensor(image, device)])[0].items()}
        results += to_coco_results(det, label_to_id, image_id=img_id)
    return results


def evaluate_detector(cfg, model, device):
    """Run `model` over data.val and evaluate with COCO AP; writes output_dir/metrics.json and
    output_dir/eval/. Returns {iou_type: CocoEvalResult}."""
    from .evaluation.coco_eval import evaluate_and_write, load_coco_gt, load_results

    require_path(cfg.data.val.ann_file, "data.val.ann_file", "validation annotation file")
    require_path(cfg.data.val.img_dir, "data.val.img_dir", "validation image directory", folder=True)
    gt = load_coco_gt(cfg.data.val.ann_file, setting="data.val.ann_file")
    model.eval()
    results = predict_coco(model, device, gt, cfg.data.val.img_dir, category_ids(cfg))
    # A head can know classes the ground truth lacks (torchvision's 91-way COCO head has 10 unused ids);
    # COCO AP only scores the ground truth's categories, so those detections are left out, counted.
    known = set(gt.getCatIds())
    unknown = [r for r in results if r["category_id"] not in known]
    if unknown:
        logger.warning("%d detections of categories absent from %s left out (ids %s)", len(unknown),
                       cfg.data.val.ann_file, sorted({r["category_id"] for r in unknown}))
        results = [r for r in results if r["category_id"] in known]
    results = load_results(results, gt)
    return evaluate_and_write(cfg, gt, results, "the model's detections", ["bbox"])


def evaluate_model(cfg, weights: str):
    """What tools/eval_det.py --weights does: `evaluate_detector` on the weights in `weights`."""
    model, device = load_model(cfg, weights)
    return evaluate_detector(cfg, model, device)
