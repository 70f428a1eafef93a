"""How values cross HTTP: JSON with tagged base64, or a compact binary frame with raw buffers.

Both the server and :mod:`edgecompute.client` use this module; it needs only the standard library
(numpy is imported only when an array crosses).

JSON (``application/json``). Plain JSON values stay as they are. Values JSON cannot carry are
tagged objects::

    bytes          {"$bytes": "<base64>"}
    numpy array    {"$array": "<base64 of the C-ordered data>", "dtype": "<f4", "shape": [2, 3]}
    a dict whose keys start with "$"   {"$dict": [[key, value], ...]}   (so tags stay unambiguous)

Binary frame (``application/x-edgecompute``)::

    b"ECF1" | header length (uint32, little-endian) | header (JSON, UTF-8) | buffer 0 | buffer 1 ...

The header is the JSON document above, except that bytes and arrays are ``{"$buffer": i}`` (plus
``dtype`` and ``shape`` for arrays) naming raw buffers that follow the header back to back; the
header's top-level ``"$buffers"`` lists their lengths. Arrays cross without base64 (which adds a
third) and without a copy on decode (``numpy.frombuffer`` over the received body).

Depth. One rule holds both ways: a document's JSON form (tags counted as written) may nest at most
``max_depth`` arrays/objects (default :data:`MAX_DEPTH`, at most :data:`MAX_DEPTH_CEILING`). Decoding
checks it before converting anything and encoding checks it while converting, so neither can
overflow the interpreter's stack (a nested document used to end in ``RecursionError``); both raise
:class:`InvalidRequest` naming the limit.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Mapping
from typing import Any

from .errors import InvalidRequest

__all__ = ["BINARY", "JSON", "MAX_DEPTH", "MAX_DEPTH_CEILING", "check_depth", "decode_frame", "decode_json",
           "encode_frame", "from_jsonable", "to_jsonable"]

JSON = "application/json"
BINARY = "application/x-edgecompute"
MAGIC = b"ECF1"
_LENGTH = struct.Struct("<I")
_SIMPLE = (str, int, float, bool, type(None))
_CONTAINERS = (dict, list, tuple)

#: The default for how many arrays/objects a document's JSON form may nest (see the module docs).
MAX_DEPTH = 64
#: The most any setting may allow: the conversions recurse at most twice per level, well inside
#: Python's default recursion limit of 1000 even with a deep caller (a server's middleware stack).
MAX_DEPTH_CEILING = 256


def _too_deep(max_depth: int) -> InvalidRequest:
    return InvalidRequest(f"the document nests more than {max_depth} arrays/objects; the limit is "
                          f"max_depth = {max_depth} (server setting server.max_depth, ceiling {MAX_DEPTH_CEILING})")


def _depth_limit(max_depth: int) -> int:
    if type(max_depth) is not int or not 1 <= max_depth <= MAX_DEPTH_CEILING:
        raise InvalidRequest(f"max_depth must be an integer from 1 to {MAX_DEPTH_CEILING}, not {max_depth!r}")
    return max_depth


def check_depth(value: Any, max_depth: int = MAX_DEPTH) -> None:
    """Raise :class:`InvalidRequest` if ``value`` (JSON types) nests more than ``max_depth``
    dicts/lists. Iterative: any depth is safe to check."""
    _depth_limit(max_depth)
    if not isinstance(value, _CONTAINERS):
        return
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        container, depth = stack.pop()
        if depth > max_depth:
            raise _too_deep(max_depth)
        for item in (container.values() if isinstance(container, dict) else container):
            if isinstance(item, _CONTAINERS):
                stack.append((item, depth + 1))


def _may_nest(text: bytes, max_depth: int) -> bool:
    # a cheap bound (C speed): a document with no more brackets than the limit cannot be too deep
    return text.count(b"[") + text.count(b"{") > max_depth


def decode_json(body: bytes, max_depth: int = MAX_DEPTH) -> Any:
    """Parse a JSON body, check its depth, resolve its tags. Raises :class:`InvalidRequest`
    (a body that is not JSON raises :class:`ValueError`, as :func:`json.loads` does)."""
    _depth_limit(max_depth)
    try:
        document = json.loads(body)
    except RecursionError:
        raise _too_deep(max_depth) from None
    if _may_nest(body, max_depth):
        check_depth(document, max_depth)
    # without a '"$' anywhere there is no tag to resolve: skip the walk
    if b'"$' in body or b"\\u0024" in body:
        return _from_jsonable(document, None)
    return document


def _is_array(value: Any) -> bool:
    return type(value).__module__ == "numpy" and hasattr(value, "dtype") and hasattr(value, "shape")


def _array_bytes(value: Any) -> tuple[bytes | memoryview, str, list[int]]:
    import numpy as np

    array = np.asarray(value, order="C")  # not ascontiguousarray: it makes 0-d arrays 1-d
    if array.dtype.hasobject:
        raise InvalidRequest("arrays of Python objects cannot cross the wire; use a numeric dtype")
    data: bytes | memoryview = memoryview(array.data).cast("B") if array.size else b""
    return data, array.dtype.str, list(array.shape)


def _make_array(data: bytes | memoryview, dtype: Any, shape: Any) -> Any:
    import numpy as np

    if not isinstance(dtype, str) or not isinstance(shape, list) or not all(
            type(n) is int and n >= 0 for n in shape):
        raise InvalidRequest(f"an array needs a dtype string and a shape of integers >= 0, not {dtype!r}, {shape!r}")
    try:
        kind = np.dtype(dtype)
    except TypeError as exc:
        raise InvalidRequest(f"unknown array dtype {dtype!r}") from exc
    if kind.hasobject:
        raise InvalidRequest("arrays of Python objects cannot cross the wire")
    count = 1
    for n in shape:
        count *= n
    if count * kind.itemsize != len(data):
        raise InvalidRequest(f"array of shape {shape} and dtype {dtype} needs {count * kind.itemsize} bytes, "
                             f"got {len(data)}")
    return np.frombuffer(data, dtype=kind).reshape(shape)


def to_jsonable(value: Any, buffers: list[bytes | memoryview] | None = None, *, max_depth: int = MAX_DEPTH) -> Any:
    """``value`` as plain JSON types; with ``buffers``, bytes and arrays go there instead of base64.

    Raises :class:`InvalidRequest` when the JSON form would nest more than ``max_depth`` levels."""
    try:
        return _to_jsonable(value, buffers, _depth_limit(max_depth))
    except _DepthExceeded:
        raise _too_deep(max_depth) from None


class _DepthExceeded(Exception):
    """Raised deep inside the conversion, which does not know the limit; re-raised with it."""


def _to_jsonable(value: Any, buffers: list[bytes | memoryview] | None, room: int) -> Any:
    # ``room``: how many more levels of dicts/lists the JSON form may open here
    if isinstance(value, _SIMPLE):
        return value
    if room < 1:
        raise _DepthExceeded
    if isinstance(value, Mapping):
        if any(type(key) is not str or key.startswith("$") for key in value):
            if room < 3:  # {"$dict": [[key, value], ...]}: three levels
                raise _DepthExceeded
            return {"$dict": [[_to_jsonable(k, buffers, room - 3), _to_jsonable(v, buffers, room - 3)]
                              for k, v in value.items()]}
        return {key: _to_jsonable(item, buffers, room - 1) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(item, buffers, room - 1) for item in value]
    if isinstance(value, (bytes, bytearray, memoryview)):
        if buffers is not None:
            buffers.append(value if isinstance(value, bytes) else memoryview(value))
            return {"$buffer": len(buffers) - 1}
        return {"$bytes": base64.b64encode(value).decode("ascii")}
    if _is_array(value):
        if room < 2:  # the shape list inside the tag
            raise _DepthExceeded
        data, dtype, shape = _array_bytes(value)
        if buffers is not None:
            buffers.append(data)
            return {"$buffer": len(buffers) - 1, "dtype": dtype, "shape": shape}
        return {"$array": base64.b64encode(data).decode("ascii"), "dtype": dtype, "shape": shape}
    if hasattr(value, "item") and type(value).__module__ == "numpy":  # numpy scalars
        return value.item()
    raise InvalidRequest(f"a {type(value).__name__} cannot cross the wire; use JSON types, bytes or numpy arrays")


def from_jsonable(value: Any, buffers: list[memoryview] | None = None, *, max_depth: int = MAX_DEPTH) -> Any:
    """The inverse of :func:`to_jsonable`; checks the depth first (iteratively)."""
    check_depth(value, max_depth)
    return _from_jsonable(value, buffers)


def _from_jsonable(value: Any, buffers: list[memoryview] | None) -> Any:
    # recursion is bounded: every caller has checked the depth of ``value``
    if isinstance(value, _SIMPLE):
        return value
    if isinstance(value, list):
        return [_from_jsonable(item, buffers) for item in value]
    if isinstance(value, dict):
        if value and next(iter(value)).startswith("$"):
            return _tagged(value, buffers)
        return {key: _from_jsonable(item, buffers) for key, item in value.items()}
    raise InvalidRequest(f"not a JSON value: {type(value).__name__}")


def _tagged(value: dict[str, Any], buffers: list[memoryview] | None) -> Any:
    try:
        if "$bytes" in value:
            return base64.b64decode(value["$bytes"], validate=True)
        if "$array" in value:
            return _make_array(base64.b64decode(value["$array"], validate=True), value.get("dtype"),
                               value.get("shape"))
        if "$buffer" in value:
            index = value["$buffer"]
            if buffers is None or type(index) is not int or not 0 <= index < len(buffers):
                raise InvalidRequest(f"$buffer {index!r} names no buffer of this frame")
            data = buffers[index]
            if "dtype" in value:
                return _make_array(data, value["dtype"], value.get("shape"))
            return data.tobytes()
        if "$dict" in value:
            pairs = value["$dict"]
            if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
                raise InvalidRequest("$dict must be a list of [key, value] pairs")
            return {_from_jsonable(k, buffers): _from_jsonable(v, buffers) for k, v in pairs}
    except (ValueError, TypeError) as exc:  # binascii.Error is a ValueError; unhashable keys a TypeError
        if isinstance(exc, InvalidRequest):
            raise
        raise InvalidRequest(f"bad tagged value: {exc}") from exc
    raise InvalidRequest(f"unknown tag in {sorted(value)}: keys starting with '$' are reserved; wrap such "
                         "dicts as {\"$dict\": [[key, value], ...]}")


def encode_frame(document: Mapping[str, Any], *, max_depth: int = MAX_DEPTH) -> bytes:
    """A binary frame holding ``document`` (bytes and arrays inside it travel as raw buffers)."""
    buffers: list[bytes | memoryview] = []
    header = to_jsonable(dict(document), buffers, max_depth=max_depth)
    if "$dict" in header:
        raise InvalidRequest("the top level of a frame must be a dict with plain string keys")
    header["$buffers"] = [len(memoryview(b).cast("B")) if isinstance(b, memoryview) else len(b) for b in buffers]
    head = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    return b"".join([MAGIC, _LENGTH.pack(len(head)), head, *buffers])


def decode_frame(body: bytes, *, max_depth: int = MAX_DEPTH) -> dict[str, Any]:
    """Parse a binary frame; raises :class:`InvalidRequest` naming what is wrong."""
    _depth_limit(max_depth)
    view = memoryview(body)
    if len(view) < 8 or bytes(view[:4]) != MAGIC:
        raise InvalidRequest("not an edgecompute frame: it must start with b'ECF1' and a 4-byte header length")
    (length,) = _LENGTH.unpack(view[4:8])
    if 8 + length > len(view):
        raise InvalidRequest(f"frame header says {length} bytes but the body has only {len(view) - 8}")
    head = bytes(view[8:8 + length])
    try:
        header = json.loads(head)
    except RecursionError:
        raise _too_deep(max_depth) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequest(f"frame header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise InvalidRequest("frame header must be a JSON object")
    if _may_nest(head, max_depth):
        check_depth(header, max_depth)
    lengths = header.pop("$buffers", [])
    if not isinstance(lengths, list) or not all(type(n) is int and n >= 0 for n in lengths):
        raise InvalidRequest("$buffers must be a list of buffer lengths")
    buffers: list[memoryview] = []
    offset = 8 + length
    for n in lengths:
        buffers.append(view[offset:offset + n])
        offset += n
    if offset != len(view):
        raise InvalidRequest(f"frame buffers add up to {offset} bytes but the body has {len(view)}")
    document = _from_jsonable(header, buffers)
    assert isinstance(document, dict)
    return document
