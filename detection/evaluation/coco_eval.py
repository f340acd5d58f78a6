"""COCO box and mask AP: check a results list, run pycocotools (or faster-coco-eval), write the outputs.

    gt = load_coco_gt("datasets/coco/annotations/instances_val2017.json")
    report = evaluate_coco(gt, "output/eval/results.json", iou_type="bbox")
    report.metrics["AP"]          # percent: pycocotools' stats[0] * 100
    print(report.summary)         # the 12 lines pycocotools prints
    report.per_category["person"] # percent, Detectron2's per-category AP

Results are COCO's results format, one dict per detection: image_id, category_id (the dataset's own
ids, not contiguous class indices), score, bbox [x, y, w, h] in pixels of the original image and, for
masks, segmentation as compressed RLE with str counts. pycocotools checks almost none of this and
answers a wrong id with a silently lower AP or an assertion deep inside; `load_results` checks it all
first and names the entry and the field.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from engine.data.decode import read_json
from engine.errors import ConfigError, DatasetError

from ..data.coco_format import check_coco_structure, check_rle, is_finite_number, is_int, short

logger = logging.getLogger(__name__)

IOU_TYPES = ("bbox", "segm")
BACKENDS = ("pycocotools", "faster_coco_eval")
# stats[0:6] of COCOeval.summarize(), in its order.
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
SUMMARY_LINES = 12


@dataclass
class CocoEvalResult:
    """One evaluation. `metrics` and `per_category` are percent; NaN where COCO has no ground truth
    to score (pycocotools' -1). `stats` are pycocotools' 12 numbers unchanged (fractions, -1)."""

    iou_type: str
    metrics: dict[str, float]
    summary: str
    per_category: dict[str, float]
    stats: list[float] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------
# Ground truth


def load_coco_gt(path: str | os.PathLike, setting: str | None = None) -> COCO:
    """Read and check a COCO instances file. `setting` is the config key that named it, for the errors."""
    path = Path(path)
    where = f" (set by {setting})" if setting else ""
    data = read_json(path, f"ground-truth annotation file{where}")
    _check_gt(data, str(path))
    gt = COCO()
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress
        gt.dataset = data
        gt.createIndex()
    # pycocotools keeps no file name; the error messages name it.
    gt.ann_file = str(path)
    return gt


def _as_coco(coco_gt: COCO | str | os.PathLike) -> COCO:
    if isinstance(coco_gt, (str, os.PathLike)):
        return load_coco_gt(coco_gt)
    if not isinstance(coco_gt, COCO):
        raise DatasetError(f"coco_gt must be a pycocotools COCO or the path of an instances json, "
                           f"got {type(coco_gt).__name__}")
    return coco_gt


def _gt_name(gt: COCO) -> str:
    return getattr(gt, "ann_file", "the ground truth")


def _check_gt(data: Any, name: str) -> None:
    if not isinstance(data, dict):
        raise DatasetError(f"{name}: a COCO annotation file is a JSON object with images, annotations "
                           f"and categories, got a {type(data).__name__}")
    check_coco_structure(data, name)  # the keys, types and unique ids the training loader checks as well
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list) or not data[key]:
            raise DatasetError(f"{name}: '{key}' is missing or empty; is this a COCO instances file?")
    if not data.get("annotations"):
        raise DatasetError(f"{name} has no annotations (an image-info or test-dev file?); "
                           "COCO AP needs ground truth to score against")
    img_ids = {img.get("id") for img in data["images"] if isinstance(img, dict)}
    cat_ids = {cat.get("id") for cat in data["categories"] if isinstance(cat, dict)}
    seen = set()
    for i, ann in enumerate(data["annotations"]):
        ann_id = ann.get("id") if isinstance(ann, dict) else None
        prefix = f"{name}: annotation {i} (id {ann_id})"
        if not isinstance(ann_id, int) or ann_id < 1:
            # COCOeval stores the matched ground-truth id and reads 0 as "unmatched", so a detection
            # matched to id 0 would count as a false positive.
            raise DatasetError(f"{prefix}: 'id' must be an integer >= 1 (pycocotools reads a match to "
                               "id 0 as no match); renumber the annotations from 1")
        if ann_id in seen:
            raise DatasetError(f"{prefix}: id is used twice; pycocotools would keep only one of them")
        seen.add(ann_id)
        if ann.get("image_id") not in img_ids:
            raise DatasetError(f"{prefix}: image_id {ann.get('image_id')!r} is not in 'images'")
        if ann.get("category_id") not in cat_ids:
            raise DatasetError(f"{prefix}: category_id {ann.get('category_id')!r} is not in 'categories'")
        problem = _box_problem(ann.get("bbox"), "bbox")
        if problem is not None:
            raise DatasetError(f"{prefix}: {problem}")
        if not is_finite_number(ann.get("area")):
            # COCOeval sorts ground truth into small/medium/large by this field, not by the box.
            raise DatasetError(f"{prefix}: 'area' is missing or not a number")


# ---------------------------------------------------------------------------------------------------
# Results


def load_results(results_or_path: list | str | os.PathLike, coco_gt: COCO | str | os.PathLike) -> list[dict]:
    """Check a COCO results list (or the JSON file holding one) against the ground truth.

    Returns new dicts (the input is not modified) with plain ints and floats, and bytes RLE counts
    (what pycocotools.mask.encode gives) decoded to str so that the list can be written as JSON.
    """
    gt = _as_coco(coco_gt)
    if isinstance(results_or_path, (str, os.PathLike)):
        name = str(results_or_path)
        entries = read_json(Path(results_or_path), "results file")
    else:
        name, entries = "results", results_or_path
    if not isinstance(entries, list):
        raise DatasetError(f"{name}: COCO results must be a list of detections "
                           f"({{image_id, category_id, score, bbox}}), got a {type(entries).__name__}")
    gt_name = _gt_name(gt)
    unknown_cats: dict[int, int] = {}  # category id -> first entry that has it
    out = []
    for i, entry in enumerate(entries):
        prefix = f"{name} entry {i}"
        if not isinstance(entry, Mapping):
            raise DatasetError(f"{prefix}: a detection is a dict, got {type(entry).__name__}")
        det = dict(entry)
        for key in ("image_id", "category_id", "score"):
            if key not in det:
                raise DatasetError(f"{prefix}: missing '{key}'")
        for key in ("image_id", "category_id"):
            if not is_int(det[key]):
                raise DatasetError(f"{prefix}: {key} must be an integer, got {det[key]!r}")
            det[key] = int(det[key])
        if det["image_id"] not in gt.imgs:
            raise DatasetError(f"{prefix}: image_id {det['image_id']} is not in the ground truth ({gt_name})")
        if det["category_id"] not in gt.cats:
            unknown_cats.setdefault(det["category_id"], i)
        if not is_finite_number(det["score"]):
            raise DatasetError(f"{prefix}: score must be a finite number, got {det['score']!r}")
        det["score"] = float(det["score"])
        if "bbox" not in det and "segmentation" not in det:
            raise DatasetError(f"{prefix}: missing 'bbox' (and no 'segmentation'); a detection needs one")
        if "bbox" in det:
            problem = _box_problem(det["bbox"], "bbox")
            if problem is not None:
                raise DatasetError(f"{prefix}: {problem}")
            det["bbox"] = [float(v) for v in det["bbox"]]
        if "segmentation" in det:
            img = gt.imgs[det["image_id"]]
            rle = check_rle(det["segmentation"], img, prefix, results=True)
            if rle is None:
                raise DatasetError(f"{prefix}: segmentation size {list(det['segmentation']['size'])} is not the "
                                   f"size [height, width] = {[img['height'], img['width']]} of image {img['id']}; "
                                   "masks must be pasted at the original resolution")
            det["segmentation"] = rle
        out.append(det)
    if unknown_cats:
        raise DatasetError(_unknown_categories_message(name, unknown_cats, gt))
    for key in ("bbox", "segmentation"):
        have = [key in det for det in out]
        if any(have) and not all(have):
            raise DatasetError(f"{name} entry {have.index(False)}: no '{key}', but entry {have.index(True)} "
                               f"has one; give every detection a {key} or none")
    return out


def iou_types_of(results: list[dict]) -> list[str]:
    """The evaluations a checked results list supports: "bbox" when it has boxes, "segm" when it has masks."""
    if not results:
        return ["bbox"]
    return [t for t, key in (("bbox", "bbox"), ("segm", "segmentation")) if key in results[0]]


def _box_problem(box: Any, key: str) -> str | None:
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        return f"{key} must be [x, y, width, height] (4 numbers), got {short(box)}"
    if not all(is_finite_number(v) for v in box):
        return f"{key} must be 4 finite numbers, got {short(box)}"
    if box[2] < 0 or box[3] < 0:
        return f"{key} {short(box)} has a negative width or height; COCO boxes are [x, y, width, height]"
    return None


def _unknown_categories_message(name: str, unknown: dict[int, int], gt: COCO) -> str:
    ids = sorted(unknown)
    first = min(unknown.values())
    valid = sorted(gt.cats)
    text = (f"{name}: category_id {', '.join(map(str, ids))} (first at entry {first}) not in the ground "
            f"truth ({_gt_name(gt)}), whose {len(valid)} category ids are {_ranges(valid)}")
    if all(0 <= c <= len(valid) for c in ids):
        text += ("; these look like contiguous class labels, not dataset category ids: map them through "
                 "data.categories before writing results")
    return text


def _ranges(ids: list[int]) -> str:
    """[1, 2, 3, 5, 7, 8] -> '1-3, 5, 7-8': COCO's 80 ids in a line you can read."""
    parts, start = [], None
    for i, v in enumerate(ids):
        if start is None:
            start = v
        if i + 1 == len(ids) or ids[i + 1] != v + 1:
            parts.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------------
# Evaluation


def evaluate_coco(coco_gt: COCO | str | os.PathLike, results: list | str | os.PathLike, iou_type: str = "bbox",
                  backend: str = "pycocotools", img_ids: list[int] | None = None) -> CocoEvalResult:
    """COCO AP of `results` against `coco_gt`, over every ground-truth image unless `img_ids` is given
    (an image without detections counts as one with no detections). `coco_gt` is not modified."""
    gt = _as_coco(coco_gt)
    name = str(results) if isinstance(results, (str, os.PathLike)) else "results"
    return _evaluate(gt, load_results(results, gt), name, iou_type, backend, img_ids)


def _evaluate(gt: COCO, dets: list[dict], name: str, iou_type: str, backend: str,
              img_ids: list[int] | None) -> CocoEvalResult:
    """evaluate_coco on results that load_results has checked (checking 500k detections takes seconds)."""
    if iou_type not in IOU_TYPES:
        raise ConfigError(f"iou_type must be one of {', '.join(IOU_TYPES)}; got {iou_type!r}")
    if backend not in BACKENDS:
        raise ConfigError(f"test.evaluator_backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    key = "bbox" if iou_type == "bbox" else "segmentation"
    if dets and key not in dets[0]:
        raise DatasetError(f"{name} entry 0: no '{key}', which {iou_type} evaluation needs")
    if iou_type == "segm":
        # With a bbox present loadRes takes the box area as the detection's area, so small/medium/large
        # would be judged by boxes for detections and by masks for ground truth (Detectron2 drops it too).
        dets = [{k: v for k, v in d.items() if k != "bbox"} for d in dets]
        missing = next((a for a in gt.dataset["annotations"] if "segmentation" not in a), None)
        if missing is not None:
            raise DatasetError(f"{_gt_name(gt)}: annotation id {missing['id']} has no 'segmentation', "
                               "which segm evaluation needs")
    eval_img_ids = _check_img_ids(gt, img_ids)
    if not dets:
        logger.warning("%s: no detections to evaluate; every %s AP is 0 (there are %d ground-truth "
                       "annotations)", name, iou_type, len(gt.dataset["annotations"]))

    # COCOeval writes 'ignore' (and for segm an RLE) into the annotation dicts it evaluates; per-annotation
    # copies keep the caller's ground truth as it was (the polygon lists themselves are only read).
    dataset = dict(gt.dataset, annotations=[dict(a) for a in gt.dataset["annotations"]])
    if backend == "pycocotools":
        coco_eval, summary = _run_pycocotools(dataset, dets, iou_type, eval_img_ids)
    else:
        coco_eval, summary = _run_faster_coco_eval(dataset, dets, iou_type, eval_img_ids)
    stats = [float(s) for s in coco_eval.stats[:SUMMARY_LINES]]
    metrics = {k: _percent(s) for k, s in zip(METRIC_NAMES, stats)}
    return CocoEvalResult(iou_type, metrics, summary, _per_category(coco_eval, gt), stats)


def _check_img_ids(gt: COCO, img_ids: list[int] | None) -> list[int]:
    if img_ids is None:
        return sorted(gt.imgs)
    img_ids = sorted({int(i) for i in img_ids})
    unknown = [i for i in img_ids if i not in gt.imgs]
    if unknown:
        raise DatasetError(f"img_ids {unknown[:10]} are not in the ground truth ({_gt_name(gt)})")
    if not any(gt.imgToAnns.get(i) for i in img_ids):
        raise DatasetError(f"the {len(img_ids)} images of img_ids have no ground-truth annotations in "
                           f"{_gt_name(gt)}; COCO AP is undefined there")
    return img_ids


def _detections(coco_cls: type, gt: Any, dets: list[dict]) -> Any:
    # pycocotools' loadRes indexes dets[0] and fails on an empty list, so "no detections" is built by hand.
    if dets:
        return gt.loadRes([dict(d) for d in dets])  # loadRes adds id, area, iscrowd to each dict
    dt = coco_cls()
    dt.dataset = {"images": gt.dataset["images"], "categories": gt.dataset["categories"], "annotations": []}
    dt.createIndex()
    return dt


def _run_pycocotools(dataset: dict, dets: list[dict], iou_type: str, img_ids: list[int]) -> tuple[Any, str]:
    with contextlib.redirect_stdout(io.StringIO()):  # progress messages, not wanted in our output
        gt = COCO()
        gt.dataset = dataset
        gt.createIndex()
        coco_eval = COCOeval(gt, _detections(COCO, gt, dets), iou_type)
        coco_eval.params.imgIds = img_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        coco_eval.summarize()
    return coco_eval, summary.getvalue().rstrip("\n")


def _run_faster_coco_eval(dataset: dict, dets: list[dict], iou_type: str, img_ids: list[int]) -> tuple[Any, str]:
    try:
        from faster_coco_eval import COCO as FasterCOCO
        from faster_coco_eval import COCOeval_faster
    except ImportError as e:
        raise ConfigError(f"test.evaluator_backend is 'faster_coco_eval' but the package cannot be imported "
                          f"({e}); install it with `pip install faster-coco-eval` or set "
                          "test.evaluator_backend=pycocotools") from None
    quiet = lambda *args, **kwargs: None  # noqa: E731
    gt = FasterCOCO(dataset, print_function=quiet)
    coco_eval = COCOeval_faster(gt, _detections(FasterCOCO, gt, dets), iou_type, print_function=quiet)
    coco_eval.params.imgIds = img_ids
    coco_eval.evaluate()
    coco_eval.accumulate()
    lines: list[str] = []
    coco_eval.print_function = lines.append
    coco_eval.summarize()
    # It also prints AR@0.5 and AR@0.75; the first 12 lines are pycocotools' summary, character for character.
    return coco_eval, "\n".join(lines[:SUMMARY_LINES])


def _per_category(coco_eval: Any, gt: COCO) -> dict[str, float]:
    """Detectron2's per-category AP: the mean of precision over IoU thresholds and recall points for
    area "all" and the largest maxDets, leaving out -1 (no ground truth); NaN when all are -1."""
    precision = coco_eval.eval["precision"]  # [IoU thresholds, recall points, categories, areas, maxDets]
    out = {}
    for k, cat_id in enumerate(coco_eval.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        out[gt.cats[int(cat_id)]["name"]] = float(p.mean() * 100) if p.size else float("nan")
    return out


def _percent(stat: float) -> float:
    return stat * 100 if stat >= 0 else float("nan")


# ---------------------------------------------------------------------------------------------------
# Categories in the config


def check_categories(categories: Any, coco_gt: COCO | None = None, key: str = "data.categories") -> list[dict]:
    """Check `data.categories` ([{id: int, name: str}, ...]); with `coco_gt`, also that they are the
    ground truth's categories, since results map class index i to categories[i].id."""
    if not isinstance(categories, list):
        raise ConfigError(f"config key '{key}' expects a list of {{id: int, name: str}}, got {short(categories)}")
    ids, names = set(), set()
    for i, cat in enumerate(categories):
        where = f"config key '{key}[{i}]'"
        if not isinstance(cat, Mapping) or set(cat) != {"id", "name"}:
            raise ConfigError(f"{where} must be a mapping {{id: int, name: str}}, got {short(cat)}")
        if not isinstance(cat["id"], int) or isinstance(cat["id"], bool):
            raise ConfigError(f"{where}: id must be an integer, got {cat['id']!r}")
        if not isinstance(cat["name"], str) or not cat["name"]:
            raise ConfigError(f"{where}: name must be a non-empty string, got {cat['name']!r}")
        if cat["id"] in ids or cat["name"] in names:
            raise ConfigError(f"{where}: id {cat['id']} or name {cat['name']!r} appears twice in {key}")
        ids.add(cat["id"])
        names.add(cat["name"])
    if coco_gt is not None and categories:
        ours = {c["id"]: c["name"] for c in categories}
        theirs = {c["id"]: c["name"] for c in coco_gt.dataset["categories"]}
        if ours != theirs:
            differ = sorted(set(ours.items()) ^ set(theirs.items()))
            raise ConfigError(f"config key '{key}' does not match the categories of {_gt_name(coco_gt)}; "
                              f"(id, name) pairs in only one of them: {differ[:10]}")
    return [dict(c) for c in categories]


# ---------------------------------------------------------------------------------------------------
# Outputs


def format_per_category(per_category: dict[str, float]) -> str:
    """An aligned two-column table, one category per line in the ground truth's order."""
    width = max([len("category")] + [len(n) for n in per_category])
    lines = [f"{'category':<{width}}  {'AP':>7}"]
    lines += [f"{name:<{width}}  {ap:7.3f}" for name, ap in per_category.items()]
    return "\n".join(lines)


def write_eval_outputs(output_dir: str | os.PathLike, results: list[dict], metrics_by_type: dict[str, dict],
                       per_category_by_type: dict[str, dict], summaries: dict[str, str]) -> list[Path]:
    """Write output_dir/metrics.json ({"bbox": {...}, "segm": {...}}) and, under output_dir/eval/,
    results.json, per_category_<type>.txt/.json and summary_<type>.txt. NaN is written as null."""
    out = Path(output_dir)
    # One detection per line would make a 40 MB COCO results file 10 times longer; keep it compact.
    files = {out / "eval" / "results.json": json.dumps(results, separators=(",", ":")) + "\n",
             out / "metrics.json": _json(metrics_by_type)}
    for iou_type, per_category in per_category_by_type.items():
        files[out / "eval" / f"per_category_{iou_type}.txt"] = format_per_category(per_category) + "\n"
        files[out / "eval" / f"per_category_{iou_type}.json"] = _json(per_category)
    for iou_type, summary in summaries.items():
        files[out / "eval" / f"summary_{iou_type}.txt"] = summary + "\n"
    try:
        (out / "eval").mkdir(parents=True, exist_ok=True)
        for path, text in files.items():
            path.write_text(text, encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot write the evaluation outputs under output_dir {out}: {e.strerror or e}") from None
    return list(files)


def evaluate_results_file(cfg: Mapping, results_path: str | os.PathLike) -> dict[str, CocoEvalResult]:
    """What tools/eval_det.py --results does: evaluate a results file against data.val.ann_file with
    test.evaluator_backend, box AP and (when the results have masks) mask AP; write to output_dir."""
    ann_file = cfg["data"]["val"]["ann_file"]
    if not ann_file:
        raise ConfigError("config key 'data.val.ann_file' is not set; set it to the instances json of the "
                          "split the results were made on (e.g. data.val.ann_file=path/instances_val2017.json)")
    gt = load_coco_gt(ann_file, setting="data.val.ann_file")
    check_categories(cfg["data"]["categories"], gt)
    results = load_results(results_path, gt)
    if not results:
        # A file of no detections is a failed or cut-off inference run; its AP of 0 would look like a result.
        raise DatasetError(f"{results_path}: the results list is empty (no detections); check the inference "
                           "run that wrote it")
    return evaluate_and_write(cfg, gt, results, str(results_path))


def evaluate_and_write(cfg: Mapping, gt: COCO, results: list[dict], name: str, iou_types: list[str] | None = None,
                       img_ids: list[int] | None = None) -> dict[str, CocoEvalResult]:
    """Evaluate checked results (`load_results`) with test.evaluator_backend over `img_ids` (default:
    every ground-truth image) and write them to output_dir, as tools/eval_det.py does for a results file
    and for a model's own detections."""
    backend = cfg["test"]["evaluator_backend"]
    iou_types = iou_types or iou_types_of(results) or ["bbox"]
    reports = {t: _evaluate(gt, results, name, t, backend, img_ids) for t in iou_types}
    write_eval_outputs(cfg["output_dir"], results, {t: r.metrics for t, r in reports.items()},
                       {t: r.per_category for t, r in reports.items()}, {t: r.summary for t, r in reports.items()})
    return reports


# ---------------------------------------------------------------------------------------------------
# Helpers


def _json(value: Any) -> str:
    # json.dumps would write NaN, which strict JSON readers (and jq) reject.
    return json.dumps(_nan_to_none(value), indent=1) + "\n"


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, Mapping):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(v) for v in value]
    return value
