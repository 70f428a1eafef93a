"""A compact CLIP (image and text towers, projections, logit scale) for zero-shot classification.

Reads transformers' ``CLIPModel`` names (``vision_model.*``, ``text_model.*``,
``visual_projection``, ``text_projection``, ``logit_scale``). The text tower is causal, so
right padding never changes the pooled (end-of-text) state and batches need no padding mask.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import torch
import torch.nn.functional as F

from ..errors import ModelError
from .dense import Dense
from .vit import ACTIVATIONS

__all__ = ["CLIPConfig", "CLIPModel", "TowerConfig"]


@attrs.frozen
class TowerConfig:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], source: str, tower: str) -> TowerConfig:
        act = config.get("hidden_act", "quick_gelu")
        if act not in ACTIVATIONS:
            raise ModelError(f"{source}: {tower} hidden_act {act!r} not supported ({', '.join(ACTIVATIONS)})")
        return cls(int(config["hidden_size"]), int(config["num_hidden_layers"]), int(config["num_attention_heads"]),
                   int(config["intermediate_size"]), float(config.get("layer_norm_eps", 1e-5)), act)

    def layer_tensors(self, prefix: str) -> dict[str, tuple[int, ...]]:
        h, i = self.hidden_size, self.intermediate_size
        out: dict[str, tuple[int, ...]] = {}
        for n in range(self.num_hidden_layers):
            q = f"{prefix}encoder.layers.{n}."
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                out[f"{q}self_attn.{proj}.weight"] = (h, h)
                out[f"{q}self_attn.{proj}.bias"] = (h,)
            out |= {q + "layer_norm1.weight": (h,), q + "layer_norm1.bias": (h,),
                    q + "layer_norm2.weight": (h,), q + "layer_norm2.bias": (h,),
                    q + "mlp.fc1.weight": (i, h), q + "mlp.fc1.bias": (i,),
                    q + "mlp.fc2.weight": (h, i), q + "mlp.fc2.bias": (h,)}
        return out


@attrs.frozen
class CLIPConfig:
    vision: TowerConfig
    text: TowerConfig
    projection_dim: int
    image_size: int
    patch_size: int
    vocab_size: int
    max_position_embeddings: int
    eos_token_id: int
    num_channels: int = 3

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], source: str = "config.json") -> CLIPConfig:
        try:
            v, t = config["vision_config"], config["text_config"]
            return cls(
                vision=TowerConfig.from_hf(v, source, "vision_config"),
                text=TowerConfig.from_hf(t, source, "text_config"),
                projection_dim=int(config.get("projection_dim", 512)),
                image_size=int(v.get("image_size", 224)),
                patch_size=int(v.get("patch_size", 32)),
                num_channels=int(v.get("num_channels", 3)),
                vocab_size=int(t["vocab_size"]),
                max_position_embeddings=int(t.get("max_position_embeddings", 77)),
                eos_token_id=int(t.get("eos_token_id", 2)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{source}: invalid CLIP config: {type(exc).__name__}: {exc}") from exc

    @property
    def positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    def expected_tensors(self) -> dict[str, tuple[int, ...]]:
        vh, th, p = self.vision.hidden_size, self.text.hidden_size, self.patch_size
        out: dict[str, tuple[int, ...]] = {
            "logit_scale": (),
            "vision_model.embeddings.class_embedding": (vh,),
            "vision_model.embeddings.patch_embedding.weight": (vh, self.num_channels, p, p),
            "vision_model.embeddings.position_embedding.weight": (self.positions, vh),
            "vision_model.pre_layrnorm.weight": (vh,), "vision_model.pre_layrnorm.bias": (vh,),
            "vision_model.post_layernorm.weight": (vh,), "vision_model.post_layernorm.bias": (vh,),
            "visual_projection.weight": (self.projection_dim, vh),
            "text_model.embeddings.token_embedding.weight": (self.vocab_size, th),
            "text_model.embeddings.position_embedding.weight": (self.max_position_embeddings, th),
            "text_model.final_layer_norm.weight": (th,), "text_model.final_layer_norm.bias": (th,),
            "text_projection.weight": (self.projection_dim, th),
        }
        return out | self.vision.layer_tensors("vision_model.") | self.text.layer_tensors("text_model.")


class _Tower:
    """The pre-norm transformer both towers share (CLIPEncoder). Its layers' tensors are taken out
    of ``w`` (the model keeps the rest): the linear weights are held once, as :class:`Dense`."""

    def __init__(self, config: TowerConfig, w: dict[str, torch.Tensor], prefix: str, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.config = config
        self.layers: list[tuple[tuple[torch.Tensor, torch.Tensor], Dense, Dense, tuple[torch.Tensor, torch.Tensor],
                                Dense, Dense]] = []
        for n in range(config.num_hidden_layers):
            q = f"{prefix}encoder.layers.{n}."
            a = q + "self_attn."
            self.layers.append((
                (w.pop(q + "layer_norm1.weight"), w.pop(q + "layer_norm1.bias")),
                Dense(torch.cat([w.pop(a + "q_proj.weight"), w.pop(a + "k_proj.weight"), w.pop(a + "v_proj.weight")]),
                      torch.cat([w.pop(a + "q_proj.bias"), w.pop(a + "k_proj.bias"), w.pop(a + "v_proj.bias")]),
                      device, dtype),
                Dense(w.pop(a + "out_proj.weight"), w.pop(a + "out_proj.bias"), device, dtype),
                (w.pop(q + "layer_norm2.weight"), w.pop(q + "layer_norm2.bias")),
                Dense(w.pop(q + "mlp.fc1.weight"), w.pop(q + "mlp.fc1.bias"), device, dtype,
                      gelu=config.hidden_act == "gelu"),
                Dense(w.pop(q + "mlp.fc2.weight"), w.pop(q + "mlp.fc2.bias"), device, dtype),
            ))
        self._act = ACTIVATIONS[config.hidden_act]

    def weight_bytes(self) -> int:
        dense = sum(lin.nbytes for _, qkv, o, _, f1, f2 in self.layers for lin in (qkv, o, f1, f2))
        norms = [t for ln1, _, _, ln2, _, _ in self.layers for t in (*ln1, *ln2)]
        return dense + sum(t.numel() * t.element_size() for t in norms)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        c = self.config
        b, t, h = x.shape
        nh = c.num_attention_heads
        hd = h // nh
        for ln1, qkv_lin, o_lin, ln2, f1_lin, f2_lin in self.layers:
            y = F.layer_norm(x, (h,), *ln1, eps=c.layer_norm_eps)
            qkv = qkv_lin(y).view(b, t, 3, nh, hd).permute(2, 0, 3, 1, 4)
            attn = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=causal)
            x = x + o_lin(attn.transpose(1, 2).reshape(b, t, h))
            y = F.layer_norm(x, (h,), *ln2, eps=c.layer_norm_eps)
            x = x + f2_lin(f1_lin(y) if f1_lin.gelu else self._act(f1_lin(y)))
        return x


class CLIPModel:
    """Image embeddings, text embeddings and the image-text logits of ``CLIPModel``."""

    family = "clip"

    def __init__(self, config: CLIPConfig, weights: Mapping[str, torch.Tensor], dtype: torch.dtype,
                 device: torch.device) -> None:
        self.config = config
        self.dtype = dtype
        self.device = device
        self.weights = dict(weights)
        w = self.weights
        self.vision = _Tower(config.vision, w, "vision_model.", device, dtype)
        self.text = _Tower(config.text, w, "text_model.", device, dtype)

    def weight_bytes(self) -> int:
        rest = sum(t.numel() * t.element_size() for t in self.weights.values())
        return rest + self.vision.weight_bytes() + self.text.weight_bytes()

    @torch.inference_mode()
    def image_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels (N, C, H, W) -> projected image embeddings (N, projection_dim), float32, not normalised."""
        c, w = self.config, self.weights
        pixels = pixels.to(device=self.device, dtype=self.dtype)
        if pixels.shape[-2:] != (c.image_size, c.image_size):
            raise ModelError(f"CLIP expects {c.image_size}x{c.image_size} images, got "
                             f"{pixels.shape[-2]}x{pixels.shape[-1]}")
        h = c.vision.hidden_size
        x = F.conv2d(pixels, w["vision_model.embeddings.patch_embedding.weight"], stride=c.patch_size)
        x = x.flatten(2).transpose(1, 2)
        cls = w["vision_model.embeddings.class_embedding"].expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + w["vision_model.embeddings.position_embedding.weight"]
        x = F.layer_norm(x, (h,), w["vision_model.pre_layrnorm.weight"], w["vision_model.pre_layrnorm.bias"],
                         eps=c.vision.layer_norm_eps)
        x = self.vision.forward(x, causal=False)
        pooled = F.layer_norm(x[:, 0], (h,), w["vision_model.post_layernorm.weight"],
                              w["vision_model.post_layernorm.bias"], eps=c.vision.layer_norm_eps)
        return F.linear(pooled, w["visual_projection.weight"]).float()

    @torch.inference_mode()
    def text_embeds(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids (N, T), right-padded, each with its end-of-text token -> (N, projection_dim), float32."""
        c, w = self.config, self.weights
        input_ids = input_ids.to(self.device)
        t = input_ids.shape[1]
        if t > c.max_position_embeddings:
            raise ModelError(f"text of {t} tokens exceeds CLIP's {c.max_position_embeddings} positions")
        h = c.text.hidden_size
        x = F.embedding(input_ids, w["text_model.embeddings.token_embedding.weight"])
        x = x + w["text_model.embeddings.position_embedding.weight"][:t]
        x = self.text.forward(x, causal=True)
        x = F.layer_norm(x, (h,), w["text_model.final_layer_norm.weight"], w["text_model.final_layer_norm.bias"],
                         eps=c.text.layer_norm_eps)
        if c.eos_token_id == 2:  # configs before transformers#24773 pool at the highest id (the EOS of CLIP's vocab)
            where = input_ids.to(torch.int).argmax(dim=-1)
        else:
            where = (input_ids == c.eos_token_id).to(torch.int).argmax(dim=-1)
        pooled = x[torch.arange(x.shape[0], device=x.device), where]
        return F.linear(pooled, w["text_projection.weight"]).float()

    def logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """logits_per_image (N images, M texts): scaled cosine similarities."""
        scale = self.weights["logit_scale"].float().exp()
        return scale * F.normalize(image_embeds, dim=-1) @ F.normalize(text_embeds, dim=-1).T
