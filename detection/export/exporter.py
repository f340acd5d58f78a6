"""A detector as one graph that takes a raw image and returns flat tensors, for ONNX and TorchScript.

`ExportableDetector(model)(image)` with one (3, H, W) RGB tensor (uint8, or float in [0, 1]) returns
`boxes` (N, 4) xyxy in the image's pixels, `labels` (N,) int64, `scores` (N,) and, for a Mask R-CNN,
`masks` (N, 1, M, M): each detection's mask probabilities over its box, not yet pasted into the image
(`segmentation.paste_masks(masks, boxes, (H, W))` does that outside the graph, as the eager model's
`render` does).

The graph is the eager model's own `predict` (pre-processing, backbone, RPN, RoI heads, post-processing
with its drop_empty_boxes), recorded, so the two cannot part. That code keeps every size symbolic where a
graph is recorded (detection/resize.py, detection/preprocess.py): one file serves every image size.
ONNX goes through torch.export (`torch.onnx.export(dynamo=True)`, the supported exporter in torch 2.9+;
the TorchScript-based one is deprecated), TorchScript through `torch.jit.trace` (deprecated as well, kept
for C++ loaders); the model code avoids what either cannot record (see `structures.known_zero`,
`size_min`, `batched_nms`).
"""
import contextlib
import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from engine.compile import eager
from engine.errors import ExportError

from ..resize import RESIZE_MODES

FORMATS = ("onnx", "torchscript")
OUTPUTS = ("boxes", "labels", "scores", "masks")
# The exported graph's image sizes: one graph for every height and width in this range.
MIN_SIDE, MAX_SIDE = 32, 4096


class ExportableDetector(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        mode = model.preprocessor.resize_mode
        if not RESIZE_MODES[mode].graph:
            raise ExportError(f"input.resize_mode={mode} resizes with PIL, which a graph cannot hold; export with "
                              "input.resize_mode=interpolate (detections then differ slightly from PIL's)")
        self.model = model.eval()
        self.has_masks = hasattr(model.roi_heads, "mask_head")

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        detections, _ = self.model.predict([image])
        det = detections[0]
        out = (det["boxes"], det["labels"], det["scores"])
        return out + (det["masks"],) if self.has_masks else out


def _check_side(image: torch.Tensor):
    sides = image.shape[1:]
    if image.dim() != 3 or image.shape[0] != 3 or not MIN_SIDE <= min(sides) <= max(sides) <= MAX_SIDE:
        raise ExportError(f"the exported detector takes one (3, H, W) image with {MIN_SIDE} <= H, W <= {MAX_SIDE}, "
                          f"got shape {tuple(image.shape)}")


@contextlib.contextmanager
def _dead_code_removed_with_assertions():
    """torch 2.14's ONNX exporter erases runtime assertions but keeps the comparisons that fed them; one
    compares an unbacked size with a bound beyond int64 and fails to convert. Removing the then unused
    nodes as well (a private pass, patched for the call only) leaves the graph's outputs unchanged."""
    from torch.onnx._internal.exporter import _fx_passes

    original = _fx_passes.remove_assertion_nodes

    def remove(graph_module):
        graph_module = original(graph_module)
        for gm in graph_module.modules():
            if isinstance(gm, torch.fx.GraphModule):
                gm.graph.eliminate_dead_code()
                gm.recompile()
        return graph_module

    _fx_passes.remove_assertion_nodes = remove
    try:
        yield
    finally:
        _fx_passes.remove_assertion_nodes = original


def _require_onnx():
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ExportError(f"ONNX export needs {e.name}: pip install onnx onnxruntime onnxscript") from None


def export(model: nn.Module, path: str, fmt: str, example: torch.Tensor, optimize: bool = True) -> Tuple[str, ...]:
    """Write `model` (a FasterRCNN or MaskRCNN) as an ONNX or TorchScript file at `path` that takes one
    image of any size (of `example`'s dtype). Returns the output names. `optimize`: run the ONNX graph
    optimiser (constant folding, fusions; about a third of the export time)."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; valid: {', '.join(FORMATS)}")
    _check_side(example)
    wrapper = ExportableDetector(model.eval())
    names = OUTPUTS if wrapper.has_masks else OUTPUTS[:3]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with torch.no_grad(), eager(model):  # a model.compile'd backbone is recorded as its eager operations
        if fmt == "torchscript":
            # torch.jit is deprecated in favour of torch.export; tracing is what still loads without
            # Python (torch::jit::load in C++), and the graph was written to be traced with sizes kept.
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", (FutureWarning, torch.jit.TracerWarning))
                torch.jit.save(torch.jit.trace(wrapper, (example,), check_trace=False), path)
            return names
        _require_onnx()
        sides = {"image": {1: torch.export.Dim("height", min=MIN_SIDE, max=MAX_SIDE),
                           2: torch.export.Dim("width", min=MIN_SIDE, max=MAX_SIDE)}}
        try:
            program = torch.export.export(wrapper, (example,), dynamic_shapes=sides, strict=False)
            with _dead_code_removed_with_assertions():
                torch.onnx.export(program, (example,), path, input_names=["image"], output_names=list(names),
                                  dynamo=True, external_data=False, optimize=optimize, verbose=False)
        except Exception as e:  # torch.export's and the converter's errors have no common base class
            raise ExportError(f"ONNX export of {type(model).__name__} failed: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from e
    return names


def load(path: str, fmt: str) -> Callable[[torch.Tensor], Tuple[torch.Tensor, ...]]:
    """The exported file as a function of one (3, H, W) image tensor returning CPU tensors."""
    if fmt == "torchscript":
        module = torch.jit.load(path, map_location="cpu")
        return torch.no_grad()(lambda image: tuple(module(image.cpu())))
    _require_onnx()
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda image: tuple(torch.from_numpy(o) for o in session.run(None, {name: image.cpu().numpy()}))


@dataclass
class Check:
    """One image's comparison of the exported file with the eager model (or another reference)."""
    name: str
    size: Tuple[int, int]
    detections: int  # the reference's
    box_diff: float  # max |exported - eager| in pixels, over the paired detections
    box_rel_diff: float  # the same divided by max(|eager|, 1)
    score_diff: float
    mask_iou: Optional[float] = None  # smallest IoU of the masks thresholded at 0.5 (Mask R-CNN)
    at_cutoff: int = 0  # detections of either side left unpaired at the score threshold or the detection cap

    def line(self) -> str:
        masks = f", min mask IoU {self.mask_iou:.4f}" if self.mask_iou is not None else ""
        cutoff = f", {self.at_cutoff} unpaired at the score cutoff" if self.at_cutoff else ""
        return (f"{self.name} ({self.size[0]}x{self.size[1]}): {self.detections} detections, max box difference "
                f"{self.box_diff:.2e} px ({self.box_rel_diff:.2e} relative), max score difference "
                f"{self.score_diff:.2e}{masks}{cutoff}")


BOX_RTOL, SCORE_ATOL, MASK_MIN_IOU = 1e-3, 1e-3, 0.99
# Mask pixels whose reference probability lies this close to the 0.5 threshold may fall on either side by
# noise alone (on a box of a few pixels, one such pixel would decide the IoU); they are left out of it.
MASK_PROB_ATOL = 1e-3


@dataclass(frozen=True)
class Cutoff:
    """Where the post-processing stops keeping detections: scores above `score_thresh`, at most `cap` per
    image (the RoI heads' test.score_thresh and test.detections_per_img)."""
    score_thresh: float
    cap: int

    @classmethod
    def of(cls, model: nn.Module) -> "Cutoff":
        return cls(float(model.roi_heads.score_thresh), int(model.roi_heads.detections_per_img))

    def score(self, scores: torch.Tensor) -> float:
        """The lowest score a side could have kept: its last one where it is at the cap, else the threshold.
        A detection whose score lies within SCORE_ATOL of the other side's cutoff may be kept by one side
        and not the other, by floating-point noise alone."""
        return float(scores.min()) if len(scores) >= self.cap else self.score_thresh


def _differences(reference, outputs):
    """(R, E) max coordinate difference in pixels, the same relative to the reference box (at least 1 px),
    and score difference of every pair; infinite between different labels."""
    boxes, labels = outputs["boxes"].to(torch.float32), outputs["labels"].to(torch.int64)
    diff = (boxes[None] - reference["boxes"][:, None]).abs()
    px = diff.amax(-1)
    rel = (diff / reference["boxes"][:, None].abs().clamp(min=1)).amax(-1)
    score = (outputs["scores"][None] - reference["scores"][:, None]).abs()
    other = reference["labels"][:, None] != labels[None]
    return tuple(d.masked_fill(other, float("inf")) for d in (px, rel, score))


def _pairs(px, rel, score):
    """Pairs (reference index, exported index) of mutually nearest boxes of the same label within BOX_RTOL
    and SCORE_ATOL. Detections are paired, not compared in order: two scores equal to float precision may
    come out of NMS and top-k in either order."""
    if not px.numel():
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    i = torch.arange(px.shape[0])
    j = px.argmin(1)
    good = (px.argmin(0)[j] == i) & (rel[i, j] <= BOX_RTOL) & (score[i, j] <= SCORE_ATOL)
    return i[good], j[good]


def _describe(side, detections, index, px, score) -> str:
    """One detection without a counterpart, with the nearest box of its label on the other side."""
    box = [round(v, 1) for v in detections["boxes"][index].tolist()]
    nearest = "no box of that label in the other"
    if torch.isfinite(px.min()):
        nearest = (f"nearest of that label in the other {float(px.min()):.2e} px away, score "
                   f"{float(score[px.argmin()]):.2e} apart")
    return (f"{side} label {int(detections['labels'][index])} score {float(detections['scores'][index]):.4f} "
            f"box {box} ({nearest})")


def compare_detections(reference, outputs, size, name: str, cutoff: Cutoff, paste_mode: str = "torchvision",
                       source: str = "the eager model") -> Check:
    """One image's detections by `source` (`reference`: the eager model's, or the source framework's) and
    by the exported file (`outputs`: OUTPUTS to tensors); raise ExportError unless they pair one to one
    (the same label, boxes within BOX_RTOL relative, scores within SCORE_ATOL) but for detections at the
    `cutoff` (a score within SCORE_ATOL of the other side's cutoff score) and, for a Mask R-CNN, masks
    pasted with `paste_mode` at the reference's boxes have IoU above MASK_MIN_IOU with the reference's
    (N, 1, H, W) probabilities thresholded at 0.5, over the pixels farther than MASK_PROB_ATOL from it."""
    from segmentation.paste import paste_masks

    px, rel, score = _differences(reference, outputs)
    i, j = _pairs(px, rel, score)
    lone_ref = torch.ones(len(reference["boxes"]), dtype=torch.bool).index_fill(0, i, False)
    lone_out = torch.ones(len(outputs["boxes"]), dtype=torch.bool).index_fill(0, j, False)
    bad_ref = lone_ref & (reference["scores"] > cutoff.score(outputs["scores"]) + SCORE_ATOL)
    bad_out = lone_out & (outputs["scores"] > cutoff.score(reference["scores"]) + SCORE_ATOL)
    if bad_ref.any() or bad_out.any():
        first = [_describe(source, reference, int(k), px[k], score[k]) for k in torch.nonzero(bad_ref)[:, 0]]
        first += [_describe("exported", outputs, int(k), px[:, k], score[:, k]) for k in torch.nonzero(bad_out)[:, 0]]
        raise ExportError(
            f"{name} ({size[0]}x{size[1]}): the exported model's detections cannot be paired with {source}'s: "
            f"{int(bad_ref.sum())} of {source}'s {len(reference['boxes'])} and {int(bad_out.sum())} of the "
            f"exported model's {len(outputs['boxes'])} have no counterpart (the same label, box within {BOX_RTOL} "
            f"relative, score within {SCORE_ATOL}) and are not at the score cutoff (threshold "
            f"{cutoff.score_thresh}, or the lowest score where {cutoff.cap} are kept); first: " + "; ".join(first[:3]))
    n = len(i)
    check = Check(name, tuple(size), len(reference["boxes"]), float(px[i, j].max()) if n else 0.0,
                  float(rel[i, j].max()) if n else 0.0, float(score[i, j].max()) if n else 0.0,
                  at_cutoff=int(lone_ref.sum() + lone_out.sum()))
    if "masks" in reference:
        if outputs["masks"].shape[1:2] != (1,) or len(outputs["masks"]) != len(outputs["boxes"]):
            raise ExportError(f"{name}: exported masks have shape {tuple(outputs['masks'].shape)}, "
                              f"expected ({len(outputs['boxes'])}, 1, M, M)")
        # Pasted at the reference's boxes (compared above): on a box of a few pixels a box difference of
        # float noise moves the paste's samples by far more than noise, which is no mask difference.
        pasted = paste_masks(outputs["masks"][j], reference["boxes"][i], tuple(size), mode=paste_mode) >= 0.5
        probs = reference["masks"][i]
        decided = (probs - 0.5).abs() > MASK_PROB_ATOL
        expected = probs >= 0.5
        inter = (pasted & expected & decided).flatten(1).sum(1)
        union = ((pasted | expected) & decided).flatten(1).sum(1)
        # Two empty masks agree perfectly.
        iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones(()))
        check.mask_iou = float(iou.min()) if n else 1.0
        if check.mask_iou < MASK_MIN_IOU:
            raise ExportError(f"the exported model's masks differ from {source}'s on {check.line()}; "
                              f"allowed: mask IoU {MASK_MIN_IOU}")
    return check


def compare(model: nn.Module, run: Callable, image: torch.Tensor, name: str) -> Check:
    """Run the eager model and the exported file on `image`; `compare_detections` of the two."""
    with torch.no_grad():
        eager = {k: v.cpu() for k, v in model.eval()([image])[0].items()}
    outputs = dict(zip(OUTPUTS, run(image)))
    return compare_detections(eager, outputs, image.shape[-2:], name, Cutoff.of(model),
                              getattr(model, "paste_mode", "torchvision"))


def synthetic_image(height: int = 480, width: int = 640, seed: int = 0) -> torch.Tensor:
    """A (3, H, W) uint8 image of smooth colour gradients and rectangles, for a check without files."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    image = torch.stack([x, y, (x + y) / 2]) * 200
    for _ in range(6):
        x0, y0, w, h = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in
                        [(0, width - 40), (0, height - 40), (20, width // 3), (20, height // 3)])
        image[:, y0:y0 + h, x0:x0 + w] = torch.rand(3, 1, 1, generator=g) * 255
    return image.to(torch.uint8)


def read_images(paths: Sequence[str]) -> List[Tuple[str, torch.Tensor]]:
    """(name, (3, H, W) uint8) for image files and the images in folders."""
    from engine.data.decode import read_image

    from ..inference import list_images

    files = list_images(paths)
    if not files:
        raise ExportError(f"no images found in {', '.join(paths)} (for --check-images)")
    return [(os.path.basename(f), torch.from_numpy(np.ascontiguousarray(read_image(f))).permute(2, 0, 1))
            for f in files]


def export_and_check(model: nn.Module, path: str, fmt: str, images: Sequence[Tuple[str, torch.Tensor]] = (),
                     dtype: torch.dtype = torch.uint8, optimize: bool = True) -> List[Check]:
    """Export `model` to `path` and compare the file with the eager model on `images` ((name, (3, H, W)
    uint8) pairs; default: one synthetic image). The file takes `dtype` images: uint8, or float32 in [0, 1]."""
    images = list(images) or [("synthetic", synthetic_image())]
    convert = (lambda im: im) if dtype == torch.uint8 else (lambda im: im.to(dtype) / 255)
    model = model.eval()
    export(model, path, fmt, convert(images[0][1]), optimize)
    run = load(path, fmt)
    checks = []
    for name, image in images:
        _check_side(image)
        checks.append(compare(model, run, convert(image), name))
    return checks
