"""Values crossing the sandbox boundary.

Host -> guest: ``marshal.dumps(value, 2)`` (the guest's ``marshal`` is built in, so decoding costs
no import). Guest -> host: the guest encodes with marshal version 2 as well, but the host never
hands guest bytes to ``marshal.loads`` (which trusts its input): :func:`decode` is a strict parser
of the data subset only (None, bool, int, float, complex, str, bytes, tuple, list, dict, set,
frozenset), with bounds on every length and on nesting depth. Anything else is rejected.
"""

from __future__ import annotations

import marshal
import struct
from typing import Any

__all__ = ["CodecError", "decode", "encode"]

MAX_DEPTH = 200

_I32 = struct.Struct("<i")
_F64 = struct.Struct("<d")


class CodecError(ValueError):
    pass


def encode(value: Any) -> bytes:
    """Encode host data for the guest; raises ValueError for values that are not plain data."""
    return marshal.dumps(value, 2)


def decode(data: bytes | bytearray | memoryview) -> Any:
    parser = _Parser(bytes(data))
    value = parser.value(0)
    if parser.pos != len(parser.data):
        raise CodecError(f"{len(parser.data) - parser.pos} trailing bytes after the value")
    return value


class _Parser:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if n < 0 or end > len(self.data):
            raise CodecError("truncated value")
        chunk = self.data[self.pos:end]
        self.pos = end
        return chunk

    def i32(self) -> int:
        return _I32.unpack(self.take(4))[0]

    def count(self) -> int:
        n = self.i32()
        # every element needs at least one byte: a length beyond what is left is a lie
        if n < 0 or n > len(self.data) - self.pos:
            raise CodecError(f"bad length {n}")
        return n

    def value(self, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise CodecError(f"value nested deeper than {MAX_DEPTH}")
        code = self.take(1)[0]
        if code & 0x80:
            raise CodecError("references are not accepted")
        kind = chr(code)
        if kind == "N":
            return None
        if kind == "T":
            return True
        if kind == "F":
            return False
        if kind == "i":
            return self.i32()
        if kind == "l":
            n = self.i32()
            size = abs(n)
            if size > (len(self.data) - self.pos) // 2:
                raise CodecError("bad int length")
            digits = struct.unpack(f"<{size}H", self.take(2 * size))
            result = 0
            for digit in reversed(digits):
                if digit >= 1 << 15:
                    raise CodecError("bad int digit")
                result = (result << 15) | digit
            return -result if n < 0 else result
        if kind == "g":
            return _F64.unpack(self.take(8))[0]
        if kind == "y":
            real = _F64.unpack(self.take(8))[0]
            return complex(real, _F64.unpack(self.take(8))[0])
        if kind == "s":
            return self.take(self.count())
        if kind in "ut":
            try:
                return self.take(self.count()).decode("utf-8", "surrogatepass")
            except UnicodeDecodeError as exc:
                raise CodecError(f"bad text: {exc}") from None
        if kind in "aA":
            return self._ascii(self.count())
        if kind in "zZ":
            return self._ascii(self.take(1)[0])
        if kind in "([<>":
            items = [self.value(depth + 1) for _ in range(self.count())]
            if kind == "(":
                return tuple(items)
            if kind == "[":
                return items
            try:
                return set(items) if kind == "<" else frozenset(items)
            except TypeError as exc:
                raise CodecError(str(exc)) from None
        if kind == ")":
            return tuple(self.value(depth + 1) for _ in range(self.take(1)[0]))
        if kind == "{":
            result: dict[Any, Any] = {}
            while True:
                if self.pos >= len(self.data):
                    raise CodecError("truncated dict")
                if self.data[self.pos] == 0x30:  # '0' ends a dict
                    self.pos += 1
                    return result
                key = self.value(depth + 1)
                try:
                    result[key] = self.value(depth + 1)
                except TypeError as exc:
                    raise CodecError(str(exc)) from None
        raise CodecError(f"type code {kind!r} is not accepted")

    def _ascii(self, n: int) -> str:
        raw = self.take(n)
        if not raw.isascii():
            raise CodecError("bad ascii text")
        return raw.decode("ascii")
