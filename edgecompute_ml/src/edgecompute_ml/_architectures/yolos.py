"""YOLOS (``YolosForObjectDetection``): a ViT whose detection tokens become (class, box)
predictions; a detector as ``_tasks/detection.py`` describes one."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import torch
import torch.nn.functional as F

from ..errors import ModelError
from .vit import ViTConfig, ViTEncoder

__all__ = ["YolosConfig", "YolosDetector"]


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
        tensors = [t for layers in self.heads.values() for pair in layers for t in pair]
        return self.encoder.weight_bytes() + sum(t.numel() * t.element_size() for t in tensors)

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
