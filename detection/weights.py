"""Loading a whole detector's weights: ours, or torchvision's converted on the fly."""
import logging
import os
from typing import Optional

from backbones.checkpoint_kind import checkpoint_kind
from backbones.weights import check_fit, key_list, read_weights
from engine.errors import CheckpointError

from .conversion.torchvision import from_torchvision_detector

logger = logging.getLogger(__name__)


# The tools' --weights: a whole detector, which build_detector(weights=..., for_inference=True) loads.
WEIGHTS_HELP = ("the whole detector, ours or torchvision's; model.backbone.weights is not read, and a file that "
                "does not cover the model is an error")


# Tensors whose shape follows model.num_classes: the box predictor's (K + 1 classes, 4 deltas each) and the
# mask predictor's (K + 1 masks, one when class-agnostic).
CLASS_TENSORS = ("roi_heads.predictor.", "roi_heads.mask_head.predictor.")
CLASS_SCORE = "roi_heads.predictor.cls_score.weight"


def load_detector_weights(model, path: str, for_inference: bool = True, setting: Optional[str] = None):
    """Our checkpoints, or torchvision's detection state dicts (converted on the fly). A file of another
    kind is refused, saying what it is. `setting` names where the file was given (default --weights for
    inference, model.weights for training).

    `for_inference`: the weights are to be evaluated or deployed as they are, so the file must hold every
    tensor of the model and no other: anything else is a CheckpointError naming the tensors (a head left at
    random initialisation writes detections that look real and mean nothing). That includes a file for
    another class count, and a Mask R-CNN checkpoint for a Faster R-CNN (its masks would be dropped) or
    the reverse (its masks would come from random weights). As an initialisation for training
    (model.weights), each of those is a warning naming what training starts from initialisation and why:
    fine-tuning to a new label space replaces the predictors, a Faster R-CNN has no mask head."""
    setting = setting or ("--weights" if for_inference else "model.weights")
    name = f"{setting}={path}"
    if not os.path.isfile(path):
        raise CheckpointError(f"{name} not found")
    state = read_weights(path)
    kind = checkpoint_kind(state)
    if kind.source == "torchvision" and kind.is_detector:
        state = from_torchvision_detector(state)
    elif not (kind.source == "ours" and kind.is_detector):
        where = (" (a backbone or classifier goes in model.backbone.weights)"
                 if kind.model in ("classifier", "resnet", "backbone") and kind.source in ("ours", "torchvision") else "")
        raise CheckpointError(f"{name} is {kind.description}, not a detector checkpoint{where}{kind.hint()}")
    own = model.state_dict()
    built = "mask_rcnn" if any(k.startswith("roi_heads.mask_head.") for k in own) else "faster_rcnn"
    if kind.model != built:
        names = {"mask_rcnn": "Mask R-CNN", "faster_rcnn": "Faster R-CNN"}
        what = (f"{path} is a {names[kind.model]} checkpoint and the config builds a {names[built]}"
                + (" (model.name=mask_rcnn builds one; configs/mrcnn_*.yaml)" if kind.model == "mask_rcnn" else ""))
        if for_inference:
            consequence = ("its mask head would be dropped" if kind.model == "mask_rcnn" else
                           "the masks would come from an untrained mask head")
            raise CheckpointError(f"{what}: {consequence}")
        logger.warning("%s: %s", what, "its mask head is not used" if kind.model == "mask_rcnn"
                       else "the mask head starts from initialisation")
    file_classes, model_classes = (len(s[CLASS_SCORE]) - 1 if CLASS_SCORE in s else None for s in (state, own))
    new_classes = None not in (file_classes, model_classes) and file_classes != model_classes
    # Another class count reshapes the predictors, and only them: any other shape mismatch is an error
    # (check_fit), never skipped.
    reshaped = [k for k, v in state.items() if new_classes and k.startswith(CLASS_TENSORS)
                and k in own and v.shape != own[k].shape]
    if reshaped and for_inference:
        shapes = ", ".join(f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in reshaped)
        raise CheckpointError(f"{name} is a detector of {file_classes} classes and the config builds one of "
                              f"{model_classes} (model.num_classes): set model.num_classes={file_classes}, with "
                              f"data.categories to match the file's label space ({shapes})")
    state = {k: v for k, v in state.items() if k not in reshaped}
    report = check_fit(own, state, name)
    if for_inference and (report.missing or report.unexpected):
        problems = [f"{len(keys)} {what}: {key_list(keys)}" for what, keys in (
            ("of the model's tensors are not in it", report.missing),
            ("of its tensors have no place in the model", report.unexpected)) if keys]
        raise CheckpointError(
            f"{name} does not cover the model: " + "; ".join(problems) + ". A detector used as it is needs all "
            "of its tensors from the file (left at random initialisation they would give meaningless "
            "detections): use its run's complete checkpoint (model_final.pth), or, to train from this file, "
            "give it as model.weights to tools/train_det.py")
    model.load_state_dict(state, strict=False)
    logger.info("%s: %s", name, report.summary())
    if report.missing:
        mask = [k for k in report.missing if kind.model != built and k.startswith("roi_heads.mask_head.")
                and k not in reshaped]
        absent = [k for k in report.missing if k not in reshaped and k not in mask]
        reasons = [(reshaped, f"of the class predictors, as the file has {file_classes} classes and "
                              f"model.num_classes={model_classes} (a new label space, as in fine-tuning)"),
                   (mask, "of the mask head, which a Faster R-CNN checkpoint does not have"),
                   (absent, "not in the file")]
        logger.warning("%s leaves %d tensors at initialisation for training to learn: %s", name,
                       len(report.missing), "; ".join(f"{len(keys)} {why}: {key_list(keys)}"
                                                      for keys, why in reasons if keys))
    if report.unexpected:
        logger.warning("%s: %d tensors have no place in the model and are not used: %s", name,
                       len(report.unexpected), key_list(report.unexpected))
    return report
