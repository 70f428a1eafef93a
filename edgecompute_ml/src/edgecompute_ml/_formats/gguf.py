"""GGUF reading for the decoder families (architectures ``llama``, ``qwen2``, ``qwen3``, ``gemma2``,
``gemma3``, ``phi3``): metadata, tensors dequantised to torch, and a tokenizer built from the
metadata. The file is memory-mapped.

Split of work with the ``gguf`` package (llama.cpp's gguf-py), by measurement (docs/ml.md):

- the header and metadata are read here: 84 ms for SmolLM2's file against 2.7 s for
  ``gguf.GGUFReader`` (which builds a numpy view per string of the 49k-token vocabulary), and this
  reader refuses hostile headers (dimension counts, sizes past the file, alignment) with typed errors;
- F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K and Q5_K are dequantised here (numpy, 1.15-2.6x
  faster than ``gguf.quants`` on a 1536x2048 matrix); Q6_K and every other type llama.cpp defines
  (Q2_K, Q3_K, IQ*, TQ*, ...) by ``gguf.quants.dequantize``, which follows llama.cpp's new types.
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

from ..errors import ModelError, UnsupportedArchitecture, UnsupportedModelOption

__all__ = ["GGUFFile", "convert_gguf_to_folder", "gguf_config", "gguf_llama_config", "gguf_to_hf_names",
           "gguf_tokenizer", "gguf_weights"]

_MAGIC = b"GGUF"
_MAX_DIMS = 4
# value types of the key/value section
_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
            12: "<f8"}
_STRING, _ARRAY = 8, 9
_STRUCT = {k: v.replace("u1", "B").replace("i1", "b").replace("u2", "H").replace("i2", "h").replace("u4", "I")
           .replace("i4", "i").replace("f4", "f").replace("u8", "Q").replace("i8", "q").replace("f8", "d")
           for k, v in _SCALARS.items()}

# ggml tensor types dequantised here: (name, block size in values, bytes per block)
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210), 30: ("BF16", 1, 2),
}
# types whose dequantisation the gguf package does faster than the code below (measured, docs/ml.md)
_GGUF_FASTER = frozenset({"Q6_K"})


def _gguf_types() -> dict[int, tuple[str, int, int]]:
    """Every type the installed gguf package knows (block size, bytes per block)."""
    try:
        import gguf
    except ImportError:  # pragma: no cover - gguf is a dependency; only our own types then
        return {}
    return {int(t): (t.name, int(size[0]), int(size[1])) for t, size in gguf.GGML_QUANT_SIZES.items()}


_ALL_TYPES: dict[int, tuple[str, int, int]] | None = None


def type_info(type_id: int) -> tuple[str, int, int] | None:
    """(name, block size, bytes per block) of a ggml type, ours or the gguf package's."""
    global _ALL_TYPES
    if type_id in GGML_TYPES:
        return GGML_TYPES[type_id]
    if _ALL_TYPES is None:
        _ALL_TYPES = _gguf_types()
    return _ALL_TYPES.get(type_id)


@attrs.frozen
class GGUFTensor:
    name: str
    type_id: int
    shape: tuple[int, ...]  # torch order (outermost first)
    offset: int
    nbytes: int

    @property
    def type_name(self) -> str:
        return (type_info(self.type_id) or (f"type {self.type_id}", 0, 0))[0]


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
            info = type_info(type_id)
            if info is None:
                raise ModelError(f"{self.path}: tensor {name!r} has ggml type {type_id}, which neither this "
                                 f"reader nor the installed gguf package knows")
            _, block, block_bytes = info
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

    def drop_pages(self) -> None:
        """Drop the file's pages from this process (they are read again from the page cache if
        a tensor is read again)."""
        import mmap

        mapped = getattr(self._data, "_mmap", None)
        if isinstance(mapped, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
            mapped.madvise(mmap.MADV_DONTNEED)

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes (a view of the memory-mapped file)."""
        t = self.tensors[name]
        return self._data[t.offset:t.offset + t.nbytes]

    def numpy(self, name: str) -> np.ndarray:
        """The tensor dequantised to float32, in torch shape."""
        t = self.tensors[name]
        return dequantize(self.raw(name), t.type_id, t.shape)


def _f16(raw: np.ndarray) -> np.ndarray:
    return raw.view(np.float16).astype(np.float32)


def dequantize(raw: np.ndarray, type_id: int, shape: tuple[int, ...]) -> np.ndarray:
    """Dequantise the bytes of one ggml tensor to float32 of ``shape``."""
    info = type_info(type_id)
    if info is None:
        raise ModelError(f"ggml type {type_id} is not supported")
    name, block, block_bytes = info
    raw = np.asarray(raw, dtype=np.uint8)
    if type_id not in GGML_TYPES or name in _GGUF_FASTER:
        import gguf

        row = (shape[-1] if shape else 1) // block * block_bytes
        try:
            values = gguf.quants.dequantize(raw.reshape(-1, row), gguf.GGMLQuantizationType(type_id))
        except NotImplementedError as exc:
            raise ModelError(f"ggml type {name}: the gguf package cannot dequantise it: {exc}") from exc
        return np.asarray(values, dtype=np.float32).reshape(shape)
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


# -- decoder families --------------------------------------------------------------------------

# GGUF architecture -> (HF architecture, HF model_type)
GGUF_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "gemma2": ("Gemma2ForCausalLM", "gemma2"),
    "gemma3": ("Gemma3ForCausalLM", "gemma3_text"),
    "phi3": ("Phi3ForCausalLM", "phi3"),
}
# Gemma's 27B models scale queries by hidden/heads instead of head_dim; llama.cpp does not store
# query_pre_attn_scalar and recognises them by their layer count, as we do
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def gguf_config(g: GGUFFile) -> dict[str, Any]:
    """An HF-style config.json dict for a GGUF file of a supported decoder architecture."""
    arch = g.architecture
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedArchitecture(g.path, arch, [f"{a} (GGUF)" for a in GGUF_ARCHITECTURES])
    try:
        return _config(g, arch)
    except (KeyError, TypeError, ValueError, ZeroDivisionError, IndexError) as exc:
        # metadata is data: a string, a list or a zero where a count belongs is a typed error
        raise ModelError(f"{g.path}: invalid GGUF {arch} metadata: {type(exc).__name__}: {exc}") from exc


gguf_llama_config = gguf_config  # the name of the Llama-only version


def _config(g: GGUFFile, arch: str) -> dict[str, Any]:
    m = g.metadata

    def key(name: str, default: Any = None) -> Any:
        value = m.get(f"{arch}.{name}", default)
        if value is None:
            raise ModelError(f"{g.path}: GGUF metadata {arch}.{name} is missing")
        return value

    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    layers = int(key("block_count"))
    vocab = int(m.get(f"{arch}.vocab_size") or g.tensors["token_embd.weight"].shape[0])
    rotary = m.get(f"{arch}.rope.dimension_count")
    head_dim = int(m.get(f"{arch}.attention.key_length") or (rotary if arch != "phi3" else None) or hidden // heads)
    hf_arch, model_type = GGUF_ARCHITECTURES[arch]
    out: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": int(m.get(f"{arch}.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-6 if arch.startswith("gemma") else 1e-5)),
        "rope_theta": float(m.get(f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(key("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in g.tensors,
        "bos_token_id": m.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": m.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    if rotary is not None and int(rotary) != head_dim:
        out["partial_rotary_factor"] = int(rotary) / head_dim
    scaling = m.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none", "linear"):
        raise UnsupportedModelOption(g.path, f"{arch}.rope.scaling.type", scaling, ["none", "linear"])
    if scaling == "linear":
        out["rope_scaling"] = {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
    if "rope_freqs.weight" in g.tensors:
        llama3 = _llama3_from_divisors(g, out["rope_theta"], int(rotary or head_dim))
        if llama3 is not None:
            out["rope_scaling"] = llama3
    window = m.get(f"{arch}.attention.sliding_window")
    if arch.startswith("gemma"):
        out["query_pre_attn_scalar"] = hidden // heads if layers == _GEMMA_27B_LAYERS[arch] else head_dim
        out["hidden_activation"] = "gelu_pytorch_tanh"
        out["sliding_window"] = int(window or 4096)
        out["layer_types"] = _gemma_layer_types(g, arch, layers)
        caps = (50.0, 30.0) if arch == "gemma2" else (None, None)
        out["attn_logit_softcapping"] = m.get(f"{arch}.attn_logit_softcapping", caps[0])
        out["final_logit_softcapping"] = m.get(f"{arch}.final_logit_softcapping", caps[1])
        if arch == "gemma3":
            out["rope_local_base_freq"] = float(m.get(f"{arch}.rope.freq_base_swa", 10000.0))
    elif arch == "phi3":
        out["sliding_window"] = int(window) if window else None
        original = m.get(f"{arch}.rope.scaling.original_context_length")
        if original is not None:
            out["original_max_position_embeddings"] = int(original)
        if "rope_factors_long.weight" in g.tensors:
            rope: dict[str, Any] = {
                "rope_type": "longrope",
                "long_factor": g.numpy("rope_factors_long.weight").astype(float).tolist(),
                "short_factor": g.numpy("rope_factors_short.weight").astype(float).tolist(),
            }
            attention = m.get(f"{arch}.rope.scaling.attn_factor")
            if attention is not None:
                rope["attention_factor"] = float(attention)
            out["rope_scaling"] = rope
    return out


def _gemma_layer_types(g: GGUFFile, arch: str, layers: int) -> list[str]:
    """Which Gemma layers slide: ``attention.sliding_window_pattern`` (a period, or one flag per
    layer) when the file has it, else llama.cpp's defaults (Gemma 2: every other layer from the
    first; Gemma 3: all but every sixth)."""
    pattern = g.metadata.get(f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, list):
        if len(pattern) != layers:
            raise ModelError(f"{g.path}: {arch}.attention.sliding_window_pattern has {len(pattern)} entries for "
                             f"{layers} layers")
        sliding = [bool(p) for p in pattern]
    else:
        # llama.cpp's set_swa_pattern: layer i slides unless it ends a period
        period = int(pattern) if pattern else (2 if arch == "gemma2" else 6)
        sliding = [i % period < period - 1 for i in range(layers)]
    return ["sliding_attention" if s else "full_attention" for s in sliding]


def _llama3_from_divisors(g: GGUFFile, theta: float, dim: int) -> dict[str, Any] | None:
    """llama.cpp stores Llama 3.x rope scaling as ``rope_freqs`` (a divisor per frequency). Llama 3.x
    models use low/high frequency factors 1 and 4 (and an 8192-token original context): find the
    original context (a power of two) that, with those factors and the largest divisor as the
    factor, gives back the file's divisors, so that the model has an HF config transformers reads."""
    divisors = g.numpy("rope_freqs.weight").astype(np.float64).reshape(-1)
    if divisors.shape != (dim // 2,) or not np.all(np.isfinite(divisors)) or divisors.min() <= 0:
        raise ModelError(f"{g.path}: rope_freqs.weight must hold {dim // 2} positive numbers")
    if np.allclose(divisors, 1.0):
        return None
    factor = float(divisors.max())
    inv = theta ** -(np.arange(0, dim, 2, dtype=np.float64) / dim)
    wavelen = 2 * math.pi / inv
    low, high = 1.0, 4.0
    for original in [8192] + [1 << k for k in range(4, 23)]:
        smooth = (original / wavelen - low) / (high - low)
        expected = np.where(wavelen < original / high, 1.0,
                            np.where(wavelen > original / low, factor, 1 / ((1 - smooth) / factor + smooth)))
        if np.allclose(divisors, expected, rtol=1e-4, atol=1e-6):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                    "original_max_position_embeddings": original}
    raise UnsupportedModelOption(g.path, "rope_freqs.weight", "divisors other than Llama 3's rope scaling",
                                 ["llama3 (low_freq_factor 1, high_freq_factor 4, a power-of-two original context)"])


_GGUF_TO_HF = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_qkv": "self_attn.qkv_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
# where an architecture's names mean something else
_ARCH_NAMES: dict[str, dict[str, str]] = {
    "gemma2": {"ffn_norm": "pre_feedforward_layernorm", "post_attention_norm": "post_attention_layernorm",
               "post_ffw_norm": "post_feedforward_layernorm"},
    "phi3": {"ffn_up": "mlp.gate_up_proj"},  # gate and up, fused
}
_ARCH_NAMES["gemma3"] = _ARCH_NAMES["gemma2"]


def gguf_to_hf_names(g: GGUFFile) -> dict[str, str]:
    """GGUF tensor name -> HF tensor name for the tensors a decoder uses."""
    table = {**_GGUF_TO_HF, **_ARCH_NAMES.get(g.architecture, {})}
    out = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    if "output.weight" in g.tensors:
        out["output.weight"] = "lm_head.weight"
    for name in g.tensors:
        parts = name.split(".")
        if parts[0] == "blk" and len(parts) == 4 and parts[2] in table:
            out[name] = f"model.layers.{parts[1]}.{table[parts[2]]}.{parts[3]}"
    return out


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp stores a llama's q/k rows interleaved for its rope; HF uses "rotate half". Undo that."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_weights(g: GGUFFile, config: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Every weight as float32 numpy, with HF names and HF layouts."""
    return {hname: gguf_weights_one(g, config, gname, hname) for gname, hname in gguf_to_hf_names(g).items()}


def gguf_weights_one(g: GGUFFile, config: Mapping[str, Any], gname: str, hname: str) -> np.ndarray:
    """One weight as float32 numpy in the HF layout."""
    permuted = g.architecture == "llama"  # the others use the NEOX rope, HF's layout
    w = g.numpy(gname)
    if permuted and hname.endswith("self_attn.q_proj.weight"):
        w = _unpermute(w, config["num_attention_heads"])
    elif permuted and hname.endswith("self_attn.k_proj.weight"):
        w = _unpermute(w, config["num_key_value_heads"])
    elif g.architecture.startswith("gemma") and hname.endswith("norm.weight"):
        w = w - 1.0  # llama.cpp's converter stores Gemma's norms as the 1 + w they multiply by
    return w


gguf_llama_weights = gguf_weights  # the name of the Llama-only version


_FLOAT_TYPES = frozenset({"F32", "F16", "BF16", "F64"})


def quantized_codes(raw: np.ndarray, type_id: int, shape: tuple[int, ...]) -> Any:
    """The unpacked codes of a quantized 2-D tensor [N, K] (``quant.Q4Codes`` for Q4_0, Q4_1 and
    Q4_K, and ``quant.Int8Codes`` with a scale per 32 for Q8_0, exactly; ``quant.Int8Codes``
    requantised per row for the other types), or None for a float tensor. Nothing of the whole
    tensor is kept in float32 but one int8 requantisation."""
    import torch

    from . import quant

    info = type_info(type_id)
    if info is None:
        raise ModelError(f"ggml type {type_id} is not supported")
    name, _, block_bytes = info
    if name in _FLOAT_TYPES or len(shape) != 2:
        return None
    n, k = shape
    b = np.asarray(raw, dtype=np.uint8).reshape(-1, block_bytes)
    if name in ("Q4_0", "Q4_1"):
        d = _f16(b[:, :2].copy())[:, 0]
        qs = b[:, 4:] if name == "Q4_1" else b[:, 2:]
        codes = np.concatenate([qs & 0x0F, qs >> 4], axis=1)
        offset = _f16(b[:, 2:4].copy())[:, 0] + 8 * d if name == "Q4_1" else np.zeros_like(d)
        scale = d
    elif name == "Q4_K":
        d = _f16(b[:, 0:2].copy())
        dmin = _f16(b[:, 2:4].copy())
        sc, mn = _k_scales(b[:, 4:16].astype(np.int32))  # [n, 8]
        qs = b[:, 16:144].reshape(-1, 4, 32)
        codes = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(-1, 256)  # sub-blocks 2j, 2j+1
        scale = (d * sc).reshape(-1)
        offset = (8 * d * sc - dmin * mn).reshape(-1)
    elif name == "Q8_0":  # kept as it is; the int8 kernel's per-row form is made from it when packed
        d = _f16(b[:, :2].copy())[:, 0]
        codes = b[:, 2:].view(np.int8)
        return quant.Int8Codes(torch.from_numpy(np.ascontiguousarray(codes.reshape(n, k))),
                               torch.from_numpy(d.astype(np.float32).reshape(n, k // quant.GROUP)))
    else:
        return quant.quantize_int8(torch.from_numpy(dequantize(raw, type_id, shape)))
    return quant.Q4Codes(torch.from_numpy(np.ascontiguousarray(codes.reshape(n, k))),
                         torch.from_numpy(scale.astype(np.float32).reshape(n, k // quant.GROUP)),
                         torch.from_numpy(offset.astype(np.float32).reshape(n, k // quant.GROUP)))


def gguf_quantized_weights(g: GGUFFile, config: Mapping[str, Any], wanted: Any) -> dict[str, Any]:
    """Like :func:`gguf_weights`, but quantized 2-D tensors come as unpacked codes (see
    :func:`quantized_codes`) and float ones as float32 torch tensors; only names in ``wanted``."""
    import torch

    names = gguf_to_hf_names(g)
    permuted = g.architecture == "llama"
    out: dict[str, Any] = {}
    for gname, hname in names.items():
        if hname not in wanted:
            continue
        t = g.tensors[gname]
        codes = quantized_codes(g.raw(gname), t.type_id, t.shape)
        if codes is None:
            out[hname] = torch.from_numpy(np.ascontiguousarray(gguf_weights_one(g, config, gname, hname)))
            continue
        heads = (config["num_attention_heads"] if hname.endswith("self_attn.q_proj.weight") else
                 config["num_key_value_heads"] if hname.endswith("self_attn.k_proj.weight") else None)
        if permuted and heads is not None:
            codes = codes.rows(torch.from_numpy(_unpermute(np.arange(t.shape[0]), heads)))
        out[hname] = codes
    return out


# -- tokenizer -------------------------------------------------------------------------------------

# llama.cpp's ``tokenizer.ggml.pre`` -> the pre-tokenizer regex of that model's tokenizer.json
# (Llama 3.x: digits in groups of three; Qwen2/2.5/3: single digits)
_PRE_SPLITS = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+",
}


def gguf_tokenizer(g: GGUFFile) -> Any:
    """A ``tokenizers.Tokenizer`` built from the GGUF metadata (byte-level BPE, "gpt2" model)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    m = g.metadata
    kind = m.get("tokenizer.ggml.model")
    if kind != "gpt2":
        # SentencePiece vocabularies (Gemma, Phi-3: "llama") need a tokenizer.json beside the file
        raise UnsupportedModelOption(g.path, "tokenizer.ggml.model", kind,
                                     ["gpt2 (byte-level BPE); else put a tokenizer.json beside the file"])
    tokens: list[str] = m["tokenizer.ggml.tokens"]
    merges = [tuple(x.split(" ", 1)) for x in m.get("tokenizer.ggml.merges", [])]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tk = Tokenizer(models.BPE(vocab, merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pre = m.get("tokenizer.ggml.pre")
    if pre in ("smollm", "starcoder", "refact"):
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in _PRE_SPLITS:  # the split regex of the model's tokenizer.json, then bytes
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_PRE_SPLITS[pre]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
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
    """Write a GGUF decoder as an HF-layout folder (config.json, model.safetensors in F32,
    tokenizer.json, tokenizer_config.json) that candle and transformers both load."""
    import torch
    from safetensors.torch import save_file

    g = GGUFFile(path)
    config = gguf_config(g)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in gguf_weights(g, config).items()}
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    gguf_tokenizer(g).save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(gguf_tokenizer_config(g), indent=2))
    return out
