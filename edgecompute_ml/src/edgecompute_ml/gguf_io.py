"""GGUF reading for Llama-family models: metadata, tensors dequantised to torch, and a tokenizer
built from the metadata. Pure numpy; the file is memory-mapped.

Supported tensor types: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from .errors import ModelError, UnsupportedArchitecture

__all__ = ["GGUFFile", "gguf_llama_config", "gguf_to_hf_names", "gguf_tokenizer"]

_MAGIC = b"GGUF"
_MAX_DIMS = 4
# value types of the key/value section
_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
            12: "<f8"}
_STRING, _ARRAY = 8, 9
_STRUCT = {k: v.replace("u1", "B").replace("i1", "b").replace("u2", "H").replace("i2", "h").replace("u4", "I")
           .replace("i4", "i").replace("f4", "f").replace("u8", "Q").replace("i8", "q").replace("f8", "d")
           for k, v in _SCALARS.items()}

# ggml tensor types: (name, block size in values, bytes per block)
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210), 30: ("BF16", 1, 2),
}


@attrs.frozen
class GGUFTensor:
    name: str
    type_id: int
    shape: tuple[int, ...]  # torch order (outermost first)
    offset: int
    nbytes: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES.get(self.type_id, (f"type {self.type_id}", 0, 0))[0]


class _Reader:
    def __init__(self, data: np.ndarray, path: str) -> None:
        # ndarray.data is memoryview(data); numpy's stubs give ndarray __buffer__ only on Python >= 3.12
        self.buf = data.data
        self.pos = 0
        self.path = path

    def _need(self, n: int) -> None:
        if self.pos + n > len(self.buf):
            raise ModelError(f"{self.path}: truncated GGUF file")

    def take(self, n: int) -> bytes:
        self._need(n)
        out = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return out

    def scalar(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        self._need(size)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        return self.take(n).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            v = self.scalar(_STRUCT[vtype])
            return bool(v) if vtype == 7 else v
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype = self.scalar("<I")
            count = self.scalar("<Q")
            if itype in _SCALARS:
                dt = np.dtype(_SCALARS[itype])
                arr = np.frombuffer(self.take(dt.itemsize * count), dt)
                return arr.astype(bool).tolist() if itype == 7 else arr.tolist()
            if itype == _STRING:
                out = []
                buf, pos, end = self.buf, self.pos, len(self.buf)
                unpack = struct.unpack_from
                for _ in range(count):
                    if pos + 8 > end:
                        raise ModelError(f"{self.path}: truncated GGUF file")
                    (n,) = unpack("<Q", buf, pos)
                    pos += 8
                    if pos + n > end:
                        raise ModelError(f"{self.path}: truncated GGUF file")
                    out.append(str(buf[pos:pos + n], "utf-8", "replace"))
                    pos += n
                self.pos = pos
                return out
            return [self.value(itype) for _ in range(count)]
        raise ModelError(f"{self.path}: unknown GGUF value type {vtype}")


class GGUFFile:
    """One GGUF file: ``metadata`` (dict) and ``tensors`` (name -> GGUFTensor), memory-mapped."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        try:
            self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as exc:
            raise ModelError(f"{self.path}: cannot read: {exc}") from exc
        r = _Reader(self._data, self.path)
        if r.take(4) != _MAGIC:
            raise ModelError(f"{self.path}: not a GGUF file (bad magic)")
        version = r.scalar("<I")
        if version not in (2, 3):
            raise ModelError(f"{self.path}: GGUF version {version} not supported (2 or 3)")
        n_tensors, n_kv = r.scalar("<Q"), r.scalar("<Q")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = r.string()
            self.metadata[key] = r.value(r.scalar("<I"))
        infos = []
        for _ in range(n_tensors):
            name = r.string()
            n_dims = r.scalar("<I")
            if n_dims > _MAX_DIMS:  # ggml tensors have at most 4 dimensions; more is a hostile header
                raise ModelError(f"{self.path}: tensor {name!r} declares {n_dims} dimensions (ggml allows "
                                 f"{_MAX_DIMS})")
            dims = [r.scalar("<Q") for _ in range(n_dims)]
            infos.append((name, dims, r.scalar("<I"), r.scalar("<Q")))
        align = self.metadata.get("general.alignment", 32)
        if isinstance(align, bool) or not isinstance(align, int) or not 1 <= align <= 1 << 20:
            raise ModelError(f"{self.path}: general.alignment must be an integer in [1, {1 << 20}], not {align!r}")
        start = (r.pos + align - 1) // align * align
        self.tensors: dict[str, GGUFTensor] = {}
        for name, dims, type_id, offset in infos:
            if type_id not in GGML_TYPES:
                raise ModelError(f"{self.path}: tensor {name!r} has ggml type {type_id}, not supported "
                                 f"(supported: {', '.join(t[0] for t in GGML_TYPES.values())})")
            _, block, block_bytes = GGML_TYPES[type_id]
            numel = math.prod(dims)  # Python ints: np.prod would wrap around on hostile dimensions
            if dims and dims[0] % block:
                raise ModelError(f"{self.path}: tensor {name!r}: row of {dims[0]} is not a multiple of {block}")
            nbytes = numel // block * block_bytes
            if start + offset + nbytes > len(self._data):
                raise ModelError(f"{self.path}: tensor {name!r} runs past the end of the file")
            self.tensors[name] = GGUFTensor(name, type_id, tuple(reversed(dims)), start + offset, nbytes)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "?"))

    def numpy(self, name: str) -> np.ndarray:
        """The tensor dequantised to float32, in torch shape."""
        t = self.tensors[name]
        raw = self._data[t.offset:t.offset + t.nbytes]
        return dequantize(raw, t.type_id, t.shape)


def _f16(raw: np.ndarray) -> np.ndarray:
    return raw.view(np.float16).astype(np.float32)


def dequantize(raw: np.ndarray, type_id: int, shape: tuple[int, ...]) -> np.ndarray:
    """Dequantise the bytes of one ggml tensor to float32 of ``shape``."""
    name, _, block_bytes = GGML_TYPES[type_id]
    raw = np.asarray(raw, dtype=np.uint8)
    if name == "F32":
        return raw.view(np.float32).reshape(shape).copy()
    if name == "F16":
        return raw.view(np.float16).astype(np.float32).reshape(shape)
    if name == "BF16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
    b = raw.reshape(-1, block_bytes)
    out: np.ndarray
    if name == "Q8_0":
        d = _f16(b[:, :2].copy())
        q = b[:, 2:].view(np.int8).astype(np.float32)
        out = q * d
    elif name in ("Q4_0", "Q4_1"):
        d = _f16(b[:, :2].copy())
        qs = b[:, 4:] if name == "Q4_1" else b[:, 2:]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)
        out = (q - 8) * d if name == "Q4_0" else q * d + _f16(b[:, 2:4].copy())
    elif name in ("Q5_0", "Q5_1"):
        d = _f16(b[:, :2].copy())
        head = 4 if name == "Q5_1" else 2
        qh = b[:, head:head + 4].copy().view(np.uint32)  # [n, 1]
        qs = b[:, head + 4:]
        bits = (qh >> np.arange(32, dtype=np.uint32)) & 1  # bit j -> value j
        lo = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.uint32)
        q = (lo | (bits << 4)).astype(np.float32)
        out = (q - 16) * d if name == "Q5_0" else q * d + _f16(b[:, 2:4].copy())
    elif name == "Q6_K":
        ql = b[:, :128].astype(np.int32)
        qh = b[:, 128:192].astype(np.int32)
        sc = b[:, 192:208].view(np.int8).astype(np.float32)
        d = _f16(b[:, 208:210].copy())
        out = np.empty((b.shape[0], 256), dtype=np.float32)
        for half in range(2):
            l_lo, l_hi = ql[:, 64 * half:64 * half + 32], ql[:, 64 * half + 32:64 * half + 64]
            h = qh[:, 32 * half:32 * half + 32]
            s = sc[:, 8 * half:8 * half + 8]
            parts = [
                (l_lo & 0xF) | ((h & 3) << 4),
                (l_hi & 0xF) | (((h >> 2) & 3) << 4),
                (l_lo >> 4) | (((h >> 4) & 3) << 4),
                (l_hi >> 4) | (((h >> 6) & 3) << 4),
            ]
            for k, part in enumerate(parts):
                scale = np.repeat(s[:, [2 * k, 2 * k + 1]], 16, axis=1)  # 16 values per scale
                out[:, 128 * half + 32 * k:128 * half + 32 * (k + 1)] = d * scale * (part - 32)
    elif name in ("Q4_K", "Q5_K"):
        d = _f16(b[:, 0:2].copy())
        dmin = _f16(b[:, 2:4].copy())
        sc, mn = _k_scales(b[:, 4:16].astype(np.int32))  # [n, 8] each
        if name == "Q4_K":
            qs = b[:, 16:144].reshape(-1, 4, 32).astype(np.int32)
            high = np.zeros((b.shape[0], 8, 32), dtype=np.int32)
        else:
            qh = b[:, 16:48].astype(np.int32)  # [n, 32]
            qs = b[:, 48:176].reshape(-1, 4, 32).astype(np.int32)
            high = np.stack([((qh >> k) & 1) << 4 for k in range(8)], axis=1)  # sub-block k uses bit k
        low = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(-1, 8, 32)  # sub-blocks 2j, 2j+1
        q = (low + high).astype(np.float32)
        out = (d[:, :, None] * sc[:, :, None] * q - dmin[:, :, None] * mn[:, :, None]).reshape(-1, 256)
    else:  # pragma: no cover - GGML_TYPES and this function are kept in step
        raise ModelError(f"ggml type {name} cannot be dequantised")
    return out.reshape(shape)


def _k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit scales and mins packed in 12 bytes (ggml's get_scale_min_k4)."""
    scales = np.empty((s.shape[0], 8), dtype=np.float32)
    mins = np.empty((s.shape[0], 8), dtype=np.float32)
    for j in range(8):
        if j < 4:
            scales[:, j] = s[:, j] & 63
            mins[:, j] = s[:, j + 4] & 63
        else:
            scales[:, j] = (s[:, j + 4] & 0x0F) | ((s[:, j - 4] >> 6) << 4)
            mins[:, j] = (s[:, j + 4] >> 4) | ((s[:, j] >> 6) << 4)
    return scales, mins


# -- Llama family --------------------------------------------------------------------------------

def gguf_llama_config(g: GGUFFile) -> dict[str, Any]:
    """An HF-style config.json dict for a Llama-family GGUF file."""
    arch = g.architecture
    if arch != "llama":
        raise UnsupportedArchitecture(g.path, arch, ["llama (GGUF)"])
    try:
        return _llama_config(g, arch)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        # metadata is data: a string, a list or a zero where a count belongs is a typed error
        raise ModelError(f"{g.path}: invalid GGUF llama metadata: {type(exc).__name__}: {exc}") from exc


def _llama_config(g: GGUFFile, arch: str) -> dict[str, Any]:
    m = g.metadata

    def key(name: str, default: Any = None) -> Any:
        value = m.get(f"{arch}.{name}", default)
        if value is None:
            raise ModelError(f"{g.path}: GGUF metadata {arch}.{name} is missing")
        return value

    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    vocab = int(m.get(f"{arch}.vocab_size") or g.tensors["token_embd.weight"].shape[0])
    eos = m.get("tokenizer.ggml.eos_token_id")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(m.get(f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(m.get(f"{arch}.attention.key_length") or m.get(f"{arch}.rope.dimension_count")
                        or hidden // heads),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(m.get(f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(key("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in g.tensors,
        "bos_token_id": m.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos,
        "torch_dtype": "float32",
    }


_GGUF_TO_HF = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


def gguf_to_hf_names(g: GGUFFile) -> dict[str, str]:
    """GGUF tensor name -> HF tensor name for the tensors a Llama model uses."""
    out = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    if "output.weight" in g.tensors:
        out["output.weight"] = "lm_head.weight"
    for name in g.tensors:
        parts = name.split(".")
        if parts[0] == "blk" and len(parts) == 4 and parts[2] in _GGUF_TO_HF:
            out[name] = f"model.layers.{parts[1]}.{_GGUF_TO_HF[parts[2]]}.{parts[3]}"
    return out


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp stores q/k rows interleaved for its rope; HF uses "rotate half". Undo that."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_llama_weights(g: GGUFFile, config: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Every weight as float32 numpy, with HF names and HF q/k row order."""
    names = gguf_to_hf_names(g)
    out: dict[str, np.ndarray] = {}
    for gname, hname in names.items():
        w = g.numpy(gname)
        if hname.endswith("self_attn.q_proj.weight"):
            w = _unpermute(w, config["num_attention_heads"])
        elif hname.endswith("self_attn.k_proj.weight"):
            w = _unpermute(w, config["num_key_value_heads"])
        out[hname] = w
    return out


# -- tokenizer -------------------------------------------------------------------------------------

def gguf_tokenizer(g: GGUFFile) -> Any:
    """A ``tokenizers.Tokenizer`` built from the GGUF metadata (byte-level BPE, "gpt2" model)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    m = g.metadata
    kind = m.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelError(f"{g.path}: GGUF tokenizer model {kind!r} is not supported (only 'gpt2' byte-level BPE); "
                         "put a tokenizer.json beside the file")
    tokens: list[str] = m["tokenizer.ggml.tokens"]
    merges = [tuple(x.split(" ", 1)) for x in m.get("tokenizer.ggml.merges", [])]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tk = Tokenizer(models.BPE(vocab, merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if m.get("tokenizer.ggml.pre") in ("smollm", "starcoder", "refact"):
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tk.pre_tokenizer = byte_level
    tk.decoder = decoders.ByteLevel()
    types = m.get("tokenizer.ggml.token_type") or []
    special = [AddedToken(tokens[i], special=True, normalized=False)
               for i, t in enumerate(types) if t in (3, 4)]  # CONTROL, USER_DEFINED
    tk.add_special_tokens(special)
    return tk


def gguf_tokenizer_config(g: GGUFFile) -> dict[str, Any]:
    m = g.metadata
    tokens = m.get("tokenizer.ggml.tokens") or []

    def tok(key: str) -> str | None:
        i = m.get(key)
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    out: dict[str, Any] = {"bos_token": tok("tokenizer.ggml.bos_token_id"),
                           "eos_token": tok("tokenizer.ggml.eos_token_id"),
                           "add_bos_token": bool(m.get("tokenizer.ggml.add_bos_token", False))}
    if "tokenizer.chat_template" in m:
        out["chat_template"] = m["tokenizer.chat_template"]
    return out


def convert_gguf_to_folder(path: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """Write a GGUF Llama model as an HF-layout folder (config.json, model.safetensors in F32,
    tokenizer.json, tokenizer_config.json) that candle and transformers both load."""
    import torch
    from safetensors.torch import save_file

    g = GGUFFile(path)
    config = gguf_llama_config(g)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in gguf_llama_weights(g, config).items()}
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    gguf_tokenizer(g).save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(gguf_tokenizer_config(g), indent=2))
    return out
