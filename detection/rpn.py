"""Region Proposal Network (Ren et al. 2015, Sec. 3.1) over all FPN levels (Lin et al. 2017, Sec. 4.1).

Matching, sampling, proposal selection and NMS run on the whole batch at once; the only Python loop
is over pyramid levels.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import ConfigError

from .anchors import AnchorGenerator
from .box_coder import BoxCoder
from .losses import box_regression_loss
from .matcher import FOREGROUND, Matcher
from .sampler import BalancedSampler
from .structures import (ImageBatch, batched_box_iou, batched_nms, box_sizes_at_least, clip_boxes, pad_boxes,
                         size_min, top_k_per_image)


# What the RPN's losses are divided by: the anchors sampled over the batch (torchvision), or the sample
# size asked for, batch_size_per_image x images, however many were sampled (Detectron2, rpn.py `losses`).
LOSS_NORMALIZERS = ("sampled", "batch_size_per_image")


class RPNHead(nn.Module):
    """A 3x3 convolution shared by all levels, then per-anchor objectness logits and box deltas."""

    def __init__(self, in_channels: int, num_anchors: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.objectness = nn.Conv2d(in_channels, num_anchors, 1)
        self.deltas = nn.Conv2d(in_channels, num_anchors * 4, 1)
        for layer in (self.conv, self.objectness, self.deltas):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, features: List[torch.Tensor]):
        """Per level: logits (B, H*W*A) and deltas (B, H*W*A, 4), ordered (y, x, anchor)."""
        logits, deltas = [], []
        for x in features:
            t = F.relu(self.conv(x))
            b, _, h, w = t.shape
            logits.append(self.objectness(t).permute(0, 2, 3, 1).reshape(b, -1))
            d = self.deltas(t)
            deltas.append(d.view(b, -1, 4, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, 4))
        return logits, deltas


@dataclass(frozen=True)
class ProposalSelection:
    """How the RPN turns scored anchors into proposals (`RPN.select_proposals`); each field is the
    model.rpn key of the same name."""
    pre_nms_topk_train: int = 2000
    pre_nms_topk_test: int = 1000
    post_nms_topk_train: int = 2000
    post_nms_topk_test: int = 1000
    nms_thresh: float = 0.7
    min_box_size: float = 1e-3
    score_thresh: float = 0.0
    # Detectron2 (proposal_utils.find_top_rpn_proposals) keeps sides > min_box_size (Boxes.nonempty) and
    # runs NMS on the logits; torchvision keeps sides >= min_box_size and runs NMS on probabilities,
    # which saturate to 1.0 for logits above ~17 and so order high-scoring boxes differently.
    strict_min_size: bool = False
    nms_on_logits: bool = False

    def pre_nms_topk(self, training: bool) -> int:
        return self.pre_nms_topk_train if training else self.pre_nms_topk_test

    def post_nms_topk(self, training: bool) -> int:
        return self.post_nms_topk_train if training else self.post_nms_topk_test


class RPN(nn.Module):
    """Proposals from the `head`'s objectness and deltas over the `anchor_generator`'s anchors on the
    `in_features` maps; in training, its losses on anchors matched by `matcher`, drawn by `sampler` and
    encoded by `box_coder`. `detection.build.build_rpn` makes the parts from a config."""

    def __init__(self, *, in_features: Sequence[str], head: RPNHead, anchor_generator: AnchorGenerator,
                 matcher: Matcher, sampler: BalancedSampler, box_coder: BoxCoder,
                 selection: ProposalSelection = ProposalSelection(), box_loss: str = "smooth_l1",
                 smooth_l1_beta: float = 1 / 9, loss_normalizer: str = "sampled"):
        super().__init__()
        if loss_normalizer not in LOSS_NORMALIZERS:
            raise ConfigError(f"unknown RPN loss_normalizer {loss_normalizer!r}; valid: {', '.join(LOSS_NORMALIZERS)}")
        self.in_features = list(in_features)
        self.head = head
        self.anchor_generator = anchor_generator
        self.matcher = matcher
        self.sampler = sampler
        self.box_coder = box_coder
        self.selection = selection
        self.box_loss = box_loss
        self.smooth_l1_beta = smooth_l1_beta
        self.loss_normalizer = loss_normalizer

    def forward(self, images: ImageBatch, features: Dict[str, torch.Tensor],
                targets: Optional[List[Dict[str, torch.Tensor]]] = None):
        maps = [features[f] for f in self.in_features]
        logits, deltas = self.head(maps)
        anchors = self.anchor_generator([m.shape[-2:] for m in maps], images.padded_size)
        proposals = [self.box_coder.decode(d.detach(), a).squeeze(-2) for d, a in zip(deltas, anchors)]
        boxes = self.select_proposals(proposals, [l.detach() for l in logits], images)
        losses = {}
        if self.training:
            losses = self.losses(torch.cat(anchors), torch.cat(logits, 1), torch.cat(deltas, 1), targets)
        return boxes, losses

    @torch.no_grad()
    def select_proposals(self, proposals: List[torch.Tensor], logits: List[torch.Tensor],
                         images: ImageBatch) -> List[torch.Tensor]:
        """Per level the top-k by objectness, then clip, drop tiny and low-scoring boxes, NMS per image
        and level, and keep each image's best `post_nms_topk` (all settings from `self.selection`)."""
        num_images = logits[0].shape[0]
        settings = self.selection
        k_pre = settings.pre_nms_topk(self.training)
        boxes, scores, levels = [], [], []
        for lvl, (p, l) in enumerate(zip(proposals, logits)):
            top, idx = l.topk(size_min(k_pre, l.shape[1]), dim=1)
            boxes.append(torch.gather(p, 1, idx[..., None].expand(-1, -1, 4)))
            scores.append(top)
            levels.append(torch.full_like(idx, lvl))
        boxes = clip_boxes(torch.cat(boxes, 1), images.sizes_tensor())
        logits = torch.cat(scores, 1)
        scores = logits.sigmoid()
        groups = torch.cat(levels, 1) + len(proposals) * torch.arange(num_images, device=scores.device)[:, None]
        if settings.strict_min_size:
            w, h = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
            large = (w > settings.min_box_size) & (h > settings.min_box_size)
        else:
            large = box_sizes_at_least(boxes, settings.min_box_size)
        keep = large & (scores >= settings.score_thresh)
        boxes, scores, logits, groups = boxes[keep], scores[keep], logits[keep], groups[keep]
        kept = batched_nms(boxes, logits if settings.nms_on_logits else scores, groups, settings.nms_thresh)
        image_ids = groups[kept] // len(proposals)
        kept = kept[top_k_per_image(image_ids, settings.post_nms_topk(self.training), num_images)]
        image_ids = groups[kept] // len(proposals)
        return [boxes[kept[image_ids == i]] for i in range(num_images)]

    def losses(self, anchors, logits, deltas, targets):
        if targets is None:
            raise ValueError("the RPN needs targets in training mode")
        gt, valid = pad_boxes([t["boxes"] for t in targets])
        iou = batched_box_iou(gt, anchors.expand(len(targets), -1, -1))
        matched, labels = self.matcher(iou, valid)
        fg, bg = self.sampler(labels)
        sampled = fg | bg
        if self.loss_normalizer == "batch_size_per_image":
            normalizer = self.sampler.batch_size_per_image * len(targets)
        else:
            normalizer = sampled.sum().clamp(min=1)
        objectness_loss = F.binary_cross_entropy_with_logits(
            logits[sampled], (labels[sampled] == FOREGROUND).to(logits.dtype), reduction="sum") / normalizer
        matched_boxes = torch.gather(gt, 1, matched[..., None].expand(-1, -1, 4))
        target_deltas = self.box_coder.encode(matched_boxes[fg], anchors.expand(len(targets), -1, -1)[fg])
        box_loss = box_regression_loss(deltas[fg], target_deltas, self.box_loss,
                                       self.smooth_l1_beta) / normalizer
        return {"loss_objectness": objectness_loss, "loss_rpn_box_reg": box_loss}
