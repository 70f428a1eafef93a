"""Decoder-only transformers of the Llama lineage, written the way candle writes them.

One implementation covers Llama (1-3.x, SmolLM2), Mistral, Qwen2/2.5, Qwen3, Gemma 2, Gemma 3
(text) and Phi-3: grouped-query attention, rotary embeddings (HF "rotate half" layout, optionally
partial), RMSNorm, gated MLPs, tied embeddings and a KV cache preallocated for the whole
generation. What differs between the families is data in :class:`LlamaConfig`:

- rotary scaling (``llama3``, ``linear``, ``longrope``/``su``), and a second, local rotary table
  for Gemma 3's sliding-window layers;
- q/k/v biases (Qwen2), per-head q/k RMSNorm (Qwen3, Gemma 3);
- Gemma's ``1 + weight`` norms, the extra norms around attention and MLP, embeddings scaled by
  ``sqrt(hidden_size)``, ``query_pre_attn_scalar``, attention and final logit soft-capping and
  GELU(tanh) MLPs;
- sliding-window attention on all layers (Mistral, Phi-3) or on some (Gemma 2/3, Qwen2);
- fused ``qkv_proj`` / ``gate_up_proj`` tensors (Phi-3).

Weights are plain tensors, not ``nn.Module`` parameters: q/k/v and gate/up are fused into one
matmul each at load time.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import torch
import torch.nn.functional as F

from .._formats.quant import embedding, fuse, into_huge_pages, linear, prepare, tensor_bytes
from .._formats.quant import logits as quant_logits
from .._kernels import build as kernels
from ..errors import ModelError, UnsupportedModelOption

__all__ = ["DECODER_FAMILIES", "KVCache", "LlamaConfig", "LlamaModel", "RopeSpec"]

# family name -> (model_types, architectures) of the configs it reads
DECODER_FAMILIES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "llama": (("llama", "mistral"), ("LlamaForCausalLM", "MistralForCausalLM")),
    "qwen2": (("qwen2",), ("Qwen2ForCausalLM",)),
    "qwen3": (("qwen3",), ("Qwen3ForCausalLM",)),
    "gemma2": (("gemma2",), ("Gemma2ForCausalLM",)),
    "gemma3": (("gemma3_text",), ("Gemma3ForCausalLM",)),
    "phi3": (("phi3",), ("Phi3ForCausalLM",)),
}
ARCHITECTURES = tuple(a for _, archs in DECODER_FAMILIES.values() for a in archs)
MODEL_TYPES = tuple(t for types, _ in DECODER_FAMILIES.values() for t in types)

_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")
_ROPE_TYPES = ("default", "linear", "llama3", "longrope")
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                "gelu_fast": "gelu_tanh", "gelu": "gelu"}
_LAYER_TYPES = ("full_attention", "sliding_attention")


def _variant(config: Mapping[str, Any]) -> str:
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    for name, (types, archs) in DECODER_FAMILIES.items():
        if model_type in types or any(a in archs for a in architectures):
            return name
    return "llama"


@attrs.frozen
class RopeSpec:
    """How one rotary table is computed (transformers' ``rope_parameters``, one layer type)."""

    theta: float = 10000.0
    kind: str = "default"  # default, linear, llama3, longrope
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 0
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float = 1.0

    @classmethod
    def parse(cls, params: Mapping[str, Any], *, theta: float, max_positions: int, original: int | None,
              rotary_dim: int, source: str, key: str) -> RopeSpec:
        kind = params.get("rope_type") or params.get("type") or "default"
        if kind == "su":  # Phi-3's first name for longrope
            kind = "longrope"
        if kind not in _ROPE_TYPES:
            raise UnsupportedModelOption(source, f"{key}.rope_type", kind, _ROPE_TYPES)
        theta = float(params.get("rope_theta") or theta)
        if kind == "default":
            return cls(theta=theta)
        if kind == "linear":
            return cls(theta=theta, kind=kind, factor=float(params["factor"]))
        orig = int(original or params.get("original_max_position_embeddings") or max_positions)
        if kind == "llama3":
            return cls(theta=theta, kind=kind, factor=float(params["factor"]),
                       low_freq_factor=float(params["low_freq_factor"]),
                       high_freq_factor=float(params["high_freq_factor"]), original_max_position_embeddings=orig)
        short = tuple(float(f) for f in params["short_factor"])
        long = tuple(float(f) for f in params["long_factor"])
        if len(short) != rotary_dim // 2 or len(long) != rotary_dim // 2:
            raise ModelError(f"{source}: {key}: short_factor and long_factor need {rotary_dim // 2} values "
                             f"(half the rotary dimension), not {len(short)} and {len(long)}")
        factor = params.get("factor") or max_positions / orig
        attention = params.get("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
        return cls(theta=theta, kind=kind, factor=float(factor), original_max_position_embeddings=orig,
                   short_factor=short, long_factor=long, attention_factor=float(attention))

    def uses_long(self, length: int) -> bool:
        """LongRoPE switches to its long factors past the pretraining length; we decide once per KV
        cache, from its capacity (as llama.cpp does from its context size), so that no cached key
        was rotated with other factors than the queries that read it."""
        return self.kind == "longrope" and length > self.original_max_position_embeddings

    def inv_freq(self, dim: int, long: bool = False) -> tuple[torch.Tensor, float]:
        """Inverse frequencies of a ``dim``-wide rotary embedding, and the cos/sin multiplier,
        computed as transformers' ROPE_INIT_FUNCTIONS compute them."""
        exponent = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
        if self.kind == "longrope":
            ext = torch.tensor(self.long_factor if long else self.short_factor, dtype=torch.float32)
            return 1.0 / (ext * self.theta ** exponent), self.attention_factor
        inv = 1.0 / (self.theta ** exponent)
        if self.kind == "linear":
            inv = inv / self.factor
        elif self.kind == "llama3":
            old = self.original_max_position_embeddings
            low_wavelen, high_wavelen = old / self.low_freq_factor, old / self.high_freq_factor
            wavelen = 2 * math.pi / inv
            scaled = torch.where(wavelen > low_wavelen, inv / self.factor, inv)
            smooth = (old / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
            inv = torch.where(medium, smoothed, scaled)
        return inv, 1.0


def _number(config: Mapping[str, Any], key: str, default: float | None) -> float | None:
    value = config.get(key, default)
    return None if value is None else float(value)


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
    variant: str = "llama"
    rope: RopeSpec = RopeSpec()
    rope_local: RopeSpec | None = None  # sliding-window layers' table (Gemma 3)
    rotary_dim: int = 0  # 0: head_dim
    qkv_bias: bool = False  # q/k/v biases without an o bias (Qwen2)
    qk_norm: bool = False
    gemma: bool = False  # 1 + weight norms, sandwich norms, scaled embeddings
    query_pre_attn_scalar: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] = ()
    activation: str = "silu"
    fused: bool = False  # qkv_proj / gate_up_proj tensors (Phi-3)

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], source: str = "config.json") -> LlamaConfig:
        try:
            return cls._from_hf(config, source)
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
            raise ModelError(f"{source}: invalid {_variant(config)} config: {type(exc).__name__}: {exc}") from exc

    @classmethod
    def _from_hf(cls, config: Mapping[str, Any], source: str) -> LlamaConfig:
        variant = _variant(config)
        gemma = variant in ("gemma2", "gemma3")
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        layers = int(config["num_hidden_layers"])
        # trap 2: head_dim may differ from hidden/heads (and may be present but null)
        head_dim = int(config.get("head_dim") or hidden // heads)
        max_positions = int(config.get("max_position_embeddings", 2048))
        # trap 1: recent transformers writes rope_theta only inside rope_parameters, Gemma 3's
        # per layer type ({"full_attention": {...}, "sliding_attention": {...}})
        rope_params = config.get("rope_parameters") or config.get("rope_scaling") or {}
        partial = float(rope_params.get("partial_rotary_factor") or config.get("partial_rotary_factor") or 1.0)
        rotary_dim = int(head_dim * partial)
        if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
            raise ModelError(f"{source}: partial_rotary_factor {partial} gives an odd or empty rotary dimension "
                             f"({rotary_dim} of head_dim {head_dim})")
        theta = float(config.get("rope_theta") or 10000.0)
        original = config.get("original_max_position_embeddings")
        original = int(original) if original is not None else None
        nested = any(isinstance(rope_params.get(k), Mapping) for k in _LAYER_TYPES)

        def spec(params: Mapping[str, Any], key: str, base: float) -> RopeSpec:
            return RopeSpec.parse(params, theta=base, max_positions=max_positions, original=original,
                                  rotary_dim=rotary_dim, source=source, key=key)

        rope_local = None
        if nested:
            rope = spec(rope_params.get("full_attention") or {}, "rope_parameters.full_attention", theta)
            if isinstance(rope_params.get("sliding_attention"), Mapping):
                rope_local = spec(rope_params["sliding_attention"], "rope_parameters.sliding_attention", 10000.0)
        else:
            key = "rope_parameters" if config.get("rope_parameters") else "rope_scaling"
            rope = spec(rope_params, key, theta)
            if variant == "gemma3":  # v4 files: the local table is unscaled, at rope_local_base_freq
                rope_local = RopeSpec(theta=float(config.get("rope_local_base_freq") or 10000.0))
        act_name = str(config.get("hidden_activation") or config.get("hidden_act")
                       or ("gelu_pytorch_tanh" if gemma else "silu"))
        if act_name not in _ACTIVATIONS:
            raise UnsupportedModelOption(source, "hidden_act", act_name, sorted(_ACTIVATIONS))
        if config.get("use_bidirectional_attention"):
            raise UnsupportedModelOption(source, "use_bidirectional_attention", True, [False])
        window, sliding = _sliding_layers(config, variant, layers, source)
        eos = config.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        bias = bool(config.get("attention_bias", False))
        default_tie = gemma
        softcap = {"gemma2": (50.0, 30.0)}.get(variant, (None, None))
        return cls(
            vocab_size=int(config["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6 if gemma else 1e-5)),
            rope_theta=rope.theta,
            max_position_embeddings=max_positions,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", default_tie)),
            attention_bias=bias,
            mlp_bias=bool(config.get("mlp_bias", False)),
            bos_token_id=config.get("bos_token_id"),
            eos_token_ids=eos_ids,
            variant=variant,
            rope=rope,
            rope_local=rope_local,
            rotary_dim=rotary_dim,
            qkv_bias=variant == "qwen2" and not bias,
            qk_norm=variant in ("qwen3", "gemma3"),
            gemma=gemma,
            query_pre_attn_scalar=_number(config, "query_pre_attn_scalar", 256) if gemma else None,
            attn_softcap=_number(config, "attn_logit_softcapping", softcap[0]) if gemma else None,
            final_softcap=_number(config, "final_logit_softcapping", softcap[1]) if gemma else None,
            sliding_window=window,
            sliding_layers=sliding,
            activation=_ACTIVATIONS[act_name],
            fused=variant == "phi3",
        )

    def expected_tensors(self) -> dict[str, tuple[int, ...]]:
        h, d = self.hidden_size, self.head_dim
        q, kv, inter = self.num_attention_heads * d, self.num_key_value_heads * d, self.intermediate_size
        out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab_size, h), "model.norm.weight": (h,)}
        if not self.tie_word_embeddings:
            out["lm_head.weight"] = (self.vocab_size, h)
        for i in range(self.num_hidden_layers):
            p = f"model.layers.{i}."
            a, m = p + "self_attn.", p + "mlp."
            if self.fused:
                out |= {a + "qkv_proj.weight": (q + 2 * kv, h), m + "gate_up_proj.weight": (2 * inter, h)}
            else:
                out |= {a + "q_proj.weight": (q, h), a + "k_proj.weight": (kv, h), a + "v_proj.weight": (kv, h),
                        m + "gate_proj.weight": (inter, h), m + "up_proj.weight": (inter, h)}
            out |= {
                a + "o_proj.weight": (h, q),
                m + "down_proj.weight": (h, inter),
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
            }
            if self.gemma:
                out |= {p + "pre_feedforward_layernorm.weight": (h,), p + "post_feedforward_layernorm.weight": (h,)}
            if self.qk_norm:
                out |= {a + "q_norm.weight": (d,), a + "k_norm.weight": (d,)}
            if self.attention_bias or self.qkv_bias:
                out |= {a + "q_proj.bias": (q,), a + "k_proj.bias": (kv,), a + "v_proj.bias": (kv,)}
            if self.attention_bias:
                out[a + "o_proj.bias"] = (h,)
            if self.mlp_bias:
                out |= {m + "gate_proj.bias": (inter,), m + "up_proj.bias": (inter,), m + "down_proj.bias": (h,)}
        return out

    def kv_bytes_per_token(self, element_size: int) -> int:
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * element_size


def _sliding_layers(config: Mapping[str, Any], variant: str, layers: int,
                    source: str) -> tuple[int | None, tuple[bool, ...]]:
    """The sliding window and which layers use it, from ``layer_types`` (transformers 5) or the
    older per-family keys (Gemma 2: even layers; Gemma 3: all but every ``sliding_window_pattern``-th;
    Qwen2: layers from ``max_window_layers`` on, with ``use_sliding_window``)."""
    window = config.get("sliding_window")
    if variant in ("qwen2", "qwen3") and not config.get("use_sliding_window", False):
        window = None  # Qwen files carry a sliding_window that is off unless use_sliding_window
    if window is None:
        return None, ()
    window = int(window)
    types = config.get("layer_types")
    if types is not None:
        if not isinstance(types, list) or len(types) != layers:
            raise ModelError(f"{source}: layer_types must list one type per layer ({layers})")
        for t in types:
            if t not in _LAYER_TYPES:
                raise UnsupportedModelOption(source, "layer_types", t, _LAYER_TYPES)
        sliding = tuple(t == "sliding_attention" for t in types)
    elif variant == "gemma2":
        sliding = tuple(i % 2 == 0 for i in range(layers))
    elif variant == "gemma3":
        pattern = int(config.get("sliding_window_pattern") or config.get("_sliding_window_pattern") or 6)
        sliding = tuple((i + 1) % pattern != 0 for i in range(layers))
    elif variant in ("qwen2", "qwen3"):
        start = int(config.get("max_window_layers") or 0)
        sliding = tuple(i >= start for i in range(layers))
    else:
        sliding = (True,) * layers
    return (window, sliding) if any(sliding) else (None, ())


class KVCache:
    """Keys and values for every layer, preallocated for ``capacity`` positions, and the rotary
    tables (cos, sin) this cache's positions use."""

    def __init__(self, config: LlamaConfig, batch: int, capacity: int, dtype: torch.dtype,
                 device: torch.device, rope: Sequence[tuple[torch.Tensor, torch.Tensor]] = ()) -> None:
        shape = (batch, config.num_key_value_heads, capacity, config.head_dim)
        # zeros, not empty: a captured step attends over the whole cache under a mask, and a
        # masked NaN left in memory would still poison the weighted sum. One tensor per layer, not
        # views of one: a compiled step writes each in place (a view of a graph input it would copy)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.capacity = capacity
        self.length = 0
        self.rope = list(rope)


_FUSED_RMS = hasattr(F, "rms_norm")


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if _FUSED_RMS and x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)  # one kernel; same math in float32
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def _gemma_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma normalises in float32 and multiplies before casting back (``weight`` is already 1 + w,
    in float32)."""
    if x.dtype == torch.float32:
        return _rms_norm(x, weight, eps)
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * weight).to(x.dtype)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    table: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"silu": F.silu, "gelu": F.gelu,
                                                                 "gelu_tanh": _gelu_tanh}
    return table[name]


def _softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    return torch.tanh(x / cap) * cap


class _Layer:
    __slots__ = ("down", "down_b", "gate_up", "gate_up_b", "k_norm", "ln1", "ln2", "o", "o_b", "post_attn",
                 "post_mlp", "q_norm", "qkv", "qkv_b", "rope_index", "sliding")
    down: Any  # a float tensor or a packed quant.QuantizedLinear
    down_b: torch.Tensor | None
    gate_up: Any  # a float tensor or a packed quant.QuantizedLinear
    gate_up_b: torch.Tensor | None
    k_norm: torch.Tensor | None
    ln1: torch.Tensor
    ln2: torch.Tensor  # the norm before the MLP
    o: Any  # a float tensor or a packed quant.QuantizedLinear
    o_b: torch.Tensor | None
    post_attn: torch.Tensor | None  # Gemma: on the attention output, before the residual add
    post_mlp: torch.Tensor | None
    q_norm: torch.Tensor | None
    qkv: Any  # a float tensor or a packed quant.QuantizedLinear
    qkv_b: torch.Tensor | None
    rope_index: int
    sliding: bool


class LlamaModel:
    """Forward pass over token ids with a KV cache; returns logits (float32)."""

    family = "llama"

    def __init__(self, config: LlamaConfig, weights: Mapping[str, torch.Tensor], dtype: torch.dtype,
                 device: torch.device) -> None:
        self.config = config
        self.family = config.variant
        self.dtype = dtype
        self.device = device
        w = weights
        c = config

        def norm(name: str) -> torch.Tensor:
            if c.gemma:  # stored as w, used as 1 + w (computed in float32, as Gemma's RMSNorm does)
                return 1.0 + w[name].float()
            return w[name]

        # quantized weights (quant.Q4Codes/Int8Codes from the loader) are packed here, after fusing
        # the output projection's top logits are recomputed exactly from the rows (quant.logits)
        self.embed = prepare(w["model.embed_tokens.weight"], rows=True, screen=c.tie_word_embeddings)
        self.norm = norm("model.norm.weight")
        self.lm_head = self.embed if c.tie_word_embeddings else prepare(w["lm_head.weight"], rows=True, screen=True)
        self.embed_scale = torch.tensor(c.hidden_size ** 0.5, dtype=dtype, device=device) if c.gemma else None
        self.layers: list[_Layer] = []
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}."
            layer = _Layer()
            a, m = p + "self_attn.", p + "mlp."
            if c.fused:
                layer.qkv, layer.gate_up = prepare(w[a + "qkv_proj.weight"]), prepare(w[m + "gate_up_proj.weight"])
            else:
                layer.qkv = fuse([w[a + "q_proj.weight"], w[a + "k_proj.weight"], w[a + "v_proj.weight"]])
                layer.gate_up = fuse([w[m + "gate_proj.weight"], w[m + "up_proj.weight"]])
            layer.qkv_b = (torch.cat([w[a + "q_proj.bias"], w[a + "k_proj.bias"], w[a + "v_proj.bias"]])
                           if c.attention_bias or c.qkv_bias else None)
            layer.o = prepare(w[a + "o_proj.weight"])
            layer.o_b = w.get(a + "o_proj.bias") if c.attention_bias else None
            layer.gate_up_b = (torch.cat([w[m + "gate_proj.bias"], w[m + "up_proj.bias"]])
                               if c.mlp_bias else None)
            layer.down = prepare(w[m + "down_proj.weight"])
            layer.down_b = w.get(m + "down_proj.bias") if c.mlp_bias else None
            layer.ln1 = norm(p + "input_layernorm.weight")
            if c.gemma:
                layer.post_attn = norm(p + "post_attention_layernorm.weight")
                layer.ln2 = norm(p + "pre_feedforward_layernorm.weight")
                layer.post_mlp = norm(p + "post_feedforward_layernorm.weight")
            else:
                layer.ln2 = w[p + "post_attention_layernorm.weight"]
                layer.post_attn = layer.post_mlp = None
            layer.q_norm = norm(a + "q_norm.weight") if c.qk_norm else None
            layer.k_norm = norm(a + "k_norm.weight") if c.qk_norm else None
            layer.sliding = bool(c.sliding_layers and c.sliding_layers[i])
            layer.rope_index = 1 if layer.sliding and c.rope_local is not None else 0
            self.layers.append(layer)
        # a token reads every packed weight: they go into huge pages together
        into_huge_pages([self.embed, self.lm_head] + [getattr(layer, s) for layer in self.layers
                                                     for s in ("qkv", "o", "gate_up", "down")])
        self._norm_fn = _gemma_rms_norm if c.gemma else _rms_norm
        self._act = _activation(c.activation)
        self._specs = [c.rope] + ([c.rope_local] if c.rope_local is not None else [])
        self._rope_lock = threading.Lock()
        # (spec index, long factors) -> (length, cos, sin)
        self._tables: dict[tuple[int, bool], tuple[int, torch.Tensor, torch.Tensor]] = {}
        self._ensure_rope(min(c.max_position_embeddings, 4096))
        self.capture: Any = None  # a _runtime.capture.DecodeCapture of decode_step, set by the executor
        # one query (a decode step) attends through _kernels/attention.cpp where it runs: float32 on
        # CPU, no soft-capped scores (Gemma 2 computes them in full)
        self._one_query = (device.type == "cpu" and dtype == torch.float32 and c.attn_softcap is None
                           and kernels.load_attention())

    def _ensure_rope(self, length: int, positions: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Tables of at least ``length`` rows, with LongRoPE's factors chosen for ``positions``
        (default ``length``): the positions a generation will use, not its cache's capacity."""
        out = []
        for index, spec in enumerate(self._specs):
            key = (index, spec.uses_long(positions or length))
            table = self._tables.get(key)
            if table is None or table[0] < length:
                with self._rope_lock:
                    table = self._tables.get(key)
                    if table is None or table[0] < length:
                        table = self._build_rope(spec, length, key[1])
                        self._tables[key] = table
            out.append((table[1], table[2]))
        return out

    def _build_rope(self, spec: RopeSpec, length: int, long: bool) -> tuple[int, torch.Tensor, torch.Tensor]:
        inv, scale = spec.inv_freq(self.config.rotary_dim or self.config.head_dim, long)
        t = torch.arange(length, dtype=torch.float32)
        freqs = torch.outer(t, inv)
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if scale != 1.0:
            cos, sin = cos * scale, sin * scale
        return length, cos.to(self.dtype).to(self.device), sin.to(self.dtype).to(self.device)

    def new_cache(self, capacity: int, batch: int = 1, *, positions: int | None = None) -> KVCache:
        """A KV cache of ``capacity`` positions for a generation that uses ``positions`` of them
        (default: all; a captured step's cache is rounded up, and must rotate as the exact one)."""
        return KVCache(self.config, batch, capacity, self.dtype, self.device, self._ensure_rope(capacity, positions))

    def weight_bytes(self) -> int:
        seen: set[int] = set()
        total = 0
        for t in [self.embed, self.norm, self.lm_head] + [
            getattr(layer, s) for layer in self.layers for s in _Layer.__slots__
        ]:
            if id(t) not in seen:
                seen.add(id(t))
                total += tensor_bytes(t)
        return total

    def _masks(self, t: int, pos: int, end: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Boolean masks [t, end] (True: attend) for full and sliding layers; None where causal
        attention (or, for one query, all keys) is exactly right."""
        c = self.config
        need_full = pos > 0 or c.attn_softcap is not None
        window = c.sliding_window
        need_window = window is not None and end > window and t > 1
        if t == 1 or not (need_full or need_window):
            return None, None
        rows = torch.arange(pos, end, device=self.device)[:, None]
        cols = torch.arange(end, device=self.device)[None, :]
        causal = cols <= rows
        sliding = causal & (cols > rows - window) if need_window and window is not None else None
        return (causal if need_full else None), sliding

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache: KVCache, *, last_only: bool = True) -> torch.Tensor:
        """Run ``input_ids`` [B, T] at positions ``cache.length ..``; returns float32 logits
        [B, V] for the last position (``last_only``) or [B, T, V]."""
        c = self.config
        t = input_ids.shape[1]
        pos = cache.length
        end = pos + t
        if end > cache.capacity:
            raise ModelError(f"sequence of {end} tokens exceeds the KV cache ({cache.capacity})")
        tables = [(cos[pos:end, None, :], sin[pos:end, None, :])  # [t, 1, rot], broadcast over heads
                  for cos, sin in (cache.rope or self._ensure_rope(end))]
        x = self._embed(input_ids)
        full_mask, window_mask = self._masks(t, pos, end)
        window = c.sliding_window
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(x, layer, tables[layer.rope_index])
            ck, cv = cache.k[i], cache.v[i]
            ck[:, :, pos:end] = k
            cv[:, :, pos:end] = v
            start = 0
            mask = full_mask
            if layer.sliding and window is not None:
                if t == 1:
                    start = max(0, end - window)  # one query: its window is the last keys
                elif window_mask is not None:
                    mask = window_mask
            causal = mask is None and t > 1
            x = self._finish_layer(x, layer, q, ck[:, :, start:end], cv[:, :, start:end], mask, causal, None, 0)
        cache.length = end
        return self._logits(x[:, -1] if last_only else x)

    @torch.no_grad()  # not inference_mode: dynamo cannot trace the in-place cache writes there
    def decode_step(self, input_ids: torch.Tensor, position: torch.Tensor, k: Sequence[torch.Tensor],
                    v: Sequence[torch.Tensor], rope: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """One token per sequence ([B, 1]) at ``position`` (a one-element long tensor) of a KV cache
        ``k``/``v`` (per layer [B, kv heads, capacity, head_dim], zero where unwritten) with rotary
        tables ``rope``; returns float32 logits [B, V].

        Every shape depends on the cache's capacity only, never on the position: attention reads
        the whole cache under a mask, and the new key/value are written with ``index_copy_``. That
        is what lets the step be captured once per capacity (``_runtime/capture.py``)."""
        c = self.config
        capacity = k[0].shape[2]
        tables = [(cos[position][:, None, :], sin[position][:, None, :]) for cos, sin in rope]
        x = self._embed(input_ids)
        cols = torch.arange(capacity, device=position.device)
        full = (cols <= position).view(1, 1, 1, capacity)
        window = c.sliding_window
        sliding = full & (cols > position - window).view(1, 1, 1, capacity) if window is not None else full
        for i, layer in enumerate(self.layers):
            q, key, value = self._qkv(x, layer, tables[layer.rope_index])
            ck, cv = k[i], v[i]
            ck.index_copy_(2, position, key)
            cv.index_copy_(2, position, value)
            mask = sliding if layer.sliding else full
            # the kernel reads the position itself: the keys past it are not scored at all
            x = self._finish_layer(x, layer, q, ck, cv, mask, False, position,
                                   window if layer.sliding and window is not None else 0)
        return self._logits(x[:, -1])

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = embedding(input_ids, self.embed, self.dtype)
        return x * self.embed_scale if self.embed_scale is not None else x

    def _qkv(self, x: torch.Tensor, layer: _Layer,
             table: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The layer's queries [B, heads, T, hd], and keys and values [B, kv heads, T, hd], rotated."""
        c = self.config
        b, t = x.shape[0], x.shape[1]
        nh, nkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q_size, kv_size = nh * hd, nkv * hd
        rot = c.rotary_dim or hd
        half = rot // 2
        norm_fn, eps = self._norm_fn, c.rms_norm_eps
        h = norm_fn(x, layer.ln1, eps)
        qkv = linear(h, layer.qkv, layer.qkv_b)
        # rotary embedding on q and k together: [b, t, nh + nkv, hd]
        if layer.q_norm is not None and layer.k_norm is not None:
            qk = torch.cat([norm_fn(qkv[..., :q_size].view(b, t, nh, hd), layer.q_norm, eps),
                            norm_fn(qkv[..., q_size:q_size + kv_size].view(b, t, nkv, hd), layer.k_norm, eps)],
                           dim=2)
        else:
            qk = qkv[..., :q_size + kv_size].view(b, t, nh + nkv, hd)
        cos, sin = table
        if rot == hd:
            qk = qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), dim=-1) * sin
        else:  # partial rotary (Phi-3 variants): the first ``rot`` dimensions turn
            r, rest = qk[..., :rot], qk[..., rot:]
            qk = torch.cat([r * cos + torch.cat((-r[..., half:], r[..., :half]), dim=-1) * sin, rest], dim=-1)
        q = qk[:, :, :nh].transpose(1, 2)
        k = qk[:, :, nh:].transpose(1, 2)
        v = qkv[..., q_size + kv_size:].view(b, t, nkv, hd).transpose(1, 2)
        return q, k, v

    def _finish_layer(self, x: torch.Tensor, layer: _Layer, q: torch.Tensor, keys: torch.Tensor,
                      values: torch.Tensor, mask: torch.Tensor | None, causal: bool, position: torch.Tensor | None,
                      window: int) -> torch.Tensor:
        """Attention over ``keys``/``values``, the output projection, the MLP and both residuals.
        ``position`` (a decode step's, with the whole cache as ``keys``): the query's index, which
        ``mask`` also encodes; ``window`` > 0: a sliding layer's window."""
        c = self.config
        b, t = x.shape[0], x.shape[1]
        norm_fn, eps = self._norm_fn, c.rms_norm_eps
        scale = c.query_pre_attn_scalar ** -0.5 if c.query_pre_attn_scalar is not None else None
        if self._one_query and t == 1 and (mask is None or position is not None):
            attn = torch.ops.edgecompute_ml.one_query_attention(q, keys, values, position, window,
                                                                scale or c.head_dim ** -0.5)
        else:
            attn = self._attend(q, keys, values, mask, causal, scale, c.num_attention_heads // c.num_key_value_heads)
        attn = attn.transpose(1, 2).reshape(b, t, c.num_attention_heads * c.head_dim)
        out = linear(attn, layer.o, layer.o_b)
        if layer.post_attn is not None:
            out = norm_fn(out, layer.post_attn, eps)
        x = x + out
        h = norm_fn(x, layer.ln2, eps)
        gu = linear(h, layer.gate_up, layer.gate_up_b)
        inter = gu.shape[-1] // 2
        out = linear(self._act(gu[..., :inter]) * gu[..., inter:], layer.down, layer.down_b)
        if layer.post_mlp is not None:
            out = norm_fn(out, layer.post_mlp, eps)
        return x + out

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self._norm_fn(x, self.norm, self.config.rms_norm_eps)
        logits = quant_logits(x, self.lm_head)
        if self.config.final_softcap is not None:
            logits = _softcap(logits, self.config.final_softcap)
        return logits.float()

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                causal: bool, scale: float | None, rep: int) -> torch.Tensor:
        cap = self.config.attn_softcap
        if cap is not None:  # soft-capped scores (Gemma 2): SDPA cannot cap, so attention in full
            if rep > 1:
                keys = keys.repeat_interleave(rep, dim=1)
                values = values.repeat_interleave(rep, dim=1)
            scores = _softcap(torch.matmul(q, keys.transpose(2, 3)) * (scale or q.shape[-1] ** -0.5), cap)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            return torch.matmul(scores.softmax(-1, dtype=torch.float32).to(q.dtype), values)
        if rep > 1:
            if _GQA:
                return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal,
                                                      scale=scale, enable_gqa=True)
            keys = keys.repeat_interleave(rep, dim=1)
            values = values.repeat_interleave(rep, dim=1)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal, scale=scale)
