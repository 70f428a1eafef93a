"""What a user module declares, read from its binary without asking wasmtime.

wasmtime-py cannot describe some value types: reading a ``v128`` or a GC reference type
(``anyref``, ``eqref``, ``(ref $t)``, ...) through ``FuncType.params`` or ``ValType`` panics inside
``wasm_valtype_kind`` and aborts the whole host process. So the types of the exports the host calls,
and the counts of memories and tables, are read here from the module's own sections, before
wasmtime touches a value type. Anything this reader does not understand is refused (never guessed):
a module it cannot read can still be *validated* by wasmtime, but it is not run.

Plain Python, no wasmtime import.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ModuleInfo", "ModuleShapeError", "inspect_module"]

# value types the host can pass and receive as plain numbers
NUMERIC = {0x7F: "i32", 0x7E: "i64", 0x7D: "f32", 0x7C: "f64"}
# single-byte value types that are not numbers (abbreviated reference types, v128)
_OTHER = {0x7B: "v128", 0x70: "funcref", 0x6F: "externref", 0x6E: "anyref", 0x6D: "eqref", 0x6C: "i31ref",
          0x6B: "structref", 0x6A: "arrayref", 0x69: "exnref", 0x71: "nullref", 0x72: "nullexternref",
          0x73: "nullfuncref", 0x74: "nullexnref", 0x75: "nullcontref", 0x68: "contref"}
_REF, _REF_NULL = 0x64, 0x63  # (ref ht), (ref null ht): a heap type follows
_EXPORT_KINDS = {0: "function", 1: "table", 2: "memory", 3: "global", 4: "tag"}


class ModuleShapeError(ValueError):
    """The module's binary cannot be read here (malformed, or a construct this reader refuses)."""


@dataclass
class ModuleInfo:
    """The parts of a module the host needs before it runs it."""

    # function types by type index: (params, results), each a tuple of type names
    types: list[tuple[tuple[str, ...], tuple[str, ...]] | None] = field(default_factory=list)
    functions: list[int] = field(default_factory=list)  # type index of every function (imports first)
    exports: dict[str, tuple[str, int]] = field(default_factory=dict)  # name -> (kind, index)
    memories: int = 0  # imported and defined
    tables: int = 0
    imports: list[tuple[str, str, str]] = field(default_factory=list)  # (module, name, kind)

    def signature(self, export: str) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
        """(params, results) of an exported function, None when ``export`` is no function."""
        kind, index = self.exports.get(export, ("", -1))
        if kind != "function" or not 0 <= index < len(self.functions):
            return None
        type_index = self.functions[index]
        if not 0 <= type_index < len(self.types):
            raise ModuleShapeError(f"function {export!r} names type {type_index}, which is not there")
        sig = self.types[type_index]
        if sig is None:
            raise ModuleShapeError(f"function {export!r} has a type that is not a function type")
        return sig


class _Reader:
    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes | memoryview, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def byte(self) -> int:
        if self.pos >= self.end:
            raise ModuleShapeError("unexpected end of the module")
        value = self.data[self.pos]
        self.pos += 1
        return value

    def uleb(self, bits: int = 32) -> int:
        result, _, _ = self._leb(bits)
        if result >= 1 << bits:
            raise ModuleShapeError("integer out of range")
        return result

    def sleb(self, bits: int = 33) -> int:
        result, shift, last = self._leb(bits)
        return result - (1 << shift) if last & 0x40 else result

    def _leb(self, bits: int) -> tuple[int, int, int]:
        """A LEB128 number's bits, how many, and its last byte (whose 0x40 is a signed one's sign)."""
        result = shift = 0
        while True:
            b = self.byte()
            result |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return result, shift, b
            if shift >= bits + 7:
                raise ModuleShapeError("integer too long")

    def name(self) -> str:
        n = self.uleb()
        if self.pos + n > self.end:
            raise ModuleShapeError("name runs past its section")
        raw = bytes(self.data[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ModuleShapeError("a name is not UTF-8") from None

    def count(self) -> int:
        n = self.uleb()
        if n > self.end - self.pos:  # every entry takes at least one byte
            raise ModuleShapeError("a count is larger than its section")
        return n


def _valtype(r: _Reader) -> str:
    code = r.byte()
    if code in NUMERIC:
        return NUMERIC[code]
    if code in _OTHER:
        return _OTHER[code]
    if code in (_REF, _REF_NULL):
        r.sleb()  # the heap type: an abstract one (negative) or a type index
        return "(ref null ...)" if code == _REF_NULL else "(ref ...)"
    raise ModuleShapeError(f"unknown value type 0x{code:02x}")


def _limits(r: _Reader) -> None:
    flags = r.byte()
    if flags > 0x0F:
        raise ModuleShapeError(f"unknown limits flags 0x{flags:02x}")
    bits = 64 if flags & 0x04 else 32
    r.uleb(bits)
    if flags & 0x01:
        r.uleb(bits)
    if flags & 0x08:  # custom page size
        r.uleb()


def _tabletype(r: _Reader) -> None:
    _valtype(r)
    _limits(r)


def _comptype(r: _Reader) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    form = r.byte()
    if form == 0x60:
        params = tuple(_valtype(r) for _ in range(r.count()))
        results = tuple(_valtype(r) for _ in range(r.count()))
        return params, results
    if form == 0x5F:  # struct
        for _ in range(r.count()):
            _fieldtype(r)
        return None
    if form == 0x5E:  # array
        _fieldtype(r)
        return None
    raise ModuleShapeError(f"unknown type form 0x{form:02x}")


def _fieldtype(r: _Reader) -> None:
    if r.pos < r.end and r.data[r.pos] in (0x78, 0x77):  # packed i8 / i16
        r.byte()
    else:
        _valtype(r)
    r.byte()  # mutability


def _subtype(r: _Reader) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    if r.pos < r.end and r.data[r.pos] in (0x50, 0x4F):
        r.byte()
        for _ in range(r.count()):
            r.uleb()
    return _comptype(r)


def inspect_module(wasm: bytes | memoryview) -> ModuleInfo:
    """Read the type, import, function, table, memory and export sections of a binary module."""
    data = memoryview(wasm)
    if bytes(data[:8]) != b"\x00asm\x01\x00\x00\x00":
        raise ModuleShapeError("not a WebAssembly module (version 1)")
    info = ModuleInfo()
    r = _Reader(data, 8)
    while r.pos < r.end:
        section = r.byte()
        size = r.uleb()
        end = r.pos + size
        if end > r.end:
            raise ModuleShapeError("a section runs past the end of the module")
        s = _Reader(data, r.pos, end)
        if section == 1:
            for _ in range(s.count()):
                if s.pos < s.end and s.data[s.pos] == 0x4E:  # a recursion group
                    s.byte()
                    for _ in range(s.count()):
                        info.types.append(_subtype(s))
                else:
                    info.types.append(_subtype(s))
        elif section == 2:
            for _ in range(s.count()):
                module, name, kind = s.name(), s.name(), s.byte()
                info.imports.append((module, name, _EXPORT_KINDS.get(kind, f"kind {kind}")))
                if kind == 0:
                    info.functions.append(s.uleb())
                elif kind == 1:
                    _tabletype(s)
                    info.tables += 1
                elif kind == 2:
                    _limits(s)
                    info.memories += 1
                elif kind == 3:
                    _valtype(s)
                    s.byte()
                elif kind == 4:
                    s.byte()
                    s.uleb()
                else:
                    raise ModuleShapeError(f"unknown import kind {kind}")
        elif section == 3:
            info.functions.extend(s.uleb() for _ in range(s.count()))
        elif section == 4:
            info.tables += s.count()  # entries are not needed: only how many
        elif section == 5:
            info.memories += s.count()
        elif section == 7:
            for _ in range(s.count()):
                name, kind, index = s.name(), s.byte(), s.uleb()
                if kind not in _EXPORT_KINDS:
                    raise ModuleShapeError(f"unknown export kind {kind}")
                info.exports[name] = (_EXPORT_KINDS[kind], index)
        r.pos = end
    return info
