"""RoIAlign (He et al. 2017) over FPN levels with the FPN paper's level assignment (Lin et al. 2017,
Eq. 1): k = floor(k0 + log2(sqrt(wh) / 224)), k0 = 4, clamped to the available levels."""
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torchvision.ops import roi_align as torchvision_roi_align

from backbones.base import ShapeSpec
from engine.errors import ConfigError

from .structures import known_zero, recording

# torchvision's CPU RoIAlign kernels run on one core, forward and backward. Below this many RoIs a call
# is too short (under ~10 ms) for threads to pay.
THREADED_MIN_ROIS = 64


class RoIAlignThreads:
    """The threads that CPU RoIAlign runs on, owned by the MultiScaleRoIAlign that uses them.

    Owned by the pooler, not kept process-wide nor passed in by the caller: the pooler is the one user,
    its callers (the RoI heads) stay unaware of it, and the threads live as long as the model. A model is
    also copied (deepcopy for EMA weights), pickled (spawned DataLoader workers) and forked (DataLoader
    workers); none of these can carry threads, so the pool is made on first use, never copied or pickled,
    and made anew in a process other than the one that made it (a forked child has none of its parent's
    threads: the process id tells).

    threads: how many; None follows torch.get_num_threads() (torch's own intra-op setting, read at each
    call, so torch.set_num_threads applies here too); 1 runs the single torchvision call."""

    def __init__(self, threads: Optional[int] = None):
        self.threads = threads
        self._executor: Optional[ThreadPoolExecutor] = None
        self._executor_size = 0  # recorded here: ThreadPoolExecutor does not tell its size publicly
        self._executor_pid: Optional[int] = None

    def count(self) -> int:
        return torch.get_num_threads() if self.threads is None else self.threads

    def map(self, fn, items) -> list:
        n, pid = self.count(), os.getpid()
        if self._executor is None or self._executor_pid != pid or self._executor_size != n:
            if self._executor is not None and self._executor_pid == pid:
                self._executor.shutdown(wait=False)  # torch's thread count changed
            self._executor = ThreadPoolExecutor(n, thread_name_prefix="roi_align")
            self._executor_size, self._executor_pid = n, pid
        return list(self._executor.map(fn, items))

    def __getstate__(self):
        return {"threads": self.threads, "_executor": None, "_executor_size": 0, "_executor_pid": None}

    def __repr__(self):
        return f"RoIAlignThreads({self.threads})"


class _ThreadedRoIAlign(torch.autograd.Function):
    """torchvision's RoIAlign kernels, run on several threads: the forward pass on row blocks of the RoIs
    (each output row depends on its RoI alone), the backward pass one image per thread (each image's
    gradient receives from its own RoIs alone, added in the same order). Both give exactly what the single
    call gives; the kernels release the GIL."""

    @staticmethod
    def forward(ctx, feature, rois, scale: float, size: Tuple[int, int], sampling_ratio: int, aligned: bool,
                threads: RoIAlignThreads):
        feature = feature.contiguous()  # once, not in every thread (the kernel needs NCHW)

        def block(r):
            with torch.no_grad():  # grad mode is per thread: the pool's threads would record a graph
                return torchvision_roi_align(feature, r, size, scale, sampling_ratio, aligned)

        outs = threads.map(block, rois.tensor_split(threads.count()))
        ctx.save_for_backward(rois)
        ctx.args = (scale, size, sampling_ratio, aligned, tuple(feature.shape), threads)
        return torch.cat(outs)

    @staticmethod
    def backward(ctx, grad):
        (rois,), (scale, size, sampling_ratio, aligned, shape, threads) = ctx.saved_tensors, ctx.args
        grad = grad.contiguous()
        images = shape[0]

        # torchvision::_roi_align_backward is the operator torchvision registers in torch.ops for its own
        # autograd formula of roi_align (its schema is part of torchvision's op library, not a Python
        # private). No public function gives RoIAlign's backward for one image's RoIs without running the
        # forward again through autograd, which adds about 40% to the work (512 RoIs, 256 channels, 7x7 on
        # one core: forward 0.18 s, backward 0.47 s); the operator gives the same bits without it.
        def image_grad(b):
            with torch.no_grad():
                if images == 1:
                    return torch.ops.torchvision._roi_align_backward(
                        grad, rois, scale, size[0], size[1], 1, *shape[1:], sampling_ratio, aligned)
                idx = torch.nonzero(rois[:, 0] == b).squeeze(1)
                return torch.ops.torchvision._roi_align_backward(
                    grad[idx], torch.cat([torch.zeros_like(rois[idx, :1]), rois[idx, 1:]], 1), scale, size[0],
                    size[1], 1, *shape[1:], sampling_ratio, aligned)

        parts = threads.map(image_grad, range(images)) if images > 1 else [image_grad(0)]
        return torch.cat(parts), None, None, None, None, None, None


def roi_align(feature: torch.Tensor, rois: torch.Tensor, output_size: Tuple[int, int], spatial_scale: float,
              sampling_ratio: int, aligned: bool, threads: Optional[RoIAlignThreads] = None) -> torch.Tensor:
    """torchvision.ops.roi_align with (K, 5) rois; on `threads` where that pays (2 or more of them, a CPU
    tensor, eager mode, enough RoIs), otherwise the single call. The results are the same to the bit.
    Under autocast, the single call: autocast is per thread, and torchvision's roi_align relies on it to
    bring bfloat16 features and float32 RoIs to one dtype."""
    if (threads is None or feature.device.type != "cpu" or recording() or rois.shape[0] < THREADED_MIN_ROIS
            or threads.count() < 2 or torch.is_autocast_enabled("cpu")):
        return torchvision_roi_align(feature, rois, output_size, spatial_scale, sampling_ratio, aligned)
    return _ThreadedRoIAlign.apply(feature, rois, spatial_scale, tuple(output_size), sampling_ratio, aligned,
                                   threads)


LEVEL_FORMULAS = ("shifted", "detectron2")
# Detectron2's epsilon (modeling/poolers.py, assign_boxes_to_levels: sys.float_info.epsilon inside the log).
DETECTRON2_LEVEL_EPS = sys.float_info.epsilon


def assign_levels(boxes: torch.Tensor, min_level: int, max_level: int, canonical_box_size: float = 224,
                  canonical_level: int = 4, eps: float = 1e-6, formula: str = "shifted") -> torch.Tensor:
    """Index (0 = min_level) of the pyramid level each (K, 4) box is pooled from. "shifted" adds `eps`
    after the log, which keeps boxes of exactly the canonical size from falling a level through
    floating-point error; "detectron2" is floor(k0 + log2(size / 224 + 2.2e-16)), which in float32 is
    the bare formula (a box of 223.99998 pixels goes a level down)."""
    size = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sqrt()
    if formula == "detectron2":
        level = torch.floor(canonical_level + torch.log2(size / canonical_box_size + DETECTRON2_LEVEL_EPS))
        return (level.clamp(min_level, max_level) - min_level).to(torch.int64)
    level = torch.floor(canonical_level + torch.log2(size / canonical_box_size) + eps)
    return (level.clamp(min_level, max_level) - min_level).to(torch.int64)


class MultiScaleRoIAlign(nn.Module):
    def __init__(self, input_shape: Dict[str, ShapeSpec], output_size: int, sampling_ratio: int = 2,
                 aligned: bool = False, canonical_box_size: float = 224, canonical_level: int = 4,
                 level_formula: str = "shifted", threads: Optional[int] = None):
        """threads: CPU threads for RoIAlign (`RoIAlignThreads`): None follows torch.get_num_threads(), 1
        runs torchvision's single-threaded kernel as it is."""
        super().__init__()
        if level_formula not in LEVEL_FORMULAS:
            raise ConfigError(f"unknown RoI level formula {level_formula!r}; valid: {', '.join(LEVEL_FORMULAS)}")
        self.level_formula = level_formula
        self.in_features = list(input_shape)
        self.scales = [1.0 / s.stride for s in input_shape.values()]
        levels = [math.log2(s.stride) for s in input_shape.values()]
        if any(l != int(l) for l in levels) or levels != list(range(int(levels[0]), int(levels[0]) + len(levels))):
            raise ConfigError(f"RoI pooling needs consecutive power-of-two strides, got "
                              f"{[s.stride for s in input_shape.values()]} for {self.in_features}")
        self.min_level, self.max_level = int(levels[0]), int(levels[-1])
        self.output_size = (output_size, output_size)
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.canonical_box_size = canonical_box_size
        self.canonical_level = canonical_level
        self.threads = RoIAlignThreads(threads)

    def forward(self, features: Dict[str, torch.Tensor], boxes: List[torch.Tensor]) -> torch.Tensor:
        """(sum K_i, C, S, S) features for the boxes of all images, in order."""
        maps = [features[f] for f in self.in_features]
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)])
        out = maps[0].new_zeros((rois.shape[0], maps[0].shape[1]) + self.output_size)
        if known_zero(rois.shape[0]):
            return out
        if len(maps) == 1:
            return roi_align(maps[0], rois, self.output_size, self.scales[0], self.sampling_ratio, self.aligned,
                             self.threads)
        level = assign_levels(rois[:, 1:], self.min_level, self.max_level, self.canonical_box_size,
                              self.canonical_level, formula=self.level_formula)
        for i, (feature, scale) in enumerate(zip(maps, self.scales)):
            idx = torch.nonzero(level == i).squeeze(1)
            if not known_zero(idx.shape[0]):
                # index_put_, not out[idx] = ...: the tracer would fix the value's shape in a view.
                out.index_put_((idx,), roi_align(feature, rois[idx], self.output_size, scale, self.sampling_ratio,
                                                 self.aligned, self.threads).to(out.dtype))
        return out
