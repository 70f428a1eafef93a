"""Object detection: the detector protocol, YOLOS (built in), score threshold and non-maximum
suppression in torch.

A detection family is a store :class:`~edgecompute_ml.store.Family` whose task is
``object-detection`` and whose model has ``detect(pixels) -> (probs, boxes)``: per query, class
probabilities (N, Q, classes, "no object" already dropped) and boxes as (cx, cy, w, h) relative to
the input image (0..1). :func:`register_detection_family` adds one; :func:`postprocess` turns
those into boxes in pixel coordinates of the original image, with labels and scores.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import attrs
import torch
import torch.nn.functional as F

from .errors import ModelError
from .vit import ViTConfig, ViTEncoder

__all__ = ["Detection", "Detector", "YolosConfig", "YolosDetector", "batched_nms", "box_iou", "nms", "postprocess",
           "register_detection_family"]

OBJECT_DETECTION = "object-detection"


class Detector(Protocol):
    labels: tuple[str, ...]

    def detect(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def weight_bytes(self) -> int: ...


def register_detection_family(name: str, *, model_types: tuple[str, ...], architectures: tuple[str, ...],
                              parse: Callable[[Mapping[str, Any], str, Any], Any], build: Callable[..., Any]) -> None:
    """Add a detection family: ``parse(config_dict, source, tensor_names)`` returns a config with
    ``expected_tensors()``; ``build(config, weights, dtype, device)`` returns a :class:`Detector`."""
    from .store import Family, register_family
    from .vision import load_vision_model

    register_family(Family(name, OBJECT_DETECTION, model_types, architectures, parse, build, load_vision_model))


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


# -- YOLOS --------------------------------------------------------------------------------------

@attrs.frozen
class YolosConfig:
    vit: ViTConfig

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], source: str = "config.json") -> YolosConfig:
        config = {"image_size": [512, 864], **config}
        try:
            detection_tokens = int(config.get("num_detection_tokens", 100))
        except (TypeError, ValueError) as exc:
            raise ModelError(f"{source}: invalid YOLOS config: num_detection_tokens: {exc}") from exc
        vit = ViTConfig.from_hf(config, source, detection_tokens=detection_tokens,
                                mid_position_embeddings=bool(config.get("use_mid_position_embeddings", True)))
        return cls(vit)

    @property
    def labels(self) -> tuple[str, ...]:
        return self.vit.labels

    def expected_tensors(self) -> dict[str, tuple[int, ...]]:
        h, n = self.vit.hidden_size, len(self.labels)
        out = self.vit.encoder_tensors()
        for head, final in (("class_labels_classifier", n + 1), ("bbox_predictor", 4)):
            out |= {f"{head}.layers.0.weight": (h, h), f"{head}.layers.0.bias": (h,),
                    f"{head}.layers.1.weight": (h, h), f"{head}.layers.1.bias": (h,),
                    f"{head}.layers.2.weight": (final, h), f"{head}.layers.2.bias": (final,)}
        return out


def _mlp(x: torch.Tensor, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    for i, (w, b) in enumerate(layers):
        x = F.linear(x, w, b)
        if i < len(layers) - 1:
            x = F.relu(x)
    return x


class YolosDetector:
    """``YolosForObjectDetection``: a ViT whose detection tokens become (class, box) predictions."""

    family = "yolos"

    def __init__(self, config: YolosConfig, weights: Mapping[str, torch.Tensor], dtype: torch.dtype,
                 device: torch.device) -> None:
        self.config = config
        self.labels = config.labels
        self.encoder = ViTEncoder(config.vit, weights, dtype, device)
        self.heads = {head: [(weights[f"{head}.layers.{i}.weight"], weights[f"{head}.layers.{i}.bias"])
                             for i in range(3)] for head in ("class_labels_classifier", "bbox_predictor")}

    def weight_bytes(self) -> int:
        tensors = [*self.encoder.tensors()] + [t for layers in self.heads.values() for pair in layers for t in pair]
        return sum(t.numel() * t.element_size() for t in tensors)

    @torch.inference_mode()
    def raw(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (N, Q, classes + 1), boxes (N, Q, 4) as relative cx, cy, w, h), float32."""
        hidden = self.encoder.forward(pixels)[:, -self.config.vit.detection_tokens:]
        logits = _mlp(hidden, self.heads["class_labels_classifier"]).float()
        boxes = _mlp(hidden, self.heads["bbox_predictor"]).float().sigmoid()
        return logits, boxes

    def detect(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, boxes = self.raw(pixels)
        return logits.softmax(-1)[..., :-1], boxes
