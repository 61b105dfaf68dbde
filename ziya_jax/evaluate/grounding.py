"""Grounding accuracy: the first box in the generated text against the reference, hit when IoU >= 0.5.

Boxes are Ziya's `[x1,y1,x2,y2]` integers in 0..999 (ziya_jax.data.formats); IoU treats them as continuous
coordinates (area = width x height, no +1). A text without a parsable box is a miss."""

from __future__ import annotations

from collections.abc import Sequence

from ziya_jax.data import formats

IOU_THRESHOLD = 0.5


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def first_box(text: str):
    """The first well-formed box (x1 <= x2, y1 <= y2) in a text, or None."""
    return next((b for b in formats.parse_boxes(text) if b[0] <= b[2] and b[1] <= b[3]), None)


def grounding_hit(prediction: str, reference: Sequence[int], threshold: float = IOU_THRESHOLD) -> bool:
    box = first_box(prediction)
    return box is not None and iou(box, reference) >= threshold
