"""ONNX export on real images: one file per detector, run by onnxruntime on COCO images of three aspect
ratios, gives the eager model's detections and the source framework's own model's with the same weights
(torchvision's for configs/torchvision/*, Detectron2's for configs/detectron2/*): the same labels, boxes
within 1e-3 relative, scores within 1e-3, pasted masks with IoU above 0.99, every detection paired but those
within the score tolerance of the score threshold or of the detection cap's last score, which
floating-point noise alone may move across.

What each export covers (exports dominate the time):
- configs/torchvision/{frcnn,mrcnn}_r50_fpn.yaml: torchvision's R50-FPN models, seeded, with random
  FrozenBN statistics and the classifier scaled by 30 (scores spread over about 0.2-0.45, 100 detections
  at the cap on every image), converted with the converter of tools/convert_weights.py --from torchvision.
- configs/detectron2/mrcnn_r50_fpn.yaml (its graph is frcnn_r50_fpn.yaml's plus the mask branch) with
  input.resize_mode=interpolate (PIL's resize cannot be in a graph): Detectron2's own R50-FPN Mask R-CNN
  (the `detectron2` fixture) built from its zoo config, seeded and calibrated on the test images as
  tests/parity/test_detectron2_weights.py does it, converted with the converter of --from detectron2. Detectron2's model resizes outside itself, with PIL: it and the file
  are given the same image, resized by Detectron2's ResizeShortestEdge to the test size, which the file's
  own resize then leaves as it is; the eager model gets that image too. (On the image as read, the file's
  resize is onnxruntime's bilinear Resize, whose sampling coordinates round differently from torch's:
  up to 0.014 grey levels apart on 0-255 pixels, which these calibrated weights amplify to 7e-4 in score,
  too near the 1e-3 tolerance to hold on every CPU. The resize in the graph is checked on the images as
  read by the torchvision configs, whose eager and file scores agree within 1e-5.)
- our own configs: tests/tools/test_export.py (R18 Mask R-CNN ONNX, Faster R-CNN TorchScript).

Smallest faithful setup: the full R50 models at a test size of 384 (max 640) instead of 800 (a third of
the pixels; the same graph). 000000000030.jpg (640x428) at that size is one of the sizes the graph once
resized one row short of the eager model; `test_graph_resize_arithmetic_equals_eager` sweeps all sizes.

Non-maximum suppression: while a graph is recorded, detection.structures.batched_nms takes torchvision's
offset form, and onnxruntime's NonMaxSuppression kernel computes the overlaps; the eager model takes
torchvision's CPU kernel (per class above 1000 boxes). The two can decide differently only for a pair of
boxes whose overlap lies within float32 rounding of the threshold; on these images every detection pairs.
"""
import numpy as np
import pytest
import torch
import torchvision

from detection.build import build_detector
from detection.conversion import from_detectron2, from_torchvision
from detection.conversion.detectron2_model import detectron2_config, detectron2_detections, detectron2_predictor
from detection.export.exporter import (OUTPUTS, SCORE_ATOL, Cutoff, compare, compare_detections, export, load,
                                       read_images)
from detection.resize import shortest_edge_size
from tests.conftest import REPO, SHARED_DATA
from tests.parity.test_torchvision_frcnn import random_torchvision_frcnn

MIN_SIZE, MAX_SIZE = 384, 640
SIZE = [f"input.min_size_test={MIN_SIZE}", f"input.max_size_test={MAX_SIZE}", "model.backbone.weights=null",
        "device=cpu"]
IMAGES = ["coco128/train2017/000000000030.jpg",  # 640x428 landscape, the image of the report
          "coco128/train2017/000000000036.jpg",  # 481x640 portrait
          "tiny_coco/val2017/000000314294.jpg"]  # 640x360, 16:9
# Mask logits of random weights spread with a standard deviation of about 0.7: scaled by 10, few pixels lie
# near the 0.5 threshold, and few saturate to exactly 1.0, whose bilinear mix with a tiny probability is
# exactly 0.5, a tie that float noise between two paste implementations breaks either way (by 100: 1.6% of
# a small mask's pixels, eager against torchvision).
MASK_SCALE = 10.0
D2_SIZE = ["INPUT.MIN_SIZE_TEST", MIN_SIZE, "INPUT.MAX_SIZE_TEST", MAX_SIZE]
# configs/detectron2/frcnn_r50_fpn.yaml is mrcnn_r50_fpn.yaml without the mask head, and its graph the Mask
# R-CNN graph without the mask branch (the same boxes, scores and labels): one export serves both, and the
# suite keeps the 45 s a second R50 export and its Detectron2 comparison would cost.
CONFIGS = ["torchvision/frcnn_r50_fpn", "torchvision/mrcnn_r50_fpn", "detectron2/mrcnn_r50_fpn"]


def test_graph_resize_arithmetic_equals_eager():
    """The resize's size arithmetic on tensors (what torch.export and torch.jit.trace record) gives the
    Python numbers' sizes for every side from 32 to 1600 against 40 others, at two test sizes: a size one
    pixel off moves every detection of the exported file."""
    heights = torch.arange(32, 1601)
    for width in list(range(300, 700, 10)):
        for min_size, max_size in [(800.0, 1333.0), (float(MIN_SIZE), float(MAX_SIZE))]:
            h, w = shortest_edge_size(heights.double(), torch.full((len(heights),), float(width), dtype=torch.float64),
                                      min_size, max_size)
            eager = torch.tensor([shortest_edge_size(int(x), width, min_size, max_size) for x in heights])
            mismatch = torch.nonzero((torch.stack([h, w], 1) != eager).any(1))[:, 0]
            assert not len(mismatch), f"heights {heights[mismatch][:5].tolist()} x width {width} at {min_size}"


def torchvision_pair(name):
    """Ours from configs/torchvision/NAME, and a function of an image giving torchvision's detections and the
    image the file is to get (the same): torchvision's model seeded, with random FrozenBN statistics, the
    classifier scaled by 30 and mask logits by MASK_SCALE, at our test size, its weights converted to ours."""
    model_class = torchvision.models.detection.MaskRCNN if "mrcnn" in name else torchvision.models.detection.FasterRCNN
    tv = random_torchvision_frcnn(score_scale=30.0, model_class=model_class)
    tv.transform.min_size, tv.transform.max_size = (MIN_SIZE,), MAX_SIZE
    if "mrcnn" in name:
        with torch.no_grad():
            tv.roi_heads.mask_predictor.mask_fcn_logits.weight.mul_(MASK_SCALE)
    ours = build_detector(REPO / "configs" / f"{name}.yaml", SIZE)
    ours.load_state_dict(from_torchvision(tv.state_dict()).state_dict, strict=True)

    def reference(image):
        with torch.no_grad():  # torchvision's model takes float images; the file the uint8 one (x / 255 in it)
            return tv.eval()([image.float() / 255])[0], image
    return ours.eval(), reference, "torchvision"


def hwc(image: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(image.permute(1, 2, 0).numpy())


def detectron2_pair(name, state):
    """Ours from configs/detectron2/NAME, exportable (resize by interpolation), and a function of an image
    giving Detectron2's detections and the image the file is to get: the image resized as Detectron2's
    DefaultPredictor resizes it (PIL), which both then take at its size. Detectron2's model is its zoo
    config's at the test size, with the calibrated weights converted to ours (Faster R-CNN: Mask R-CNN's
    without the mask head)."""
    from detectron2.data.transforms import ResizeShortestEdge

    mask = "mrcnn" in name
    state = {k: v for k, v in state.items() if mask or not k.startswith("roi_heads.mask_head.")}
    theirs = detectron2_predictor(detectron2_config(mask, opts=D2_SIZE), state)
    ours = build_detector(REPO / "configs" / f"{name}.yaml", SIZE + ["input.resize_mode=interpolate"])
    ours.load_state_dict(from_detectron2({k: torch.from_numpy(v) for k, v in state.items()}).state_dict, strict=True)
    resize = ResizeShortestEdge([MIN_SIZE, MIN_SIZE], MAX_SIZE)

    def reference(image):
        resized = resize.get_transform(hwc(image)).apply_image(hwc(image))
        size = resized.shape[:2]
        assert resize.get_output_shape(*size, MIN_SIZE, MAX_SIZE) == size, "a second resize would change it"
        detections = detectron2_detections(theirs, resized)
        if mask:  # Detectron2 pastes masks thresholded: probabilities 0 or 1
            detections["masks"] = detections["masks"][:, None].float()
        return detections, torch.from_numpy(resized).permute(2, 0, 1).contiguous()
    return ours.eval(), reference, "Detectron2"


@pytest.fixture(scope="module")
def images():
    files = [SHARED_DATA / name for name in IMAGES]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        pytest.skip(f"images not found: {', '.join(missing)} (real COCO subsets live in ../shared/data)")
    return dict(zip(IMAGES, (image for _, image in read_images([str(f) for f in files]))))


@pytest.fixture(scope="module")
def detectron2_state(images, detectron2):
    """Detectron2's Mask R-CNN R50-FPN state (numpy) of its zoo config, seeded and calibrated at the test size
    on the images as tests/parity/test_detectron2_weights.py calibrates it."""
    from detectron2.engine import DefaultPredictor
    from tests.parity.test_detectron2_weights import calibrate

    torch.manual_seed(0)
    predictor = DefaultPredictor(detectron2_config(True, opts=D2_SIZE))
    calibrate(predictor.model, [[(hwc(image), (MIN_SIZE, MAX_SIZE)) for image in images.values()]])
    return {k: v.numpy().copy() for k, v in predictor.model.state_dict().items()}


@pytest.fixture(scope="module", params=CONFIGS)
def exported(request, images, tmp_path_factory):
    """(ours, the source framework's detections as a function, its name, the ONNX file as a function):
    exported once per config, recorded on the first image (optimize=False: the same graph without the
    optimiser's rewrites, faster to write)."""
    pytest.importorskip("onnxruntime", reason="ONNX export is checked with onnxruntime: pip install onnx onnxruntime")
    pytest.importorskip("onnxscript", reason="torch.onnx.export(dynamo=True) needs onnxscript")
    name = request.param
    if name.startswith("torchvision"):
        ours, reference, source = torchvision_pair(name)
    else:
        ours, reference, source = detectron2_pair(name, request.getfixturevalue("detectron2_state"))
    path = tmp_path_factory.mktemp("export") / "model.onnx"
    export(ours, str(path), "onnx", images[IMAGES[0]], optimize=False)
    return ours, reference, source, load(str(path), "onnx")


@pytest.mark.slow
@pytest.mark.parametrize("image_name", IMAGES)
def test_onnx_file_gives_eager_and_source_framework_detections(exported, images, image_name):
    ours, reference, source, run = exported
    theirs, given = reference(images[image_name])
    check = compare(ours, run, given, image_name)
    print(check.line())  # the measured differences, with pytest -s
    assert check.detections >= 20, f"too few detections to compare: {check.line()}"
    outputs = dict(zip(OUTPUTS, run(given)))
    spread = theirs["scores"].max() - theirs["scores"].min()
    # Detectron2's calibrated scores crowd near the threshold (0.05), torchvision's spread over 0.2-0.45.
    assert spread > 10 * SCORE_ATOL, "scores must spread past the tolerance for the comparison to mean something"
    versus = compare_detections(theirs, outputs, given.shape[-2:], image_name, Cutoff.of(ours),
                                getattr(ours, "paste_mode", "torchvision"), source=source)
    print(f"{source}:", versus.line())
    assert versus.detections == len(theirs["boxes"]) >= 20, versus.line()
