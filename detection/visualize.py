"""Detections drawn on images, for people to look at (OpenCV drawing; no GUI)."""
import colorsys

import cv2
import numpy as np


def color_for(category_id: int):
    """A stable, well-separated colour per category (golden-ratio hue steps)."""
    h = (category_id * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_detections(image: np.ndarray, boxes, scores, category_ids, names=None, masks=None) -> np.ndarray:
    """An RGB copy of `image` with boxes, "name score" labels and, if given, translucent masks."""
    out = image.copy()
    names = names or {}
    scale = max(out.shape[:2]) / 640
    thickness = max(1, int(round(2 * scale)))
    font_scale = max(0.35, 0.5 * scale)
    if masks is not None:
        for mask, cid in zip(masks, category_ids):
            m = mask.astype(bool)
            out[m] = (0.5 * out[m] + 0.5 * np.array(color_for(int(cid)))).astype(np.uint8)
    for box, score, cid in zip(boxes, scores, category_ids):
        color = color_for(int(cid))
        x1, y1, x2, y2 = (int(round(float(v))) for v in box)
        cv2.rectangle(out, (x1, y1), (x2, y2), color, thickness)
        label = f"{names.get(int(cid), str(int(cid)))} {float(score):.2f}"
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
        ty = max(y1, th + base)
        cv2.rectangle(out, (x1, ty - th - base), (x1 + tw, ty), color, -1)
        cv2.putText(out, label, (x1, ty - base), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (0, 0, 0), 1, cv2.LINE_AA)
    return out
