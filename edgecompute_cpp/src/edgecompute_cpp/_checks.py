"""What a request may ask of the cpp executor: limits, and per-algorithm specs of the bundled plugin.

A request is untrusted (it may come from a remote client through the gateway). Native code
cannot be stopped safely once it runs, and a wrong size in it can end the host, so every
request is checked here, in Python, before any native code sees it: input names, dtypes and
dimensions, params (names, types, ranges), and what the call will allocate (outputs and working
memory) and compute, all from shapes and params, with Python integers (no overflow). The specs
are precomputed per algorithm; a check costs O(inputs + params).

Plugins other than the bundled one describe no params or inputs in the C ABI (1-2), so their
requests get the generic checks only (input count, dimensions, dtypes, total input bytes, params
JSON depth); their outputs are checked against ``max_output_bytes`` after the call.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from edgecompute.errors import InvalidRequest

from ._limits import LIMITS, Limits

__all__ = ["BUNDLED", "LIMITS", "Checked", "Limits", "check_builtin", "check_plugin", "has_spec"]

#: params JSON nesting that plugins' parsers (recursive) must never see exceeded
_MAX_PARAM_DEPTH = 32


Arrays = Sequence[tuple[bytes | None, np.ndarray]]
#: bytes the call will hold besides its inputs (outputs + working memory)
Checked = int


def _refuse(where: str, message: str) -> InvalidRequest:
    return InvalidRequest(f"{where}: {message}")


def _suggest(name: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _over(where: str, what: str, amount: int, limits: Limits, setting: str, hint: str) -> InvalidRequest:
    return _refuse(where, f"{what} would be {amount:,}, above the limit {getattr(limits, setting):,} "
                          f"([executors.cpp] {setting}, at most {LIMITS[setting][1]:,}); {hint}")


def _generic(arrays: Arrays, limits: Limits, where: str) -> int:
    """Checks every request passes; returns the inputs' total bytes."""
    if len(arrays) > limits.max_inputs:
        raise _refuse(where, f"{len(arrays)} inputs; at most {limits.max_inputs} are allowed "
                             f"([executors.cpp] max_inputs)")
    total = 0
    for name, array in arrays:
        if array.ndim > 8:
            label = "input" if name is None else f"input {name.decode()!r}"
            raise _refuse(where, f"{label} has {array.ndim} dimensions; at most 8 are supported")
        total += array.nbytes
    if total > limits.max_input_bytes:
        raise _over(where, "the inputs' size in bytes", total, limits, "max_input_bytes", "send smaller inputs")
    return total


def _depth(value: Any, level: int = 0) -> int:
    if level > _MAX_PARAM_DEPTH:
        return level
    if isinstance(value, Mapping):
        return max((_depth(v, level + 1) for v in value.values()), default=level + 1)
    if isinstance(value, (list, tuple)):
        return max((_depth(v, level + 1) for v in value), default=level + 1)
    return level


def check_plugin(arrays: Arrays, params: Mapping[str, Any], limits: Limits, where: str) -> Checked:
    """The checks of a plugin algorithm, which declares no params or input names (see the module)."""
    _generic(arrays, limits, where)
    for value in params.values():
        if isinstance(value, (Mapping, list, tuple)) and _depth(value) > _MAX_PARAM_DEPTH:
            raise _refuse(where, f"params nest deeper than {_MAX_PARAM_DEPTH} levels")
    return 0


# -- the bundled algorithms ------------------------------------------------------------------------

_F32, _F64 = np.dtype("float32"), np.dtype("float64")
_C64, _C128 = np.dtype("complex64"), np.dtype("complex128")
_U8, _I32, _I64 = np.dtype("uint8"), np.dtype("int32"), np.dtype("int64")


class _Input:
    __slots__ = ("dtypes", "hi", "lo", "name")

    def __init__(self, name: str, dtypes: Sequence[np.dtype[Any]], lo: int, hi: int) -> None:
        self.name, self.dtypes, self.lo, self.hi = name, frozenset(dtypes), lo, hi


class _Spec:
    __slots__ = ("inputs", "name", "names", "params", "sizes")

    def __init__(self, name: str, inputs: Sequence[_Input], params: Mapping[str, Callable[[Any, str], Any]],
                 sizes: Callable[[list[np.ndarray], dict[str, Any], Limits, str], tuple[int, int, int]]) -> None:
        self.name = name
        self.inputs = tuple(inputs)
        self.names = tuple(i.name for i in inputs)
        self.params = dict(params)  # name -> parser (value, where) -> value
        self.sizes = sizes  # (arrays, parsed params, limits, where) -> output bytes, scratch bytes, work

    def bind(self, arrays: Arrays, where: str) -> list[np.ndarray]:
        """The inputs in declared order: by name (all named) or by position."""
        names = self.names
        if len(arrays) == len(names) and arrays[0][0] is None:  # the common case, first
            bound = [array for _, array in arrays]
        elif arrays and arrays[0][0] is not None:
            found: dict[str, np.ndarray] = {}
            for raw, array in arrays:
                name = raw.decode() if raw is not None else ""
                if name not in names:
                    raise _refuse(where, f"unknown input {name!r}{_suggest(name, names)}; "
                                         f"{self.name} takes {', '.join(names)}")
                found[name] = array
            missing = [n for n in names if n not in found]
            if missing:
                raise _refuse(where, f"missing input {missing[0]!r}; {self.name} takes {', '.join(names)}")
            bound = [found[n] for n in names]
        else:
            if len(arrays) != len(names):
                raise _refuse(where, f"{self.name} takes {len(names)} input(s) ({', '.join(names)}), "
                                     f"got {len(arrays)}")
            bound = [array for _, array in arrays]
        for spec, array in zip(self.inputs, bound, strict=False):  # (as long as each other here)
            if array.dtype not in spec.dtypes:
                valid = ", ".join(sorted(str(d) for d in spec.dtypes))
                raise _refuse(where, f"{self.name} input {spec.name!r} must have dtype {valid}, not {array.dtype}")
            if not spec.lo <= array.ndim <= spec.hi:
                if array.ndim > 8:
                    raise _refuse(where, f"input {spec.name!r} has {array.ndim} dimensions; at most 8 are supported")
                dims = str(spec.lo) if spec.lo == spec.hi else f"{spec.lo}-{spec.hi}"
                raise _refuse(where, f"{self.name} input {spec.name!r} must have {dims} dimensions, "
                                     f"got shape {array.shape}")
        return bound

    def parse(self, params: Mapping[str, Any], where: str) -> dict[str, Any]:
        parsers = self.params
        parsed: dict[str, Any] = {}
        for key, value in params.items():
            parser = parsers.get(key) if type(key) is str else None
            if parser is None:
                valid = ", ".join(sorted(parsers)) or "none"
                raise _refuse(where, f"unknown param {key!r}{_suggest(str(key), list(parsers))}; "
                                     f"{self.name} takes: {valid}")
            parsed[key] = parser(value, where)
        return parsed


def _is_number(value: Any) -> bool:
    if type(value) is float or type(value) is int:  # the common case, without the tuple of types
        return True
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _number(lo: float, hi: float) -> Callable[[Any, str, str], float]:
    def parse(value: Any, where: str, name: str) -> float:
        if not _is_number(value) or not math.isfinite(value) or not lo <= value <= hi:
            raise _refuse(where, f"param {name!r} must be a number from {lo:g} to {hi:g}, not {value!r}")
        return float(value)

    return parse


def _named(name: str, parser: Callable[[Any, str, str], Any]) -> Callable[[Any, str], Any]:
    return lambda value, where: parser(value, where, name)


def _integer(name: str, lo: int, hi: int) -> Callable[[Any, str], Any]:
    def parse(value: Any, where: str) -> int:
        if _is_number(value) and math.isfinite(value) and float(value).is_integer() and lo <= value <= hi:
            return int(value)
        raise _refuse(where, f"param {name!r} must be an integer from {lo} to {hi}, not {value!r}")

    return parse


def _choice(name: str, *choices: str) -> Callable[[Any, str], Any]:
    def parse(value: Any, where: str) -> str:
        if value not in choices or type(value) is not str:
            raise _refuse(where, f"param {name!r} must be one of {', '.join(map(repr, choices))}, not {value!r}")
        return value

    return parse


def _boolean(name: str) -> Callable[[Any, str], Any]:
    def parse(value: Any, where: str) -> bool:
        if not isinstance(value, (bool, np.bool_)):
            raise _refuse(where, f"param {name!r} must be true or false, not {value!r}")
        return bool(value)

    return parse


_sigma_number = _number(0.0, 1000.0)


def _sigma(value: Any, where: str) -> tuple[float, float]:
    if type(value) is not float and type(value) is not int and isinstance(value, (list, tuple, np.ndarray)):
        items = list(value)
        if len(items) not in (1, 2):
            raise _refuse(where, "param 'sigma' must be a number or [sigma_y, sigma_x]")
        parsed = [_sigma_number(v, where, "sigma") for v in items]
        return parsed[0], parsed[-1]
    s = _sigma_number(value, where, "sigma")
    return s, s


def _radius(sigma: float, truncate: float) -> int:
    # as gaussian_kernel in builtin.cpp: an axis with sigma ~ 0 is left alone
    return 0 if sigma <= 1e-15 else int(truncate * sigma + 0.5)


def _sizes_grayscale(a: list[np.ndarray], p: dict[str, Any], limits: Limits, where: str) -> tuple[int, int, int]:
    image = a[0]
    if image.shape[2] not in (3, 4):
        raise _refuse(where, f"grayscale input 'image' must have shape (height, width, 3 or 4), got {image.shape}")
    pixels = image.shape[0] * image.shape[1]
    return pixels * image.itemsize, 0, pixels * 4


def _sizes_blur(a: list[np.ndarray], p: dict[str, Any], limits: Limits, where: str) -> tuple[int, int, int]:
    image = a[0]
    sy, sx = p.get("sigma", (1.0, 1.0))
    truncate = p.get("truncate", 4.0)
    ry, rx = _radius(sy, truncate), _radius(sx, truncate)
    h, w = image.shape[0], image.shape[1]
    ch = image.shape[2] if image.ndim == 3 else 1
    scratch = ((w + 2 * rx) * ch + 2 * (rx + ry + 1)) * image.itemsize + 16 * (2 * ry + 2 * rx + 2)
    return image.nbytes, scratch, h * w * ch * (ry + rx + 2)


def _sizes_sobel(a: list[np.ndarray], p: dict[str, Any], limits: Limits, where: str) -> tuple[int, int, int]:
    image = a[0]
    outputs = {"magnitude": 1, "gradients": 2, "all": 3}[p.get("output", "magnitude")]
    return outputs * image.nbytes, 4 * (image.shape[1] + 2) * image.itemsize, 12 * image.size


def _sizes_resize(a: list[np.ndarray], p: dict[str, Any], limits: Limits, where: str) -> tuple[int, int, int]:
    image = a[0]
    if "width" not in p or "height" not in p:
        raise _refuse(where, "resize needs params 'width' and 'height'")
    h, w = image.shape[0], image.shape[1]
    if h < 1 or w < 1:
        raise _refuse(where, f"resize input 'image' is empty: shape {image.shape}")
    ch = image.shape[2] if image.ndim == 3 else 1
    oh, ow = p["height"], p["width"]
    orowlen, rowlen = ow * ch, w * ch
    # taps (24 B per output row and column), the horizontal plan (~28 B per output row element),
    # two resized rows, and a converted/blended source row (bounded in builtin.cpp: kMaxRowScratch)
    scratch = 24 * (oh + ow) + 36 * orowlen + 4 * min(rowlen, _RESIZE_ROW_SCRATCH)
    return oh * orowlen * image.itemsize, scratch, 4 * oh * orowlen + h * rowlen


#: elements of a source row that resize converts/blends into a float row (builtin.cpp kMaxRowScratch)
_RESIZE_ROW_SCRATCH = 1 << 24


def _sizes_fir(a: list[np.ndarray], p: dict[str, Any], limits: Limits, where: str) -> tuple[int, int, int]:
    signal, taps = a
    k = taps.shape[0]
    if k < 1:
        raise _refuse(where, "fir_filter input 'taps' is empty")
    rows = signal.shape[0] if signal.ndim == 2 else 1
    n = signal.shape[-1]
    ny = (n + k - 1 if n else 0) if p.get("mode", "causal") == "full" else n
    return rows * ny * signal.itemsize, k * signal.itemsize, rows * ny * k


def _sizes_fft(a: list[np.ndarray], p: dict[str, Any], limits: Limits, where: str) -> tuple[int, int, int]:
    signal = a[0]
    n = signal.shape[-1]
    rows = signal.shape[0] if signal.ndim == 2 else 1
    if n > limits.max_fft_length:
        raise _over(where, "the transform length (last axis)", n, limits, "max_fft_length", "send shorter signals")
    single = signal.dtype in (_F32, _C64)
    # The plan's tables and the per-thread scratch: a Bluestein plan (lengths with a prime factor
    # above 61) pads to a power of two >= 2 n and holds chirp, filter and inner plan, at most
    # ~160 bytes per point; mixed-radix plans hold far less. A conservative bound, not a measure.
    scratch = 160 * n if n else 0
    return rows * n * (8 if single else 16), scratch, 8 * rows * n * max(1, n.bit_length())


def _sizes_matmul(a: list[np.ndarray], p: dict[str, Any], limits: Limits, where: str) -> tuple[int, int, int]:
    x, y = a
    if x.dtype != y.dtype:
        raise _refuse(where, f"matmul inputs must have the same dtype, got {x.dtype} and {y.dtype}")
    if x.shape[1] != y.shape[0]:
        raise _refuse(where, f"matmul shapes do not match: {x.shape} @ {y.shape}")
    m, k, n = x.shape[0], x.shape[1], y.shape[1]
    return m * n * x.itemsize, (256 * 2048 + 6 * 256) * x.itemsize, m * k * n


def _sizes_sum(a: list[np.ndarray], p: dict[str, Any], limits: Limits, where: str) -> tuple[int, int, int]:
    return 8, 0, a[0].size


_IMAGE_FLOAT = (_F32, _F64)
_SPECS: dict[str, _Spec] = {
    spec.name: spec for spec in (
        _Spec("grayscale", [_Input("image", (_U8, _F32, _F64), 3, 3)],
              {"order": _choice("order", "rgb", "bgr")}, _sizes_grayscale),
        _Spec("gaussian_blur", [_Input("image", _IMAGE_FLOAT, 2, 3)],
              {"sigma": _sigma, "truncate": _named("truncate", _number(1e-9, 100.0))}, _sizes_blur),
        _Spec("sobel", [_Input("image", _IMAGE_FLOAT, 2, 2)],
              {"output": _choice("output", "magnitude", "gradients", "all")}, _sizes_sobel),
        _Spec("resize", [_Input("image", (_U8, _F32), 2, 3)],
              {"width": _integer("width", 1, 1 << 20), "height": _integer("height", 1, 1 << 20)}, _sizes_resize),
        _Spec("fir_filter", [_Input("signal", _IMAGE_FLOAT, 1, 2), _Input("taps", _IMAGE_FLOAT, 1, 1)],
              {"mode": _choice("mode", "causal", "full")}, _sizes_fir),
        _Spec("fft", [_Input("signal", (_F32, _F64, _C64, _C128), 1, 2)],
              {"inverse": _boolean("inverse")}, _sizes_fft),
        _Spec("matmul", [_Input("a", _IMAGE_FLOAT, 2, 2), _Input("b", _IMAGE_FLOAT, 2, 2)], {}, _sizes_matmul),
        _Spec("sum", [_Input("x", (_F32, _F64, _I32, _I64, _U8), 0, 8)], {}, _sizes_sum),
    )
}


#: the bundled plugin's algorithms (a test holds the plugin's own list to it)
BUNDLED = tuple(_SPECS)


def has_spec(name: str) -> bool:
    return name in _SPECS


def check_builtin(name: str, arrays: Arrays, params: Mapping[str, Any], limits: Limits, where: str) -> Checked:
    """Check a request for bundled algorithm ``name`` before any native code runs; returns the
    bytes the call will allocate besides its inputs (outputs + working memory)."""
    # (the generic checks inline: this runs on every call; bind() checks the dimensions)
    if len(arrays) > limits.max_inputs:
        _generic(arrays, limits, where)  # raises
    total = 0
    for _, array in arrays:
        total += array.nbytes
    if total > limits.max_input_bytes:
        _generic(arrays, limits, where)  # raises
    spec = _SPECS[name]
    bound = spec.bind(arrays, where)
    parsed = spec.parse(params, where) if params else {}
    out, scratch, work = spec.sizes(bound, parsed, limits, where)
    if out > limits.max_output_bytes:
        raise _over(where, "the output size in bytes", out, limits, "max_output_bytes",
                    "ask for a smaller output (e.g. width/height) or send smaller inputs")
    if scratch > limits.max_scratch_bytes:
        raise _over(where, "the working memory in bytes", scratch, limits, "max_scratch_bytes",
                    "ask for smaller sizes")
    if work > limits.max_work:
        raise _over(where, "the estimated work (multiply-adds)", work, limits, "max_work",
                    "send smaller inputs or ask for less (smaller sigma/taps/sizes)")
    return out + scratch
