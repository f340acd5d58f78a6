"""The second stage of Faster R-CNN (Ren et al. 2015; Girshick 2015): per-RoI classification and
class-specific box regression over pooled FPN features, with training-time matching and sampling and
inference-time score thresholding and per-class NMS, all batched across images."""
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from backbones.norms import get_norm

from .box_coder import BoxCoder
from .losses import box_regression_loss
from .matcher import Matcher
from .poolers import MultiScaleRoIAlign
from .sampler import BalancedSampler
from .structures import batched_box_iou, batched_nms, box_sizes_at_least, clip_boxes, pad_boxes, top_k_per_image


class BoxHead(nn.Module):
    """`num_conv` 3x3 convolutions then `num_fc` fully connected layers, ReLU after each: 0 + 2 is the
    FPN paper's 2-fc head (2mlp), 4 + 1 the "4conv1fc" head of the GroupNorm paper."""

    def __init__(self, in_channels: int, resolution: int, num_conv: int = 0, conv_dim: int = 256,
                 num_fc: int = 2, fc_dim: int = 1024, norm: str = ""):
        super().__init__()
        convs = []
        for i in range(num_conv):
            convs.append(nn.Conv2d(in_channels if i == 0 else conv_dim, conv_dim, 3, padding=1, bias=not norm))
            if norm:
                convs.append(get_norm(norm, conv_dim))
            convs.append(nn.ReLU(inplace=True))
        self.convs = nn.Sequential(*convs)
        channels = conv_dim if num_conv else in_channels
        dims = [channels * resolution * resolution] + [fc_dim] * num_fc
        for i in range(num_fc):
            setattr(self, f"fc{i + 1}", nn.Linear(dims[i], dims[i + 1]))
        self.num_fc = num_fc
        self.out_dim = dims[-1]

    def forward(self, x):
        x = self.convs(x).flatten(1)
        for i in range(self.num_fc):
            x = F.relu(getattr(self, f"fc{i + 1}")(x))
        return x


class BoxPredictor(nn.Module):
    """Class scores over background (index 0) + K classes and class-specific box deltas."""

    def __init__(self, in_dim: int, num_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(in_dim, num_classes + 1)
        self.bbox_pred = nn.Linear(in_dim, (num_classes + 1) * 4)
        self.num_classes = num_classes
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x):
        return self.cls_score(x), self.bbox_pred(x)


class RoIHeads(nn.Module):
    """Per-RoI class scores and boxes: the `pooler`'s features of each proposal through `box_head` and
    `predictor`; in training, its losses on proposals matched by `matcher`, drawn by `sampler` and encoded
    by `box_coder`; at inference, the detections above `score_thresh` after per-class NMS, at most
    `detections_per_img` per image. `detection.build.build_roi_heads` makes the parts from a config."""

    def __init__(self, *, pooler: MultiScaleRoIAlign, box_head: nn.Module, predictor: BoxPredictor,
                 matcher: Matcher, sampler: BalancedSampler, box_coder: BoxCoder, append_gt_boxes: bool = True,
                 score_thresh: float = 0.05, nms_thresh: float = 0.5, detections_per_img: int = 100,
                 min_box_size: float = 1e-2, box_loss: str = "smooth_l1", smooth_l1_beta: float = 1 / 9):
        super().__init__()
        self.pooler = pooler
        self.box_head = box_head
        self.predictor = predictor
        self.num_classes = predictor.num_classes
        self.matcher = matcher
        self.sampler = sampler
        self.box_coder = box_coder
        self.append_gt_boxes = append_gt_boxes
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.min_box_size = min_box_size
        self.box_loss = box_loss
        self.smooth_l1_beta = smooth_l1_beta

    def forward(self, features: Dict[str, torch.Tensor], proposals: List[torch.Tensor],
                image_sizes: torch.Tensor, targets: Optional[List[Dict[str, torch.Tensor]]] = None):
        if self.training:
            if targets is None:
                raise ValueError("the RoI heads need targets in training mode")
            proposals, labels, box_targets, matched = self.sample_proposals(proposals, targets)
        logits, deltas = self.predictor(self.box_head(self.pooler(features, proposals)))
        if self.training:
            losses = self.losses(logits, deltas, labels, box_targets)
            return [], {**losses, **self.branch_losses(features, proposals, labels, matched, targets)}
        return self.branch_outputs(features, self.detect(logits, deltas, proposals, image_sizes)), {}

    # Hooks for heads that run further branches on the same RoIs (Mask R-CNN's mask branch).
    def branch_losses(self, features, proposals, labels, matched, targets) -> Dict[str, torch.Tensor]:
        """Extra losses from the sampled RoIs (`sample_proposals`' outputs)."""
        return {}

    def branch_outputs(self, features, detections):
        """Extra outputs for the final detections (boxes in the resized image's pixels)."""
        return detections

    @torch.no_grad()
    def sample_proposals(self, proposals, targets):
        """Match proposals (plus the ground truth itself, so every object has perfect positives) to
        ground truth and draw the sampler's balanced share of them.

        Returns the sampled boxes per image, and over all of them in order: class labels (0 background),
        box regression targets and the index of the matched ground truth within its image."""
        if self.append_gt_boxes:
            proposals = [torch.cat([p, t["boxes"].to(p.dtype)]) for p, t in zip(proposals, targets)]
        props, prop_valid = pad_boxes(proposals)
        gt, gt_valid = pad_boxes([t["boxes"] for t in targets])
        matched, labels = self.matcher(batched_box_iou(gt, props), gt_valid)
        labels[~prop_valid] = -1
        fg, bg = self.sampler(labels)
        keep = fg | bg
        classes = pad_labels([t["labels"] for t in targets], gt.shape[1], props.device)
        cls = torch.gather(classes, 1, matched) * fg
        matched_boxes = torch.gather(gt, 1, matched[..., None].expand(-1, -1, 4))
        box_targets = self.box_coder.encode(matched_boxes, props)
        sampled = [props[i][keep[i]] for i in range(len(proposals))]
        return sampled, cls[keep], box_targets[keep], matched[keep]

    def losses(self, logits, deltas, labels, box_targets):
        # Summed and divided, not averaged: a batch without any sampled RoI gives 0, not NaN.
        classification = F.cross_entropy(logits, labels, reduction="sum") / max(labels.numel(), 1)
        fg = torch.nonzero(labels > 0).squeeze(1)
        deltas = deltas.reshape(len(deltas), self.num_classes + 1, 4)[fg, labels[fg]]
        box = box_regression_loss(deltas, box_targets[fg], self.box_loss, self.smooth_l1_beta)
        return {"loss_classifier": classification, "loss_box_reg": box / max(labels.numel(), 1)}

    @torch.no_grad()
    def detect(self, logits, deltas, proposals, image_sizes):
        """Softmax, per-class decoding, clipping, score threshold, per-class NMS and top-k per image."""
        # Each RoI's image index, built from tensors (no Python counts, which torch.export cannot know).
        image_ids = torch.cat([torch.full_like(p[:, 0], i, dtype=torch.long) for i, p in enumerate(proposals)])
        boxes = self.box_coder.decode(deltas, torch.cat(proposals))  # (R, K+1, 4)
        boxes = clip_boxes(boxes, image_sizes[image_ids])
        scores = F.softmax(logits, -1)
        # Drop the background column, then one candidate per (RoI, class).
        boxes, scores = boxes[:, 1:], scores[:, 1:]
        labels = torch.arange(1, self.num_classes + 1, device=logits.device).expand_as(scores)
        ids = image_ids[:, None].expand_as(scores)
        boxes, scores, labels, ids = boxes.reshape(-1, 4), scores.reshape(-1), labels.reshape(-1), ids.reshape(-1)
        keep = (scores > self.score_thresh) & box_sizes_at_least(boxes, self.min_box_size)
        boxes, scores, labels, ids = boxes[keep], scores[keep], labels[keep], ids[keep]
        kept = batched_nms(boxes, scores, ids * (self.num_classes + 1) + labels, self.nms_thresh)
        kept = kept[top_k_per_image(ids[kept], self.detections_per_img, len(proposals))]
        ids = ids[kept]
        return [{"boxes": boxes[kept[ids == i]], "scores": scores[kept[ids == i]],
                 "labels": labels[kept[ids == i]]} for i in range(len(proposals))]


def pad_labels(labels: List[torch.Tensor], m: int, device) -> torch.Tensor:
    out = torch.zeros(len(labels), m, dtype=torch.long, device=device)
    for i, l in enumerate(labels):
        out[i, : len(l)] = l
    return out
