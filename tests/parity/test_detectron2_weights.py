"""tools/convert_weights.py --from detectron2 against Detectron2 itself (the `detectron2` fixture): its Faster and
Mask R-CNN R50-FPN built from its model-zoo configs with seeded random weights made non-trivial, saved as its
model zoo ships them, converted by the tool, and run next to ours on real images; Caffe2 ImageNet blobs
loaded into Detectron2's ResNet by its own checkpointer."""
import functools
import os
import pickle
import re

import numpy as np
import pytest
import torch
from PIL import Image

from backbones.resnet import ResNet
from backbones.weights import read_weights
from detection.build import build_detector
from detection.conversion import CONVERTERS_IN, from_detectron2
from detection.conversion.check import compare_detections, verify_conversion
from detection.conversion.detectron2_model import (detectron2_config, detectron2_detections, detectron2_predictor,
                                                   detectron2_resnet, zoo_config_file)
from detection.inference import binary_masks
from detection.predictor import Predictor
from engine.data.decode import read_image
from tests.conftest import REPO, SHARED_DATA, import_detectron2, run_tool

# Detectron2's zoo configs resize to 800 / 1333 for inference; here both frameworks resize to 400 / 560: a
# forward pass is 4x cheaper, and the long-side cap binds for some of the images (aspect ratio over 1.4).
D2_SIZE = ["INPUT.MIN_SIZE_TEST", 400, "INPUT.MAX_SIZE_TEST", 560]
OUR_SIZE = ["input.min_size_test=400", "input.max_size_test=560"]
SCORE_THRESH = 0.05  # both zoo configs' (ROI_HEADS.SCORE_THRESH_TEST) and ours (test.score_thresh)
NEAR = 0.005  # "near the threshold": scores in [0.045, 0.055]
# Standard deviations of the heads' outputs after calibration: objectness and class logits spread enough that
# nothing ties, box deltas that move boxes by a fifth of their size, mask logits that make masks of most pixels
# clearly in or out.
SPREADS = {"proposal_generator.rpn_head.objectness_logits": 3.0, "proposal_generator.rpn_head.anchor_deltas": 0.2,
           "roi_heads.box_predictor.cls_score": 2.0, "roi_heads.box_predictor.bbox_pred": 0.2,
           "roi_heads.mask_head.predictor": 3.0}
CANDIDATES = 40  # class scores over the threshold per image at least (before NMS), set by the background's bias
CLS_SCORE = "roi_heads.box_predictor.cls_score"


def _initialised_mask_rcnn(seed: int):
    """Detectron2's Mask R-CNN R50-FPN as its zoo config builds it, initialised by Detectron2 (seeded): the
    DefaultPredictor."""
    import_detectron2()
    from detectron2.engine import DefaultPredictor

    torch.manual_seed(seed)
    return DefaultPredictor(detectron2_config(True, opts=D2_SIZE))


@functools.lru_cache(maxsize=None)
def _initialised_state(seed: int):
    return {k: v.numpy() for k, v in _initialised_mask_rcnn(seed).model.state_dict().items()}


def detectron2_r50_fpn(mask: bool, seed: int = 0):
    """A Detectron2 R50-FPN state dict as its model zoo stores it ({name: float32 numpy array}, not to be
    written to), initialised by Detectron2; Faster R-CNN's is Mask R-CNN's without the mask head. Skips without
    Detectron2."""
    return {k: v for k, v in _initialised_state(seed).items() if mask or not k.startswith("roi_heads.mask_head.")}


def write_pkl(path, obj):
    """A .pkl as Detectron2's tools write the zoo's (pickle.dump, its default protocol)."""
    with open(path, "wb") as f:
        pickle.dump(obj, f)
    return path


def convert(capsys, src, dst, *more):
    result = run_tool(capsys, "convert_weights.py", "--from", "detectron2", src, dst, *more)
    assert result.returncode == 0, result.stderr
    return result.stdout


def shared_images(root):
    """Three tiny_coco images of different shapes (a portrait, the widest, a 4:3 landscape): resized to 400 /
    560, the first two reach the long-side cap and the last does not."""
    files = sorted((root / "tiny_coco" / "val2017").glob("*.jpg"))
    sizes = {f: Image.open(f).size for f in files}  # (width, height), from the header
    portrait = next(f for f in files if sizes[f][1] > 1.4 * sizes[f][0])
    widest = max(files, key=lambda f: sizes[f][0] / sizes[f][1])
    landscape = next(f for f in files if abs(sizes[f][0] / sizes[f][1] - 4 / 3) < 0.01)
    return [(f.name, read_image(str(f))) for f in (portrait, widest, landscape)]


def calibrate(model, batches, seed=0):
    """Detectron2's freshly initialised `model` (FrozenBN the identity, heads of std 0.01 or 0.001, which find
    nothing) made non-trivial in a pass over each of `batches` (lists of (RGB image, (min_size, max_size)), resized
    as DefaultPredictor resizes). The first sets every FrozenBN's statistics near those of its own input there
    (per channel the mean, shifted by up to 0.2 standard deviations; the layer's variance, scaled by 0.5..2 per
    channel) with a random affine, so activations keep their scale through the ResNet, and scales the heads' last
    layers to `SPREADS`; each lowers the background class's bias until at least `CANDIDATES` class scores of each
    of its images exceed the threshold, most of them near it."""
    from detectron2.data.transforms import ResizeShortestEdge
    from detectron2.layers import FrozenBatchNorm2d

    g = torch.Generator().manual_seed(seed)
    scaled, proposals = set(), []

    def set_statistics(module, args):
        if module in scaled:
            return
        scaled.add(module)
        x, n = args[0], module.num_features
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3)).mean()
        module.running_mean.copy_(mean + (torch.rand(n, generator=g) * 0.4 - 0.2) * var.sqrt())
        module.running_var.copy_(var * (torch.rand(n, generator=g) * 1.5 + 0.5))
        module.weight.copy_(torch.rand(n, generator=g) + 0.5)
        module.bias.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)

    def background_bias(logits):
        """The background logit's shift (bisected) at which `CANDIDATES` class scores exceed the threshold."""
        lo, hi, background = -20.0, 20.0, torch.eye(logits.shape[1])[-1]  # Detectron2's background is last
        for _ in range(40):
            mid = (lo + hi) / 2
            over = (torch.softmax(logits + background * mid, -1)[:, :-1] > SCORE_THRESH).sum()
            lo, hi = (mid, hi) if over > CANDIDATES else (lo, mid)
        return lo

    def spread(std):
        def hook(module, args, out):
            first = module not in scaled
            if first:  # the RPN head runs once per level: scaled on the first
                scaled.add(module)
                k = std / out.std()
                module.weight.mul_(k)
                module.bias.mul_(k)
                out = out * k
            if module is model.get_submodule(CLS_SCORE):  # set on the first batch, only lowered after
                shift = min(map(background_bias, out.split(proposals)))
                shift = shift if first else min(shift, 0.0)
                module.bias[-1] += shift
                out[:, -1] += shift
            return out
        return hook

    def count_proposals(module, args):  # StandardROIHeads.forward(images, features, proposals)
        proposals[:] = [len(p) for p in args[2]]

    hooks = [m.register_forward_pre_hook(set_statistics) for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    hooks += [model.get_submodule(name).register_forward_hook(spread(std)) for name, std in SPREADS.items()]
    hooks.append(model.roi_heads.register_forward_pre_hook(count_proposals))
    try:
        for inputs in batches:
            batch = []
            for image, (min_size, max_size) in inputs:  # as DefaultPredictor prepares an image
                bgr = np.ascontiguousarray(image[:, :, ::-1])
                resized = ResizeShortestEdge([min_size, min_size], max_size).get_transform(bgr).apply_image(bgr)
                batch.append({"image": torch.as_tensor(resized.astype("float32").transpose(2, 0, 1)),
                              "height": image.shape[0], "width": image.shape[1]})
            with torch.no_grad():
                model(batch)
    finally:
        for h in hooks:
            h.remove()


@pytest.fixture(scope="module")
def zoo(detectron2):
    """(Detectron2's Mask R-CNN state as numpy arrays, the three test images, a strip of the last for --check),
    the weights calibrated on the images as the tests resize them (the strip as the zoo config does)."""
    if not SHARED_DATA.is_dir():  # the `shared_data` fixture's test, for a fixture of this module's scope
        pytest.skip(f"shared data not found at {SHARED_DATA} (real COCO subsets live in ../shared/data)")
    images = shared_images(SHARED_DATA)
    # A 160 x 640 strip of a real image: the long-side cap resizes it to 333 x 1333, less than half the pixels
    # of a whole image at 800 / 1333.
    strip = np.ascontiguousarray(images[2][1][200:360])
    predictor = _initialised_mask_rcnn(seed=0)
    # The strip in a batch of its own: padded to one batch with it, the others would cost 3 times as much.
    calibrate(predictor.model, [[(image, (D2_SIZE[1], D2_SIZE[3])) for _, image in images], [(strip, (800, 1333))]])
    return {k: v.numpy().copy() for k, v in predictor.model.state_dict().items()}, images, strip


def compare_on_images(theirs, ours, images, mask: bool):
    """Detectron2's predictor and ours on each image: the detections must be the same (compare_detections).
    Returns, over all images, the scores of Detectron2's detections and of its class scores before the
    threshold (captured from its box predictor)."""
    before = []
    hook = theirs.model.roi_heads.box_predictor.register_forward_hook(
        lambda module, inputs, out: before.append(torch.softmax(out[0], -1)[:, :-1].flatten()))
    scores, report = [], []
    try:
        for name, image in images:
            det_theirs = detectron2_detections(theirs, image)
            det_ours = ours(image)
            if mask:
                det_ours["masks"] = torch.from_numpy(binary_masks(det_ours, ours.cfg.test.mask_thresh))
            lines, ok = compare_detections(det_ours, det_theirs, image_size=image.shape[:2],
                                           score_thresh=SCORE_THRESH, max_detections=100)
            report.append((name, ok, lines))
            scores.append(det_theirs["scores"])
    finally:
        hook.remove()
    assert all(ok for _, ok, _ in report), "\n".join(f"{n}:\n" + "\n".join(lines) for n, _, lines in report)
    return torch.cat(scores), torch.cat(before), report


def assert_near_threshold(scores, before):
    """The images put detections near the threshold, and class scores just under it that must not be kept."""
    assert len(scores) >= 20 and (scores >= SCORE_THRESH).all()
    assert ((scores - SCORE_THRESH) < NEAR).sum() >= 5
    assert ((before < SCORE_THRESH) & (before > SCORE_THRESH - NEAR)).sum() >= 5


def test_faster_rcnn_pkl_gives_detectron2s_detections(tmp_path, capsys, zoo):
    state, images, _ = zoo
    faster = {k: v for k, v in state.items() if not k.startswith("roi_heads.mask_head.")}
    theirs = detectron2_predictor(detectron2_config(False, opts=D2_SIZE), faster)
    # The zoo's files were written while pixel_mean / pixel_std were saved buffers: they hold them.
    zoo_file = dict(faster, **{k: v.numpy() for k, v in theirs.model.named_buffers() if k.startswith("pixel_")})
    src = write_pkl(tmp_path / "model_final.pkl", {"model": zoo_file, "__author__": "Detectron2 Model Zoo"})
    out = convert(capsys, src, tmp_path / "ours.pth")
    assert "Faster R-CNN R50-FPN (80 classes)" in out and "pixel_mean, pixel_std" in out
    ours = Predictor(REPO / "configs/detectron2/frcnn_r50_fpn.yaml", tmp_path / "ours.pth", OUR_SIZE)
    # The portrait (capped at 560) and the 4:3 landscape (not capped); the Mask R-CNN test runs all three.
    scores, before, _ = compare_on_images(theirs, ours, [images[0], images[2]], mask=False)
    assert_near_threshold(scores, before)


def test_mask_rcnn_pth_gives_detectron2s_detections_and_masks(tmp_path, capsys, zoo):
    state, images, _ = zoo
    tensors = {k: torch.from_numpy(v) for k, v in state.items()}
    tensors["proposal_generator.anchor_generator.cell_anchors.0"] = torch.zeros(3, 4)  # older files keep these
    torch.save({"model": tensors, "iteration": 90000}, tmp_path / "model_final.pth")
    out = convert(capsys, tmp_path / "model_final.pth", tmp_path / "ours.pth")
    assert "Mask R-CNN R50-FPN (80 classes)" in out and "cell_anchors.0" in out
    theirs = detectron2_predictor(detectron2_config(True, opts=D2_SIZE), tensors)
    ours = Predictor(REPO / "configs/detectron2/mrcnn_r50_fpn.yaml", tmp_path / "ours.pth", OUR_SIZE)
    scores, before, report = compare_on_images(theirs, ours, images, mask=True)
    assert_near_threshold(scores, before)
    assert all(any("masks:" in line for line in lines) for _, _, lines in report)


def _swapping(state):
    """The conversion with two same-shaped tensors of the ResNet swapped: a file that loads, and is wrong."""
    conversion = from_detectron2(state)
    sd, a, b = conversion.state_dict, "backbone.bottom_up.res2.1.conv2.weight", "backbone.bottom_up.res2.2.conv2.weight"
    sd[a], sd[b] = sd[b], sd[a]
    return conversion


def test_check_runs_detectron2_and_fails_a_wrong_conversion(tmp_path, capsys, monkeypatch, zoo):
    """--check runs Detectron2's Mask R-CNN of its zoo config (resizing to 800 / 1333) and ours on an image: a
    right conversion passes; a wrong one fails on the FPN features, before any detection is run."""
    state, _, strip = zoo
    src = write_pkl(tmp_path / "model_final.pkl", {"model": state, "__author__": "Detectron2 Model Zoo"})
    image = tmp_path / "strip.png"
    Image.fromarray(strip).save(image)
    out = convert(capsys, src, tmp_path / "ours.pth", "--check", "--check-images", image)
    assert "--check against Detectron2's Mask R-CNN (model.backbone.depth=50):" in out
    assert "FPN on a random 1x3x256x320 input: p6: max |ours - theirs|" in out
    assert f"detections on {image}, resized as 800/1333:" in out and "masks:" in out
    same = re.search(r"(\d+) detections of ours, (\d+) of theirs: (\d+) the same", out)
    assert same and int(same[3]) >= 10 and same[1] == same[2] == same[3]

    monkeypatch.setitem(CONVERTERS_IN, "detectron2", _swapping)
    result = run_tool(capsys, "convert_weights.py", "--from", "detectron2", src, tmp_path / "wrong.pth", "--check",
                      "--check-images", image)
    assert result.returncode == 2
    assert "--check: the converted model's outputs differ from detectron2's" in result.stderr
    assert "the FPN features differ: detections not compared" in result.stdout


def test_tensors_that_do_not_fit_the_named_config_are_refused_unwritten(tmp_path, capsys):
    """The converter names the config its tensors are for; the tool builds that model (shapes only) before it
    writes anything, and names what does not fit."""
    d2 = {k: v for k, v in detectron2_r50_fpn(mask=True).items() if k != "proposal_generator.rpn_head.conv.bias"}
    src = write_pkl(tmp_path / "model_final.pkl", {"model": d2})
    result = run_tool(capsys, "convert_weights.py", "--from", "detectron2", src, tmp_path / "out.pth")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (f"{src}: the state dict converted for configs/detectron2/mrcnn_r50_fpn.yaml model.backbone.depth=50 "
            "does not fit the model it builds: 1 of the model's missing: rpn.head.conv.bias") in result.stderr
    assert not (tmp_path / "out.pth").exists()


@pytest.mark.parametrize("zoo_config", ["COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml",
                                        "COCO-InstanceSegmentation/mask_rcnn_X_101_32x8d_FPN_3x.yaml"])
def test_r101_and_x101_settings_are_detectron2s_own(zoo_config, detectron2):
    """What the conversion of Detectron2's R101 / X101-FPN records (Conversion.config) builds the model of its
    zoo config in both frameworks: Detectron2's settings from it (what --check runs) are the zoo config's, and
    its tensors fit our model of it (names and shapes: both built on the meta device)."""
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    theirs = get_cfg()
    theirs.merge_from_file(str(zoo_config_file(zoo_config)))
    theirs.MODEL.DEVICE = "meta"
    with torch.device("meta"):
        conversion = from_detectron2(build_model(theirs).state_dict())
    verify_conversion(conversion)
    cfg = detectron2_config("mask_rcnn" in zoo_config, conversion.config[1:])
    assert cfg.MODEL.RESNETS == theirs.MODEL.RESNETS and cfg.MODEL.PIXEL_STD == theirs.MODEL.PIXEL_STD
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == theirs.MODEL.ROI_HEADS.NUM_CLASSES
    assert cfg.MODEL.MASK_ON == theirs.MODEL.MASK_ON


def test_c4_model_is_refused(tmp_path, capsys, detectron2):
    """Detectron2's C4 Faster R-CNN (its zoo config; built on the meta device, names only)."""
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    cfg = get_cfg()
    cfg.merge_from_file(str(zoo_config_file("COCO-Detection/faster_rcnn_R_50_C4_3x.yaml")))
    cfg.MODEL.DEVICE = "meta"
    with torch.device("meta"):
        names = list(build_model(cfg).state_dict())
    src = write_pkl(tmp_path / "c4.pkl", {"model": {k: np.zeros(1, np.float32) for k in names},
                                          "__author__": "Detectron2 Model Zoo"})
    result = run_tool(capsys, "convert_weights.py", "--from", "detectron2", src, tmp_path / "out.pth")
    assert result.returncode != 0 and "C4" in result.stderr and "roi_heads.res5.0.conv1.weight" in result.stderr
    assert not (tmp_path / "out.pth").exists()


class _Evil:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


@pytest.mark.parametrize("fn, name", [(os.system, "system"), (eval, ".eval")])
def test_pickle_with_code_is_refused(tmp_path, capsys, fn, name):
    marker = tmp_path / "ran"
    src = write_pkl(tmp_path / "evil.pkl", {"model": {"x": _Evil(fn, f"open({str(marker)!r}, 'w')"
                                                                 if fn is eval else f"touch {marker}")}})
    result = run_tool(capsys, "convert_weights.py", "--from", "detectron2", src, tmp_path / "out.pth")
    assert result.returncode != 0 and "refusing to unpickle" in result.stderr and name in result.stderr
    assert not marker.exists()


def caffe2_blob(name: str) -> str:
    """A Detectron2 ResNet tensor's Caffe2 blob name (MSRA's R-50.pkl): the inverse of the renaming in
    Detectron2's c2_model_loading.convert_basic_c2_names, which the test checks it is."""
    name = name.replace(".norm.weight", "_bn_s").replace(".norm.bias", "_bn_b")
    name = re.sub(r"^stem\.conv1", "res_conv1" if "_bn_" in name else "conv1", name)
    for ours, theirs in ((".shortcut", ".branch1"), (".conv1", ".branch2a"), (".conv2", ".branch2b"),
                         (".conv3", ".branch2c")):
        name = name.replace(ours, theirs)
    return re.sub(r"\.weight$", "_w", name).replace(".", "_")


def test_msra_blobs_give_detectron2s_resnet_features(tmp_path, capsys, detectron2):
    """R-50.pkl's blobs, named as Detectron2's own Caffe2 renaming reads them: Detectron2's checkpointer loads the
    file into its ResNet-50, ours converts it, and the two compute the same res2..res5 (and --check says so)."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.checkpoint.c2_model_loading import convert_basic_c2_names

    torch.manual_seed(0)
    theirs = detectron2_resnet(50, 1, 64, stride_in_1x1=True)
    g = torch.Generator().manual_seed(0)
    blobs = {}
    for key, value in theirs.state_dict().items():
        if key.endswith(("running_mean", "running_var")):
            continue  # Caffe2's affine BN keeps only its scale and bias
        if key.endswith(("norm.weight", "norm.bias")):  # around 1 and 0, as ImageNet training leaves them
            value = torch.rand(value.shape, generator=g) * (0.5 if key.endswith("weight") else 0.2) + (
                0.75 if key.endswith("weight") else -0.1)
        blobs[caffe2_blob(key)] = value.numpy().copy()
    assert convert_basic_c2_names(list(blobs)) == [k for k in theirs.state_dict() if "running" not in k]
    blobs.update(fc1000_w=np.full((1000, 2048), 0.01, np.float32), fc1000_b=np.zeros(1000, np.float32),
                 conv1_w_momentum=np.zeros((64, 3, 7, 7), np.float32))
    src = write_pkl(tmp_path / "R-50.pkl", {"blobs": blobs})

    out = convert(capsys, src, tmp_path / "r50.pth", "--check")
    assert "conv1_w_momentum" in out and "stride_in_1x1=True" in out and "std [1, 1, 1]" in out
    assert "--check against Detectron2's ResNet-50 (build_resnet_backbone, the blobs loaded by its Caffe2 name " \
           "matching; not in it: fc1000.bias, fc1000.weight):" in out

    loaded = detectron2_resnet(50, 1, 64, stride_in_1x1=True)
    DetectionCheckpointer(loaded).load(str(src))  # Detectron2's own reading of a Caffe2 .pkl
    ours = ResNet(depth=50, num_classes=1000, stride_in_1x1=True, norm="FrozenBN",
                  out_features=["res2", "res3", "res4", "res5"]).eval()
    ours.load_state_dict(read_weights(str(tmp_path / "r50.pth")), strict=True)
    x = torch.randn(1, 3, 128, 160, generator=g) * 50  # BGR 0-255 minus the mean: MSRA's input
    with torch.no_grad():
        a, b = ours.forward_features(x), loaded(x)
    for stage in ("res2", "res3", "res4", "res5"):
        # float32 through up to 50 layers of the same operations, summed in other orders: ~1e-5 of the scale.
        torch.testing.assert_close(a[stage], b[stage], rtol=0, atol=1e-4 * b[stage].abs().max().item())
    detector = build_detector("configs/detectron2/frcnn_r50_fpn.yaml", [f"model.backbone.weights={tmp_path / 'r50.pth'}"])
    assert torch.equal(detector.backbone.bottom_up.res3[1].conv2.weight, torch.from_numpy(blobs["res3_1_branch2b_w"]))
