"""Model configs are data: every key a family reads is checked before the family parses it.

Model folders are chosen by the operator, but their ``config.json`` (or a GGUF file's metadata)
is data written by someone else. Without these checks a string where a table belongs is an
``AttributeError``, ``num_hidden_layers: true`` silently builds one layer, a hidden size that the
heads do not divide is a raw torch error at the first forward pass, and ``num_hidden_layers: 1e9``
builds a billion-entry tensor list before any file is read. Each failure here is an
:class:`~edgecompute_ml.errors.InvalidModelConfig` naming the key.

Only keys this package reads are checked; others (``transformers_version``, ``torch_dtype``...)
pass untouched. Ceilings are far above any real model and only stop absurd values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..errors import InvalidModelConfig

__all__ = ["check_model_config"]

# key -> (smallest, largest) allowed integer; None (JSON null) is allowed where the readers
# treat null as "use the default" (head_dim, num_key_value_heads)
_INTS: dict[str, tuple[int, int]] = {
    "vocab_size": (1, 1 << 24),
    "hidden_size": (1, 1 << 16),
    "intermediate_size": (1, 1 << 18),
    "num_hidden_layers": (1, 1024),
    "num_attention_heads": (1, 1024),
    "num_key_value_heads": (1, 1024),
    "head_dim": (1, 1 << 12),
    "max_position_embeddings": (1, 1 << 22),
    "type_vocab_size": (1, 1 << 16),
    "d_model": (1, 1 << 16),
    "encoder_layers": (1, 1024),
    "decoder_layers": (1, 1024),
    "encoder_attention_heads": (1, 1024),
    "decoder_attention_heads": (1, 1024),
    "encoder_ffn_dim": (1, 1 << 18),
    "decoder_ffn_dim": (1, 1 << 18),
    "max_source_positions": (1, 1 << 16),
    "max_target_positions": (1, 1 << 16),
    "num_mel_bins": (1, 1024),
    "patch_size": (1, 1 << 12),
    "num_channels": (1, 16),
    "projection_dim": (1, 1 << 16),
    "num_detection_tokens": (1, 1 << 12),
    "num_labels": (1, 1 << 20),
    "depth_divisible_by": (1, 1 << 10),
    "min_depth": (1, 1 << 12),
    "output_stride": (1, 1 << 10),
    "sliding_window": (1, 1 << 22),
    "max_window_layers": (0, 1024),
    "sliding_window_pattern": (1, 1024),
    "original_max_position_embeddings": (1, 1 << 22),
}
# sliding_window: null is "no window" (Mistral v0.2+, Phi-3 variants)
_NULLABLE_INTS = frozenset({"head_dim", "num_key_value_heads", "sliding_window"})
# key -> (exclusive lower bound, inclusive upper bound)
_FLOATS: dict[str, tuple[float, float]] = {
    "rms_norm_eps": (0.0, 1.0),
    "layer_norm_eps": (0.0, 1.0),
    "rope_theta": (0.0, 1e12),
    "depth_multiplier": (0.0, 16.0),
    "expand_ratio": (0.0, 64.0),
    "query_pre_attn_scalar": (0.0, float(1 << 20)),
    "attn_logit_softcapping": (0.0, 1e6),
    "final_logit_softcapping": (0.0, 1e6),
    "partial_rotary_factor": (0.0, 1.0),
    "rope_local_base_freq": (0.0, 1e12),
}
# null switches the soft caps off (Gemma 3)
_NULLABLE_FLOATS = frozenset({"attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar"})
_BOOLS = frozenset({"tie_word_embeddings", "attention_bias", "mlp_bias", "qkv_bias", "scale_embedding",
                    "use_mid_position_embeddings", "first_layer_is_expansion", "finegrained_output", "tf_padding",
                    "is_multilingual", "use_sliding_window", "use_bidirectional_attention"})
_TABLES = frozenset({"rope_parameters", "rope_scaling", "id2label", "label2id"})
_STRINGS = frozenset({"model_type", "hidden_act", "hidden_activation", "activation_function",
                      "position_embedding_type"})
_TOKEN_IDS = frozenset({"bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"})
# nested configs (CLIP's towers) are checked with the same rules
_NESTED = ("vision_config", "text_config")
# the largest image side a config may declare (ViT/YOLOS/CLIP ``image_size``)
_MAX_IMAGE_SIDE = 1 << 14


def _fail(source: str, key: str, problem: str, value: Any) -> InvalidModelConfig:
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return InvalidModelConfig(source, key, f"{problem}, not {shown}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(source: str, key: str, value: Any, low: int, high: int) -> None:
    if not _is_int(value) or not low <= value <= high:
        raise _fail(source, key, f"must be an integer in [{low}, {high}]", value)


def check_model_config(raw: Mapping[str, Any], source: str, prefix: str = "") -> None:
    """Raise :class:`InvalidModelConfig` naming the first key of ``raw`` with a bad type or value."""
    for key, value in raw.items():
        name = prefix + key
        if key in _INTS:
            if value is None and key in _NULLABLE_INTS:
                continue
            _check_int(source, name, value, *_INTS[key])
        elif key in _FLOATS:
            if value is None and key in _NULLABLE_FLOATS:
                continue
            low, high = _FLOATS[key]
            if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                    or not low < value <= high):
                raise _fail(source, name, f"must be a number in ({low:g}, {high:g}]", value)
        elif key in _BOOLS:
            if value is None and key == "use_bidirectional_attention":  # Gemma 2 writes null for "no"
                continue
            if not isinstance(value, bool):
                raise _fail(source, name, "must be true or false", value)
        elif key in _TABLES:
            if value is not None and not isinstance(value, Mapping):
                raise _fail(source, name, "must be a table (JSON object) or null", value)
        elif key in _STRINGS:
            if not isinstance(value, str):
                raise _fail(source, name, "must be a string", value)
        elif key in _TOKEN_IDS:
            ids = value if isinstance(value, list) else [value]
            if not all(v is None or _is_int(v) for v in ids) or (isinstance(value, list) and None in value):
                raise _fail(source, name, "must be an integer token id, a list of them or null", value)
        elif key == "image_size":
            sides = value if isinstance(value, list) and len(value) == 2 else [value]
            if not all(_is_int(v) and 1 <= v <= _MAX_IMAGE_SIDE for v in sides):
                raise _fail(source, name, f"must be an integer in [1, {_MAX_IMAGE_SIDE}] or [height, width] of them",
                            value)
        elif key == "layer_types":
            # unknown names pass here: the family names the type it does not support
            if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
                raise _fail(source, name, "must be a list of strings (one per layer)", value)
            layers = raw.get("num_hidden_layers")
            if _is_int(layers) and len(value) != layers:
                raise _fail(source, name, f"must list one type per layer ({layers})", value)
        elif key == "architectures":
            if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
                raise _fail(source, name, "must be a list of strings", value)
        elif key in _NESTED:
            if not isinstance(value, Mapping):
                raise _fail(source, name, "must be a table (JSON object)", value)
            check_model_config(value, source, prefix=f"{name}.")
    for table_key in ("rope_parameters", "rope_scaling"):
        rope = raw.get(table_key)
        if isinstance(rope, Mapping):
            _check_rope(rope, source, f"{prefix}{table_key}")
            for layer_type in ("full_attention", "sliding_attention"):  # Gemma 3: one table per layer type
                if isinstance(rope.get(layer_type), Mapping):
                    _check_rope(rope[layer_type], source, f"{prefix}{table_key}.{layer_type}")
    _check_divisible(raw, source, prefix)


def _positive(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _check_rope(rope: Mapping[str, Any], source: str, name: str) -> None:
    """A rotary table's parameters: numbers positive and finite, factor lists short and numeric."""
    for key in ("rope_theta", "factor", "low_freq_factor", "high_freq_factor", "attention_factor",
                "partial_rotary_factor"):
        value = rope.get(key)
        if value is not None and not _positive(value):
            raise _fail(source, f"{name}.{key}", "must be a number > 0", value)
    low: Any = rope.get("low_freq_factor")
    high: Any = rope.get("high_freq_factor")
    if _positive(low) and _positive(high) and high <= low:
        raise _fail(source, f"{name}.high_freq_factor", f"must be larger than low_freq_factor {low}", high)
    original = rope.get("original_max_position_embeddings")
    if original is not None:
        _check_int(source, f"{name}.original_max_position_embeddings", original, 1, 1 << 22)
    for key in ("short_factor", "long_factor"):
        value = rope.get(key)
        if value is not None and (not isinstance(value, list) or len(value) > 1 << 12
                                  or not all(_positive(v) for v in value)):
            raise _fail(source, f"{name}.{key}", "must be a list of numbers > 0 (half the rotary dimension)", value)
    kind = rope.get("rope_type", rope.get("type"))
    if kind is not None and not isinstance(kind, str):
        raise _fail(source, f"{name}.rope_type", "must be a string", kind)


def _check_divisible(raw: Mapping[str, Any], source: str, prefix: str) -> None:
    """Attention splits the hidden size across the heads (unless ``head_dim`` is explicit), and
    grouped-query attention shares each key/value head among a whole number of query heads."""
    heads, hidden = raw.get("num_attention_heads"), raw.get("hidden_size")
    if isinstance(heads, int) and isinstance(hidden, int) and heads > 0 and raw.get("head_dim") is None \
            and hidden % heads:
        raise InvalidModelConfig(source, f"{prefix}hidden_size",
                                 f"{hidden} is not divisible by num_attention_heads {heads} (and no head_dim is "
                                 "given)")
    kv = raw.get("num_key_value_heads")
    if isinstance(heads, int) and isinstance(kv, int) and kv > 0 and heads % kv:
        raise InvalidModelConfig(source, f"{prefix}num_attention_heads",
                                 f"{heads} is not a multiple of num_key_value_heads {kv}")
    d_model = raw.get("d_model")
    for key in ("encoder_attention_heads", "decoder_attention_heads"):
        n = raw.get(key)
        if isinstance(d_model, int) and isinstance(n, int) and n > 0 and d_model % n:
            raise InvalidModelConfig(source, f"{prefix}d_model", f"{d_model} is not divisible by {key} {n}")
