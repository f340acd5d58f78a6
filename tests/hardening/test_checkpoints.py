"""Broken, foreign and hostile weight files: each is one CheckpointError naming the file, and a file
that carries code never runs it."""
import hashlib
import os
import pickle
import re

import numpy as np
import pytest
import torch

from backbones.build import build_model, load_backbone_weights
from backbones.resnet import ResNet
from backbones.weights import read_weights, save_weights
from detection.build import build_detector
from detection.weights import load_detector_weights
from engine.checkpoint import (Checkpointer, load_checkpoint_file, safe_torch_load, sha256_file,
                               verify_checksum)
from engine.config import Config
from engine.errors import CheckpointError

DEMO = "configs/demo/frcnn_shapes.yaml"
FASTER = ["model.num_classes=3", "model.backbone.weights=null"]


def refused(load, path, *args):
    with pytest.raises(CheckpointError) as info:
        load(str(path), *args)
    message = str(info.value)
    assert str(path) in message
    return message


@pytest.fixture
def saved(tmp_path):
    """A real training checkpoint of a small model, written by Checkpointer."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    return Checkpointer(str(tmp_path / "run")).save("model_0000010.pth", model, 10), model


# ---------------------------------------------------------------------------------------------------
# Truncated, empty and text files


@pytest.mark.parametrize("load", [load_checkpoint_file, read_weights, safe_torch_load])
def test_truncated_checkpoint(tmp_path, saved, load):
    data = open(saved[0], "rb").read()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[:len(data) // 2])
    message = refused(load, cut)
    assert re.match(rf"cannot read (checkpoint|weights file) {re.escape(str(cut))} \(truncated or not a PyTorch "
                    r"file\?\): \w+Error: ", message), message


def test_truncated_legacy_format(tmp_path):
    path = tmp_path / "old.pth"
    torch.save({"w": torch.zeros(1000)}, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    assert refused(read_weights, path).startswith(f"cannot read weights file {path} (truncated or not a PyTorch file?)")


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.pth"
    path.write_bytes(b"")
    assert refused(read_weights, path) == (f"weights file {path} is empty (0 bytes): an interrupted download, "
                                           "copy or save?")


@pytest.mark.parametrize("text", ["hello, this is not a model\n", "<html><body>404 Not Found</body></html>"])
def test_text_file(tmp_path, text):
    path = tmp_path / "model.pth"
    path.write_text(text)
    assert refused(read_weights, path) == (f"weights file {path} is not a PyTorch file (neither a zip archive nor "
                                           f"a pickle): it starts with {text.encode()[:24]!r}")


def test_git_lfs_pointer(tmp_path):
    path = tmp_path / "model.pth"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 123\n")
    assert refused(read_weights, path).startswith(f"weights file {path} is a Git LFS pointer, not the weights")


@pytest.mark.parametrize("content", [b"", b"\x80\x02}q\x00(X", b"not a pickle at all"])
def test_broken_pkl(tmp_path, content):
    path = tmp_path / "zoo.pkl"
    path.write_bytes(content)
    assert refused(read_weights, path).startswith(f"{path}: not a readable pickle (")


def test_missing_file(tmp_path):
    for name in ("nothing.pth", "nothing.pkl"):
        assert refused(read_weights, tmp_path / name) == f"weights file not found: {str(tmp_path / name)!r}"


# ---------------------------------------------------------------------------------------------------
# Pickles that carry code


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("zipped", [True, False])
@pytest.mark.parametrize("load", [read_weights, load_checkpoint_file])
def test_pth_with_code_is_refused_unrun(tmp_path, zipped, load):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(2), "x": RunsCode(marker)}}, path,
               _use_new_zipfile_serialization=zipped)
    message = refused(load, path)
    assert re.match(rf"refusing to load (checkpoint|weights file) {re.escape(str(path))}: it holds Python objects "
                    r"beyond tensors and plain containers, which could run code \(.*GLOBAL (posix|os)\.system",
                    message), message
    assert not marker.exists()


def test_pth_with_code_given_to_each_builder(tmp_path):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pth"
    torch.save({"model": RunsCode(marker)}, path)
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        load_backbone_weights(ResNet(18, 0), str(path))
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        build_detector(DEMO, FASTER + [f"model.weights={path}"])
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        build_model(Config.from_dict({"model": {"name": "classifier", "num_classes": 10,
                                                "backbone": {"depth": 18}, "weights": str(path)}}))
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_pkl_with_code_is_refused_unrun(tmp_path, protocol):
    marker = tmp_path / "MARKER"
    path = tmp_path / "model_final_abc123.pkl"
    path.write_bytes(pickle.dumps({"model": {"w": np.zeros(2), "x": RunsCode(marker)}}, protocol=protocol))
    message = refused(read_weights, path)
    assert re.match(rf"{re.escape(str(path))}: refusing to unpickle (posix|os)\.system: only numpy arrays", message)
    assert not marker.exists()


def test_resume_from_a_checkpoint_with_code(tmp_path):
    marker = tmp_path / "MARKER"
    run = tmp_path / "run"
    ckpt = Checkpointer(str(run))
    run.mkdir()
    torch.save({"model": {"w": RunsCode(marker)}, "iteration": 5}, run / "model_0000005.pth")
    (run / "last_checkpoint").write_text("model_0000005.pth")
    with pytest.raises(CheckpointError, match="refusing to load checkpoint .*model_0000005.pth"):
        ckpt.resume(torch.nn.Linear(2, 2))
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------
# Files of another model


@pytest.fixture(scope="module")
def detectors(tmp_path_factory):
    folder = tmp_path_factory.mktemp("detectors")
    paths = {}
    for name, args in {"faster3": FASTER, "mask3": FASTER + ["model.name=mask_rcnn"],
                       "faster5": ["model.num_classes=5", "model.backbone.weights=null"]}.items():
        paths[name] = folder / f"{name}.pth"
        save_weights(str(paths[name]), build_detector(DEMO, args).state_dict())
    paths["classifier"] = folder / "classifier.pth"
    save_weights(str(paths["classifier"]), ResNet(18, 10).state_dict())
    return paths


def test_classifier_as_detector_weights(detectors):
    with pytest.raises(CheckpointError) as info:
        load_detector_weights(build_detector(DEMO, FASTER), str(detectors["classifier"]))
    assert str(info.value) == (f"--weights={detectors['classifier']} is our ResNet classifier, not a detector "
                               "checkpoint (a backbone or classifier goes in model.backbone.weights)")


def test_detector_as_backbone_weights(detectors):
    with pytest.raises(CheckpointError) as info:
        load_backbone_weights(ResNet(18, 0), str(detectors["faster3"]))
    assert str(info.value) == (f"model.backbone.weights={detectors['faster3']} is our Faster R-CNN checkpoint, "
                               "not a ResNet classifier or backbone (a detector's checkpoint goes in model.weights)")


PREDICTOR = ["roi_heads.predictor.cls_score.weight", "roi_heads.predictor.cls_score.bias",
             "roi_heads.predictor.bbox_pred.weight", "roi_heads.predictor.bbox_pred.bias"]
BOX_HEAD_CUT = ["roi_heads.box_head.fc1.weight", "roi_heads.box_head.fc1.bias", "roi_heads.box_head.fc2.weight"]


def test_wrong_number_of_classes_for_inference(detectors):
    with pytest.raises(CheckpointError) as info:
        load_detector_weights(build_detector(DEMO, FASTER), str(detectors["faster5"]))
    message = str(info.value)
    assert message.startswith(f"--weights={detectors['faster5']} is a detector of 5 classes and the config builds "
                              "one of 3 (model.num_classes): set model.num_classes=5")
    assert "roi_heads.predictor.cls_score.weight: file (6, " in message and "vs model (4, " in message


def test_wrong_number_of_classes_as_training_init_warns(detectors, caplog):
    """Fine-tuning to a new label space: the class predictors start anew, said with the reason; the rest loads."""
    with caplog.at_level("WARNING"):
        model = build_detector(DEMO, FASTER + [f"model.weights={detectors['faster5']}"])
    assert (f"model.weights={detectors['faster5']} leaves 4 tensors at initialisation for training to learn: 4 of "
            "the class predictors, as the file has 5 classes and model.num_classes=3 (a new label space, as in "
            f"fine-tuning): {', '.join(PREDICTOR)}") in caplog.text
    saved = read_weights(str(detectors["faster5"]))
    assert torch.equal(model.state_dict()["roi_heads.box_head.fc2.weight"], saved["roi_heads.box_head.fc2.weight"])
    assert model.state_dict()["roi_heads.predictor.cls_score.weight"].shape == (4, 256)


def test_other_shape_mismatch_is_an_error_even_as_training_init(detectors, tmp_path):
    """Only the class count may reshape tensors at initialisation: a box head of another width is refused."""
    state = read_weights(str(detectors["faster5"]))
    state["roi_heads.box_head.fc2.weight"] = torch.zeros(256, 128)
    save_weights(str(tmp_path / "narrow.pth"), state)
    with pytest.raises(CheckpointError, match=r"does not fit the model; shape mismatches:\n  "
                                              r"roi_heads.box_head.fc2.weight: file \(256, 128\) vs model \(256, 256\)$"):
        build_detector(DEMO, FASTER + [f"model.weights={tmp_path / 'narrow.pth'}"])


@pytest.fixture(scope="module")
def cut_detector(detectors, tmp_path_factory):
    """faster3 without 3 tensors of its box head."""
    state = read_weights(str(detectors["faster3"]))
    path = tmp_path_factory.mktemp("cut") / "cut.pth"
    save_weights(str(path), {k: v for k, v in state.items() if k not in BOX_HEAD_CUT})
    return path


def test_incomplete_detector_for_inference(cut_detector):
    model = build_detector(DEMO, FASTER)
    before = model.state_dict()["rpn.head.conv.weight"].clone()
    with pytest.raises(CheckpointError) as info:
        load_detector_weights(model, str(cut_detector))
    assert str(info.value).startswith(f"--weights={cut_detector} does not cover the model: 3 of the model's tensors "
                                      f"are not in it: {', '.join(BOX_HEAD_CUT)}. ")
    assert torch.equal(model.state_dict()["rpn.head.conv.weight"], before)  # refused before anything loaded
    # model.weights is the detector when the model is used as it is (Predictor, --eval-only): the same error.
    with pytest.raises(CheckpointError, match=rf"^model.weights={re.escape(str(cut_detector))} does not cover"):
        build_detector(DEMO, FASTER + [f"model.weights={cut_detector}"], for_inference=True)


def test_incomplete_detector_as_training_init_warns(cut_detector, caplog):
    with caplog.at_level("WARNING"):
        model = build_detector(DEMO, FASTER + [f"model.weights={cut_detector}"])
    assert (f"model.weights={cut_detector} leaves 3 tensors at initialisation for training to learn: 3 not in the "
            f"file: {', '.join(BOX_HEAD_CUT)}") in caplog.text
    saved = read_weights(str(cut_detector))
    assert torch.equal(model.state_dict()["roi_heads.box_head.fc2.bias"], saved["roi_heads.box_head.fc2.bias"])


def test_unexpected_tensors_for_inference_are_named_and_counted(detectors, tmp_path):
    state = dict(read_weights(str(detectors["faster3"])), **{f"extra.{i}": torch.zeros(1) for i in range(10)})
    save_weights(str(tmp_path / "extra.pth"), state)
    with pytest.raises(CheckpointError) as info:
        load_detector_weights(build_detector(DEMO, FASTER), str(tmp_path / "extra.pth"))
    assert ("does not cover the model: 10 of its tensors have no place in the model: extra.0, extra.1, extra.2, "
            "extra.3, extra.4, extra.5, extra.6, extra.7 and 2 more. ") in str(info.value)


@pytest.mark.parametrize("given, built, consequence", [
    ("mask3", FASTER, "its mask head would be dropped"),
    ("faster3", FASTER + ["model.name=mask_rcnn"], "the masks would come from an untrained mask head"),
])
def test_faster_vs_mask(detectors, given, built, consequence):
    with pytest.raises(CheckpointError) as info:
        load_detector_weights(build_detector(DEMO, built), str(detectors[given]))
    assert str(detectors[given]) in str(info.value) and str(info.value).endswith(consequence)


def test_resume_with_another_models_checkpoint(saved):
    path, _ = saved
    with pytest.raises(CheckpointError) as info:
        Checkpointer(os.path.dirname(path)).resume(torch.nn.Linear(3, 3))
    assert str(info.value).startswith(f"{path} does not fit the configured model: ")


# ---------------------------------------------------------------------------------------------------
# Checksums


def test_checkpointer_writes_a_sha256sum_sidecar(saved):
    path, model = saved
    sidecar = open(path + ".sha256").read()
    assert sidecar == f"{hashlib.sha256(open(path, 'rb').read()).hexdigest()}  model_0000010.pth\n"
    state = Checkpointer(os.path.dirname(path)).resume(model)  # verified, then loaded
    assert state["iteration"] == 10


def test_checkpoint_changed_after_it_was_written(saved):
    path, model = saved
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: torch would still read it
    open(path, "wb").write(bytes(data))
    recorded = open(path + ".sha256").read().split()[0]
    with pytest.raises(CheckpointError) as info:
        Checkpointer(os.path.dirname(path)).resume(model)
    assert str(info.value) == (f"checksum mismatch for checkpoint {path}: its sha256 is {sha256_file(path)}, but "
                               f"{path}.sha256 records {recorded}; the file was changed or damaged after it was "
                               "written")
    with pytest.raises(CheckpointError, match="checksum mismatch for weights file"):
        read_weights(path)


def test_checkpoint_without_sidecar_loads(saved):
    path, model = saved
    os.remove(path + ".sha256")
    assert Checkpointer(os.path.dirname(path)).resume(model)["iteration"] == 10


def test_malformed_sidecar(saved):
    path, _ = saved
    open(path + ".sha256", "w").write("not a hash\n")
    assert refused(load_checkpoint_file, path).startswith(f"{path}.sha256, the checksum file of checkpoint {path}, "
                                                          "does not start with a sha256")


def test_resave_replaces_the_sidecar_and_prune_removes_it(tmp_path):
    ckpt = Checkpointer(str(tmp_path), keep=1)
    model = torch.nn.Linear(2, 2)
    ckpt.save("model_final.pth", model, 1)
    torch.nn.init.ones_(model.weight)
    ckpt.save("model_final.pth", model, 2)
    verify_checksum(str(tmp_path / "model_final.pth"))
    ckpt.save("model_0000001.pth", model, 1)
    ckpt.save("model_0000002.pth", model, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "last_checkpoint", "model_0000002.pth", "model_0000002.pth.sha256", "model_final.pth",
        "model_final.pth.sha256"]


def test_hash_in_the_name(tmp_path):
    state = {"model": {"w": torch.arange(4.0)}}
    plain = tmp_path / "plain.pth"
    torch.save(state, plain)
    digest = sha256_file(str(plain))
    good = tmp_path / f"resnet18-{digest[:8]}.pth"
    plain.rename(good)
    assert torch.equal(read_weights(str(good))["w"], torch.arange(4.0))
    wrong = "deadbeef" if not digest.startswith("deadbeef") else "cafebabe"
    bad = tmp_path / f"resnet18-{wrong}.pth"
    good.rename(bad)
    with pytest.raises(CheckpointError) as info:
        read_weights(str(bad))
    assert str(info.value).startswith(f"checksum mismatch for weights file {bad}: its name says its sha256 starts "
                                      f"with {wrong}, the file's starts with {digest[:8]}; ")
    # Not a hash: too short, not after a dash, or digits only (a date or a run number).
    for name in (f"resnet18-{wrong[:6]}.pth", f"model_{wrong}.pth", "run-20240115.pth"):
        bad.rename(tmp_path / name)
        assert torch.equal(read_weights(str(tmp_path / name))["w"], torch.arange(4.0))
        bad = tmp_path / name


def test_sidecar_checked_for_pkl(tmp_path):
    path = tmp_path / "zoo.pkl"
    path.write_bytes(pickle.dumps({"model": {"w": np.zeros(3, dtype=np.float32)}}, protocol=2))
    (tmp_path / "zoo.pkl.sha256").write_text("f" * 64 + "  zoo.pkl\n")
    assert refused(read_weights, path).startswith(f"checksum mismatch for weights file {path}: its sha256 is ")
