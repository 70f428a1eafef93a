"""A compact Whisper (encoder-decoder speech recognition) on torch, from HF/candle-layout weights.

The encoder runs once per 30 s window; the decoder steps one token at a time through a
preallocated self-attention KV cache, with the cross-attention keys/values computed once per
window. Attention is ``scaled_dot_product_attention`` throughout.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.nn.functional as F

from .._formats.quant import Int8Codes, embedding, fuse, into_huge_pages, linear, prepare, tensor_bytes
from .._formats.quant import logits as quant_logits
from ..errors import ModelError

__all__ = ["WhisperCache", "WhisperConfig", "WhisperModel"]

MODEL_TYPES = ("whisper",)
ARCHITECTURES = ("WhisperForConditionalGeneration", "WhisperModel")
N_SAMPLES = 480_000  # 30 s at 16 kHz: the window every Whisper checkpoint is trained on
N_FRAMES = 3000


@attrs.frozen
class WhisperConfig:
    vocab_size: int
    num_mel_bins: int
    d_model: int
    encoder_layers: int
    encoder_attention_heads: int
    encoder_ffn_dim: int
    decoder_layers: int
    decoder_attention_heads: int
    decoder_ffn_dim: int
    max_source_positions: int
    max_target_positions: int
    scale_embedding: bool = False
    decoder_start_token_id: int = 50257
    eos_token_id: int = 50256
    # from generation_config.json (what decoding needs: special tokens and suppression)
    suppress_tokens: tuple[int, ...] = ()
    begin_suppress_tokens: tuple[int, ...] = ()
    no_timestamps_token_id: int | None = None
    lang_to_id: Mapping[str, int] = attrs.field(factory=dict)
    task_to_id: Mapping[str, int] = attrs.field(factory=dict)
    is_multilingual: bool = False
    max_initial_timestamp_index: int = 50

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return (self.eos_token_id,)

    @property
    def timestamp_begin(self) -> int | None:
        return None if self.no_timestamps_token_id is None else self.no_timestamps_token_id + 1

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], source: str = "config.json") -> WhisperConfig:
        act = config.get("activation_function", "gelu")
        if act != "gelu":
            raise ModelError(f"{source}: activation_function {act!r} not supported (only 'gelu')")
        gen: dict[str, Any] = {}
        gen_path = Path(source).parent / "generation_config.json"
        if gen_path.is_file():
            try:
                gen = json.loads(gen_path.read_text())
            except ValueError as exc:
                raise ModelError(f"{gen_path}: invalid JSON: {exc}") from exc

        def ids(key: str) -> tuple[int, ...]:
            # recent transformers writes "suppress_tokens": null; read it as no suppression
            value = gen.get(key, config.get(key))
            return tuple(int(v) for v in value) if isinstance(value, list) else ()

        try:
            d_model = int(config["d_model"])
            out = cls(
                vocab_size=int(config["vocab_size"]), num_mel_bins=int(config.get("num_mel_bins", 80)),
                d_model=d_model, encoder_layers=int(config["encoder_layers"]),
                encoder_attention_heads=int(config["encoder_attention_heads"]),
                encoder_ffn_dim=int(config["encoder_ffn_dim"]), decoder_layers=int(config["decoder_layers"]),
                decoder_attention_heads=int(config["decoder_attention_heads"]),
                decoder_ffn_dim=int(config["decoder_ffn_dim"]),
                max_source_positions=int(config.get("max_source_positions", 1500)),
                max_target_positions=int(config.get("max_target_positions", 448)),
                scale_embedding=bool(config.get("scale_embedding", False)),
                decoder_start_token_id=int(gen.get("decoder_start_token_id", config.get("decoder_start_token_id",
                                                                                       50257))),
                eos_token_id=int(gen.get("eos_token_id", config.get("eos_token_id", 50256))),
                suppress_tokens=ids("suppress_tokens"), begin_suppress_tokens=ids("begin_suppress_tokens"),
                no_timestamps_token_id=gen.get("no_timestamps_token_id"),
                lang_to_id=dict(gen.get("lang_to_id") or {}), task_to_id=dict(gen.get("task_to_id") or {}),
                is_multilingual=bool(gen.get("is_multilingual", False)),
                max_initial_timestamp_index=int(gen.get("max_initial_timestamp_index", 50)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{source}: not a valid Whisper config: {exc!r}") from exc
        for heads, name in ((out.encoder_attention_heads, "encoder"), (out.decoder_attention_heads, "decoder")):
            if d_model % heads:
                raise ModelError(f"{source}: d_model {d_model} is not divisible by {name}_attention_heads {heads}")
        return out

    def expected_tensors(self) -> dict[str, tuple[int, ...]]:
        d = self.d_model
        out: dict[str, tuple[int, ...]] = {}
        e, dec = "model.encoder", "model.decoder"
        out[f"{e}.conv1.weight"], out[f"{e}.conv1.bias"] = (d, self.num_mel_bins, 3), (d,)
        out[f"{e}.conv2.weight"], out[f"{e}.conv2.bias"] = (d, d, 3), (d,)
        out[f"{e}.embed_positions.weight"] = (self.max_source_positions, d)
        out[f"{dec}.embed_tokens.weight"] = (self.vocab_size, d)
        out[f"{dec}.embed_positions.weight"] = (self.max_target_positions, d)
        for prefix, layers, ffn, cross in ((e, self.encoder_layers, self.encoder_ffn_dim, False),
                                           (dec, self.decoder_layers, self.decoder_ffn_dim, True)):
            out[f"{prefix}.layer_norm.weight"] = out[f"{prefix}.layer_norm.bias"] = (d,)
            for i in range(layers):
                p = f"{prefix}.layers.{i}"
                for attn in ("self_attn", "encoder_attn") if cross else ("self_attn",):
                    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                        out[f"{p}.{attn}.{proj}.weight"] = (d, d)
                        if proj != "k_proj":
                            out[f"{p}.{attn}.{proj}.bias"] = (d,)
                    out[f"{p}.{attn}_layer_norm.weight"] = out[f"{p}.{attn}_layer_norm.bias"] = (d,)
                out[f"{p}.fc1.weight"], out[f"{p}.fc1.bias"] = (ffn, d), (ffn,)
                out[f"{p}.fc2.weight"], out[f"{p}.fc2.bias"] = (d, ffn), (d,)
                out[f"{p}.final_layer_norm.weight"] = out[f"{p}.final_layer_norm.bias"] = (d,)
        return out


class WhisperCache:
    """Decoder state for one window: self-attention K/V (preallocated) and cross-attention K/V."""

    def __init__(self, self_kv: torch.Tensor, cross: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.self_kv = self_kv  # [layers, 2, batch, heads, max_len, head_dim]
        self.cross = cross
        self.length = 0

    @property
    def capacity(self) -> int:
        return int(self.self_kv.shape[4])

    def reorder(self, index: torch.Tensor) -> None:
        """Keep the self-attention rows ``index`` (beam search). Cross K/V rows all come from the
        same audio, so they stay as they are."""
        self.self_kv = self.self_kv.index_select(2, index)

    def expand(self, rows: int) -> None:
        """Grow a one-row cache to ``rows`` identical rows (copied once: attention over stride-0
        views would copy them again at every step)."""
        self.self_kv = self.self_kv.expand(-1, -1, rows, -1, -1, -1).contiguous()
        self.cross = [(k.expand(rows, -1, -1, -1).contiguous(), v.expand(rows, -1, -1, -1).contiguous())
                      for k, v in self.cross]


def _ln(x: torch.Tensor, w: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], w[f"{name}.weight"], w[f"{name}.bias"], 1e-5)


class WhisperModel:
    def __init__(self, config: WhisperConfig, weights: dict[str, Any], dtype: torch.dtype,
                 device: torch.device) -> None:
        self.config, self.dtype, self.device = config, dtype, device
        d = config.d_model
        self.w = w = weights
        zero = torch.zeros(d, dtype=dtype, device=device)
        # fused projections: one matmul for q/k/v of self-attention, one for k/v of cross-attention
        # (Whisper's k projections have no bias)
        for prefix, layers in (("model.encoder", config.encoder_layers), ("model.decoder", config.decoder_layers)):
            for i in range(layers):
                p = f"{prefix}.layers.{i}.self_attn"
                w[f"{p}.qkv.weight"] = fuse([w.pop(f"{p}.q_proj.weight"), w.pop(f"{p}.k_proj.weight"),
                                             w.pop(f"{p}.v_proj.weight")])
                w[f"{p}.qkv.bias"] = torch.cat([w.pop(f"{p}.q_proj.bias"), zero, w.pop(f"{p}.v_proj.bias")])
                if prefix == "model.decoder":
                    c = f"{prefix}.layers.{i}.encoder_attn"
                    w[f"{c}.kv.weight"] = fuse([w.pop(f"{c}.k_proj.weight"), w.pop(f"{c}.v_proj.weight")])
                    w[f"{c}.kv.bias"] = torch.cat([zero, w.pop(f"{c}.v_proj.bias")])
        # the output projection reads the whole [vocab, d] embedding at every token (80 MB for
        # tiny.en: memory-bound); stored transposed, [d, vocab], it streams rows instead of strided
        # dot products (measured 5.1 -> 3.7 ms per token on 2 CPU threads). The lookup reads the
        # transposed view; there is one copy of the weights.
        # dtype = "int8" (_formats/quant.py): the other linear weights arrive as int8 codes and are packed
        # here; the embedding becomes int8 rows, its top logits recomputed in float32
        for name, value in list(w.items()):
            if isinstance(value, Int8Codes) and name != "model.decoder.embed_tokens.weight":
                w[name] = prepare(value)
        embed = w["model.decoder.embed_tokens.weight"]
        self.embed_t: torch.Tensor | None = None
        if isinstance(embed, torch.Tensor):
            self.embed_t = embed.t().contiguous()
            self.embed = w["model.decoder.embed_tokens.weight"] = self.embed_t.t()
        else:
            self.embed = w["model.decoder.embed_tokens.weight"] = prepare(embed, rows=True)
        self.embed_scale = d**0.5 if config.scale_embedding else 1.0
        into_huge_pages(w.values())  # int8 weights (a decoder token reads its layers' and the embedding)

    def weight_bytes(self) -> int:
        return sum(tensor_bytes(t) for t in self.w.values())

    # -- encoder -----------------------------------------------------------------------------------

    def _attend(self, x: torch.Tensor, heads: int, p: str, *, causal: bool = False) -> torch.Tensor:
        b, t, d = x.shape
        qkv = linear(x, self.w[f"{p}.qkv.weight"], self.w[f"{p}.qkv.bias"])
        q, k, v = qkv.view(b, t, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return linear(o.transpose(1, 2).reshape(b, t, d), self.w[f"{p}.out_proj.weight"],
                        self.w[f"{p}.out_proj.bias"])

    def _ffn(self, x: torch.Tensor, p: str) -> torch.Tensor:
        h = F.gelu(linear(x, self.w[f"{p}.fc1.weight"], self.w[f"{p}.fc1.bias"]))
        return linear(h, self.w[f"{p}.fc2.weight"], self.w[f"{p}.fc2.bias"])

    def encode(self, mel: torch.Tensor) -> torch.Tensor:
        """Log-mel features ``[batch, n_mels, frames]`` -> encoder states ``[batch, frames / 2, d]``."""
        c = self.config
        if mel.dim() != 3 or mel.shape[1] != c.num_mel_bins or mel.shape[2] > 2 * c.max_source_positions:
            raise ModelError(f"Whisper expects features [batch, {c.num_mel_bins}, <= {2 * c.max_source_positions}]"
                             f", got {list(mel.shape)}")
        w, e = self.w, "model.encoder"
        x = mel.to(device=self.device, dtype=self.dtype)
        x = F.gelu(F.conv1d(x, w[f"{e}.conv1.weight"], w[f"{e}.conv1.bias"], padding=1))
        x = F.gelu(F.conv1d(x, w[f"{e}.conv2.weight"], w[f"{e}.conv2.bias"], stride=2, padding=1))
        x = x.transpose(1, 2) + w[f"{e}.embed_positions.weight"][: x.shape[2]]
        for i in range(c.encoder_layers):
            p = f"{e}.layers.{i}"
            x = x + self._attend(_ln(x, w, f"{p}.self_attn_layer_norm"), c.encoder_attention_heads, f"{p}.self_attn")
            x = x + self._ffn(_ln(x, w, f"{p}.final_layer_norm"), p)
        return _ln(x, w, f"{e}.layer_norm")

    # -- decoder -----------------------------------------------------------------------------------

    def new_cache(self, encoded: torch.Tensor, max_len: int | None = None) -> WhisperCache:
        """A decoder cache for ``encoded`` (one row per sequence): cross K/V computed here, once."""
        c, w = self.config, self.w
        b, s, d = encoded.shape
        heads = c.decoder_attention_heads
        max_len = min(max_len or c.max_target_positions, c.max_target_positions)
        cross = []
        for i in range(c.decoder_layers):
            p = f"model.decoder.layers.{i}.encoder_attn"
            kv = linear(encoded, w[f"{p}.kv.weight"], w[f"{p}.kv.bias"])
            k, v = kv.view(b, s, 2, heads, d // heads).permute(2, 0, 3, 1, 4)
            cross.append((k.contiguous(), v.contiguous()))
        self_kv = torch.zeros(c.decoder_layers, 2, b, heads, max_len, d // heads, dtype=self.dtype, device=self.device)
        return WhisperCache(self_kv, cross)

    def decode(self, ids: torch.Tensor, cache: WhisperCache, *, last_only: bool = True) -> torch.Tensor:
        """Run ``ids [batch, t]`` at the cache's position; logits ``[batch, vocab]`` (last position)
        or ``[batch, t, vocab]``, in float32."""
        c, w = self.config, self.w
        b, t = ids.shape
        pos = cache.length
        if pos + t > cache.capacity:
            raise ModelError(f"Whisper decoder: {pos + t} positions exceed the cache ({cache.capacity}; "
                             f"max_target_positions {c.max_target_positions})")
        heads, d = c.decoder_attention_heads, c.d_model
        hd = d // heads
        x = embedding(ids.to(self.device), self.embed, self.dtype) * self.embed_scale
        x = x + w["model.decoder.embed_positions.weight"][pos:pos + t]
        mask = None
        if t > 1 and pos > 0:  # a chunk after cached tokens: causal within the chunk, all of the past
            mask = torch.ones(t, pos + t, dtype=torch.bool, device=self.device).tril(pos)
        for i in range(c.decoder_layers):
            p = f"model.decoder.layers.{i}"
            h = _ln(x, w, f"{p}.self_attn_layer_norm")
            qkv = linear(h, w[f"{p}.self_attn.qkv.weight"], w[f"{p}.self_attn.qkv.bias"])
            q, k, v = qkv.view(b, t, 3, heads, hd).permute(2, 0, 3, 1, 4)
            kv = cache.self_kv[i]
            kv[0, :, :, pos:pos + t] = k
            kv[1, :, :, pos:pos + t] = v
            o = F.scaled_dot_product_attention(q, kv[0, :, :, :pos + t], kv[1, :, :, :pos + t], attn_mask=mask,
                                               is_causal=t > 1 and pos == 0)
            x = x + linear(o.transpose(1, 2).reshape(b, t, d), w[f"{p}.self_attn.out_proj.weight"],
                             w[f"{p}.self_attn.out_proj.bias"])
            h = _ln(x, w, f"{p}.encoder_attn_layer_norm")
            q = linear(h, w[f"{p}.encoder_attn.q_proj.weight"], w[f"{p}.encoder_attn.q_proj.bias"])
            ck, cv = cache.cross[i]
            o = F.scaled_dot_product_attention(q.view(b, t, heads, hd).transpose(1, 2), ck, cv)
            x = x + linear(o.transpose(1, 2).reshape(b, t, d), w[f"{p}.encoder_attn.out_proj.weight"],
                             w[f"{p}.encoder_attn.out_proj.bias"])
            x = x + self._ffn(_ln(x, w, f"{p}.final_layer_norm"), p)
        cache.length = pos + t
        if last_only:
            x = x[:, -1]
        x = _ln(x, w, "model.decoder.layer_norm")
        if self.embed_t is None:
            return quant_logits(x, self.embed)
        return torch.matmul(x, self.embed_t).float()
