"""Detections on the GPU: our Faster and Mask R-CNN give on CUDA the detections they give on the CPU with
the same weights, and the detections torchvision's model gives on CUDA.

The weights are torchvision's R50-FPN detectors with random weights and non-trivial frozen-BN statistics,
converted, as the torchvision parity tests build them (tests/parity/test_torchvision_frcnn.py); the images
are real COCO images (../shared/data/tiny_coco). Detections are paired one to one by
`detection.conversion.check.compare_detections` (the same label, box and score within tolerance, masks
differing in at most 1% of their union); only detections within the score tolerance of the score threshold
or of the detection cap may be on one side alone.

Tolerance: the score tolerance of the torchvision parity tests, 1e-3. Their classifier is scaled by 30
(`score_scale`) so that the scores spread out, which also multiplies float32 rounding of the box features
(summed in other orders by cuDNN's and oneDNN's kernels, and with frozen BN folded into the convolutions on
our side) by 30 in the logits. Boxes keep compare_detections' 1e-4 of the image's larger side (0.06 px on
a 640-px image). TF32 is off (`float32_exact`): its rounding is ~8000 times float32's.
"""
import copy

import pytest
import torch
import torchvision

from backbones.weights import save_weights
from detection.conversion import from_torchvision
from detection.conversion.check import Tolerances, compare_detections
from detection.inference import binary_masks
from detection.predictor import Predictor
from engine.data.decode import read_image
from tests.conftest import REPO
from tests.parity.test_torchvision_frcnn import random_torchvision_frcnn

pytestmark = pytest.mark.slow

MODELS = {"faster_rcnn": (REPO / "configs" / "torchvision" / "frcnn_r50_fpn.yaml",
                          torchvision.models.detection.FasterRCNN),
          "mask_rcnn": (REPO / "configs" / "torchvision" / "mrcnn_r50_fpn.yaml",
                        torchvision.models.detection.MaskRCNN)}
TOL = Tolerances(score=1e-3)


@pytest.fixture(scope="module", params=list(MODELS))
def converted(request, cuda, tmp_path_factory):
    """(config, our weights file, torchvision's model on the CPU) for each detector."""
    config, model_class = MODELS[request.param]
    tv = random_torchvision_frcnn(score_scale=30.0, model_class=model_class)
    path = tmp_path_factory.mktemp(request.param) / "ours.pth"
    save_weights(str(path), from_torchvision(tv.state_dict()).state_dict)
    return config, path, tv


@pytest.fixture
def images(shared_data):
    """Two real COCO images, HxWx3 uint8 RGB."""
    return [(path.name, read_image(path)) for path in sorted((shared_data / "tiny_coco" / "val2017").glob("*.jpg"))[:2]]


def with_binary_masks(det, thresh):
    """`det` (CPU tensors) with its masks, if any, as (N, H, W) bool at `thresh`."""
    out = {k: det[k] for k in ("boxes", "scores", "labels")}
    masks = binary_masks(det, thresh)
    if masks is not None:
        out["masks"] = torch.from_numpy(masks)
    return out


def assert_same(ours, theirs, image, cfg, what):
    assert len(theirs["scores"]) > 0 and theirs["scores"].max() - theirs["scores"].min() > 0.1, \
        "the comparison needs detections whose scores spread out"
    if "masks" in theirs:
        assert theirs["masks"].flatten(1).any(1).float().mean() > 0.5, "most masks must be non-empty"
    lines, ok = compare_detections(ours, theirs, image_size=image.shape[:2], score_thresh=cfg.test.score_thresh,
                                   max_detections=cfg.test.detections_per_img, tol=TOL)
    assert ok, f"{what}:\n" + "\n".join(lines)


def test_cuda_detections_equal_cpu_detections(converted, images, cuda, float32_exact):
    config, weights, _ = converted
    on_cpu = Predictor(config, weights=str(weights), device="cpu")
    on_gpu = Predictor(config, weights=str(weights), device=str(cuda))
    assert next(on_gpu.model.parameters()).device.type == cuda.type
    thresh = on_cpu.cfg.test.mask_thresh
    for name, image in images:
        ours_gpu, ours_cpu = (with_binary_masks(p(image), thresh) for p in (on_gpu, on_cpu))
        assert_same(ours_gpu, ours_cpu, image, on_cpu.cfg, f"{name}: ours on {cuda} (ours) against ours on the CPU")


def test_cuda_detections_equal_torchvision_on_cuda(converted, images, cuda, float32_exact):
    config, weights, tv = converted
    ours = Predictor(config, weights=str(weights), device=str(cuda))
    theirs_model = copy.deepcopy(tv).to(cuda)
    thresh = ours.cfg.test.mask_thresh
    for name, image in images:
        with torch.no_grad():
            x = torch.from_numpy(image).permute(2, 0, 1).to(cuda).float() / 255
            theirs = {k: v.cpu() for k, v in theirs_model([x])[0].items()}
        # torchvision's masks are probabilities; thresholded as ours are (binary_masks, test.mask_thresh).
        assert_same(with_binary_masks(ours(image), thresh), with_binary_masks(theirs, thresh), image, ours.cfg,
                    f"{name}: ours (ours) against torchvision's model (theirs), both on {cuda}")
