"""Our backbones inside the real Detectron2 (the snapshot at ../shared/peers/detectron2, fixture `detectron2`).

Against Detectron2's own backbones: registry, output_shape(), parameter counts and features with the same
weights. Inside its GeneralizedRCNN: a training step, inference, a DetectionCheckpointer round trip. What its
checkpointer does with ImageNet files in MODEL.WEIGHTS (refused, naming MODEL.BACKBONE.WEIGHTS). And a subset
of Detectron2's own unit tests with our builders in place of its ResNet builders.
"""
import contextlib
import importlib.util
import pickle
import re
import unittest

import pytest
import torch

import backbones
from backbones.weights import convert_keys, save_weights, to_torchvision_resnet
from detection.conversion.detectron2 import DETECTRON2_KEYS
from engine.errors import CheckpointError, ConfigError, ToolkitError
from tests.conftest import DETECTRON2_PEER, randomize_norms, run_tool

pytestmark = pytest.mark.usefixtures("detectron2", "one_thread")  # small images: a second thread mostly waits

# Detectron2's builder -> ours.
OURS_FOR = {"build_resnet_backbone": "build_resnet_det_backbone",
            "build_resnet_fpn_backbone": "build_resnet_det_fpn_backbone",
            "build_retinanet_resnet_fpn_backbone": "build_resnet_det_retinanet_fpn_backbone"}
MASK_RCNN = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"


def adapter():
    """backbones.adapters.detectron2_backbone, importable once the `detectron2` fixture has found Detectron2."""
    from backbones.adapters import detectron2_backbone

    return detectron2_backbone


def zoo_cfg(name=MASK_RCNN, **backbone):
    from detectron2 import model_zoo

    from backbones.adapters.detectron2_backbone import add_resnet_det_config

    cfg = add_resnet_det_config(model_zoo.get_config(name))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.BACKBONE.update(backbone)
    return cfg


def randomize_detectron2_norms(model, seed=0):
    """Non-trivial statistics and affine parameters in Detectron2's FrozenBatchNorm2d (all buffers)."""
    from detectron2.layers import FrozenBatchNorm2d

    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            m.weight.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
    return model


def in_our_names(theirs, ours):
    """Detectron2's backbone state dict in the names of our adapter `ours`: its ResNet and FPN keys through the
    converter's table (DETECTRON2_KEYS, written for whole detectors, hence the "backbone." prefix); keys it
    leaves (RetinaNet's top_block.p6/p7) have the same name in both. The table numbers FPN levels from P2
    (fpn_lateral2 -> lateral_convs.0); Detectron2's levels are renumbered so that its first one is 2."""
    inner = "fpn." if isinstance(ours, adapter().Detectron2FPN) else "body."
    outer = "backbone." if inner == "fpn." else "backbone.bottom_up."
    levels = sorted({int(m[1]) for m in map(re.compile(r"^fpn_lateral(\d)\.").match, theirs) if m})
    shift = {f"fpn_{kind}{level}.": f"fpn_{kind}{i + 2}." for i, level in enumerate(levels)
             for kind in ("lateral", "output")}
    renamed = {next((shift[p] + k[len(p):] for p in shift if k.startswith(p)), k): v for k, v in theirs.items()}
    converted, same = convert_keys({outer + k: v for k, v in renamed.items()}, DETECTRON2_KEYS)
    mapped = {inner + k[len(outer):]: v for k, v in converted.items()}
    mapped.update({inner + k[len(outer):]: renamed[k[len(outer):]] for k in same})
    assert sorted(mapped) == sorted(ours.state_dict()), "the two backbones differ in structure"
    return mapped


def assert_features_close(ours, theirs):
    assert list(ours) == list(theirs)
    for name in theirs:
        # Same weights, different float32 arithmetic: Detectron2's FrozenBN runs F.batch_norm without
        # gradients, ours x * scale + shift. Rounding (~1e-7 relative per operation) adds up over ~50 layers
        # to well under 1e-4 of the largest activation; a wrong weight or layer is off by O(1).
        scale = theirs[name].abs().max().item()
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=1e-4 * scale, msg=name)


@pytest.mark.parametrize("config, builder, resnets", [
    ("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml", "build_resnet_fpn_backbone", {}),
    ("COCO-Detection/retinanet_R_50_FPN_1x.yaml", "build_retinanet_resnet_fpn_backbone", {}),
    # C4 (res-only), R101: stages up to res4 only, as Detectron2 builds them for OUT_FEATURES ending at res4.
    ("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml", "build_resnet_backbone",
     dict(DEPTH=101, OUT_FEATURES=["res2", "res3", "res4"])),
])
def test_our_backbones_equal_detectron2s_own(config, builder, resnets):
    from detectron2.modeling import BACKBONE_REGISTRY, build_backbone

    assert BACKBONE_REGISTRY.get(OURS_FOR[builder]) is getattr(adapter(), OURS_FOR[builder])
    cfg = zoo_cfg(config)
    cfg.MODEL.RESNETS.update(resnets)
    cfg.MODEL.BACKBONE.NAME = builder
    torch.manual_seed(0)
    theirs = randomize_detectron2_norms(build_backbone(cfg)).eval()
    cfg.MODEL.BACKBONE.NAME = OURS_FOR[builder]
    ours = build_backbone(cfg).eval()
    assert type(ours).__name__ == ("Detectron2ResNet" if builder == "build_resnet_backbone" else "Detectron2FPN")

    assert ours.output_shape() == theirs.output_shape()
    assert ours.size_divisibility == theirs.size_divisibility
    assert ours.padding_constraints == theirs.padding_constraints

    def counts(model):
        return (sum(p.numel() for p in model.parameters()),
                sum(p.numel() for p in model.parameters() if p.requires_grad),  # FREEZE_AT=2
                sum(b.numel() for b in model.buffers()))

    assert counts(ours) == counts(theirs)

    ours.load_state_dict(in_our_names(theirs.state_dict(), ours))
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        assert_features_close(ours(images), theirs(images))


def mask_rcnn_inputs(n=2, size=128, seed=0):
    from detectron2.structures import BitMasks, Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    inputs = []
    for _ in range(n):
        instances = Instances((size, size))
        corner = torch.randint(0, size // 2, (3, 2), generator=g).float()
        boxes = torch.cat([corner, corner + torch.randint(16, size // 2, (3, 2), generator=g)], 1)
        instances.gt_boxes = Boxes(boxes)
        instances.gt_classes = torch.randint(0, 80, (3,), generator=g)
        masks = torch.zeros(3, size, size, dtype=torch.bool)
        for mask, (x0, y0, x1, y1) in zip(masks, boxes.long().tolist()):
            mask[y0:y1, x0:x1] = True
        instances.gt_masks = BitMasks(masks)
        inputs.append({"image": torch.rand(3, size, size, generator=g) * 255, "instances": instances})
    return inputs


def mask_rcnn_cfg():
    cfg = zoo_cfg(MASK_RCNN, NAME="build_resnet_det_fpn_backbone")
    # Fewer proposals and RoIs than COCO's settings: the same code paths at a fraction of the time.
    cfg.MODEL.RPN.update(PRE_NMS_TOPK_TRAIN=200, POST_NMS_TOPK_TRAIN=100, PRE_NMS_TOPK_TEST=200,
                         POST_NMS_TOPK_TEST=50)
    cfg.MODEL.ROI_HEADS.update(BATCH_SIZE_PER_IMAGE=64, SCORE_THRESH_TEST=0.0)  # detections from random heads
    cfg.TEST.DETECTIONS_PER_IMAGE = 10  # the mask head's four 3x3 convolutions cost ~0.1 GFLOP per detection
    # Unit-variance input (the ImageNet std): a random R50 with its std of 1 on 0-255 pixels gives features of
    # ~1e4, whose box deltas leave the RPN only empty boxes.
    cfg.MODEL.PIXEL_STD = [57.375, 57.120, 58.395]
    return cfg


def build_model(cfg, seed):
    from detectron2.modeling import build_model

    torch.manual_seed(seed)
    return build_model(cfg)


@pytest.fixture(scope="module")
def mask_rcnn():
    """Detectron2's Mask R-CNN (GeneralizedRCNN) with our R50-FPN, random weights; tests leave it unchanged."""
    return build_model(mask_rcnn_cfg(), seed=0)


def test_mask_rcnn_trains_infers_and_round_trips_through_detectioncheckpointer(tmp_path):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.utils.events import EventStorage

    cfg = mask_rcnn_cfg()
    model = build_model(cfg, seed=0)
    assert isinstance(model.backbone, adapter().Detectron2FPN)
    model.train()
    with EventStorage():
        losses = model(mask_rcnn_inputs())
    assert {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    body = model.backbone.fpn.bottom_up
    # FREEZE_AT=2: the stem and res2 are frozen, res3..res5 and the FPN learn.
    assert all(p.grad is None for p in body.res2.parameters())
    for part in (body.res3, body.res5, model.backbone.fpn.lateral_convs):
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)

    images = [{"image": x["image"]} for x in mask_rcnn_inputs(seed=1)]
    model.eval()
    with torch.no_grad():
        before = model(images)
    assert all(len(out["instances"]) > 0 for out in before)  # up to 10 per image at score threshold 0
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model_final")
    reloaded = build_model(cfg, seed=1).eval()  # other random weights until the checkpoint loads
    DetectionCheckpointer(reloaded).load(str(tmp_path / "model_final.pth"))
    with torch.no_grad():
        after = reloaded(images)
    for a, b in zip(before, after):
        a, b = a["instances"], b["instances"]
        assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor) and torch.equal(a.scores, b.scores)
        assert torch.equal(a.pred_classes, b.pred_classes) and torch.equal(a.pred_masks, b.pred_masks)


def imagenet_files(tmp_path):
    """A randomised R50 classifier in our names and in torchvision's."""
    classifier = randomize_norms(backbones.resnet50()).eval()
    ours, torchvision = tmp_path / "r50.pth", tmp_path / "r50_tv.pth"
    save_weights(str(ours), classifier.state_dict())
    torch.save(to_torchvision_resnet(classifier.state_dict()), torchvision)  # what torchvision's file holds
    return classifier, {"ours": ours, "torchvision": torchvision}


def assert_refused_untouched(model, path, *needles):
    from detectron2.checkpoint import DetectionCheckpointer

    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="MODEL.BACKBONE.WEIGHTS") as error:
        DetectionCheckpointer(model).load(str(path))
    for needle in needles:
        assert needle in str(error.value)
    # The backbone refuses before it or anything after it loads: the model is as it was.
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_imagenet_files_in_model_weights_are_refused_and_load_through_backbone_weights(mask_rcnn, tmp_path):
    from detectron2.modeling import build_backbone

    classifier, files = imagenet_files(tmp_path)
    for path in files.values():
        # Detectron2 alone would log "Some model parameters or buffers are not found in the checkpoint" and go on.
        assert_refused_untouched(mask_rcnn, path, "0 of its")
        cfg = zoo_cfg(MASK_RCNN, NAME="build_resnet_det_fpn_backbone", WEIGHTS=str(path))
        body = build_backbone(cfg).fpn.bottom_up
        expected = classifier.state_dict()
        assert all(torch.equal(v, expected[k]) for k, v in body.state_dict().items())


def caffe2_name(key: str) -> str:
    """A Detectron2 ResNet key in Caffe2's blob names: the inverse of Detectron2's convert_basic_c2_names for
    ResNet keys (checked against it in the test)."""
    key = key.replace("stem.conv1.norm.", "res.conv1.norm.").replace("stem.conv1.", "conv1.")
    branches = {"shortcut": "branch1", "conv1": "branch2a", "conv2": "branch2b", "conv3": "branch2c"}
    key = re.sub(r"^(res\d\.\d+\.)(shortcut|conv\d)\.", lambda m: f"{m[1]}{branches[m[2]]}.", key)
    key = key.replace(".norm.weight", ".bn.s").replace(".norm.bias", ".bn.b").replace(".weight", ".w")
    return key.replace(".", "_")


def test_caffe2_pkl_is_refused_in_model_weights_and_converts_to_detectron2s_features(mask_rcnn, tmp_path, capsys):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.checkpoint.c2_model_loading import convert_basic_c2_names
    from detectron2.modeling import build_backbone

    # An MSRA-style R-50.pkl made from a real Detectron2 ResNet-50: its weights in Caffe2's blob names (scale and
    # bias per BN, no statistics, as MSRA's file), numpy arrays in a plain pickle.
    cfg = zoo_cfg(MASK_RCNN, NAME="build_resnet_backbone")
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    torch.manual_seed(0)
    theirs = randomize_detectron2_norms(build_backbone(cfg)).eval()
    weights = {k: v for k, v in theirs.state_dict().items() if not k.endswith(("running_mean", "running_var"))}
    blobs = {caffe2_name(k): v.numpy() for k, v in weights.items()}
    assert convert_basic_c2_names(list(blobs)) == list(weights)  # Detectron2's own reading of the names
    pkl = tmp_path / "R-50.pkl"
    pkl.write_bytes(pickle.dumps(blobs, protocol=2))

    # Detectron2's heuristics load the pkl into its own ResNet completely ...
    DetectionCheckpointer(theirs).load(str(pkl))
    # ... and into ours only the convolutions (our norms are named norm1.., not conv1.norm): refused.
    assert_refused_untouched(mask_rcnn, pkl, "tools/convert_weights.py --from detectron2")

    converted = tmp_path / "r50_msra.pth"
    result = run_tool(capsys, "convert_weights.py", "--from", "detectron2", pkl, converted)
    assert result.returncode == 0, result.stderr
    cfg.MODEL.BACKBONE.update(NAME="build_resnet_det_backbone", WEIGHTS=str(converted))
    ours = build_backbone(cfg).eval()
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        assert_features_close(ours(images), theirs(images))


def test_partial_state_dict_is_refused_naming_what_is_missing():
    from detectron2.modeling import build_backbone

    model = build_backbone(zoo_cfg(MASK_RCNN, NAME="build_resnet_det_fpn_backbone"))
    state = model.state_dict()
    model.load_state_dict(state)  # all of it loads
    del state["fpn.bottom_up.res4.2.norm2.running_var"]
    with pytest.raises(CheckpointError, match=r"of its \d+ tensors \(missing fpn.bottom_up.res4.2.norm2.running_var"):
        model.load_state_dict(state, strict=False)


@pytest.mark.parametrize("section, key, value", [
    ("RESNETS", "RES5_DILATION", 2),
    ("RESNETS", "DEFORM_ON_PER_STAGE", [False, True, True, True]),
    ("RESNETS", "NORM", "nnSyncBN"),
    ("RESNETS", "STEM_OUT_CHANNELS", 128),
    ("RESNETS", "DEPTH", 26),
    ("RESNETS", "RES2_OUT_CHANNELS", 64),
    ("FPN", "FUSE_TYPE", "avg"),
    ("FPN", "IN_FEATURES", []),
    ("FPN", "NORM", "LN"),
    ("BACKBONE", "FREEZE_AT", 7),
])
def test_refuses_what_it_cannot_build_naming_the_key(section, key, value):
    from detectron2.modeling import build_backbone

    cfg = zoo_cfg(MASK_RCNN, NAME="build_resnet_det_fpn_backbone")
    cfg.MODEL[section][key] = value  # each one a value Detectron2's own builders accept
    with pytest.raises(ConfigError, match=f"MODEL.{section}.{key}"):
        build_backbone(cfg)


def test_registering_again_keeps_our_builders_and_another_owner_is_refused():
    from detectron2.modeling import BACKBONE_REGISTRY
    from fvcore.common.registry import Registry

    import backbones.adapters

    first = BACKBONE_REGISTRY.get("build_resnet_det_fpn_backbone")
    assert backbones.adapters.register_all()["detectron2"] == list(OURS_FOR.values())
    assert BACKBONE_REGISTRY.get("build_resnet_det_fpn_backbone") is first

    def build_resnet_det_backbone(cfg, input_shape):  # someone else's builder under our name
        return None

    taken = Registry("BACKBONE")
    taken.register(build_resnet_det_backbone)
    with pytest.raises(ToolkitError, match="'build_resnet_det_backbone' is already registered"):
        adapter().register(taken)


# Detectron2's own tests that build its ResNet backbones, and what of them runs here. test_model_e2e: one
# training case per detector (Mask R-CNN with masks, RetinaNet: evaluation and training); its CUDA cases
# cannot run here, and its other cases (inf/nan heads on given features, FCOS and semantic FPN, which build
# no backbone through these builders or test none) add ~100 s on two cores.
# test_model_analysis: the parameter counts (its FLOP counts at 800x800 pass too, ~20 s each: left out).
DETECTRON2_TESTS = {
    "tests/modeling/test_backbone.py": ["TestBackBone"],
    "tests/modeling/test_model_e2e.py": ["MaskRCNNE2ETest.test_half_empty_data", "RetinaNetE2ETest.test_empty_data"],
    "tests/test_model_analysis.py": ["RetinaNetTest.test_param_count", "FasterRCNNTest.test_param_count"],
}


@contextlib.contextmanager
def our_builders_in_detectron2(built):
    """Our builders under the names of Detectron2's ResNet builders in BACKBONE_REGISTRY, recording in `built`
    what each call returned; Detectron2's own are put back afterwards. fvcore's Registry has no way to replace
    an entry, so its table (_obj_map) is written directly."""
    from detectron2.modeling import BACKBONE_REGISTRY

    def recording(builder):
        def build(cfg, input_shape):
            built.append(builder(cfg, input_shape))
            return built[-1]
        return build

    saved = {name: BACKBONE_REGISTRY.get(name) for name in OURS_FOR}
    try:
        BACKBONE_REGISTRY._obj_map.update({name: recording(getattr(adapter(), ours)) for name, ours in OURS_FOR.items()})
        yield {name: BACKBONE_REGISTRY.get(name) for name in OURS_FOR}
    finally:
        BACKBONE_REGISTRY._obj_map.update(saved)


@pytest.mark.parametrize("path", list(DETECTRON2_TESTS))
def test_detectron2s_own_tests_pass_with_our_backbones(path, monkeypatch):
    from detectron2.modeling import BACKBONE_REGISTRY

    file = DETECTRON2_PEER / path
    spec = importlib.util.spec_from_file_location("detectron2_" + file.stem, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    built = []
    with our_builders_in_detectron2(built) as builders:
        for name, builder in builders.items():  # names the test module imported from Detectron2
            if hasattr(module, name):
                monkeypatch.setattr(module, name, builder)
        suite = unittest.defaultTestLoader.loadTestsFromNames(DETECTRON2_TESTS[path], module)
        result = unittest.TestResult()
        suite.run(result)
    assert result.wasSuccessful(), [str(e) for _, e in result.errors + result.failures]
    ran = result.testsRun - len(result.skipped)
    assert ran > 0 and len(built) >= ran
    assert all(isinstance(b, (adapter().Detectron2FPN, adapter().Detectron2ResNet)) for b in built)
    assert BACKBONE_REGISTRY.get("build_resnet_fpn_backbone").__module__.startswith("detectron2.")
