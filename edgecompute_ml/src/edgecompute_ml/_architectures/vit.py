"""A compact Vision Transformer: ViT image classifiers and the encoder YOLOS detectors share.

Reads transformers' names (``vit.embeddings.*``, ``vit.encoder.layer.N.attention.attention.query``,
``layernorm_before``/``layernorm_after``, ``classifier``), which are also the names candle's ViT
reads; checkpoints saved from a bare ``ViTModel`` (no ``vit.`` prefix) load too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs
import torch
import torch.nn.functional as F

from ..errors import ModelError
from .dense import Dense

__all__ = ["ViTClassifier", "ViTConfig", "ViTEncoder"]

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu,
}


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


@attrs.frozen
class ViTConfig:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    image_size: tuple[int, int] = (224, 224)
    patch_size: int = 16
    num_channels: int = 3
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    qkv_bias: bool = True
    labels: tuple[str, ...] = ()
    prefix: str = "vit."
    #: YOLOS: detection tokens appended after the patches, and per-layer position embeddings
    detection_tokens: int = 0
    mid_position_embeddings: bool = False

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], source: str = "config.json", **extra: Any) -> ViTConfig:
        try:
            act = config.get("hidden_act", "gelu")
            if act not in ACTIVATIONS:
                raise ModelError(f"{source}: hidden_act {act!r} not supported ({', '.join(ACTIVATIONS)})")
            return cls(
                hidden_size=int(config["hidden_size"]),
                num_hidden_layers=int(config["num_hidden_layers"]),
                num_attention_heads=int(config["num_attention_heads"]),
                intermediate_size=int(config["intermediate_size"]),
                image_size=_pair(config.get("image_size", 224)),
                patch_size=int(config.get("patch_size", 16)),
                num_channels=int(config.get("num_channels", 3)),
                layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)),
                hidden_act=act,
                qkv_bias=bool(config.get("qkv_bias", True)),
                labels=labels_from_config(config),
                **extra,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{source}: invalid ViT config: {type(exc).__name__}: {exc}") from exc

    def with_prefix(self, tensor_names: Any) -> ViTConfig:
        names = set(tensor_names)
        if "vit.embeddings.cls_token" not in names and "embeddings.cls_token" in names:
            return attrs.evolve(self, prefix="")
        return self

    @property
    def grid(self) -> tuple[int, int]:
        return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size

    @property
    def positions(self) -> int:
        return 1 + self.grid[0] * self.grid[1] + self.detection_tokens

    def encoder_tensors(self) -> dict[str, tuple[int, ...]]:
        h, i, p, ps = self.hidden_size, self.intermediate_size, self.prefix, self.patch_size
        out: dict[str, tuple[int, ...]] = {
            p + "embeddings.cls_token": (1, 1, h),
            p + "embeddings.position_embeddings": (1, self.positions, h),
            p + "embeddings.patch_embeddings.projection.weight": (h, self.num_channels, ps, ps),
            p + "embeddings.patch_embeddings.projection.bias": (h,),
            p + "layernorm.weight": (h,), p + "layernorm.bias": (h,),
        }
        if self.detection_tokens:
            out[p + "embeddings.detection_tokens"] = (1, self.detection_tokens, h)
        if self.mid_position_embeddings:
            out[p + "encoder.mid_position_embeddings"] = (self.num_hidden_layers - 1, 1, self.positions, h)
        for n in range(self.num_hidden_layers):
            q = f"{p}encoder.layer.{n}."
            for part in ("attention.attention.query", "attention.attention.key", "attention.attention.value"):
                out[q + part + ".weight"] = (h, h)
                if self.qkv_bias:
                    out[q + part + ".bias"] = (h,)
            out |= {
                q + "attention.output.dense.weight": (h, h), q + "attention.output.dense.bias": (h,),
                q + "intermediate.dense.weight": (i, h), q + "intermediate.dense.bias": (i,),
                q + "output.dense.weight": (h, i), q + "output.dense.bias": (h,),
                q + "layernorm_before.weight": (h,), q + "layernorm_before.bias": (h,),
                q + "layernorm_after.weight": (h,), q + "layernorm_after.bias": (h,),
            }
        return out

    def expected_tensors(self) -> dict[str, tuple[int, ...]]:
        return self.encoder_tensors() | {"classifier.weight": (len(self.labels), self.hidden_size),
                                         "classifier.bias": (len(self.labels),)}


def labels_from_config(config: Mapping[str, Any]) -> tuple[str, ...]:
    """Class names in index order from ``id2label`` (or ``LABEL_n`` for ``num_labels``)."""
    id2label = config.get("id2label")
    if isinstance(id2label, Mapping) and id2label:
        by_index = {int(k): str(v) for k, v in id2label.items()}
        if sorted(by_index) != list(range(len(by_index))):
            raise ValueError(f"id2label keys must be 0..{len(by_index) - 1}")
        return tuple(by_index[i] for i in range(len(by_index)))
    return tuple(f"LABEL_{i}" for i in range(int(config.get("num_labels", 2))))


def interpolate_grid(pos: torch.Tensor, grid: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    """Patch position embeddings (..., gh*gw, h) laid on their grid and resized bicubically."""
    if grid == target:
        return pos
    lead = pos.shape[:-2]
    h = pos.shape[-1]
    flat = pos.reshape(-1, grid[0], grid[1], h).permute(0, 3, 1, 2)
    flat = F.interpolate(flat.float(), size=target, mode="bicubic", align_corners=False).to(pos.dtype)
    return flat.permute(0, 2, 3, 1).reshape(*lead, target[0] * target[1], h)


class ViTEncoder:
    """Pixels (N, C, H, W) -> final hidden states (N, 1 + patches + detection tokens, hidden)."""

    def __init__(self, config: ViTConfig, weights: Mapping[str, torch.Tensor], dtype: torch.dtype,
                 device: torch.device) -> None:
        self.config = config
        self.dtype = dtype
        self.device = device
        p, w = config.prefix, weights
        self.cls = w[p + "embeddings.cls_token"]
        self.pos = w[p + "embeddings.position_embeddings"]
        self.patch = (w[p + "embeddings.patch_embeddings.projection.weight"],
                      w[p + "embeddings.patch_embeddings.projection.bias"])
        self.det = w.get(p + "embeddings.detection_tokens")
        self.mid = w.get(p + "encoder.mid_position_embeddings")
        self.ln = (w[p + "layernorm.weight"], w[p + "layernorm.bias"])
        self.layers: list[tuple[tuple[torch.Tensor, torch.Tensor], Dense, Dense, tuple[torch.Tensor, torch.Tensor],
                                Dense, Dense]] = []
        for n in range(config.num_hidden_layers):
            q = f"{p}encoder.layer.{n}."
            a = q + "attention.attention."
            bias = (torch.cat([w[a + "query.bias"], w[a + "key.bias"], w[a + "value.bias"]]) if config.qkv_bias
                    else None)
            self.layers.append((
                (w[q + "layernorm_before.weight"], w[q + "layernorm_before.bias"]),
                Dense(torch.cat([w[a + "query.weight"], w[a + "key.weight"], w[a + "value.weight"]]), bias,
                      device, dtype),
                Dense(w[q + "attention.output.dense.weight"], w[q + "attention.output.dense.bias"], device, dtype),
                (w[q + "layernorm_after.weight"], w[q + "layernorm_after.bias"]),
                Dense(w[q + "intermediate.dense.weight"], w[q + "intermediate.dense.bias"], device, dtype,
                      gelu=config.hidden_act == "gelu"),
                Dense(w[q + "output.dense.weight"], w[q + "output.dense.bias"], device, dtype),
            ))
        self._act = ACTIVATIONS[config.hidden_act]

    def tensors(self) -> list[torch.Tensor]:
        """The float tensors besides the linear layers' weights (see :meth:`weight_bytes`)."""
        out = [self.cls, self.pos, *self.patch, *self.ln]
        out += [t for lb, qkv, o, la, i, d in self.layers for t in (*lb, *la)]
        return out + [t for t in (self.det, self.mid) if t is not None]

    def weight_bytes(self) -> int:
        dense = sum(lin.nbytes for lb, qkv, o, la, i, d in self.layers for lin in (qkv, o, i, d))
        return dense + sum(t.numel() * t.element_size() for t in self.tensors())

    def _positions(self, pos: torch.Tensor, target: tuple[int, int]) -> torch.Tensor:
        """Position embeddings (…, positions, h) for a patch grid of ``target``."""
        d = self.config.detection_tokens
        end = pos.shape[-2] - d
        patches = interpolate_grid(pos[..., 1:end, :], self.config.grid, target)
        return torch.cat([pos[..., :1, :], patches, pos[..., end:, :]], dim=-2)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        c = self.config
        pixels = pixels.to(device=self.device, dtype=self.dtype)
        b, _, height, width = pixels.shape
        target = (height // c.patch_size, width // c.patch_size)
        if target[0] < 1 or target[1] < 1:
            raise ModelError(f"image of {height}x{width} pixels is smaller than one {c.patch_size}-pixel patch")
        x = F.conv2d(pixels, *self.patch, stride=c.patch_size).flatten(2).transpose(1, 2)
        parts = [self.cls.expand(b, -1, -1), x]
        if self.det is not None:
            parts.append(self.det.expand(b, -1, -1))
        x = torch.cat(parts, dim=1) + self._positions(self.pos, target)
        mid = self._positions(self.mid, target) if self.mid is not None else None
        h, nh = c.hidden_size, c.num_attention_heads
        hd = h // nh
        t = x.shape[1]
        for n, (lb, qkv_lin, o_lin, la, i_lin, d_lin) in enumerate(self.layers):
            y = F.layer_norm(x, (h,), *lb, eps=c.layer_norm_eps)
            qkv = qkv_lin(y).view(b, t, 3, nh, hd).permute(2, 0, 3, 1, 4)
            attn = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2]).transpose(1, 2).reshape(b, t, h)
            x = x + o_lin(attn)
            y = F.layer_norm(x, (h,), *la, eps=c.layer_norm_eps)
            x = x + d_lin(i_lin(y) if i_lin.gelu else self._act(i_lin(y)))
            if mid is not None and n < len(self.layers) - 1:
                x = x + mid[n]
        return F.layer_norm(x, (h,), *self.ln, eps=c.layer_norm_eps)


class ViTClassifier:
    """``ViTForImageClassification``: logits from the final [CLS] state."""

    family = "vit"

    def __init__(self, config: ViTConfig, weights: Mapping[str, torch.Tensor], dtype: torch.dtype,
                 device: torch.device) -> None:
        self.config = config
        self.encoder = ViTEncoder(config, weights, dtype, device)
        self.head = (weights["classifier.weight"], weights["classifier.bias"])

    def weight_bytes(self) -> int:
        return self.encoder.weight_bytes() + sum(t.numel() * t.element_size() for t in self.head)

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder.forward(pixels)
        return F.linear(hidden[:, 0], *self.head).float()
