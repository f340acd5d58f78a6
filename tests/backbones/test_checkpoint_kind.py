"""A checkpoint of the wrong kind gets a message saying what it is and what was expected."""
import logging

import pytest
import torch

from backbones.checkpoint_kind import checkpoint_kind
from backbones.resnet import ResNet
from backbones.weights import save_weights, to_torchvision_resnet
from detection.build import build_detector
from detection.weights import load_detector_weights
from engine.config import Config
from engine.errors import CheckpointError

FASTER = ["model.num_classes=3", "model.backbone.weights=null"]
MASK = FASTER + ["model.name=mask_rcnn"]
DEMO = "configs/demo/frcnn_shapes.yaml"


@pytest.fixture(scope="module")
def states():
    faster = build_detector(DEMO, FASTER).state_dict()
    mask = build_detector(DEMO, MASK).state_dict()
    resnet = ResNet(18, 10).state_dict()
    return {"faster": faster, "mask": mask, "classifier": resnet}


def test_kinds_from_key_names(states):
    assert checkpoint_kind(states["faster"]).description == "our Faster R-CNN checkpoint"
    assert checkpoint_kind(states["mask"]).description == "our Mask R-CNN checkpoint"
    assert checkpoint_kind(states["classifier"]).description == "our ResNet classifier"
    tv = to_torchvision_resnet(states["classifier"])
    assert checkpoint_kind(tv).description == "a torchvision ResNet classifier"
    # Other frameworks' layouts, by the names their files use.
    detectron2 = {"backbone.bottom_up.stem.conv1.norm.weight": 0, "proposal_generator.rpn_head.conv.weight": 0,
                  "roi_heads.box_predictor.cls_score.weight": 0, "roi_heads.mask_head.mask_fcn1.weight": 0}
    kind = checkpoint_kind(detectron2)
    assert (kind.source, kind.model) == ("detectron2", "mask_rcnn")
    assert "--from detectron2" in kind.hint()
    caffe2 = checkpoint_kind({"conv1_w": 0, "res_conv1_bn_s": 0, "res2_0_branch2a_w": 0})
    assert caffe2.source == "caffe2" and "--from detectron2" in caffe2.hint()
    timm_d = checkpoint_kind({"conv1.0.weight": 0, "layer1.0.conv1.weight": 0, "layer2.0.downsample.2.weight": 0})
    assert timm_d.source == "timm" and "--from timm" in timm_d.hint()
    tv_mask = checkpoint_kind({"backbone.body.conv1.weight": 0, "roi_heads.mask_predictor.conv5_mask.weight": 0})
    assert (tv_mask.source, tv_mask.model) == ("torchvision", "mask_rcnn")
    assert checkpoint_kind({"foo": 0}).source == "unknown"


@pytest.mark.parametrize("given,built,message", [
    ("classifier", FASTER, r"is our ResNet classifier, not a detector checkpoint \(a backbone or classifier goes "
                           r"in model.backbone.weights\)"),
    ("mask", FASTER, r"is a Mask R-CNN checkpoint and the config builds a Faster R-CNN .*model.name=mask_rcnn.*"
                     r"its mask head would be dropped"),
    ("faster", MASK, r"is a Faster R-CNN checkpoint and the config builds a Mask R-CNN: the masks would come "
                     r"from an untrained mask head"),
])
def test_wrong_kind_for_inference(tmp_path, states, given, built, message):
    path = tmp_path / f"{given}.pth"
    save_weights(str(path), states[given])
    with pytest.raises(CheckpointError, match=message):
        load_detector_weights(build_detector(DEMO, built), str(path))


def test_other_kind_as_training_init_warns(tmp_path, states, caplog):
    """As model.weights (an initialisation), a Faster R-CNN for a Mask R-CNN is a normal start: the mask head
    is new. It is said, and the rest loads."""
    path = tmp_path / "faster.pth"
    save_weights(str(path), states["faster"])
    with caplog.at_level(logging.WARNING):
        model = build_detector(DEMO, MASK + [f"model.weights={path}"])
    assert "is a Faster R-CNN checkpoint and the config builds a Mask R-CNN: the mask head starts from " \
           "initialisation" in caplog.text
    assert torch.equal(model.state_dict()["rpn.head.conv.weight"], states["faster"]["rpn.head.conv.weight"])


def test_foreign_files_name_the_converter(tmp_path, states):
    detectron2 = {"backbone.bottom_up.stem.conv1.weight": torch.zeros(64, 3, 7, 7),
                  "backbone.bottom_up.stem.conv1.norm.weight": torch.zeros(64)}
    save_weights(str(tmp_path / "d2.pth"), detectron2)
    with pytest.raises(CheckpointError, match=r"is a Detectron2 ResNet-FPN backbone checkpoint, not a detector "
                                              r"checkpoint; convert it first: python tools/convert_weights.py "
                                              r"--from detectron2 IN OUT"):
        load_detector_weights(build_detector(DEMO, FASTER), str(tmp_path / "d2.pth"))
    timm_d = {"conv1.0.weight": torch.zeros(32, 3, 3, 3), "layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1)}
    save_weights(str(tmp_path / "timm.pth"), timm_d)
    cfg = Config.from_dict({"model": {"name": "resnet_fpn", "backbone": {"depth": 18,
                                                                          "weights": str(tmp_path / "timm.pth")}}})
    from backbones.build import build_model
    with pytest.raises(CheckpointError, match=r"is a timm ResNet-C/D .*--from timm"):
        build_model(cfg)


def test_classifier_weights_must_be_a_classifier(tmp_path, states):
    """model.weights of a classifier: a detector is refused; a bare ResNet is pointed at backbone.weights."""
    from backbones.build import build_model
    save_weights(str(tmp_path / "faster.pth"), states["faster"])
    cfg = Config.from_dict({"model": {"name": "classifier", "num_classes": 10, "backbone": {"depth": 18},
                                      "weights": str(tmp_path / "faster.pth")}})
    with pytest.raises(CheckpointError, match="is our Faster R-CNN checkpoint, not a ResNet classifier"):
        build_model(cfg)
    body = {k: v for k, v in states["classifier"].items() if not k.startswith("fc.")}
    save_weights(str(tmp_path / "body.pth"), body)
    cfg = Config.from_dict({"model": {"name": "classifier", "num_classes": 10, "backbone": {"depth": 18},
                                      "weights": str(tmp_path / "body.pth")}})
    with pytest.raises(CheckpointError, match="go in model.backbone.weights"):
        build_model(cfg)
    save_weights(str(tmp_path / "cls.pth"), states["classifier"])
    cfg = Config.from_dict({"model": {"name": "classifier", "num_classes": 10, "backbone": {"depth": 18},
                                      "weights": str(tmp_path / "cls.pth")}})
    assert torch.equal(build_model(cfg).fc.weight, states["classifier"]["fc.weight"])
