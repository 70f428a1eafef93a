"""Loading plugin libraries with cffi and calling them without copies (imports cffi and numpy)."""

from __future__ import annotations

import json
import re
import struct
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cffi  # type: ignore[import-untyped,unused-ignore]
import numpy as np

from edgecompute.errors import InvalidRequest, PluginError

from . import ABI_VERSION, MIN_ABI_VERSION
from .errors import PluginABIError, PluginCallError

__all__ = ["AlgorithmInfo", "NativePlugin", "encode_params", "normalise_inputs"]

# The host always allocates the newest layout; structures only grow at their end, so a plugin
# built for an older ABI reads and writes a prefix of them.
CDEF = """
typedef struct ec_buffer {
    const char* name; int32_t dtype; int32_t ndim; int64_t shape[8]; void* data;
} ec_buffer;
typedef struct ec_algorithm_info {
    const char* name; const char* description; double cpu; double memory_mb; int32_t thread_safe;
} ec_algorithm_info;
typedef struct ec_plugin_info {
    uint32_t abi_version; const char* name; const char* version; int32_t n_algorithms;
    const ec_algorithm_info* algorithms;
} ec_plugin_info;
typedef struct ec_result {
    int32_t n_outputs; ec_buffer outputs[8]; void* owner; int32_t error_code; char error_message[1024];
    const int32_t* cancelled;
} ec_result;
const ec_plugin_info* ec_info(void);
int32_t ec_execute(const char* algorithm, const ec_buffer* inputs, int32_t n_inputs, const char* params_json,
                   ec_result* result);
void ec_release(void* owner);
"""

ffi = cffi.FFI()
ffi.cdef(CDEF)

MAX_DIMS = 8
EC_OK, EC_INVALID_INPUT, EC_UNKNOWN_ALGORITHM, EC_INTERNAL_ERROR, EC_OUT_OF_MEMORY, EC_CANCELLED = range(6)
STATUS_NAMES = {1: "invalid input", 2: "unknown algorithm", 3: "internal error", 4: "out of memory", 5: "cancelled"}

_DTYPES = ["bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64", "float32",
           "float64", "complex64", "complex128"]
#: numpy dtype -> ABI code, and back
DTYPE_CODES: dict[np.dtype[Any], int] = {np.dtype(name): code for code, name in enumerate(_DTYPES, start=1)}
CODE_DTYPES: dict[int, np.dtype[Any]] = {code: dtype for dtype, code in DTYPE_CODES.items()}
SUPPORTED = ", ".join(_DTYPES)

_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")
_NOT_CANCELLED = ffi.new("int32_t*")  # shared, always 0, for calls nobody can cancel
EMPTY_PARAMS = _EMPTY_PARAMS = b"{}"
_scratch = threading.local()
_gc = ffi.gc
_CHAR_ARRAY = ffi.typeof("char[]")


class AlgorithmInfo:
    __slots__ = ("cpu", "description", "memory_mb", "name", "thread_safe")

    def __init__(self, name: str, description: str, cpu: float, memory_mb: float, thread_safe: bool) -> None:
        self.name = name
        self.description = description
        self.cpu = cpu
        self.memory_mb = memory_mb
        self.thread_safe = thread_safe

    def as_dict(self) -> dict[str, Any]:
        return {s: getattr(self, s) for s in self.__slots__}


def _text(pointer: Any) -> str:
    return "" if pointer == ffi.NULL else ffi.string(pointer).decode("utf-8", "replace")


class _Memory:
    """Exposes one plugin output to numpy; keeps the plugin's owner (and so the memory) alive."""

    __slots__ = ("__array_interface__", "owner")

    def __init__(self, owner: Any, interface: dict[str, Any]) -> None:
        self.owner = owner
        self.__array_interface__ = interface


class NativePlugin:
    """One loaded plugin library. Thread-safe: calls only read its state."""

    def __init__(self, path: str | Path, label: str | None = None) -> None:
        self.path = str(path)
        label = label or self.path
        try:
            self.lib = ffi.dlopen(self.path)
        except OSError as exc:
            raise PluginError(label, f"cannot load the shared library: {exc}") from exc
        try:
            info = self.lib.ec_info()
            self._execute = self.lib.ec_execute
            self._release = self.lib.ec_release
        except AttributeError as exc:
            raise PluginError(label, f"not an edgecompute plugin (missing symbol: {exc}); "
                                     "a plugin exports ec_info, ec_execute and ec_release") from exc
        if info == ffi.NULL:
            raise PluginError(label, "ec_info() returned NULL")
        self.abi_version = int(info.abi_version)
        if not MIN_ABI_VERSION <= self.abi_version <= ABI_VERSION:
            raise PluginABIError(label, self.abi_version, (MIN_ABI_VERSION, ABI_VERSION))
        self.name = _text(info.name)
        if not _NAME.match(self.name) or "." in self.name:
            raise PluginError(label, f"plugin name {self.name!r} must match [A-Za-z0-9_-]+")
        self.version = _text(info.version)
        self.algorithms: dict[str, AlgorithmInfo] = {}
        for i in range(int(info.n_algorithms)):
            a = info.algorithms[i]
            name = _text(a.name)
            if not _NAME.match(name):
                raise PluginError(label, f"algorithm name {name!r} must match [A-Za-z0-9_.-]+")
            if name in self.algorithms:
                raise PluginError(label, f"algorithm {name!r} is listed twice")
            cpu, memory = float(a.cpu), float(a.memory_mb)
            if not (cpu >= 0 and memory >= 0):
                raise PluginError(label, f"algorithm {name!r} declares negative resources")
            self.algorithms[name] = AlgorithmInfo(name, _text(a.description), cpu, memory, bool(a.thread_safe))
        self._names = {name: ffi.new("char[]", name.encode()) for name in self.algorithms}
        self._lock = threading.Lock()

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "abi_version": self.abi_version, "path": self.path,
                "algorithms": [a.as_dict() for a in self.algorithms.values()]}

    def call(self, algorithm: str, inputs: Sequence[tuple[bytes | None, np.ndarray]], params: bytes = _EMPTY_PARAMS,
             cancelled: Any = None) -> list[tuple[str, np.ndarray]]:
        """Run ``algorithm``; inputs are C-contiguous arrays of supported dtypes (see
        :func:`normalise_inputs`). Returns ``(name, array)`` pairs: small outputs are copied and
        the plugin's memory released at once, large ones are arrays over the plugin's memory."""
        name = self._names.get(algorithm)
        if name is None:
            raise InvalidRequest(f"plugin {self.name!r} has no algorithm {algorithm!r}; "
                                 f"it has: {', '.join(sorted(self.algorithms))}")
        scratch = _scratch.__dict__.get("v")
        if scratch is None:
            scratch = _scratch.v = _Scratch()
        n = len(inputs)
        buffers, view = (scratch.buffers, scratch.buffers_view) if n <= 8 else _buffers(n)
        result = scratch.result
        rview = scratch.result_view
        # The structures are written with struct.pack_into and read with one unpack_from: a cffi
        # attribute access costs about as much as packing a whole structure.
        keep = []
        for i, (input_name, array) in enumerate(inputs):
            ndim = array.ndim
            if ndim > MAX_DIMS:  # the ABI's shape holds 8 (the executor refuses these earlier)
                raise InvalidRequest(f"{self.name}.{algorithm}: input {i} has {ndim} dimensions; "
                                     f"at most {MAX_DIMS} are supported")
            _HEADS[ndim].pack_into(view, i * _BUFFER_SIZE, 0, DTYPE_CODES[array.dtype], ndim, *array.shape)
            b = buffers[i]
            data = ffi.from_buffer(_CHAR_ARRAY, array, require_writable=False)
            keep.append(data)
            b.data = data
            if input_name is not None:
                text = ffi.new("char[]", input_name)
                keep.append(text)
                b.name = text
        _RESET_COUNT.pack_into(rview, 0, 0)
        _RESET_TAIL.pack_into(rview, _OWNER_OFFSET, 0, 0, 0)
        if cancelled is not None:
            result.cancelled = cancelled
        try:
            code = self._execute(name, buffers, n, params, result)
        finally:
            if cancelled is not None:
                result.cancelled = _NOT_CANCELLED
        head = _AFTER.unpack_from(rview, 0)
        count, owner, error = head[0], head[13], head[14]
        if code != EC_OK or error != EC_OK:
            code = code or error
            if owner:  # a plugin that reports an error should have freed its outputs
                self._release(result.owner)
            message = ffi.string(result.error_message).decode("utf-8", "replace") or STATUS_NAMES.get(code, "error")
            where = f"{self.name}.{algorithm}"
            if code == EC_INVALID_INPUT:
                raise InvalidRequest(f"{where}: {message}")
            raise PluginCallError(f"{where} failed ({STATUS_NAMES.get(code, f'error {code}')}): {message}", code)
        if count == 0:
            if owner:
                self._release(result.owner)
            return []
        if count > 8:
            if owner:
                self._release(result.owner)
            raise PluginCallError(f"{self.name}.{algorithm} returned {count} outputs; at most 8 are allowed",
                                  EC_INTERNAL_ERROR)
        if count == 1:
            described = [head[1:13]]
        else:
            described = [_BUFFER.unpack_from(rview, _OUTPUTS_OFFSET + i * _BUFFER_SIZE) for i in range(count)]
        owner_cdata = result.owner if owner else None
        shared: Any = None
        outputs = []
        try:
            for i, fields in enumerate(described):
                code, ndim, data = fields[1], fields[2], fields[11]
                dtype = CODE_DTYPES.get(code)
                if dtype is None or not 0 <= ndim <= MAX_DIMS:
                    raise PluginCallError(f"{self.name}.{algorithm} returned output {i} with dtype code {code} "
                                          f"and {ndim} dimensions, which the ABI does not allow", EC_INTERNAL_ERROR)
                shape = fields[3:3 + ndim]
                nbytes = dtype.itemsize
                for extent in shape:
                    nbytes *= extent
                if nbytes <= COPY_BELOW:
                    # Copying a small output and releasing the plugin's memory now is cheaper than
                    # tying the memory's lifetime to an array.
                    array = np.empty(shape, dtype)
                    if nbytes:
                        ffi.memmove(array, ffi.cast(_CHAR_P, data), nbytes)
                else:
                    if shared is None and owner_cdata is not None:
                        shared = _gc(owner_cdata, self._release)
                    array = np.asarray(_Memory(shared, {"data": (data, False), "shape": shape,
                                                        "typestr": dtype.str, "version": 3}))
                # a single output is returned bare: its name is never used
                label = "output" if count == 1 else _text(result.outputs[i].name) if fields[0] else f"output{i}"
                outputs.append((label, array))
        finally:
            if shared is None and owner_cdata is not None:
                self._release(owner_cdata)  # every output was copied (or none could be read)
        return outputs


#: outputs up to this size are copied out of the plugin's memory, larger ones are used in place
COPY_BELOW = 16 * 1024

_BUFFER = struct.Struct("=Qii8qQ")  # ec_buffer: name, dtype, ndim, shape[8], data
_BUFFER_SIZE = _BUFFER.size
assert ffi.sizeof("ec_buffer") == _BUFFER_SIZE
#: ec_buffer up to the last dimension in use: name (NULL), dtype, ndim, shape[:ndim]
_HEADS = [struct.Struct(f"=Qii{ndim}q") for ndim in range(MAX_DIMS + 1)]
_OUTPUTS_OFFSET = ffi.offsetof("ec_result", "outputs")
_OWNER_OFFSET = ffi.offsetof("ec_result", "owner")
assert ffi.offsetof("ec_result", "error_message") == _OWNER_OFFSET + 12
_RESET_COUNT = struct.Struct("=i")
_RESET_TAIL = struct.Struct("=Qib")  # owner, error_code, error_message[0]
#: n_outputs, outputs[0] (12 fields), owner, error_code
_AFTER = struct.Struct(f"=i{_OUTPUTS_OFFSET - 4}xQii8qQ{_OWNER_OFFSET - _OUTPUTS_OFFSET - _BUFFER_SIZE}xQi")
_CHAR_P = ffi.typeof("char*")


class _Scratch:
    """Per-thread call structures, reused: allocating them costs more than a small call."""

    __slots__ = ("buffers", "buffers_view", "result", "result_view")

    def __init__(self) -> None:
        self.buffers, self.buffers_view = _buffers(8)
        self.result = ffi.new("ec_result*")
        self.result.cancelled = _NOT_CANCELLED
        self.result_view = ffi.buffer(self.result)


def _buffers(n: int) -> tuple[Any, Any]:
    buffers = ffi.new("ec_buffer[]", n)
    return buffers, ffi.buffer(buffers)


def normalise_inputs(inputs: Any, where: str) -> list[tuple[bytes | None, np.ndarray]]:
    """Request inputs as ``(name, array)`` pairs: an array, a mapping of names to arrays, a list
    or tuple of arrays, or anything ``numpy.asarray`` turns into one numeric array."""
    if inputs is None:
        return []
    if isinstance(inputs, np.ndarray):
        return [(None, _array(inputs, "input", where))]
    if isinstance(inputs, Mapping):
        out: list[tuple[bytes | None, np.ndarray]] = []
        for key, value in inputs.items():
            if not isinstance(key, str):
                raise InvalidRequest(f"{where}: input names must be strings, not {key!r}")
            out.append((key.encode(), _array(value, key, where)))
        return out
    if isinstance(inputs, (list, tuple)) and inputs and all(isinstance(v, np.ndarray) for v in inputs):
        return [(None, _array(v, f"input {i}", where)) for i, v in enumerate(inputs)]
    return [(None, _array(inputs, "input", where))]


def _array(value: Any, label: str, where: str) -> np.ndarray:
    if type(value) is np.ndarray and value.flags.c_contiguous and value.dtype in DTYPE_CODES:
        return value  # the fast path: no conversion, no copy
    try:
        array = np.asarray(value)
    except Exception as exc:
        raise InvalidRequest(f"{where}: input {label!r} cannot become an array: {type(exc).__name__}: {exc}") from exc
    if array.dtype not in DTYPE_CODES:
        native = array.dtype.newbyteorder("=") if array.dtype.byteorder not in "=|" else None
        if native is not None and native in DTYPE_CODES:
            array = array.astype(native)
        else:
            raise InvalidRequest(f"{where}: input {label!r} has dtype {array.dtype}, which C++ plugins cannot take; "
                                 f"supported: {SUPPORTED}")
    if array.ndim > MAX_DIMS:
        raise InvalidRequest(f"{where}: input {label!r} has {array.ndim} dimensions; at most {MAX_DIMS} are supported")
    return np.ascontiguousarray(array)  # copies only arrays that are not C-contiguous


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def encode_params(params: Mapping[str, Any], where: str) -> bytes:
    if not params:
        return _EMPTY_PARAMS
    try:
        return json.dumps(params, default=_json_default, separators=(",", ":")).encode()
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(f"{where}: params must be JSON-serialisable: {exc}") from exc
