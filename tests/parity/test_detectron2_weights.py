"""tools/convert_weights.py --from detectron2 on synthetic files with Detectron2's and Caffe2's exact key names
and shapes (Detectron2 itself is not installable here, so its detections cannot be compared)."""
import os
import pickle

import numpy as np
import pytest
import torch

from backbones.resnet import ResNet
from backbones.weights import check_fit, read_weights
from detection.build import build_detector
from detection.conversion.detectron2 import from_detectron2
from engine.data.decode import read_image
from tests.conftest import run_tool

K = 80
STAGES = {2: (3, 64, 256), 3: (4, 128, 512), 4: (6, 256, 1024), 5: (3, 512, 2048)}  # R50: blocks, width, out


def _norm(sd, prefix, n, rng):
    sd[prefix + "norm.weight"] = rng.uniform(0.5, 1.5, n)
    sd[prefix + "norm.bias"] = rng.uniform(-0.1, 0.1, n)
    sd[prefix + "norm.running_mean"] = rng.uniform(-0.1, 0.1, n)
    sd[prefix + "norm.running_var"] = rng.uniform(0.5, 2.0, n)


def detectron2_r50_fpn(mask: bool, seed: int = 0):
    """A Detectron2 model-zoo R50-FPN state dict (names and shapes of its modules), small random values."""
    rng = np.random.default_rng(seed)
    shapes, norms = {}, []
    b = "backbone.bottom_up."
    shapes[b + "stem.conv1.weight"] = (64, 3, 7, 7)
    norms.append((b + "stem.conv1.", 64))
    cin = 64
    for r, (blocks, width, out) in STAGES.items():
        for i in range(blocks):
            p = f"{b}res{r}.{i}."
            for k, shape in ((1, (width, cin, 1, 1)), (2, (width, width, 3, 3)), (3, (out, width, 1, 1))):
                shapes[f"{p}conv{k}.weight"] = shape
                norms.append((f"{p}conv{k}.", shape[0]))
            if i == 0:
                shapes[p + "shortcut.weight"] = (out, cin, 1, 1)
                norms.append((p + "shortcut.", out))
            cin = out
    for level, c in zip((2, 3, 4, 5), (256, 512, 1024, 2048)):
        shapes[f"backbone.fpn_lateral{level}.weight"], shapes[f"backbone.fpn_lateral{level}.bias"] = (256, c, 1, 1), (256,)
        shapes[f"backbone.fpn_output{level}.weight"], shapes[f"backbone.fpn_output{level}.bias"] = (256, 256, 3, 3), (256,)
    rpn = "proposal_generator.rpn_head."
    shapes.update({rpn + "conv.weight": (256, 256, 3, 3), rpn + "conv.bias": (256,),
                   rpn + "objectness_logits.weight": (3, 256, 1, 1), rpn + "objectness_logits.bias": (3,),
                   rpn + "anchor_deltas.weight": (12, 256, 1, 1), rpn + "anchor_deltas.bias": (12,),
                   "roi_heads.box_head.fc1.weight": (1024, 256 * 7 * 7), "roi_heads.box_head.fc1.bias": (1024,),
                   "roi_heads.box_head.fc2.weight": (1024, 1024), "roi_heads.box_head.fc2.bias": (1024,),
                   "roi_heads.box_predictor.cls_score.weight": (K + 1, 1024),
                   "roi_heads.box_predictor.cls_score.bias": (K + 1,),
                   "roi_heads.box_predictor.bbox_pred.weight": (4 * K, 1024),
                   "roi_heads.box_predictor.bbox_pred.bias": (4 * K,)})
    if mask:
        for k in range(1, 5):
            shapes[f"roi_heads.mask_head.mask_fcn{k}.weight"] = (256, 256, 3, 3)
            shapes[f"roi_heads.mask_head.mask_fcn{k}.bias"] = (256,)
        shapes.update({"roi_heads.mask_head.deconv.weight": (256, 256, 2, 2), "roi_heads.mask_head.deconv.bias": (256,),
                       "roi_heads.mask_head.predictor.weight": (K, 256, 1, 1), "roi_heads.mask_head.predictor.bias": (K,)})
    sd = {}
    for key, shape in shapes.items():
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        sd[key] = rng.standard_normal(shape, dtype=np.float32) / np.float32(np.sqrt(fan_in))
    for prefix, n in norms:
        _norm(sd, prefix, n, rng)
    sd = {k: v.astype(np.float32) for k, v in sd.items()}
    sd["pixel_mean"] = np.array([103.53, 116.28, 123.675], dtype=np.float32).reshape(3, 1, 1)
    sd["pixel_std"] = np.ones((3, 1, 1), dtype=np.float32)
    return sd


@pytest.fixture(scope="module")
def d2_mask_rcnn():
    return detectron2_r50_fpn(mask=True)


def write_pkl(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)
    return path


def convert(capsys, src, dst):
    result = run_tool(capsys, "convert_weights.py", "--from", "detectron2", src, dst)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_mask_rcnn_pkl_every_tensor_and_background(tmp_path, capsys, d2_mask_rcnn):
    d2 = d2_mask_rcnn
    src = write_pkl(tmp_path / "model_final.pkl", {"model": d2, "__author__": "Detectron2 Model Zoo"})
    out = convert(capsys, src, tmp_path / "ours.pth")
    assert "pixel_mean" in out and "added" in out and "configs/detectron2/mrcnn_r50_fpn.yaml" in out
    ours = read_weights(str(tmp_path / "ours.pth"))
    b, o = "backbone.bottom_up.", "backbone.bottom_up."
    same = {b + "stem.conv1.weight": o + "stem.conv1.weight",
            b + "stem.conv1.norm.running_var": o + "stem.norm1.running_var",
            b + "res3.2.conv2.norm.weight": o + "res3.2.norm2.weight",
            b + "res4.5.conv3.weight": o + "res4.5.conv3.weight",
            b + "res4.0.shortcut.weight": o + "res4.0.shortcut.conv.weight",
            b + "res5.0.shortcut.norm.running_mean": o + "res5.0.shortcut.norm.running_mean",
            "backbone.fpn_lateral3.weight": "backbone.lateral_convs.1.weight",
            "backbone.fpn_output5.bias": "backbone.output_convs.3.bias",
            "proposal_generator.rpn_head.objectness_logits.weight": "rpn.head.objectness.weight",
            "proposal_generator.rpn_head.anchor_deltas.bias": "rpn.head.deltas.bias",
            "roi_heads.box_head.fc1.weight": "roi_heads.box_head.fc1.weight",
            "roi_heads.mask_head.mask_fcn2.weight": "roi_heads.mask_head.fcn2.weight",
            "roi_heads.mask_head.deconv.weight": "roi_heads.mask_head.deconv.weight"}
    for theirs, mine in same.items():
        assert torch.equal(ours[mine], torch.from_numpy(d2[theirs])), theirs
    # Every Detectron2 tensor but the two normalisation buffers is in the file, nothing else.
    assert len(ours) == len(d2) - 2
    model = build_detector("configs/detectron2/mrcnn_r50_fpn.yaml")
    fit = check_fit(model.state_dict(), ours)
    assert not fit.missing and not fit.unexpected
    model.load_state_dict(ours, strict=True)

    # Background semantics, computed independently: Detectron2's softmax over K+1 with background last.
    # float64, and the same products summed over 1024 inputs, but by matrix products of other shapes (BLAS
    # blocks them as it likes): ~1e-15 apart (measured 4e-15); the float64 default (1e-7) only checks the
    # rows land where they should.
    x = torch.randn(6, 1024, dtype=torch.float64)
    w, bias = (torch.from_numpy(d2[f"roi_heads.box_predictor.cls_score.{p}"]).double() for p in ("weight", "bias"))
    theirs = torch.softmax(x @ w.T + bias, -1)[:, :K]
    mine = torch.softmax(x @ ours["roi_heads.predictor.cls_score.weight"].double().T
                         + ours["roi_heads.predictor.cls_score.bias"].double(), -1)[:, 1:]
    torch.testing.assert_close(mine, theirs)
    wd, bd = (torch.from_numpy(d2[f"roi_heads.box_predictor.bbox_pred.{p}"]).double() for p in ("weight", "bias"))
    their_deltas = (x @ wd.T + bd).view(6, K, 4)
    my_deltas = (x @ ours["roi_heads.predictor.bbox_pred.weight"].double().T
                 + ours["roi_heads.predictor.bbox_pred.bias"].double()).view(6, K + 1, 4)
    torch.testing.assert_close(my_deltas[:, 1:], their_deltas)
    assert not my_deltas[:, 0].any()
    pred = ours["roi_heads.mask_head.predictor.weight"]
    assert pred.shape[0] == K + 1 and not pred[0].any()
    assert torch.equal(pred[1:], torch.from_numpy(d2["roi_heads.mask_head.predictor.weight"]))


def test_faster_rcnn_pth_loads_strictly(tmp_path, capsys, d2_mask_rcnn):
    d2 = {k: torch.from_numpy(v) for k, v in d2_mask_rcnn.items() if not k.startswith("roi_heads.mask_head.")}
    d2["proposal_generator.anchor_generator.cell_anchors.0"] = torch.zeros(3, 4)  # old files keep these
    torch.save({"model": d2, "iteration": 90000}, tmp_path / "model_final.pth")
    out = convert(capsys, tmp_path / "model_final.pth", tmp_path / "ours.pth")
    assert "Faster R-CNN R50-FPN (80 classes)" in out and "cell_anchors.0" in out
    model = build_detector("configs/detectron2/frcnn_r50_fpn.yaml", [f"model.weights={tmp_path / 'ours.pth'}"])
    model.load_state_dict(read_weights(str(tmp_path / "ours.pth")), strict=True)


def test_tensors_that_do_not_fit_the_named_config_are_refused_unwritten(tmp_path, capsys, d2_mask_rcnn):
    """The converter names the config its tensors are for; the tool builds that model (shapes only) before it
    writes anything, and names what does not fit."""
    d2 = {k: v for k, v in d2_mask_rcnn.items() if k != "proposal_generator.rpn_head.conv.bias"}
    src = write_pkl(tmp_path / "model_final.pkl", {"model": d2})
    result = run_tool(capsys, "convert_weights.py", "--from", "detectron2", src, tmp_path / "out.pth")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (f"{src}: the state dict converted for configs/detectron2/mrcnn_r50_fpn.yaml model.backbone.depth=50 "
            "does not fit the model it builds: 1 of the model's missing: rpn.head.conv.bias") in result.stderr
    assert not (tmp_path / "out.pth").exists()


def test_c4_model_is_refused(tmp_path, capsys):
    sd = {"backbone.res2.0.conv1.weight": np.zeros((64, 64, 1, 1), np.float32),
          "roi_heads.res5.0.conv1.weight": np.zeros((512, 1024, 1, 1), np.float32),
          "roi_heads.box_predictor.cls_score.weight": np.zeros((81, 2048), np.float32)}
    src = write_pkl(tmp_path / "c4.pkl", {"model": sd, "__author__": "Detectron2 Model Zoo"})
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


def msra_r50_blobs(seed=0):
    """Caffe2 blob names of MSRA's R-50.pkl (as Detectron2's c2_model_loading.py maps them)."""
    rng = np.random.default_rng(seed)
    blobs = {"conv1_w": (64, 3, 7, 7), "res_conv1_bn_s": (64,), "res_conv1_bn_b": (64,),
             "fc1000_w": (1000, 2048), "fc1000_b": (1000,)}
    cin = 64
    for r, (blocks, width, out) in STAGES.items():
        for i in range(blocks):
            for part, shape in (("2a", (width, cin, 1, 1)), ("2b", (width, width, 3, 3)), ("2c", (out, width, 1, 1))):
                blobs[f"res{r}_{i}_branch{part}_w"] = shape
                blobs[f"res{r}_{i}_branch{part}_bn_s"] = blobs[f"res{r}_{i}_branch{part}_bn_b"] = (shape[0],)
            if i == 0:
                blobs[f"res{r}_{i}_branch1_w"] = (out, cin, 1, 1)
                blobs[f"res{r}_{i}_branch1_bn_s"] = blobs[f"res{r}_{i}_branch1_bn_b"] = (out,)
            cin = out
    arrays = {k: (rng.standard_normal(s, dtype=np.float32) * 0.05) for k, s in blobs.items()}
    arrays["conv1_w_momentum"] = np.zeros((64, 3, 7, 7), np.float32)
    return arrays


def test_msra_blobs(tmp_path, capsys):
    blobs = msra_r50_blobs()
    src = write_pkl(tmp_path / "R-50.pkl", {"blobs": blobs})
    out = convert(capsys, src, tmp_path / "r50.pth")
    assert "conv1_w_momentum" in out and "BGR" in out and "stride_in_1x1=True" in out
    assert "std [1, 1, 1]" in out and "model.backbone.stride_in_1x1=true" in out
    ours = read_weights(str(tmp_path / "r50.pth"))
    pairs = {"conv1_w": "stem.conv1.weight", "res_conv1_bn_s": "stem.norm1.weight", "res_conv1_bn_b": "stem.norm1.bias",
             "res2_0_branch2a_w": "res2.0.conv1.weight", "res3_1_branch2b_bn_s": "res3.1.norm2.weight",
             "res4_0_branch1_w": "res4.0.shortcut.conv.weight", "res5_0_branch1_bn_b": "res5.0.shortcut.norm.bias",
             "fc1000_w": "fc.weight"}
    for blob, key in pairs.items():
        assert torch.equal(ours[key], torch.from_numpy(blobs[blob])), blob
    # Affine-only BN: mean 0 and var 1, the statistics Detectron2's FrozenBatchNorm2d fills in on loading.
    assert not ours["res3.1.norm2.running_mean"].any()
    assert torch.equal(ours["res3.1.norm2.running_var"], torch.ones(128))
    resnet = ResNet(depth=50, num_classes=1000, stride_in_1x1=True)
    resnet.load_state_dict(ours, strict=True)
    detector = build_detector("configs/detectron2/frcnn_r50_fpn.yaml", [f"model.backbone.weights={tmp_path / 'r50.pth'}"])
    assert torch.equal(detector.backbone.bottom_up.res3[1].conv2.weight, torch.from_numpy(blobs["res3_1_branch2b_w"]))


def test_detection_runs_on_tiny_coco(d2_mask_rcnn, shared_data):
    # Random box regressors would throw the boxes off the image (empty after clipping, and dropped).
    # (The file round trip is tested above; here the converter runs in-process.)
    d2 = {k: torch.from_numpy(v * np.float32(1e-3) if "deltas" in k or "bbox_pred" in k else v)
          for k, v in d2_mask_rcnn.items()}
    model = build_detector("configs/detectron2/mrcnn_r50_fpn.yaml",
                           ["input.min_size_test=320", "test.score_thresh=0.0", "test.detections_per_img=5"])
    model.load_state_dict(from_detectron2(d2).state_dict, strict=True)
    image = read_image(str(sorted((shared_data / "tiny_coco" / "val2017").glob("*.jpg"))[0]))
    with torch.inference_mode():
        det = model.eval()([torch.from_numpy(image).permute(2, 0, 1)])[0]
    n = len(det["boxes"])
    assert 0 < n <= 5 and det["masks"].shape == (n, 1) + image.shape[:2]
    boxes = det["boxes"]
    assert ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all()
    assert (boxes[:, 2] <= image.shape[1]).all() and (boxes[:, 3] <= image.shape[0]).all()
    assert ((det["labels"] >= 1) & (det["labels"] <= K)).all()
