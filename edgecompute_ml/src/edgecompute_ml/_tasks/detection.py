"""Object detection: the detector protocol, score threshold and non-maximum suppression in torch.

A detection family is a store :class:`~edgecompute_ml.Family` whose task is ``object-detection``
and whose model has ``detect(pixels) -> (probs, boxes)``: per query, class probabilities (N, Q,
classes, "no object" already dropped) and boxes as (cx, cy, w, h) relative to the input image
(0..1). ``edgecompute_ml.register_detection_family`` adds one (YOLOS is built in:
``_architectures/yolos.py``); :func:`postprocess` turns those into boxes in pixel coordinates of
the original image, with labels and scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import attrs
import torch

__all__ = ["Detection", "Detector", "batched_nms", "box_iou", "nms", "postprocess"]


class Detector(Protocol):
    labels: tuple[str, ...]

    def detect(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def weight_bytes(self) -> int: ...


@attrs.frozen
class Detection:
    label: str
    score: float
    box: tuple[float, float, float, float]  # xmin, ymin, xmax, ymax in pixels of the original image

    def as_dict(self) -> dict[str, Any]:
        xmin, ymin, xmax, ymax = self.box
        return {"label": self.label, "score": self.score,
                "box": {"xmin": xmin, "ymin": ymin, "xmax": xmax, "ymax": ymax}}


# -- non-maximum suppression ----------------------------------------------------------------------

def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of every box in ``a`` (N, 4) with every box in ``b`` (M, 4), boxes as x1, y1, x2, y2."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS: indices of the kept boxes, highest score first. A box is dropped when its IoU
    with a kept, higher-scoring box exceeds ``iou_threshold``."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = torch.argsort(scores, descending=True, stable=True)
    iou = box_iou(boxes[order], boxes[order]).cpu()
    suppressed = torch.zeros(len(order), dtype=torch.bool)
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= iou[i] > iou_threshold
    return order[torch.tensor(keep, dtype=torch.long, device=order.device)]


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Class-wise NMS: boxes of different classes never suppress each other."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    # move each class to its own region of the plane, so one NMS pass serves all classes
    offset = classes.to(boxes.dtype)[:, None] * (boxes.max() - boxes.min() + 1)
    return nms(boxes + offset, scores, iou_threshold)


def postprocess(probs: torch.Tensor, boxes: torch.Tensor, labels: Sequence[str], size: tuple[int, int], *,
                threshold: float = 0.5, iou_threshold: float = 0.5, max_detections: int = 100) -> list[Detection]:
    """One image's (Q, classes) probabilities and (Q, 4) relative cx, cy, w, h boxes -> detections
    above ``threshold`` after class-wise NMS, in pixels of an image of ``size`` (width, height)."""
    scores, classes = probs.float().max(dim=-1)
    cx, cy, w, h = boxes.float().unbind(-1)
    width, height = size
    xyxy = torch.stack([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height], -1)
    xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, width)
    xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, height)
    mask = scores > threshold
    scores, classes, xyxy = scores[mask], classes[mask], xyxy[mask]
    keep = batched_nms(xyxy, scores, classes, iou_threshold)[:max_detections]
    return [Detection(labels[int(classes[k])], float(scores[k]), tuple(float(v) for v in xyxy[k]))  # type: ignore[arg-type]
            for k in keep]
