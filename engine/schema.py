"""Every config key the toolkit reads: its type, default, allowed values and a one-line description.

`engine.config` derives the defaults, the validation and the "did you mean" suggestions from `SCHEMA`,
so adding a key is one `Opt` line here and nothing else. Search this file for a key to find what it
means; search the code for the dotted key to find where it is used.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

NoneType = type(None)


@dataclass(frozen=True)
class Opt:
    """One config key.

    `type` is a type or a tuple of types; `None` in the tuple makes the key optional (`(str, None)`).
    `elem` is the element type of a list. `choices`, when given, lists every accepted value. `min`, when
    given, is the smallest accepted number (of the value, or of each element of a list).
    """

    type: type | tuple
    default: Any
    choices: tuple | None = None
    elem: type | None = None
    help: str = ""
    min: int | None = None

    def __post_init__(self):
        # A set would make the order of the values in error messages change from run to run.
        if self.choices is not None:
            object.__setattr__(self, "choices", tuple(self.choices))

    @property
    def types(self) -> tuple[type, ...]:
        spec = self.type if isinstance(self.type, tuple) else (self.type,)
        return tuple(NoneType if t is None else t for t in spec)


_NORMS = ("BN", "FrozenBN", "SyncBN", "GN")


def _split(name: str) -> dict:
    return {
        "root": Opt((str, None), None, help=f"directory of the {name} split; null: the default under data.root"),
        "ann_file": Opt((str, None), None, help=f"annotation file of the {name} split; null: the dataset's default"),
        "img_dir": Opt((str, None), None, help=f"image directory of the {name} split; null: the dataset's default"),
    }


SCHEMA: dict = {
    "model": {
        "name": Opt(str, "resnet_fpn", choices=("classifier", "resnet_fpn", "faster_rcnn", "mask_rcnn"),
                    help="which model the builder makes"),
        "channels_last": Opt(bool, False, help="NHWC memory format for the model and its inputs (faster "
                                               "convolutions on GPUs and recent CPUs; same outputs)"),
        "compile": Opt(bool, False, help="torch.compile the model for training and inference (a detector's backbone "
                                         "and FPN, a whole classifier); its first iterations compile, export never "
                                         "does; same outputs and checkpoints"),
        "compile_mode": Opt(str, "default", choices=("default", "reduce-overhead", "max-autotune"),
                            help="torch.compile's mode when model.compile is on"),
        "num_classes": Opt(int, 1000, min=1, help="classes of the classifier; foreground classes of a detector"),
        "label_space": Opt(str, "contiguous", choices=("contiguous", "category_id"),
                           help="detector label i is data.categories[i-1] ('contiguous') or category id i"),
        "weights": Opt((str, None), None, help="checkpoint for the whole model; null: none"),
        "backbone": {
            "depth": Opt(int, 50, choices=(18, 34, 50, 101, 152), help="ResNet depth"),
            "groups": Opt(int, 1, min=1, help="ResNeXt cardinality; 1 is a plain ResNet"),
            "width_per_group": Opt(int, 64, min=1, help="bottleneck width per group (64 = ResNet, 128 = wide ResNet)"),
            "norm": Opt(str, "BN", choices=_NORMS, help="normalization layer of the backbone"),
            "num_groups": Opt(int, 32, min=1, help="number of groups when norm is GN"),
            "freeze_at": Opt(int, 0, min=0, help="1 freezes the stem, k = 2..5 the stem and res2..res{k}; 0 trains all"),
            "stride_in_1x1": Opt(bool, False, help="put the bottleneck stride in the 1x1 conv (Caffe/MSRA style)"),
            "zero_init_residual": Opt(bool, False, help="zero the last norm of each residual branch (Goyal et al.)"),
            "dilation": Opt(list, [False, False, False], elem=bool, help="dilate, not stride, in res3, res4, res5"),
            "shortcut": Opt(str, "B", choices=("A", "B", "C"), help="shortcut option of He et al. 2016, Table 3"),
            "plain": Opt(bool, False, help="drop the shortcuts (the 'plain' networks of He et al. 2016)"),
            "stem_type": Opt(str, "basic", choices=("basic", "deep"),
                             help="'basic': one 7x7 conv; 'deep': three 3x3 convs of 32, 32, 64 channels "
                                  "(ResNet-C/D, He et al. 2019 'Bag of Tricks'; timm's resnet50c/d)"),
            "avg_down": Opt(bool, False, help="projection shortcuts: 2x2 average pool, then a stride-1 1x1 "
                                              "(ResNet-D; timm's resnet50d)"),
            "out_features": Opt(list, ["res2", "res3", "res4", "res5"], elem=str, help="stages the backbone returns"),
            "weights": Opt((str, None), None, help="checkpoint for the backbone only; null: random init"),
        },
        "fpn": {
            "out_channels": Opt(int, 256, min=1, help="channels of every FPN output"),
            "norm": Opt(str, "", choices=("",) + _NORMS, help="normalization after FPN convs; '' for none"),
            "top_block": Opt(str, "maxpool", choices=("maxpool", "p6p7", "none"), help="levels above the last stage"),
        },
        "anchors": {
            "sizes": Opt(list, [[32], [64], [128], [256], [512]], elem=list, help="anchor sizes per level, in pixels"),
            "aspect_ratios": Opt(list, [[0.5, 1.0, 2.0]], elem=list, help="height/width ratios per level (one list: all)"),
            "stride_mode": Opt(str, "backbone", choices=("backbone", "padded_image"),
                               help="anchor spacing: backbone stride, or padded size // feature size (torchvision)"),
            "round": Opt(bool, True, help="round cell anchors to integers (torchvision, the original Faster R-CNN); "
                                          "false: exact sizes, as Detectron2 (32, ratio 0.5: +-22.627 x +-11.314)"),
        },
        "rpn": {
            "in_features": Opt(list, ["0", "1", "2", "3", "pool"], elem=str, help="backbone outputs the RPN runs on"),
            "iou_thresholds": Opt(list, [0.3, 0.7], elem=float, help="IoU below the first: background; above the second: object"),
            "batch_size_per_image": Opt(int, 256, min=1, help="anchors sampled per image for the losses"),
            "positive_fraction": Opt(float, 0.5, help="largest share of object anchors in the sample"),
            "pre_nms_topk_train": Opt(int, 2000, min=1, help="proposals kept per level before NMS, training"),
            "pre_nms_topk_test": Opt(int, 1000, min=1, help="proposals kept per level before NMS, inference"),
            "post_nms_topk_train": Opt(int, 2000, min=1, help="proposals kept per image after NMS, training"),
            "post_nms_topk_test": Opt(int, 1000, min=1, help="proposals kept per image after NMS, inference"),
            "nms_thresh": Opt(float, 0.7, help="IoU threshold of the proposals' NMS"),
            "min_box_size": Opt(float, 1e-3, help="proposals narrower or lower than this (pixels) are dropped"),
            "strict_min_size": Opt(bool, False, help="keep proposals whose sides are > min_box_size, not >= "
                                                     "(Detectron2: min_box_size 0 drops only empty boxes)"),
            "nms_on_logits": Opt(bool, False, help="order the proposals' NMS by objectness logits (Detectron2), not "
                                                   "by probabilities, which tie at 1.0 for logits above ~17"),
            "score_thresh": Opt(float, 0.0, help="proposals with a lower objectness probability are dropped"),
            "box_loss": Opt(str, "smooth_l1", choices=("smooth_l1", "l1"), help="box regression loss"),
            "smooth_l1_beta": Opt(float, 1 / 9, help="smooth-L1 transition point"),
            "loss_normalizer": Opt(str, "sampled", choices=("sampled", "batch_size_per_image"),
                                   help="divide the losses by the anchors sampled (torchvision) or by "
                                        "batch_size_per_image x images, however many were sampled (Detectron2)"),
        },
        "roi_heads": {
            "in_features": Opt(list, ["0", "1", "2", "3"], elem=str, help="backbone outputs RoIs are pooled from"),
            "pooler_resolution": Opt(int, 7, min=1, help="RoIAlign output size"),
            "sampling_ratio": Opt(int, 2, min=0, help="RoIAlign samples per bin side; 0: adaptive"),
            "aligned": Opt(bool, False, help="RoIAlign with the half-pixel shift (Detectron2: true)"),
            "canonical_box_size": Opt(float, 224.0, help="FPN Eq. 1: boxes this large are pooled from canonical_level"),
            "canonical_level": Opt(int, 4, min=0, help="FPN Eq. 1: k0"),
            "level_formula": Opt(str, "shifted", choices=("shifted", "detectron2"),
                                 help="FPN Eq. 1 in floats: 'shifted' adds 1e-6 after the log2 (canonical boxes stay "
                                      "on k0); 'detectron2' adds 2.2e-16 inside it (no effect in float32)"),
            "box_head": Opt(str, "2fc", choices=("2fc", "4conv1fc"), help="box head layout"),
            "fc_dim": Opt(int, 1024, min=1, help="width of the box head's fully connected layers"),
            "conv_dim": Opt(int, 256, min=1, help="width of the 4conv1fc head's convolutions"),
            "norm": Opt(str, "", choices=("",) + _NORMS, help="norm in the 4conv1fc head's convolutions"),
            "iou_threshold": Opt(float, 0.5, help="proposals with IoU >= this are foreground"),
            "batch_size_per_image": Opt(int, 512, min=1, help="RoIs sampled per image for the losses"),
            "positive_fraction": Opt(float, 0.25, help="largest share of foreground RoIs in the sample"),
            "bbox_reg_weights": Opt(list, [10.0, 10.0, 5.0, 5.0], elem=float, help="box coder weights (wx, wy, ww, wh)"),
            "append_gt_boxes": Opt(bool, True, help="add the ground-truth boxes to the proposals in training"),
            "min_box_size": Opt(float, 1e-2, help="detections narrower or lower than this (pixels) are dropped"),
            "box_loss": Opt(str, "smooth_l1", choices=("smooth_l1", "l1"), help="box regression loss"),
            "smooth_l1_beta": Opt(float, 1 / 9, help="smooth-L1 transition point"),
        },
        "mask_head": {
            "in_features": Opt(list, ["0", "1", "2", "3"], elem=str, help="backbone outputs mask RoIs are pooled from"),
            "pooler_resolution": Opt(int, 14, min=1, help="RoIAlign output size of the mask branch"),
            "sampling_ratio": Opt(int, 2, min=0, help="RoIAlign samples per bin side; 0: adaptive"),
            "num_conv": Opt(int, 4, min=0, help="3x3 convolutions before the 2x deconvolution"),
            "conv_dim": Opt(int, 256, min=1, help="width of the mask head's convolutions"),
            "norm": Opt(str, "", choices=("",) + _NORMS, help="norm in the mask head's convolutions"),
            "class_agnostic": Opt(bool, False, help="one mask per RoI instead of one per class"),
            "binary_targets": Opt(bool, False, help="threshold the ground-truth masks resampled into each RoI at "
                                                    "0.5 (Detectron2); false: their fractions in [0, 1] (torchvision)"),
            "paste_mode": Opt(str, "torchvision", choices=("torchvision", "detectron2"),
                              help="mask pasting: 'torchvision' pads the mask and grows its box to whole pixels; "
                                   "'detectron2' samples the mask bilinearly over the box as it is"),
        },
    },
    "input": {
        "size": Opt(int, 224, min=1, help="classification crop size"),
        "crop_scale": Opt(list, [0.08, 1.0], elem=float,
                          help="classification training: area range of RandomResizedCrop, as fractions of the image"),
        "format": Opt(str, "RGB", choices=("RGB", "BGR"), help="channel order the model's weights expect"),
        "pixel_scale": Opt(float, 1.0, help="multiplier on [0, 1] pixels before normalising: 1.0 or 255.0"),
        "pixel_mean": Opt(list, [0.485, 0.456, 0.406], elem=float, help="per-channel mean, in the model's format and scale"),
        "pixel_std": Opt(list, [0.229, 0.224, 0.225], elem=float, help="per-channel std, in the model's format and scale"),
        "size_divisibility": Opt(int, 32, min=1, help="batches are padded to a multiple of this"),
        "min_size_train": Opt(list, [800], elem=int, min=1, help="shorter side at training, one drawn per image"),
        "max_size_train": Opt(int, 1333, min=1, help="cap on the longer side at training"),
        "min_size_test": Opt(int, 800, min=1, help="shorter side at test"),
        "flip_prob": Opt(float, 0.5, help="detection training: probability of a horizontal flip"),
        "lsj_size": Opt(int, 0, min=0, help="detection training: large-scale jitter to this square size; 0: off"),
        "lsj_min_scale": Opt(float, 0.1, help="large-scale jitter: smallest scale"),
        "lsj_max_scale": Opt(float, 2.0, help="large-scale jitter: largest scale"),
        "max_size_test": Opt(int, 1333, min=1, help="cap on the longer side at test"),
        "resize_mode": Opt(str, "interpolate", choices=("interpolate", "pil"),
                           help="detector resize (model, data loader and export alike): 'interpolate' = sides "
                                "rounded down, bilinear on the normalised float image (torchvision); 'pil' = "
                                "Detectron2's: sides rounded with int(x + 0.5), PIL bilinear on the uint8 image, "
                                "then normalisation"),
        "train_resize": Opt(str, "loader", choices=("loader", "model"),
                            help="detection training: who resizes the images to min_size_train: 'loader' = the "
                                 "data loader's workers, with the other augmentations (uint8, before the batch); "
                                 "'model' = the model's pre-processing, on the raw images (torchvision's contract)"),
    },
    "data": {
        "root": Opt(str, "datasets", help="directory that holds the datasets"),
        "num_workers": Opt(int, 2, min=0, help="DataLoader worker processes"),
        "pin_memory": Opt(bool, True, help="page-locked batches for faster host-to-GPU copies (CUDA only)"),
        "filter_empty": Opt(bool, True, help="detection training: skip images without usable annotations"),
        "skip_bad_images": Opt(bool, False, help="skip unreadable images (logged and counted) instead of stopping"),
        "train": _split("training"),
        "val": _split("validation"),
        "categories": Opt(list, [], elem=dict, help="[{id: int, name: str}, ...] in the detector's class order"),
    },
    "solver": {
        "optimizer": Opt(str, "SGD", choices=("SGD", "AdamW"), help="SGD with momentum, or AdamW"),
        "base_lr": Opt(float, 0.1, help="learning rate for ims_per_batch images"),
        "momentum": Opt(float, 0.9, help="SGD momentum (AdamW keeps its default betas)"),
        "weight_decay": Opt(float, 1e-4, help="SGD weight decay"),
        "ims_per_batch": Opt(int, 16, min=1, help="images per step, summed over all processes"),
        "max_iter": Opt(int, 1000, min=1, help="training length in iterations (detection)"),
        "epochs": Opt(int, 90, min=1, help="training length in epochs (classification)"),
        "steps": Opt(list, [], elem=int, min=0, help="iterations or epochs at which the step schedule multiplies lr by gamma"),
        "gamma": Opt(float, 0.1, help="lr factor at each of solver.steps"),
        "warmup_iters": Opt(int, 0, min=0, help="linear lr warm-up length in iterations; 0: none"),
        "warmup_factor": Opt(float, 0.001, help="lr multiplier at the first warm-up iteration"),
        "no_weight_decay_norm_bias": Opt(bool, False, help="exempt norm-layer parameters and biases from weight decay"),
        "clip_grad_norm": Opt(float, 0.0, help="clip the gradients' total L2 norm to this; 0: no clipping"),
        "log_period": Opt(int, 20, min=1, help="write metrics.jsonl / TensorBoard every this many iterations"),
        "lr_scheduler": Opt(str, "step", choices=("step", "cosine"), help="lr schedule"),
        "checkpoint_period": Opt(int, 5000, min=0, help="save a checkpoint every this many iterations"),
        "amp": Opt(bool, False, help="mixed-precision training (autocast with gradient scaling for float16)"),
        "amp_dtype": Opt(str, "float16", choices=("float16", "bfloat16"), help="autocast dtype when solver.amp"),
        "reference_batch_size": Opt(int, 0, min=0, help="> 0: base_lr is for this many images and the lr used is "
                                    "base_lr * ims_per_batch / reference_batch_size (linear scaling); 0: base_lr as is"),
        "reference_world_size": Opt(int, 0, min=0, help="> 0: the batch (ims_per_batch), lr and schedule are written for this many "
                                    "processes; with another number they are rescaled, keeping the images per process "
                                    "(linear scaling rule); an ims_per_batch given on the command line is the batch "
                                    "of the run, the rest scaled from the file's; 0: used as written"),
        "label_smoothing": Opt(float, 0.0, help="classification: label smoothing of the cross-entropy (0: none)"),
        "ema": Opt(bool, False, help="classification: keep an exponential moving average of the weights, "
                   "evaluated and exported as backbone.pth"),
        "ema_decay": Opt(float, 0.9999, help="solver.ema: weight of the old average at each step"),
    },
    "test": {
        "eval_period": Opt(int, 0, min=0, help="evaluate every this many iterations; 0: only at the end"),
        "ims_per_batch": Opt(int, 1, min=1, help="images per forward pass in evaluation (per process). Above 1, "
                             "images of different sizes are padded to the largest, which moves detections "
                             "near the padded borders slightly; 1 gives the reference implementations' numbers"),
        "score_thresh": Opt(float, 0.05, help="detections with a lower class probability are dropped"),
        "nms_thresh": Opt(float, 0.5, help="IoU threshold of the per-class NMS"),
        "detections_per_img": Opt(int, 100, min=1, help="detections kept per image"),
        "drop_empty_boxes": Opt(bool, False, help="clip the detections to the input image after rescaling and "
                                                  "drop those of zero width or height (Detectron2)"),
        "mask_thresh": Opt(float, 0.5, help="mask probability at or above which a pixel belongs to the object"),
        "evaluator_backend": Opt(str, "pycocotools", choices=("pycocotools", "faster_coco_eval"),
                                 help="COCO evaluator; both give the same numbers, faster_coco_eval sooner"),
    },
    "output_dir": Opt(str, "output/default", help="where checkpoints, logs and config.yaml go"),
    "seed": Opt(int, 0, min=0, help="random seed"),
    "device": Opt(str, "auto", help="torch device; 'auto': cuda when available, else cpu"),
    "cudnn_benchmark": Opt(bool, False, help="cuDNN autotuning on CUDA (pays off for fixed input sizes)"),
    "deterministic": Opt(bool, False, help="deterministic algorithms only (torch.use_deterministic_algorithms; "
                                           "on CUDA also deterministic cuDNN without autotuning and cuBLAS "
                                           "workspaces): runs repeat bit for bit on one machine, slower"),
}


# Short names that command lines and scripts use, accepted in KEY=VALUE overrides: `model.depth=101`
# sets model.backbone.depth (the ResNet of a classifier and of a detector alike).
OVERRIDE_ALIASES = {"model.depth": "model.backbone.depth"}


def defaults(schema: dict = SCHEMA) -> dict:
    """The default config as a fresh nested dict (list defaults are copied, so callers may mutate them)."""
    return {key: defaults(spec) if isinstance(spec, dict) else copy.deepcopy(spec.default)
            for key, spec in schema.items()}


def all_keys(include_sections: bool = False, schema: dict = SCHEMA, prefix: str = "") -> list[str]:
    """Every dotted key ("model.backbone.depth", ...); with `include_sections`, also "model", "model.backbone", ..."""
    keys = []
    for key, spec in schema.items():
        dotted = prefix + key
        if isinstance(spec, dict):
            if include_sections:
                keys.append(dotted)
            keys.extend(all_keys(include_sections, spec, dotted + "."))
        else:
            keys.append(dotted)
    return keys
