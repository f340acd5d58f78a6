"""Loading a whole detector's weights: ours, or torchvision's converted on the fly. The sequence is
`backbones.weights.load_weights`; this module holds the detector's rules around it (the class count, Faster
vs Mask R-CNN, and, for inference, a file that covers the model)."""
import logging
from dataclasses import dataclass, field
from typing import List, Optional

from backbones.weights import Accepts, key_list, load_weights
from engine.errors import CheckpointError

from .conversion.torchvision import from_torchvision_detector

logger = logging.getLogger(__name__)


# The tools' --weights: a whole detector, which build_detector(weights=..., for_inference=True) loads.
WEIGHTS_HELP = ("the whole detector, ours or torchvision's; model.backbone.weights is not read, and a file that "
                "does not cover the model is an error")

DETECTOR_WEIGHTS = Accepts(
    "a detector checkpoint",
    {("ours", "faster_rcnn"): None, ("ours", "mask_rcnn"): None,
     ("torchvision", "faster_rcnn"): from_torchvision_detector,
     ("torchvision", "mask_rcnn"): from_torchvision_detector},
    model="detector",
    elsewhere=dict.fromkeys(("classifier", "resnet", "backbone"),
                            " (a backbone or classifier goes in model.backbone.weights)"))
# For inference, after the names of the tensors a file lacks or has no place for.
COMPLETE = ("A detector used as it is needs all of its tensors from the file (left at random initialisation they "
            "would give meaningless detections): use its run's complete checkpoint (model_final.pth), or, to train "
            "from this file, give it as model.weights to tools/train_det.py")

# Tensors whose shape follows model.num_classes: the box predictor's (K + 1 classes, 4 deltas each) and the
# mask predictor's (K + 1 masks, one when class-agnostic).
CLASS_TENSORS = ("roi_heads.predictor.", "roi_heads.mask_head.predictor.")
CLASS_SCORE = "roi_heads.predictor.cls_score.weight"
NAMES = {"mask_rcnn": "Mask R-CNN", "faster_rcnn": "Faster R-CNN"}


@dataclass
class _DetectorRules:
    """`load_weights`'s `adapt` for a detector, remembering what it set aside for the warnings after loading."""
    path: str
    name: str
    for_inference: bool
    reshaped: List[str] = field(default_factory=list)
    other_model: bool = False  # a Faster R-CNN file for a Mask R-CNN or the reverse
    classes: tuple = (None, None)  # (the file's, the model's)

    def __call__(self, state, kind, own):
        built = "mask_rcnn" if any(k.startswith("roi_heads.mask_head.") for k in own) else "faster_rcnn"
        self.other_model = kind.model != built
        if self.other_model:
            what = (f"{self.path} is a {NAMES[kind.model]} checkpoint and the config builds a {NAMES[built]}"
                    + (" (model.name=mask_rcnn builds one; configs/mrcnn_*.yaml)" if kind.model == "mask_rcnn" else ""))
            if self.for_inference:
                consequence = ("its mask head would be dropped" if kind.model == "mask_rcnn" else
                               "the masks would come from an untrained mask head")
                raise CheckpointError(f"{what}: {consequence}")
            logger.warning("%s: %s", what, "its mask head is not used" if kind.model == "mask_rcnn"
                           else "the mask head starts from initialisation")
        self.classes = file_classes, model_classes = tuple(len(s[CLASS_SCORE]) - 1 if CLASS_SCORE in s else None
                                                           for s in (state, own))
        new_classes = None not in self.classes and file_classes != model_classes
        # Another class count reshapes the predictors, and only them: any other shape mismatch is an error
        # (check_fit), never skipped.
        self.reshaped = [k for k, v in state.items() if new_classes and k.startswith(CLASS_TENSORS)
                         and k in own and v.shape != own[k].shape]
        if self.reshaped and self.for_inference:
            shapes = ", ".join(f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                               for k in self.reshaped)
            raise CheckpointError(f"{self.name} is a detector of {file_classes} classes and the config builds one of "
                                  f"{model_classes} (model.num_classes): set model.num_classes={file_classes}, with "
                                  f"data.categories to match the file's label space ({shapes})")
        return {k: v for k, v in state.items() if k not in self.reshaped}

    def warn(self, report):
        """What training starts from initialisation, and why; what in the file is not used."""
        if report.missing:
            mask = [k for k in report.missing if self.other_model and k.startswith("roi_heads.mask_head.")
                    and k not in self.reshaped]
            absent = [k for k in report.missing if k not in self.reshaped and k not in mask]
            reasons = [(self.reshaped, f"of the class predictors, as the file has {self.classes[0]} classes and "
                                       f"model.num_classes={self.classes[1]} (a new label space, as in fine-tuning)"),
                       (mask, "of the mask head, which a Faster R-CNN checkpoint does not have"),
                       (absent, "not in the file")]
            logger.warning("%s leaves %d tensors at initialisation for training to learn: %s", self.name,
                           len(report.missing), "; ".join(f"{len(keys)} {why}: {key_list(keys)}"
                                                          for keys, why in reasons if keys))
        if report.unexpected:
            logger.warning("%s: %d tensors have no place in the model and are not used: %s", self.name,
                           len(report.unexpected), key_list(report.unexpected))


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
    rules = _DetectorRules(path, f"{setting}={path}", for_inference)
    report = load_weights(model, path, setting, DETECTOR_WEIGHTS, adapt=rules,
                          complete=COMPLETE if for_inference else "")
    rules.warn(report)
    return report
