"""Running a detector over files or a dataset and turning its outputs into COCO results."""
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
from engine.data.paths import IMAGE_EXTENSIONS, require_path
from engine import distributed as dist
from engine.device import resolve_device
from engine.errors import DatasetError

from .data.build import wants_masks
from .build import build_detector, category_ids, category_names
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


def load_model(cfg, weights):
    device = resolve_device(cfg.device)
    model = build_detector(cfg, weights=weights, for_inference=True)
    return model.eval().to(device), device


def image_tensor(image: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1).to(device)


def detect(model, images: Sequence[np.ndarray], device, mask_thresh: float):
    """The model's detections on HxWx3 RGB images run as one batch: for each image, its detections on the
    CPU and their binary masks (None without)."""
    out = []
    for det in model([image_tensor(image, device) for image in images]):
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
        det, masks = detect(model, [image], device, cfg.test.mask_thresh)[0]
        entries = to_coco_results(det, label_to_id, masks, file_name=os.path.basename(path))
        results += entries
        if visualize:
            drawn = draw_detections(image, det["boxes"].numpy(), det["scores"].numpy(),
                                    [e["category_id"] for e in entries], names, masks)
            cv2.imwrite(os.path.join(output_dir, Path(path).stem + ".png"), drawn[:, :, ::-1])
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        f.write(json.dumps(results))  # json.dumps encodes in C; json.dump to a file encodes piece by piece in Python
    return results, failures


@torch.inference_mode()
def predict_coco(model, device, gt, img_dir: str, label_to_id: Dict[int, int],
                 mask_thresh: float = 0.5, img_ids: Optional[Sequence[int]] = None,
                 batch_size: int = 1) -> List[dict]:
    """COCO results (image_id, category_id, bbox, score, and segmentation when the model predicts masks)
    for the images `img_ids` (default: every image) of a COCO ground truth, run `batch_size` images at a
    time (test.ims_per_batch). Masks become RLE batch by batch: full-size masks of a whole dataset would
    not fit in memory."""
    results = []
    img_ids = sorted(gt.getImgIds()) if img_ids is None else img_ids
    quiet = len(img_ids) <= PROGRESS_MIN_IMAGES or not dist.is_main()
    with tqdm(total=len(img_ids), desc="eval", disable=True if quiet else None) as bar:
        for start in range(0, len(img_ids), batch_size):
            ids = img_ids[start:start + batch_size]
            images = [read_image(os.path.join(img_dir, gt.imgs[img_id]["file_name"])) for img_id in ids]
            for img_id, (det, masks) in zip(ids, detect(model, images, device, mask_thresh)):
                results += to_coco_results(det, label_to_id, masks, image_id=img_id)
            bar.update(len(ids))
    return results


def evaluate_detector(cfg, model, device):
    """Run `model` over data.val and evaluate with COCO AP, box AP and, for a model with masks
    (model.name mask_rcnn), mask AP; writes output_dir/metrics.json and output_dir/eval/.
    Returns {iou_type: CocoEvalResult}.

    In a distributed run every process detects on its contiguous share of the images; rank 0 gathers
    the results in image order, evaluates once and writes the files, and every process returns its
    reports. The processes' models must hold the same weights; BN statistics are copied from rank 0."""
    from .evaluation.coco_eval import load_coco_gt

    require_path(cfg.data.val.ann_file, "data.val.ann_file", "validation annotation file")
    require_path(cfg.data.val.img_dir, "data.val.img_dir", "validation image directory", folder=True)
    gt = load_coco_gt(cfg.data.val.ann_file, setting="data.val.ann_file")
    dist.sync_buffers(model)
    model.eval()
    img_ids = sorted(gt.getImgIds())
    mine = [img_ids[i] for i in dist.shard(len(img_ids))]
    results = predict_coco(model, device, gt, cfg.data.val.img_dir, category_ids(cfg), cfg.test.mask_thresh, mine,
                           cfg.test.ims_per_batch)
    parts = dist.gather_to_main(results)
    return dist.on_main(lambda: _evaluate_results(cfg, gt, [r for part in parts for r in part]))


def _evaluate_results(cfg, gt, results: List[dict]):
    from .evaluation.coco_eval import evaluate_and_write, load_results

    # A head can know classes the ground truth lacks (torchvision's 91-way COCO head has 10 unused ids);
    # COCO AP only scores the ground truth's categories, so those detections are left out, counted.
    known = set(gt.getCatIds())
    unknown = [r for r in results if r["category_id"] not in known]
    if unknown:
        logger.warning("%d detections of categories absent from %s left out (ids %s)", len(unknown),
                       cfg.data.val.ann_file, sorted({r["category_id"] for r in unknown}))
        results = [r for r in results if r["category_id"] in known]
    results = load_results(results, gt)
    has_masks = wants_masks(cfg) or bool(results and "segmentation" in results[0])
    return evaluate_and_write(cfg, gt, results, "the model's detections",
                              ["bbox", "segm"] if has_masks else ["bbox"])


def evaluate_model(cfg, weights: str):
    """What tools/eval_det.py --weights does: `evaluate_detector` on the weights in `weights`."""
    model, device = load_model(cfg, weights)
    return evaluate_detector(cfg, model, device)
