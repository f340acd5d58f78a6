"""Region Proposal Network (Ren et al. 2015, Sec. 3.1) over all FPN levels (Lin et al. 2017, Sec. 4.1).

Matching, sampling, proposal selection and NMS run on the whole batch at once; the only Python loop
is over pyramid levels.
"""
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from backbones.base import ShapeSpec
from engine.errors import ConfigError

from .anchors import AnchorGenerator
from .box_coder import BoxCoder
from .losses import box_regression_loss
from .matcher import FOREGROUND, Matcher, sample_balanced
from .structures import (ImageBatch, batched_box_iou, batched_nms, box_sizes_at_least, clip_boxes, pad_boxes,
                         size_min, top_k_per_image)


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


class RPN(nn.Module):
    def __init__(self, input_shape: Dict[str, ShapeSpec], *, anchor_sizes: Sequence[Sequence[float]],
                 aspect_ratios: Sequence[Sequence[float]], anchor_stride_mode: str = "backbone",
                 iou_thresholds: Sequence[float] = (0.3, 0.7), batch_size_per_image: int = 256,
                 positive_fraction: float = 0.5, pre_nms_topk_train: int = 2000,
                 pre_nms_topk_test: int = 1000, post_nms_topk_train: int = 2000,
                 post_nms_topk_test: int = 1000, nms_thresh: float = 0.7, min_box_size: float = 1e-3,
                 score_thresh: float = 0.0, box_loss: str = "smooth_l1", smooth_l1_beta: float = 1 / 9,
                 round_anchors: bool = True, strict_min_size: bool = False, nms_on_logits: bool = False):
        super().__init__()
        self.in_features = list(input_shape)
        channels = {s.channels for s in input_shape.values()}
        if len(channels) != 1:
            raise ConfigError(f"the RPN head is shared across levels and needs equal channels, got {channels}")
        if len(anchor_sizes) == 1 and len(self.in_features) > 1:
            anchor_sizes = list(anchor_sizes) * len(self.in_features)
        if len(aspect_ratios) == 1 and len(self.in_features) > 1:
            aspect_ratios = list(aspect_ratios) * len(self.in_features)
        self.anchor_generator = AnchorGenerator(anchor_sizes, aspect_ratios,
                                                [s.stride for s in input_shape.values()], anchor_stride_mode,
                                                round_anchors)
        if len(set(self.anchor_generator.num_anchors)) != 1:
            raise ConfigError("every level needs the same number of anchors (sizes x aspect ratios) "
                              "for the shared RPN head")
        self.head = RPNHead(channels.pop(), self.anchor_generator.num_anchors[0])
        self.box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
        self.matcher = Matcher(iou_thresholds, allow_low_quality_matches=True)
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.pre_nms_topk = {True: pre_nms_topk_train, False: pre_nms_topk_test}
        self.post_nms_topk = {True: post_nms_topk_train, False: post_nms_topk_test}
        self.nms_thresh = nms_thresh
        self.min_box_size = min_box_size
        # Detectron2 (proposal_utils.find_top_rpn_proposals) keeps sides > min_box_size (Boxes.nonempty) and
        # runs NMS on the logits; torchvision keeps sides >= min_box_size and runs NMS on probabilities,
        # which saturate to 1.0 for logits above ~17 and so order high-scoring boxes differently.
        self.strict_min_size = strict_min_size
        self.nms_on_logits = nms_on_logits
        self.score_thresh = score_thresh
        self.box_loss = box_loss
        self.smooth_l1_beta = smooth_l1_beta

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
        and level, and keep each image's best `post_nms_topk`."""
        num_images = logits[0].shape[0]
        k_pre = self.pre_nms_topk[self.training]
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
        if self.strict_min_size:
            w, h = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
            large = (w > self.min_box_size) & (h > self.min_box_size)
        else:
            large = box_sizes_at_least(boxes, self.min_box_size)
        keep = large & (scores >= self.score_thresh)
        boxes, scores, logits, groups = boxes[keep], scores[keep], logits[keep], groups[keep]
        kept = batched_nms(boxes, logits if self.nms_on_logits else scores, groups, self.nms_thresh)
        image_ids = groups[kept] // len(proposals)
        kept = kept[top_k_per_image(image_ids, self.post_nms_topk[self.training], num_images)]
        image_ids = groups[kept] // len(proposals)
        return [boxes[kept[image_ids == i]] for i in range(num_images)]

    def losses(self, anchors, logits, deltas, targets):
        if targets is None:
            raise ValueError("the RPN needs targets in training mode")
        gt, valid = pad_boxes([t["boxes"] for t in targets])
        iou = batched_box_iou(gt, anchors.expand(len(targets), -1, -1))
        matched, labels = self.matcher(iou, valid)
        fg, bg = sample_balanced(labels, self.batch_size_per_image, self.positive_fraction)
        sampled = fg | bg
        num_sampled = sampled.sum().clamp(min=1)
        objectness_loss = F.binary_cross_entropy_with_logits(
            logits[sampled], (labels[sampled] == FOREGROUND).to(logits.dtype), reduction="sum") / num_sampled
        matched_boxes = torch.gather(gt, 1, matched[..., None].expand(-1, -1, 4))
        target_deltas = self.box_coder.encode(matched_boxes[fg], anchors.expand(len(targets), -1, -1)[fg])
        box_loss = box_regression_loss(deltas[fg], target_deltas, self.box_loss,
                                       self.smooth_l1_beta) / num_sampled
        return {"loss_objectness": objectness_loss, "loss_rpn_box_reg": box_loss}
