"""Predictor: numpy HxWx3 uint8 in, a dict of CPU tensors out, the same as calling the model."""
import numpy as np
import pytest
import torch

from backbones.weights import save_weights
from detection import Predictor
from engine.config import Config

CFG = {
    "model": {"name": "faster_rcnn", "num_classes": 4, "backbone": {"depth": 18, "norm": "FrozenBN"},
              "fpn": {"out_channels": 32},
              "rpn": {"pre_nms_topk_test": 200, "post_nms_topk_test": 100},
              "roi_heads": {"fc_dim": 64}},
    "input": {"min_size_test": 96, "max_size_test": 160},
    "test": {"score_thresh": 0.0},  # an untrained head's scores sit near 1/5: keep them all
    "device": "cpu",
}


@pytest.fixture(scope="module")
def predictor():
    torch.manual_seed(0)
    return Predictor(Config.from_dict(CFG), weights=None)


def _image(h=72, w=120, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_returns_boxes_scores_labels_in_image_pixels(predictor):
    image = _image()
    out = predictor(image)
    assert set(out) == {"boxes", "scores", "labels"}
    n = len(out["boxes"])
    assert n > 0
    assert out["boxes"].shape == (n, 4) and out["boxes"].dtype == torch.float32
    assert out["scores"].shape == (n,) and out["labels"].shape == (n,) and out["labels"].dtype == torch.int64
    assert all(v.device.type == "cpu" for v in out.values())
    assert out["labels"].min() >= 1 and out["labels"].max() <= 4
    assert (out["scores"][:-1] >= out["scores"][1:]).all()
    # In the array's pixels (72 x 120), not the resized 96 x 160, up to the float32 rounding of the scale
    # ratio times ~120 px (1e-5 px): 1e-3 px.
    assert out["boxes"][:, 0::2].max() <= 120 + 1e-3 and out["boxes"][:, 1::2].max() <= 72 + 1e-3


def test_equals_the_model_on_the_same_image(predictor):
    image = _image(seed=1)
    out = predictor(image)
    with torch.no_grad():
        expected = predictor.model([torch.from_numpy(image).permute(2, 0, 1).float() / 255])[0]
    for key in out:  # the same model on the same float pixels in one process: the same bits
        torch.testing.assert_close(out[key], expected[key], rtol=0, atol=0)


def test_non_contiguous_array(predictor):
    image = _image(80, 100, seed=2)
    flipped = image[:, ::-1]  # a negative-stride view, as from cv2 BGR->RGB slicing
    out = predictor(flipped)
    expected = predictor(np.ascontiguousarray(flipped))
    for key in out:  # the predictor copies the pixels into one layout first: bitwise
        assert torch.equal(out[key], expected[key])


def test_weights_are_loaded(tmp_path):
    torch.manual_seed(1)
    source = Predictor(Config.from_dict(CFG))
    save_weights(str(tmp_path / "det.pth"), source.model.state_dict())
    torch.manual_seed(2)
    loaded = Predictor(Config.from_dict(CFG), weights=str(tmp_path / "det.pth"))
    image = _image(seed=3)
    a, b = source(image), loaded(image)
    for key in a:  # the same weights, bit for bit, through the same code: bitwise
        assert torch.equal(a[key], b[key])


@pytest.mark.parametrize("bad,match", [
    (np.zeros((32, 32, 3), dtype=np.float32), r"uint8.*float32 array of shape \(32, 32, 3\)"),
    (np.zeros((32, 32), dtype=np.uint8), r"\(32, 32\)"),
    (np.zeros((32, 32, 4), dtype=np.uint8), r"\(32, 32, 4\)"),
    (np.zeros((3, 32, 32), dtype=np.uint8), r"\(3, 32, 32\)"),
    (torch.zeros(32, 32, 3, dtype=torch.uint8), r"got Tensor"),
    ([[0, 0, 0]], r"got list"),
])
def test_wrong_input_raises_value_error(predictor, bad, match):
    with pytest.raises(ValueError, match=match):
        predictor(bad)


def test_from_a_config_file_with_overrides():
    from tests.conftest import REPO
    predictor = Predictor(REPO / "configs" / "torchvision" / "frcnn_r50_fpn.yaml",
                          overrides=["model.backbone.depth=18", "model.fpn.out_channels=32",
                                     "model.roi_heads.fc_dim=64", "input.min_size_test=64",
                                     "input.max_size_test=96", "test.score_thresh=0.0", "device=cpu"])
    assert predictor.model.backbone.bottom_up.depth == 18
    assert predictor.model.preprocessor.min_size_test == 64
    out = predictor(_image(50, 70, seed=4))
    assert len(out["boxes"]) > 0 and out["labels"].max() <= 90


def test_overrides_apply_to_a_config_object():
    predictor = Predictor(Config.from_dict(CFG), overrides=["test.score_thresh=0.5"])
    assert predictor.cfg.test.score_thresh == 0.5
    assert predictor.model.roi_heads.score_thresh == 0.5


def test_whole_detector_weights_need_no_backbone_file_and_must_cover_the_model(tmp_path):
    from engine.errors import CheckpointError

    torch.manual_seed(1)
    source = Predictor(Config.from_dict(CFG))
    state = source.model.state_dict()
    save_weights(str(tmp_path / "det.pth"), state)
    absent = str(tmp_path / "no" / "resnet18.pth")
    cfg = Config.from_dict({**CFG, "model": {**CFG["model"],
                                             "backbone": {**CFG["model"]["backbone"], "weights": absent}}})
    with pytest.raises(CheckpointError, match="resnet18.pth not found"):  # it is missing, and would be opened
        Predictor(cfg)
    image = _image(seed=5)
    for loaded in (Predictor(cfg, weights=str(tmp_path / "det.pth")),  # weights= and model.weights alike
                   Predictor(cfg, overrides=[f"model.weights={tmp_path / 'det.pth'}"])):
        a, b = source(image), loaded(image)
        for key in a:
            assert torch.equal(a[key], b[key])
    cut = [k for k in state if k.startswith("roi_heads.box_head.")][:3]
    save_weights(str(tmp_path / "cut.pth"), {k: v for k, v in state.items() if k not in cut})
    for kwargs in ({"weights": str(tmp_path / "cut.pth")}, {"overrides": [f"model.weights={tmp_path / 'cut.pth'}"]}):
        with pytest.raises(CheckpointError, match=f"does not cover the model: 3 of the model's tensors are not in it: "
                                                  f"{', '.join(cut)}\\."):
            Predictor(cfg, **kwargs)
