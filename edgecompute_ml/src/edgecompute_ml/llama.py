"""A compact Llama-family decoder (Llama, SmolLM2, Mistral-style), written the way candle writes it.

Grouped-query attention, rotary embeddings (HF "rotate half" layout), RMSNorm, SwiGLU MLP, tied
embeddings, and a KV cache preallocated for the whole generation. Weights are plain tensors, not
``nn.Module`` parameters: q/k/v and gate/up are fused into one matmul each at load time.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import attrs
import torch
import torch.nn.functional as F

from .errors import ModelError

__all__ = ["KVCache", "LlamaConfig", "LlamaModel"]

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
MODEL_TYPES = ("llama", "mistral")

_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


@attrs.frozen
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], source: str = "config.json") -> LlamaConfig:
        try:
            hidden = int(config["hidden_size"])
            heads = int(config["num_attention_heads"])
            # trap 1: recent transformers writes rope_theta only inside rope_parameters
            rope = config.get("rope_parameters") or {}
            theta = config.get("rope_theta", rope.get("rope_theta", 10000.0))
            rope_type = rope.get("rope_type") or (config.get("rope_scaling") or {}).get("rope_type") \
                or (config.get("rope_scaling") or {}).get("type") or "default"
            if rope_type != "default":
                raise ModelError(f"{source}: rope type {rope_type!r} is not supported (only 'default')")
            eos = config.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            return cls(
                vocab_size=int(config["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(config["intermediate_size"]),
                num_hidden_layers=int(config["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(config.get("num_key_value_heads") or heads),
                # trap 2: head_dim may differ from hidden/heads (and may be present but null)
                head_dim=int(config.get("head_dim") or hidden // heads),
                rms_norm_eps=float(config.get("rms_norm_eps", 1e-5)),
                rope_theta=float(theta),
                max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                attention_bias=bool(config.get("attention_bias", False)),
                mlp_bias=bool(config.get("mlp_bias", False)),
                bos_token_id=config.get("bos_token_id"),
                eos_token_ids=eos_ids,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{source}: invalid Llama config: {type(exc).__name__}: {exc}") from exc

    def expected_tensors(self) -> dict[str, tuple[int, ...]]:
        h, d = self.hidden_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab_size, h), "model.norm.weight": (h,)}
        if not self.tie_word_embeddings:
            out["lm_head.weight"] = (self.vocab_size, h)
        for i in range(self.num_hidden_layers):
            p = f"model.layers.{i}."
            out |= {
                p + "self_attn.q_proj.weight": (q, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, q),
                p + "mlp.gate_proj.weight": (self.intermediate_size, h),
                p + "mlp.up_proj.weight": (self.intermediate_size, h),
                p + "mlp.down_proj.weight": (h, self.intermediate_size),
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
            }
            if self.attention_bias:
                out |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                        p + "self_attn.v_proj.bias": (kv,), p + "self_attn.o_proj.bias": (h,)}
            if self.mlp_bias:
                out |= {p + "mlp.gate_proj.bias": (self.intermediate_size,),
                        p + "mlp.up_proj.bias": (self.intermediate_size,), p + "mlp.down_proj.bias": (h,)}
        return out

    def kv_bytes_per_token(self, element_size: int) -> int:
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * element_size


class KVCache:
    """Keys and values for every layer, preallocated for ``capacity`` positions."""

    def __init__(self, config: LlamaConfig, batch: int, capacity: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        shape = (config.num_hidden_layers, batch, config.num_key_value_heads, capacity, config.head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.length = 0


_FUSED_RMS = hasattr(F, "rms_norm")


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if _FUSED_RMS and x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)  # one kernel; same math in float32
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


class _Layer:
    __slots__ = ("down", "down_b", "gate_up", "gate_up_b", "ln1", "ln2", "o", "o_b", "qkv", "qkv_b")
    down: torch.Tensor
    down_b: torch.Tensor | None
    gate_up: torch.Tensor
    gate_up_b: torch.Tensor | None
    ln1: torch.Tensor
    ln2: torch.Tensor
    o: torch.Tensor
    o_b: torch.Tensor | None
    qkv: torch.Tensor
    qkv_b: torch.Tensor | None


class LlamaModel:
    """Forward pass over token ids with a KV cache; returns logits (float32)."""

    family = "llama"

    def __init__(self, config: LlamaConfig, weights: Mapping[str, torch.Tensor], dtype: torch.dtype,
                 device: torch.device) -> None:
        self.config = config
        self.dtype = dtype
        self.device = device
        w = weights
        self.embed = w["model.embed_tokens.weight"]
        self.norm = w["model.norm.weight"]
        self.lm_head = self.embed if config.tie_word_embeddings else w["lm_head.weight"]
        self.layers: list[_Layer] = []
        for i in range(config.num_hidden_layers):
            p = f"model.layers.{i}."
            layer = _Layer()
            a = p + "self_attn."
            layer.qkv = torch.cat([w[a + "q_proj.weight"], w[a + "k_proj.weight"], w[a + "v_proj.weight"]])
            layer.qkv_b = (torch.cat([w[a + "q_proj.bias"], w[a + "k_proj.bias"], w[a + "v_proj.bias"]])
                           if config.attention_bias else None)
            layer.o = w[a + "o_proj.weight"]
            layer.o_b = w.get(a + "o_proj.bias") if config.attention_bias else None
            m = p + "mlp."
            layer.gate_up = torch.cat([w[m + "gate_proj.weight"], w[m + "up_proj.weight"]])
            layer.gate_up_b = (torch.cat([w[m + "gate_proj.bias"], w[m + "up_proj.bias"]])
                               if config.mlp_bias else None)
            layer.down = w[m + "down_proj.weight"]
            layer.down_b = w.get(m + "down_proj.bias") if config.mlp_bias else None
            layer.ln1 = w[p + "input_layernorm.weight"]
            layer.ln2 = w[p + "post_attention_layernorm.weight"]
            self.layers.append(layer)
        self._rope_len = 0
        self._rope_lock = threading.Lock()
        self._cos = self._sin = torch.empty(0)
        self._ensure_rope(min(config.max_position_embeddings, 4096))

    def _ensure_rope(self, length: int) -> None:
        if length <= self._rope_len:
            return
        with self._rope_lock:
            if length > self._rope_len:
                self._build_rope(length)

    def _build_rope(self, length: int) -> None:
        c = self.config
        inv = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.int64).float() / c.head_dim))
        t = torch.arange(length, dtype=torch.float32)
        freqs = torch.outer(t, inv)
        emb = torch.cat([freqs, freqs], dim=-1)
        self._cos = emb.cos().to(self.dtype).to(self.device)
        self._sin = emb.sin().to(self.dtype).to(self.device)
        self._rope_len = length

    def new_cache(self, capacity: int, batch: int = 1) -> KVCache:
        self._ensure_rope(capacity)
        return KVCache(self.config, batch, capacity, self.dtype, self.device)

    def weight_bytes(self) -> int:
        seen: set[int] = set()
        total = 0
        for t in [self.embed, self.norm, self.lm_head] + [
            getattr(layer, s) for layer in self.layers for s in _Layer.__slots__
        ]:
            if isinstance(t, torch.Tensor) and id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        return total

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache: KVCache, *, last_only: bool = True) -> torch.Tensor:
        """Run ``input_ids`` [B, T] at positions ``cache.length ..``; returns float32 logits
        [B, V] for the last position (``last_only``) or [B, T, V]."""
        c = self.config
        b, t = input_ids.shape
        pos = cache.length
        end = pos + t
        if end > cache.capacity:
            raise ModelError(f"sequence of {end} tokens exceeds the KV cache ({cache.capacity})")
        nh, nkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q_size, kv_size = nh * hd, nkv * hd
        cos = self._cos[pos:end, None, :]  # [t, 1, hd], broadcast over heads
        sin = self._sin[pos:end, None, :]
        half = hd // 2
        x = F.embedding(input_ids, self.embed)
        if t == 1:
            mask, causal = None, False
        elif pos == 0:
            mask, causal = None, True
        else:
            mask = torch.ones(t, end, dtype=torch.bool, device=self.device).tril(diagonal=pos)
            causal = False
        rep = nh // nkv
        for i, layer in enumerate(self.layers):
            h = _rms_norm(x, layer.ln1, c.rms_norm_eps)
            qkv = F.linear(h, layer.qkv, layer.qkv_b)
            # rotary embedding on q and k together: [b, t, nh + nkv, hd]
            qk = qkv[..., :q_size + kv_size].view(b, t, nh + nkv, hd)
            qk = qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), dim=-1) * sin
            q = qk[:, :, :nh].transpose(1, 2)
            k = qk[:, :, nh:].transpose(1, 2)
            v = qkv[..., q_size + kv_size:].view(b, t, nkv, hd).transpose(1, 2)
            ck, cv = cache.k[i], cache.v[i]
            ck[:, :, pos:end] = k
            cv[:, :, pos:end] = v
            keys, values = ck[:, :, :end], cv[:, :, :end]
            if rep > 1:
                if _GQA:
                    attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal,
                                                          enable_gqa=True)
                else:
                    keys = keys.repeat_interleave(rep, dim=1)
                    values = values.repeat_interleave(rep, dim=1)
                    attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal)
            else:
                attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal)
            attn = attn.transpose(1, 2).reshape(b, t, q_size)
            x = x + F.linear(attn, layer.o, layer.o_b)
            h = _rms_norm(x, layer.ln2, c.rms_norm_eps)
            gu = F.linear(h, layer.gate_up, layer.gate_up_b)
            inter = gu.shape[-1] // 2
            x = x + F.linear(F.silu(gu[..., :inter]) * gu[..., inter:], layer.down, layer.down_b)
        cache.length = end
        if last_only:
            x = x[:, -1]
        x = _rms_norm(x, self.norm, c.rms_norm_eps)
        return F.linear(x, self.lm_head).float()
