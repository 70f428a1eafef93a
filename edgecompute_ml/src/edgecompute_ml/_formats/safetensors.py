"""Reading safetensors checkpoints: headers checked before any tensor is loaded.

A checkpoint is one ``model.safetensors`` or shards listed by ``model.safetensors.index.json``
(``weight_map``: tensor name -> shard file). Only the header (8-byte length + JSON) is read to
validate names, shapes and byte ranges and to estimate memory; tensors are then memory-mapped.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs

from ..errors import ModelError, ShapeMismatch

__all__ = ["Checkpoint", "TensorInfo", "read_header"]

DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
FLOAT_DTYPES = frozenset({"F32", "F16", "BF16", "F64"})
_MAX_HEADER = 100 * 2**20


@attrs.frozen
class TensorInfo:
    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: str | os.PathLike[str]) -> dict[str, TensorInfo]:
    """Parse and validate one safetensors file's header; raise ModelError naming the file."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ModelError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (length,) = struct.unpack("<Q", raw)
            if length > min(_MAX_HEADER, size - 8):
                raise ModelError(f"{path}: not a safetensors file (header length {length} exceeds the file)")
            header = json.loads(f.read(length))
    except OSError as exc:
        raise ModelError(f"{path}: cannot read: {exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: corrupt safetensors header: {exc}") from exc
    if not isinstance(header, dict):
        raise ModelError(f"{path}: corrupt safetensors header: not a JSON object")
    data_size = size - 8 - length
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = entry["dtype"]
            shape = tuple(int(d) for d in entry["shape"])
            start, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{path}: tensor {name!r}: malformed header entry {entry!r}") from exc
        if dtype not in DTYPE_SIZES:
            raise ModelError(f"{path}: tensor {name!r}: unknown dtype {dtype!r}")
        if any(d < 0 for d in shape):
            raise ModelError(f"{path}: tensor {name!r}: negative dimension in shape {list(shape)}")
        expected = math.prod(shape) * DTYPE_SIZES[dtype]
        if not (0 <= start <= end <= data_size) or end - start != expected:
            raise ModelError(f"{path}: tensor {name!r}: byte range [{start}, {end}) does not hold "
                             f"{dtype}{list(shape)} ({expected} bytes) inside the {data_size}-byte data section")
        tensors[name] = TensorInfo(path, dtype, shape, start, end)
    return tensors


class Checkpoint:
    """The tensors of a model folder's safetensors file(s), by name (header only until loaded)."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        single = self.folder / "model.safetensors"
        self.tensors: dict[str, TensorInfo] = {}
        if index.is_file():
            try:
                weight_map: Mapping[str, str] = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ModelError(f"{index}: not a valid safetensors index (needs 'weight_map'): {exc}") from exc
            headers: dict[str, dict[str, TensorInfo]] = {}
            for name, shard in weight_map.items():
                if shard not in headers:
                    shard_path = self.folder / shard
                    if not shard_path.is_file():
                        raise ModelError(f"{index}: shard {shard!r} (holding {name!r}) is missing")
                    headers[shard] = read_header(shard_path)
                info = headers[shard].get(name)
                if info is None:
                    raise ModelError(f"{self.folder / shard}: tensor {name!r} is listed in {index.name} "
                                     "but not in the shard")
                self.tensors[name] = info
            self.files = [str(self.folder / s) for s in headers]
        elif single.is_file():
            self.tensors = read_header(single)
            self.files = [str(single)]
        else:
            candidates = sorted(self.folder.glob("*.safetensors"))
            if not candidates:
                raise ModelError(f"{self.folder}: no model.safetensors or model.safetensors.index.json")
            for candidate in candidates:
                self.tensors.update(read_header(candidate))
            self.files = [str(c) for c in candidates]

    def describe(self) -> str:
        return self.files[0] if len(self.files) == 1 else f"{self.folder} ({len(self.files)} shards)"

    def validate(self, expected: Mapping[str, tuple[int, ...]], optional: frozenset[str] = frozenset()) -> None:
        """Every expected tensor exists with exactly the expected shape and a float dtype."""
        for name, shape in expected.items():
            info = self.tensors.get(name)
            if info is None:
                if name in optional:
                    continue
                raise ModelError(f"{self.describe()}: tensor {name!r} (shape {list(shape)}) is missing")
            if info.shape != tuple(shape):
                raise ShapeMismatch(info.file, name, shape, info.shape)
            if info.dtype not in FLOAT_DTYPES:
                raise ModelError(f"{info.file}: tensor {name!r} has dtype {info.dtype}; expected F32, F16 or BF16")

    def bytes_for(self, names: Any, element_size: int) -> int:
        return sum(self.tensors[n].numel * element_size for n in names if n in self.tensors)

    def load(self, names: Any, dtype: Any, device: Any, *,
             convert: Callable[[str, Any], Any] | None = None) -> dict[str, Any]:
        """Load ``names`` (memory-mapped), converted to ``dtype`` on ``device``, each then passed
        through ``convert(name, tensor)`` when given (quantization at load)."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for name in names:
            if name in self.tensors:
                by_file.setdefault(self.tensors[name].file, []).append(name)
        out: dict[str, Any] = {}
        for file, file_names in by_file.items():
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in file_names:
                    tensor = f.get_tensor(name).to(device=device, dtype=dtype).contiguous()
                    out[name] = tensor if convert is None else convert(name, tensor)
        return out
