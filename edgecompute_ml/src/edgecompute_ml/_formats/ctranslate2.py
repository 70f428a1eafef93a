"""CTranslate2 Whisper models (``model.bin``) converted to an HF/candle-layout safetensors folder.

A CTranslate2 model file (binary version 6) is: u32 version, string spec name, u32 revision, u32
count of variables, each (string name, u8 rank, u32 dims, u8 dtype, u32 byte count, raw bytes),
then u32 count of aliases (string alias, string target). Strings are u16 length (with a trailing
NUL) and UTF-8 bytes. Whisper's self-attention q/k/v and cross-attention k/v are fused there;
here they are split back into HF names (with the k projections' zero bias dropped).

``edgecompute-ml convert CT2_FOLDER OUT_FOLDER`` converts one ahead of time (the store otherwise
converts it into its cache on first use: :func:`converted_folder`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np

from .._runtime.paths import cache_root
from ..errors import ModelError

__all__ = ["convert_ctranslate2_whisper", "converted_folder", "is_ctranslate2_folder", "read_ctranslate2"]

_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}  # 5 is bfloat16


def is_ctranslate2_folder(path: str | os.PathLike[str]) -> bool:
    p = Path(path)
    return (p / "model.bin").is_file() and not any(p.glob("*.safetensors"))


def read_ctranslate2(path: str | os.PathLike[str]) -> tuple[str, dict[str, np.ndarray]]:
    """The spec name and the variables (aliases resolved) of a CTranslate2 ``model.bin``."""
    try:
        data = memoryview(Path(path).read_bytes())
    except OSError as exc:
        raise ModelError(f"{path}: cannot read: {exc}") from exc
    pos = 0

    def take(fmt: str) -> Any:
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise ModelError(f"{path}: truncated CTranslate2 file (at byte {pos})")
        value = struct.unpack_from(fmt, data, pos)
        pos += size
        return value[0] if len(value) == 1 else value

    def string() -> str:
        nonlocal pos
        n = take("<H")
        if n < 1 or pos + n > len(data):
            raise ModelError(f"{path}: corrupt CTranslate2 string at byte {pos}")
        text = bytes(data[pos:pos + n - 1]).decode("utf-8")
        pos += n
        return text

    version = take("<I")
    if version != 6:
        raise ModelError(f"{path}: CTranslate2 binary version {version} is not supported (only 6)")
    spec = string()
    take("<I")  # spec revision
    out: dict[str, np.ndarray] = {}
    for _ in range(take("<I")):
        name = string()
        shape = [take("<I") for _ in range(take("<B"))]
        code, nbytes = take("<B"), take("<I")
        if pos + nbytes > len(data):
            raise ModelError(f"{path}: variable {name!r} runs past the end of the file")
        raw = data[pos:pos + nbytes]
        pos += nbytes
        if code == 5:
            bits = np.frombuffer(raw, np.uint16).astype(np.uint32) << 16
            array = bits.view(np.float32)
        elif code in _DTYPES:
            array = np.frombuffer(raw, _DTYPES[code])
        else:
            raise ModelError(f"{path}: variable {name!r} has unknown dtype code {code}")
        count = int(np.prod(shape)) if shape else 1
        if array.size != count:
            raise ModelError(f"{path}: variable {name!r} holds {array.size} values, shape {shape} needs {count}")
        out[name] = array.reshape(shape)
    for _ in range(take("<I")):
        alias, target = string(), string()
        if target in out:
            out[alias] = out[target]
    return spec, out


def _float(a: np.ndarray, name: str) -> np.ndarray:
    if a.dtype not in (np.float16, np.float32):
        raise ModelError(f"CTranslate2 variable {name!r} is {a.dtype} (a quantised model); only float16/float32 "
                         "Whisper models can be converted")
    return np.ascontiguousarray(a)


def _attention(v: dict[str, np.ndarray], src: str, dst: str, d: int, *, cross: bool,
               out: dict[str, np.ndarray]) -> None:
    if cross:  # linear_0: q, linear_1: fused k/v, linear_2: out
        q_w, q_b = v[f"{src}/linear_0/weight"], v[f"{src}/linear_0/bias"]
        kv_w, kv_b = v[f"{src}/linear_1/weight"], v[f"{src}/linear_1/bias"]
        k_w, v_w, v_b = kv_w[:d], kv_w[d:], kv_b[d:]
        o = "linear_2"
    else:  # linear_0: fused q/k/v, linear_1: out
        qkv_w, qkv_b = v[f"{src}/linear_0/weight"], v[f"{src}/linear_0/bias"]
        q_w, k_w, v_w = qkv_w[:d], qkv_w[d:2 * d], qkv_w[2 * d:]
        q_b, v_b = qkv_b[:d], qkv_b[2 * d:]
        o = "linear_1"
    for name, array in (("q_proj.weight", q_w), ("q_proj.bias", q_b), ("k_proj.weight", k_w),
                        ("v_proj.weight", v_w), ("v_proj.bias", v_b), ("out_proj.weight", v[f"{src}/{o}/weight"]),
                        ("out_proj.bias", v[f"{src}/{o}/bias"])):
        out[f"{dst}.{name}"] = _float(array, f"{src}/{name}")
    out[f"{dst}_layer_norm.weight"] = _float(v[f"{src}/layer_norm/gamma"], src)
    out[f"{dst}_layer_norm.bias"] = _float(v[f"{src}/layer_norm/beta"], src)


def _layers(v: dict[str, np.ndarray], side: str) -> int:
    n = 0
    while f"{side}/layer_{n}/ffn/linear_0/weight" in v:
        n += 1
    return n


def whisper_tensors(v: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """HF-named tensors and the config dimensions of a CTranslate2 WhisperSpec's variables."""
    try:
        d = int(v["encoder/conv1/weight"].shape[0])
        out: dict[str, np.ndarray] = {}
        e, dec = "model.encoder", "model.decoder"
        for conv in ("conv1", "conv2"):
            out[f"{e}.{conv}.weight"] = _float(v[f"encoder/{conv}/weight"], conv)
            out[f"{e}.{conv}.bias"] = _float(v[f"encoder/{conv}/bias"], conv)
        out[f"{e}.embed_positions.weight"] = _float(v["encoder/position_encodings/encodings"], "encoder positions")
        out[f"{dec}.embed_tokens.weight"] = _float(v["decoder/embeddings/weight"], "embeddings")
        out[f"{dec}.embed_positions.weight"] = _float(v["decoder/position_encodings/encodings"], "decoder positions")
        layers = {"encoder": _layers(v, "encoder"), "decoder": _layers(v, "decoder")}
        for side, prefix in (("encoder", e), ("decoder", dec)):
            out[f"{prefix}.layer_norm.weight"] = _float(v[f"{side}/layer_norm/gamma"], side)
            out[f"{prefix}.layer_norm.bias"] = _float(v[f"{side}/layer_norm/beta"], side)
            for i in range(layers[side]):
                src, dst = f"{side}/layer_{i}", f"{prefix}.layers.{i}"
                _attention(v, f"{src}/self_attention", f"{dst}.self_attn", d, cross=False, out=out)
                if side == "decoder":
                    _attention(v, f"{src}/attention", f"{dst}.encoder_attn", d, cross=True, out=out)
                for j, fc in ((0, "fc1"), (1, "fc2")):
                    out[f"{dst}.{fc}.weight"] = _float(v[f"{src}/ffn/linear_{j}/weight"], fc)
                    out[f"{dst}.{fc}.bias"] = _float(v[f"{src}/ffn/linear_{j}/bias"], fc)
                out[f"{dst}.final_layer_norm.weight"] = _float(v[f"{src}/ffn/layer_norm/gamma"], src)
                out[f"{dst}.final_layer_norm.bias"] = _float(v[f"{src}/ffn/layer_norm/beta"], src)
        dims = {
            "d_model": d, "num_mel_bins": int(v["encoder/conv1/weight"].shape[1]),
            "vocab_size": int(v["decoder/embeddings/weight"].shape[0]),
            "encoder_layers": layers["encoder"], "decoder_layers": layers["decoder"],
            "encoder_attention_heads": int(v["encoder/num_heads"].reshape(-1)[0]),
            "decoder_attention_heads": int(v["decoder/num_heads"].reshape(-1)[0]),
            "encoder_ffn_dim": int(v["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
            "decoder_ffn_dim": int(v["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
            "max_source_positions": int(v["encoder/position_encodings/encodings"].shape[0]),
            "max_target_positions": int(v["decoder/position_encodings/encodings"].shape[0]),
        }
    except KeyError as exc:
        raise ModelError(f"CTranslate2 Whisper model lacks variable {exc}") from exc
    return out, dims


#: Part of the conversion cache's key: bump it when the converter's output changes.
FORMAT = "edgecompute-ct2-whisper/2"


def convert_ctranslate2_whisper(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Write ``dst`` (config.json, generation_config.json, model.safetensors, tokenizer.json) from a
    CTranslate2 Whisper folder (model.bin, config.json, tokenizer.json). Returns ``dst``."""
    from safetensors.numpy import save_file

    src, dst = Path(src), Path(dst)
    spec, variables = read_ctranslate2(src / "model.bin")
    if spec != "WhisperSpec":
        raise ModelError(f"{src / 'model.bin'}: a CTranslate2 {spec}, not a WhisperSpec")
    tensors, dims = whisper_tensors(variables)
    ct2_config: dict[str, Any] = {}
    if (src / "config.json").is_file():
        ct2_config = json.loads((src / "config.json").read_text())
    tokenizer = src / "tokenizer.json"
    if not tokenizer.is_file():
        raise ModelError(f"{src}: no tokenizer.json next to model.bin")
    vocab = json.loads(tokenizer.read_text())
    specials = {t["content"]: int(t["id"]) for t in vocab.get("added_tokens", [])}
    eot = specials.get("<|endoftext|>", 50256)
    # language tokens are <|xx|> or <|xxx|>. English-only tokenizers list them too, so the
    # vocabulary size tells (OpenAI's rule: multilingual checkpoints have 51865 or more tokens)
    languages = {k: i for k, i in specials.items() if re.fullmatch(r"<\|[a-z]{2,3}\|>", k)}
    multilingual = dims["vocab_size"] >= 51865 and len(languages) > 1
    lang_to_id = languages if multilingual else {}
    no_ts = specials.get("<|notimestamps|>")
    config = {
        "architectures": ["WhisperForConditionalGeneration"], "model_type": "whisper", **dims,
        "activation_function": "gelu", "scale_embedding": False, "bos_token_id": eot, "eos_token_id": eot,
        "pad_token_id": eot, "decoder_start_token_id": specials.get("<|startoftranscript|>", eot + 1),
        "torch_dtype": "float16" if next(iter(tensors.values())).dtype == np.float16 else "float32",
        # candle reads both lists from config.json; a list, never null
        "suppress_tokens": list(ct2_config.get("suppress_ids", [])),
        "begin_suppress_tokens": list(ct2_config.get("suppress_ids_begin", [220, eot])),
    }
    generation = {
        "decoder_start_token_id": config["decoder_start_token_id"], "eos_token_id": eot, "pad_token_id": eot,
        "bos_token_id": eot, "suppress_tokens": config["suppress_tokens"],
        "begin_suppress_tokens": config["begin_suppress_tokens"], "no_timestamps_token_id": no_ts,
        "max_initial_timestamp_index": 50, "is_multilingual": multilingual, "max_length": 448,
        "alignment_heads": ct2_config.get("alignment_heads", []),
        "forced_decoder_ids": [[1, no_ts]] if not multilingual and no_ts is not None else None,
    }
    if multilingual:
        generation["lang_to_id"] = lang_to_id
        generation["task_to_id"] = {t: specials[f"<|{t}|>"] for t in ("transcribe", "translate")
                                    if f"<|{t}|>" in specials}
    dst.mkdir(parents=True, exist_ok=True)
    tmp = dst / f"model.safetensors.{os.getpid()}.tmp"  # two processes may convert at once
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    (dst / "generation_config.json").write_text(json.dumps(generation, indent=2))
    (dst / "tokenizer.json").write_text(tokenizer.read_text())
    (dst / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 448, "eos_token": "<|endoftext|>"}))
    os.replace(tmp, dst / "model.safetensors")  # last: a folder with weights is a finished conversion
    return dst


def converted_folder(src: str | os.PathLike[str]) -> Path:
    """The HF-layout conversion of a CTranslate2 folder, made on first use under the cache root
    (``$EDGECOMPUTE_ML_CACHE``, else ``~/.cache/edgecompute-ml``) and keyed by the source file."""
    src = Path(src).resolve()
    stat = (src / "model.bin").stat()
    key = hashlib.sha256(f"{FORMAT}|{src}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    dst = cache_root() / f"ct2-{src.name}-{key}"
    if not (dst / "model.safetensors").is_file():
        convert_ctranslate2_whisper(src, dst)
    return dst

