"""Tiny random decoders of every supported family, saved by transformers, and GGUF files written
from them the way llama.cpp's converter writes them (with the `gguf` package's own tensor names)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from .tiny import CHAT_TEMPLATE, byte_level_tokenizer

COMMON: dict[str, Any] = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                              pad_token_id=0)

# name -> (transformers config class, model class, config overrides)
SPECS: dict[str, tuple[str, str, dict[str, Any]]] = {
    # wavelengths of a 16-wide head at theta 50000 span all three llama3 regimes for a 64-token
    # original context (below 16, between 16 and 64, above 64)
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(
        head_dim=16, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "mistral_swa": ("MistralConfig", "MistralForCausalLM", dict(head_dim=16, sliding_window=4,
                                                               tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False,
                                                      rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=24, tie_word_embeddings=True)),
    # small soft caps, so that capping changes the result; query_pre_attn_scalar != head_dim
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=4,
                                                         attn_logit_softcapping=5.0, final_logit_softcapping=2.0)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        head_dim=16, query_pre_attn_scalar=16, sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}})),
    # longrope on a partial (12 of 16) rotary dimension, factors switching past 64 positions
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(
        sliding_window=6, tie_word_embeddings=False, original_max_position_embeddings=64,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                         "short_factor": [1.0, 1.2, 1.5, 2.0, 3.0, 4.0],
                         "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0]})),
}


def make_decoder(folder: Path, name: str, *, seed: int = 0, std: float = 0.3) -> Path:
    import torch
    import transformers

    config_cls, model_cls, overrides = SPECS[name]
    tk = byte_level_tokenizer()
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(vocab_size=tk.get_vocab_size(), **{**COMMON, **overrides})
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # larger than the default init, and non-trivial norms and biases
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, std)
            else:
                p.add_(torch.randn_like(p) * 0.2)
        if config.model_type.startswith("gemma"):
            # Gemma multiplies embeddings by sqrt(hidden_size): at this init they would swamp
            # every layer and greedy decoding would repeat one token
            model.get_input_embeddings().weight.normal_(0, 0.05)
    model.save_pretrained(folder)
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT_TEMPLATE, "model_max_length": 256}))
    return folder


# -- GGUF ------------------------------------------------------------------------------------------

GGUF_ARCH = {"llama3": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2", "gemma3": "gemma3",
             "phi3": "phi3"}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # what llama.cpp's converter does to a llama's q/k rows (packed rows move as wholes)
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_rope_factors(rope: dict[str, Any], dim: int) -> np.ndarray:
    """llama.cpp's converter turns llama3 rope scaling into a ``rope_freqs`` tensor of divisors."""
    base, factor = rope["rope_theta"], rope["factor"]
    low, high, old = rope["low_freq_factor"], rope["high_freq_factor"], rope["original_max_position_embeddings"]
    out = []
    for i in range(0, dim, 2):
        freq = 1.0 / (base ** (i / dim))
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_family_gguf(folder: Path, path: Path, qtype: str = "F32",
                      types: dict[str, str] | None = None) -> dict[str, np.ndarray]:
    """Write a tiny HF decoder folder as llama.cpp would (metadata, tensor names and layouts, the
    tokenizer in the metadata), its matrices as ``qtype`` but those named in ``types`` (HF name ->
    type, as llama.cpp's mixes keep the token embeddings in another type). Returns the HF-named,
    HF-layout float32 weights the GGUF holds (dequantised), for a reference folder."""
    import gguf
    from safetensors.numpy import load_file

    config = json.loads((folder / "config.json").read_text())
    name = {"llama": "llama3", "gemma3_text": "gemma3"}.get(config["model_type"], config["model_type"])
    arch = GGUF_ARCH[name]
    weights = load_file(str(folder / "model.safetensors"))
    tk = json.loads((folder / "tokenizer.json").read_text())
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    heads, kv, layers = config["num_attention_heads"], config["num_key_value_heads"], config["num_hidden_layers"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rope = config.get("rope_parameters") or {}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(layers)
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    rotary = int(head_dim * rope.get("partial_rotary_factor", 1.0)) if "full_attention" not in rope else head_dim
    w.add_rope_dimension_count(rotary)
    extra: dict[str, np.ndarray] = {}
    if arch == "gemma3":
        full = rope["full_attention"]
        w.add_rope_freq_base(full["rope_theta"])
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(full["factor"])
        w.add_sliding_window(config["sliding_window"])
        w.add_sliding_window_pattern([t == "sliding_attention" for t in config["layer_types"]])
    else:
        w.add_rope_freq_base(rope["rope_theta"])
    if arch == "gemma2":
        w.add_attn_logit_softcapping(config["attn_logit_softcapping"])
        w.add_final_logit_softcapping(config["final_logit_softcapping"])
        w.add_sliding_window(config["sliding_window"])
    if arch == "llama" and rope.get("rope_type") == "llama3":
        extra["rope_freqs.weight"] = _llama3_rope_factors(rope, head_dim)
    if arch == "phi3":
        orig = config["original_max_position_embeddings"]
        w.add_rope_scaling_orig_ctx_len(orig)
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(config["max_position_embeddings"] / orig)
                                                  / math.log(orig)))
        w.add_sliding_window(config["sliding_window"])
        extra["rope_factors_long.weight"] = np.array(rope["long_factor"], dtype=np.float32)
        extra["rope_factors_short.weight"] = np.array(rope["short_factor"], dtype=np.float32)
    vocab = sorted(tk["model"]["vocab"].items(), key=lambda kv_: kv_[1])
    specials = {t["content"] for t in tk["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in specials else 1 for t, _ in vocab])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tk["model"]["merges"]])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(tc["chat_template"])
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), layers)
    Q = gguf.GGMLQuantizationType
    dequantised: dict[str, np.ndarray] = {}
    for hf_name, raw in weights.items():
        value = raw.astype(np.float32)
        base, suffix = hf_name.rsplit(".", 1)
        gname = names.get_name(base)
        assert gname is not None, hf_name
        gname = f"{gname}.{suffix}"
        if arch.startswith("gemma") and hf_name.endswith("norm.weight"):
            dequantised[hf_name] = value
            w.add_tensor(gname, value + 1)  # llama.cpp's Gemma norms are 1 + w, as Gemma uses them
            continue
        permute = None
        if arch == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            permute = heads if "q_proj" in hf_name else kv
        kind = (types or {}).get(hf_name, qtype)
        if kind != "F32" and value.ndim == 2:
            if kind == "F16":
                packed = value.astype(np.float16)
                dequantised[hf_name] = packed.astype(np.float32)
                w.add_tensor(gname, _permute(packed, permute) if permute else packed)
            else:
                packed = gguf.quants.quantize(value, Q[kind])
                dequantised[hf_name] = gguf.quants.dequantize(packed, Q[kind])
                w.add_tensor(gname, _permute(packed, permute) if permute else packed, raw_dtype=Q[kind])
        else:
            dequantised[hf_name] = value
            w.add_tensor(gname, _permute(value, permute) if permute else value)
    for gname, value in extra.items():
        w.add_tensor(gname, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dequantised


def dequantised_folder(folder: Path, weights: dict[str, np.ndarray], out: Path) -> Path:
    """The reference a GGUF file is checked against: the original folder with the weights the GGUF
    holds. llama.cpp does not store Gemma's query_pre_attn_scalar (it uses head_dim below 27B), so
    the reference config says what the GGUF file means."""
    from safetensors.numpy import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in weights.items()}, str(out / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    if "query_pre_attn_scalar" in config:
        config["query_pre_attn_scalar"] = config["head_dim"]
    (out / "config.json").write_text(json.dumps(config))
    for extra in ("tokenizer.json", "tokenizer_config.json"):
        (out / extra).write_text((folder / extra).read_text())
    return out
