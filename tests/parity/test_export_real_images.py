"""ONNX export on real images: one file per detector, run by onnxruntime on COCO images of three aspect
ratios, gives the eager model's detections and, for configs/torchvision/*, torchvision's own model's with
the same weights (the source framework): the same labels, boxes within 1e-3 relative, scores within 1e-3,
pasted masks with IoU above 0.99, every detection paired but those within the score tolerance of the
score threshold or of the detection cap's last score, which floating-point noise alone may move across.

What each export covers (one per architecture and config family; exports dominate the time):
- configs/torchvision/{frcnn,mrcnn}_r50_fpn.yaml: torchvision's R50-FPN models, seeded, with random
  FrozenBN statistics and the classifier scaled by 30 (scores spread over about 0.2-0.45, 100 detections
  at the cap on every image), converted with the converter of tools/convert_weights.py --from torchvision.
- configs/detectron2/mrcnn_r50_fpn.yaml with input.resize_mode=interpolate (PIL's resize cannot be in a
  graph): its BGR 0-255 input, anchors, RPN, RoIAlignV2, drop_empty_boxes and mask paste; random weights
  (100 detections at the cap on every image). It is frcnn_r50_fpn.yaml plus the mask head, and its graph
  that one's plus the mask branch: one export serves both (Faster R-CNN without masks: torchvision's).
- our own configs: tests/tools/test_export.py (R18 Mask R-CNN ONNX, Faster R-CNN TorchScript).

Smallest faithful setup: the full R50 models at a test size of 384 (max 640) instead of 800 (a third of
the pixels; the same graph). 000000000030.jpg (640x428) at that size is one of the sizes the graph once
resized one row short of the eager model; `test_graph_resize_arithmetic_equals_eager` sweeps all sizes.
"""
import pytest
import torch
import torchvision

from detection.build import build_detector
from detection.conversion import from_torchvision
from detection.export.exporter import (OUTPUTS, Cutoff, compare, compare_detections, export, load,
                                       read_images)
from detection.resize import shortest_edge_size
from tests.conftest import REPO, SHARED_DATA, randomize_norms
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
    """torchvision's model (seeded, random FrozenBN statistics, classifier scaled by 30, mask logits by
    MASK_SCALE) at our test size, and ours from configs/torchvision/NAME with its weights converted."""
    model_class = torchvision.models.detection.MaskRCNN if "mrcnn" in name else torchvision.models.detection.FasterRCNN
    tv = random_torchvision_frcnn(score_scale=30.0, model_class=model_class)
    tv.transform.min_size, tv.transform.max_size = (MIN_SIZE,), MAX_SIZE
    if "mrcnn" in name:
        with torch.no_grad():
            tv.roi_heads.mask_predictor.mask_fcn_logits.weight.mul_(MASK_SCALE)
    ours = build_detector(REPO / "configs" / f"{name}.yaml", SIZE)
    ours.load_state_dict(from_torchvision(tv.state_dict()).state_dict, strict=True)
    return ours.eval(), tv


def detectron2_model(name):
    """Ours from configs/detectron2/NAME, exportable (resize by interpolation), with random weights and BN
    statistics. Its input is 0-255 pixels less the mean (pixel_std 1, as the MSRA weights take it): the
    random stem divided by 57 (the FAIR weights' pixel_std) keeps the activations of std-normalised input,
    where scores spread over about 0.45-0.75 (unscaled, every score saturates at 1.0 on degenerate boxes)."""
    torch.manual_seed(0)
    model = randomize_norms(build_detector(REPO / "configs" / f"{name}.yaml", SIZE + ["input.resize_mode=interpolate"]))
    with torch.no_grad():
        model.backbone.bottom_up.stem.conv1.weight.div_(57.0)
        if "mrcnn" in name:
            model.roi_heads.mask_head.predictor.weight.mul_(MASK_SCALE)
    return model.eval(), None


@pytest.fixture(scope="module")
def images():
    files = [SHARED_DATA / name for name in IMAGES]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        pytest.skip(f"images not found: {', '.join(missing)} (real COCO subsets live in ../shared/data)")
    return dict(zip(IMAGES, (image for _, image in read_images([str(f) for f in files]))))


@pytest.fixture(scope="module", params=CONFIGS)
def exported(request, images, tmp_path_factory):
    """(ours, torchvision's model or None, the ONNX file as a function): exported once per config, recorded on
    the first image (optimize=False: the same graph without the optimiser's rewrites, faster to write)."""
    pytest.importorskip("onnxruntime", reason="ONNX export is checked with onnxruntime: pip install onnx onnxruntime")
    pytest.importorskip("onnxscript", reason="torch.onnx.export(dynamo=True) needs onnxscript")
    name = request.param
    ours, tv = (torchvision_pair if name.startswith("torchvision") else detectron2_model)(name)
    path = tmp_path_factory.mktemp("export") / "model.onnx"
    export(ours, str(path), "onnx", images[IMAGES[0]], optimize=False)
    return ours, tv, load(str(path), "onnx")


@pytest.mark.slow
@pytest.mark.parametrize("image_name", IMAGES)
def test_onnx_file_gives_eager_and_source_framework_detections(exported, images, image_name):
    ours, tv, run = exported
    image = images[image_name]
    check = compare(ours, run, image, image_name)
    print(check.line())  # the measured differences, with pytest -s
    assert check.detections >= 20, f"too few detections to compare: {check.line()}"
    if tv is None:
        return
    with torch.no_grad():
        theirs = tv([image.float() / 255])[0]
    # torchvision's model gets the float image it takes; the file the uint8 one (x / 255 in the graph).
    outputs = dict(zip(OUTPUTS, run(image)))
    spread = theirs["scores"].max() - theirs["scores"].min()
    assert spread > 0.1, "scores must spread for the comparison to mean something"
    versus = compare_detections(theirs, outputs, image.shape[-2:], image_name, Cutoff.of(ours), source="torchvision")
    print("torchvision:", versus.line())
    assert versus.detections == len(theirs["boxes"]) >= 20, versus.line()
