"""A detector's COCO AP on data.val.

The images come through the test loader (`build_detection_test_loader`), the CocoDetection dataset that
training reads as well: file names kept inside data.val.img_dir, image sizes checked against the
annotation file, unreadable images skipped and counted with data.skip_bad_images, decoding in
data.num_workers DataLoader workers. The model gets them at their original size and resizes them
itself. Its detections become COCO results, which `coco_eval` checks and scores.
"""
import logging
from typing import Dict, List, Tuple

import torch
from tqdm import tqdm

from engine import distributed as dist
from engine.data.paths import require_path

from ..build import category_ids
from ..data.build import build_detection_test_loader, wants_masks
from ..inference import PROGRESS_MIN_IMAGES, detect, load_model, to_coco_results
from .coco_eval import evaluate_and_write, load_coco_gt, load_results

logger = logging.getLogger(__name__)


@torch.inference_mode()
def predict_coco(model, device, loader, label_to_id: Dict[int, int],
                 mask_thresh: float = 0.5) -> Tuple[List[dict], List[int]]:
    """(COCO results, the ids of the images skipped as unreadable) of `model` on every batch of
    `loader` (`build_detection_test_loader`: original-size images, targets naming their image_id).
    Results are image_id, category_id, bbox, score, and segmentation when the model predicts masks.
    Masks become RLE batch by batch: full-size masks of a whole dataset would not fit in memory."""
    image_ids = loader.dataset.image_ids
    batches = loader.batch_sampler
    total = sum(len(indices) for indices in batches)
    results, skipped = [], []
    quiet = total <= PROGRESS_MIN_IMAGES or not dist.is_main()
    with tqdm(total=total, desc="eval", disable=True if quiet else None) as bar:
        for indices, (images, targets) in zip(batches, loader):
            # With data.skip_bad_images the item of an unreadable image holds the next readable one,
            # which its own item evaluates: the stand-in is left out, so no image is scored twice.
            expected = [image_ids[i] for i in indices]
            read = [k for k, target in enumerate(targets) if target["image_id"] == expected[k]]
            skipped += [image_id for k, image_id in enumerate(expected) if k not in read]
            if read:
                for k, (det, masks) in zip(read, detect(model, [images[k] for k in read], device, mask_thresh)):
                    results += to_coco_results(det, label_to_id, masks, image_id=expected[k])
            bar.update(len(indices))
    return results, skipped


def evaluate_detector(cfg, model, device):
    """Run `model` over data.val and evaluate with COCO AP, box AP and, for a model with masks
    (model.name mask_rcnn), mask AP; writes output_dir/metrics.json and output_dir/eval/.
    Returns {iou_type: CocoEvalResult}. Images without annotations are run as well (COCO counts their
    detections as false positives); images skipped as unreadable (data.skip_bad_images) are left out
    of the evaluation, with a warning.

    In a distributed run every process detects on its contiguous share of the images; rank 0 gathers
    the results in image order, evaluates once and writes the files, and every process returns its
    reports. The processes' models must hold the same weights; BN statistics are copied from rank 0."""
    require_path(cfg.data.val.ann_file, "data.val.ann_file", "validation annotation file")
    require_path(cfg.data.val.img_dir, "data.val.img_dir", "validation image directory", folder=True)
    gt = load_coco_gt(cfg.data.val.ann_file, setting="data.val.ann_file")
    loader = build_detection_test_loader(cfg, cfg.test.ims_per_batch, resize=False, rank=dist.rank(),
                                         world_size=dist.world_size())
    dist.sync_buffers(model)
    model.eval()
    mine = predict_coco(model, device, loader, category_ids(cfg), cfg.test.mask_thresh)
    del loader  # its workers end now, not after rank 0's evaluation
    parts = dist.gather_to_main(mine)
    return dist.on_main(lambda: _evaluate_results(cfg, gt, [r for part, _ in parts for r in part],
                                                  sorted(i for _, part in parts for i in part)))


def _evaluate_results(cfg, gt, results: List[dict], skipped: List[int]):
    img_ids = None
    if skipped:
        img_ids = sorted(set(gt.getImgIds()) - set(skipped))
        logger.warning("%d of the %d images of %s could not be read (data.skip_bad_images) and are left out of "
                       "the evaluation, which scores the other %d; image ids %s", len(skipped), len(gt.imgs),
                       cfg.data.val.ann_file, len(img_ids), skipped[:10])
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
                              ["bbox", "segm"] if has_masks else ["bbox"], img_ids)


def evaluate_model(cfg, weights: str):
    """What tools/eval_det.py --weights does: `evaluate_detector` on the weights in `weights`."""
    model, device = load_model(cfg, weights)
    return evaluate_detector(cfg, model, device)
