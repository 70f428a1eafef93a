"""A pre-initialised CPython: every ``wasm/python`` sandbox starts from a snapshot of a booted one.

Booting CPython inside wasm costs 40-60 ms of CPU, which sustained traffic pays on every request.
So, once per cache folder, a trusted run of the pinned interpreter boots with nothing of any
request or host in sight (no argv of a request, an empty environment, no host folder: only empty
placeholder folders, below), imports the common stdlib modules, defines the request loop, and is
stopped there. Its linear memory and stack pointer become a new module (``snapshot-*.wasm``): the
memory as data segments, the stack pointer as the global's initial value, and one new export,
``edgecompute_run``, that calls the request loop. wasmtime instantiates that module from a
copy-on-write memory image in well under a millisecond, and every request still gets a fresh
instance of its own, touched by no other request.

How the interpreter is stopped. The runtime's ``_start`` runs ``main`` and ends in ``proc_exit``,
and the module has no name section, so there is no init function to call and return from. The boot
script instead ends by reading the monotonic clock (``time.monotonic()``, which holds the GIL
around the call), and the build's ``clock_time_get`` sets the store's epoch deadline to now: the
interpreter traps a few instructions later with every C frame of the boot frozen in linear memory,
below a consistent interpreter (its thread state, its frames, the GIL held). The snapshot keeps
those frames where they are: its stack pointer starts below them (``clock_time_get``'s result
pointer lies in the innermost frame; the new stack starts 256 bytes further down), so a restored
instance calls ``PyVectorcall_Call(serve, (), NULL)`` exactly as if the frozen boot script had
called a C function that called back into Python. The addresses of ``serve``, ``()`` and
``PyVectorcall_Call`` (function objects' ``tp_call``, a table index, then the element segment) are
read from the stopped interpreter's memory, checked (type name, function signature) and baked into
``edgecompute_run``. ``serve`` ends every request with ``os._exit``: the frozen frames never run.

WASI state. wasi-libc scans its preopened folders once, in ``_start``, into a table of (prefix,
fd); wasi-vfs (the embedded stdlib) maps the host's preopens to fds 3.. and its own after them. The
build boots with ``SLOTS`` placeholder preopens (one empty folder, named ``/.edgecompute-slot-NN``
padded to ``SLOT_BYTES``), so fds 3..3+SLOTS-1 stay the host's in every restored instance; a
request's mounts are preopened in order at fds 3.., and the host writes each one's guest path into
its slot's prefix buffer (found at build time: one copy of each placeholder, pointed at by exactly
one (prefix, fd) entry). Slots a request does not use keep their placeholder and answer EBADF. The
environment was empty at boot and stays so; argv was the boot's own; stdin, stdout and stderr are
the host's channels of each instance.

Trust. The snapshot is made only from the pinned runtime (sha256 checked before it is compiled)
and our own boot script, never from a request's data. Its manifest records the snapshot's sha256,
which is checked before the snapshot is compiled; its compiled code is a normal cache entry (key,
length and checksum checked before it is mapped). Shared by every restore, and so not secret from
guests: the interpreter's string-hash seed and the object addresses. ``random`` is reseeded from
the host's entropy at the start of every request.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import _runtime_pin as pin

log = logging.getLogger("edgecompute_wasm.snapshot")

__all__ = ["FORMAT", "SLOTS", "SLOT_BYTES", "Snapshot", "SnapshotError", "build", "compiled_key", "load",
           "manifest_path", "slot_placeholder"]

FORMAT = "1"  # bump when anything below changes what a snapshot holds or how it is made
SLOTS = 64  # preopened folders a snapshot request may have (the stdlib folder, deps, mounts)
SLOT_BYTES = 256  # a slot's prefix buffer: a guest path without its leading "/", plus a NUL
RUN_EXPORT = "edgecompute_run"
_MARK = b"EDGECOMPUTE-SNAPSHOT "

# Imported into the snapshot: free for every guest afterwards. Modules that hold no per-process
# secret (random is reseeded on every request); a module missing from the runtime is skipped.
MODULES = (
    "encodings", "codecs", "io", "abc", "stat", "posixpath", "genericpath", "os", "time", "math", "cmath",
    "json", "re", "collections", "collections.abc", "functools", "itertools", "operator", "keyword", "string",
    "textwrap", "dataclasses", "typing", "enum", "types", "copy", "copyreg", "heapq", "bisect", "struct",
    "base64", "binascii", "hashlib", "hmac", "random", "statistics", "fractions", "decimal", "numbers",
    "datetime", "calendar", "contextlib", "weakref", "reprlib", "traceback", "linecache", "tokenize", "token",
    "warnings", "pprint", "array", "zlib", "unicodedata", "uuid", "difflib", "fnmatch", "glob", "shlex",
)

# The -c script of the snapshot boot. {bootstrap} is _python.BOOTSTRAP, {modules} and {preload} the
# module names. All of it runs inside one function, so __main__ keeps no trace but the frozen frame.
BOOT = r'''
def _edgecompute_snapshot():
    import builtins, os, sys, time
    scope = {{"__name__": "_edgecompute_boot", "__builtins__": builtins}}
    exec({bootstrap!r}, scope)
    for name in {modules!r}:
        try:
            __import__(name)
        except ImportError:
            pass
    scope["prepare"]({preload!r})
    serve = scope["serve"]
    del scope
    globals().pop("_edgecompute_snapshot", None)
    import gc
    gc.collect()
    gc.freeze()  # the boot's objects are never traversed again: a restore's collections stay small, its pages shared
    os.write(1, b"EDGECOMPUTE-SNAPSHOT %d %d %d\n" % (id(serve), id(()), id(type(serve))))
    time.monotonic()  # the host stops the interpreter inside this call; this frame never resumes
    os._exit(3)
_edgecompute_snapshot()
'''


class SnapshotError(Exception):
    """The snapshot could not be made or loaded; requests boot interpreters instead."""


class Snapshot:
    """A compiled pre-initialised runtime, where its WASI slots are, and its memory's initial size."""

    __slots__ = ("memory_bytes", "module", "slots")

    def __init__(self, module: Any, slots: Sequence[int], memory_bytes: int) -> None:
        self.module = module
        self.slots = tuple(slots)
        self.memory_bytes = memory_bytes

    def fits(self, mounts: Sequence[tuple[str, str]], memory_bytes: int) -> bool:
        """Whether a sandbox with these (host, guest) preopens and this memory cap can start from
        the snapshot (a cap below the snapshot's own memory boots an interpreter, as before)."""
        if len(mounts) > len(self.slots) or memory_bytes < self.memory_bytes:
            return False
        return all("\x00" not in guest and len(_prefix(guest)) < SLOT_BYTES for _, guest in mounts)

    def prefixes(self, mounts: Sequence[tuple[str, str]]) -> list[tuple[int, bytes]]:
        """(address, bytes) to write into a fresh instance's memory: each mount's guest path in its slot."""
        return [(self.slots[i], _prefix(guest) + b"\x00") for i, (_, guest) in enumerate(mounts)]


def _prefix(guest: str) -> bytes:
    # wasi-libc keeps a preopen's prefix without its leading slashes (strip_prefixes)
    return guest.lstrip("/").encode("utf-8", "surrogateescape")


def slot_placeholder(i: int) -> str:
    name = f"/.edgecompute-slot-{i:02d}-"
    return name + "x" * (SLOT_BYTES - len(name))  # stored without the "/": SLOT_BYTES - 1 bytes and a NUL


# -- files ----------------------------------------------------------------------------------------------


def _digest(preload: Sequence[str]) -> str:
    from ._cache import sha256

    return sha256(repr((FORMAT, SLOTS, SLOT_BYTES, MODULES, tuple(preload))).encode()).hex()[:16]


def manifest_path(cache_dir: Path, preload: Sequence[str]) -> Path:
    return Path(cache_dir) / f"snapshot-{pin.RUNTIME_SHA256[:24]}-{FORMAT}-{_digest(preload)}.manifest"


def _read_manifest(cache_dir: Path, preload: Sequence[str]) -> dict[str, str] | None:
    path = manifest_path(cache_dir, preload)
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if st.st_uid != os.geteuid() or st.st_size > 65536:
                return None
            text = f.read().decode("ascii")
    except (OSError, UnicodeDecodeError):
        return None
    entries: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            entries[key] = value
    if entries.get("format") != FORMAT or len(entries.get("sha256", "")) != 64:
        return None
    return entries


def compiled_key(cache_dir: Path, preload: Sequence[str], engine_key: str) -> str | None:
    """The cache key of the compiled snapshot, when a manifest is there (imports nothing heavy: a
    new process checks this entry on a thread of its own while it imports wasmtime)."""
    from ._cache import cache_key, wasmtime_version

    entries = _read_manifest(cache_dir, preload)
    if entries is None:
        return None
    return cache_key(wasmtime_version(), engine_key, entries["sha256"])


def load(runtime: Any, preload: Sequence[str], boot_digest: str, verification: Any = None) -> Snapshot | None:
    """The compiled snapshot from the cache folder, or None when there is none (or it is stale)."""
    from ._cache import cache_key, load_or_compile, sha256, wasmtime_version

    entries = _read_manifest(runtime.cache_dir, preload)
    if entries is None or entries.get("boot") != boot_digest:
        return None
    try:
        slots = [int(value) for value in entries["slots"].split(",")]
        memory_bytes = int(entries["memory_bytes"])
        expected = entries["sha256"]
    except (KeyError, ValueError):
        return None
    if len(slots) != SLOTS:
        return None
    wasm_path = manifest_path(runtime.cache_dir, preload).with_suffix(".wasm")

    def compile_snapshot() -> Any:
        import wasmtime

        data = wasm_path.read_bytes()
        if sha256(data).hex() != expected:
            raise SnapshotError(f"{wasm_path} does not match the sha256 its manifest records")
        return wasmtime.Module(runtime.engine.engine, data)

    key = cache_key(wasmtime_version(), runtime.engine.key, expected)
    try:
        module = load_or_compile(runtime.engine.engine, key, runtime.cache_dir, compile_snapshot,
                                 runtime.cache_stats, verification)
    except (OSError, SnapshotError) as exc:
        log.warning("the wasm python snapshot could not be loaded (%s); building it again", exc)
        return None
    return Snapshot(module, slots, memory_bytes)


# -- building -------------------------------------------------------------------------------------------


def build(runtime: Any, module: Any, original: bytes, preload: Sequence[str], bootstrap: str,
          boot_digest: str) -> Snapshot:
    """Boot the pinned runtime (``module``, compiled from ``original``, whose sha256 the caller
    checked), stop it, write the snapshot module and its manifest into the cache folder, and return
    it compiled."""
    import shutil
    import tempfile

    import wasmtime

    from ._cache import cache_key, load_or_compile, remove_entry, sha256, wasmtime_version, write_atomic

    stale = compiled_key(runtime.cache_dir, preload, runtime.engine.key)  # the one this build replaces
    t0 = time.perf_counter()
    empty = Path(tempfile.mkdtemp(prefix=".snapshot-", dir=runtime.cache_dir))
    try:
        memory, stack_at, marks = _boot(runtime, module, empty, preload, bootstrap)
    finally:
        shutil.rmtree(empty, ignore_errors=True)
    boot_seconds = time.perf_counter() - t0
    serve, empty_tuple, function_type = marks
    wasm, slots = _rewrite(original, memory, stack_at, serve, empty_tuple, function_type)
    digest = sha256(wasm).hex()
    path = manifest_path(runtime.cache_dir, preload)
    write_atomic(path.with_suffix(".wasm"), wasm, runtime.cache_dir)
    key = cache_key(wasmtime_version(), runtime.engine.key, digest)
    compiled = load_or_compile(runtime.engine.engine, key, runtime.cache_dir,
                               lambda: wasmtime.Module(runtime.engine.engine, wasm), runtime.cache_stats)
    seconds = time.perf_counter() - t0
    manifest = (f"format={FORMAT}\nsha256={digest}\nboot={boot_digest}\nslots={','.join(map(str, slots))}\n"
                f"memory_bytes={len(memory)}\nboot_seconds={boot_seconds:.3f}\nbuild_seconds={seconds:.3f}\n")
    write_atomic(path, manifest.encode("ascii"), runtime.cache_dir)
    if stale is not None and stale != key:
        remove_entry(stale, runtime.cache_dir)  # its manifest and module were just overwritten
    log.info("built the wasm python snapshot in %.1f s (boot %.2f s, %d MiB of memory)", seconds, boot_seconds,
             len(memory) >> 20)
    return Snapshot(compiled, slots, len(memory))


def _boot(runtime: Any, module: Any, empty: Path, preload: Sequence[str],
          bootstrap: str) -> tuple[bytes, int, tuple[int, int, int]]:
    """Run the boot script in a pristine store; return its memory, the innermost frame's address
    and the three addresses it reported."""
    import wasmtime

    from ._caller import set_epoch_deadline

    engine = runtime.engine
    out = bytearray()
    state: dict[str, int] = {}

    def stdout(data: Any) -> None:
        out.extend(bytes(data))

    def clock_time_get(caller: Any, clock_id: int, precision: int, time_ptr: int) -> int:
        # never raises (see _sandbox): stops the guest through its epoch deadline instead
        try:
            if _MARK in out and "stack_at" not in state:
                state["stack_at"] = time_ptr
                set_epoch_deadline(caller, 0)
            now = time.time_ns() if clock_id == 0 else time.monotonic_ns()
            memory = caller.get("memory")
            memory.write(caller, struct.pack("<Q", now), time_ptr)
            return 0
        except BaseException:  # noqa: BLE001
            return 21  # EFAULT

    linker = wasmtime.Linker(engine.engine)
    linker.define_wasi()
    linker.allow_shadowing = True
    i32, i64 = wasmtime.ValType.i32(), wasmtime.ValType.i64()
    linker.define_func("wasi_snapshot_preview1", "clock_time_get", wasmtime.FuncType([i32, i64, i32], [i32]),
                       clock_time_get, access_caller=True)
    store = wasmtime.Store(engine.engine)
    try:
        store.set_limits(memory_size=1 << 30)
        store.set_epoch_deadline(engine.ticks(300.0))
        if engine.fuel:
            store.set_fuel(2**62)
        wasi = wasmtime.WasiConfig()
        script = BOOT.format(bootstrap=bootstrap, modules=MODULES, preload=tuple(preload))
        wasi.argv = ["python", "-S", "-I", "-c", script]
        wasi.stdout_custom = stdout
        for i in range(SLOTS):
            wasi.preopen_dir(str(empty), slot_placeholder(i), False)
        store.set_wasi(wasi)
        instance = linker.instantiate(store, module)
        start = instance.exports(store)["_start"]
        if not isinstance(start, wasmtime.Func):
            raise SnapshotError("the runtime's _start is not a function")
        try:
            start(store)
            raise SnapshotError(f"the snapshot boot ended without stopping: {bytes(out)[-500:]!r}")
        except wasmtime.ExitTrap as exc:
            raise SnapshotError(f"the snapshot boot exited with code {exc.code}: {bytes(out)[-500:]!r}") from None
        except wasmtime.Trap as exc:
            if "stack_at" not in state or exc.trap_code != wasmtime.TrapCode.INTERRUPT:
                raise SnapshotError(f"the snapshot boot failed: {exc}") from None
        memory = instance.exports(store)["memory"]
        if not isinstance(memory, wasmtime.Memory):
            raise SnapshotError("the runtime exports no memory")
        size = memory.data_len(store)
        data = bytes(memory.read(store, 0, size))
    finally:
        store.close()
    line = bytes(out)[bytes(out).index(_MARK):].split(b"\n", 1)[0]
    serve, empty_tuple, function_type = (int(v) for v in line[len(_MARK):].split())
    return data, state["stack_at"], (serve, empty_tuple, function_type)


# -- the module rewrite ------------------------------------------------------------------------------------


def _leb(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return result, pos


def _uleb(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _sleb(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if (value == 0 and not byte & 0x40) or (value == -1 and byte & 0x40):
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)


def _sections(wasm: bytes) -> list[tuple[int, bytes]]:
    if wasm[:8] != b"\x00asm\x01\x00\x00\x00":
        raise SnapshotError("not a wasm module")
    pos, out = 8, []
    while pos < len(wasm):
        sid = wasm[pos]
        size, pos = _leb(wasm, pos + 1)
        out.append((sid, wasm[pos:pos + size]))
        pos += size
    return out


def _vec_items(payload: bytes) -> tuple[int, int]:
    return _leb(payload, 0)


def _section(sid: int, payload: bytes) -> bytes:
    return bytes([sid]) + _uleb(len(payload)) + payload


def _name(text: str) -> bytes:
    raw = text.encode()
    return _uleb(len(raw)) + raw


def _u32(memory: bytes, address: int) -> int:
    if not 0 <= address <= len(memory) - 4:
        raise SnapshotError(f"address {address} lies outside the snapshot's memory")
    value: int = struct.unpack_from("<I", memory, address)[0]
    return value


def _cstring(memory: bytes, address: int, limit: int = 64) -> bytes:
    end = memory.find(b"\x00", address, address + limit)
    return memory[address:end] if end >= 0 else b""


def _function_types(sections: dict[int, bytes]) -> tuple[list[tuple[bytes, bytes]], int, list[int]]:
    """The type section's signatures, the number of imported functions, and each defined function's type."""
    types = []
    payload = sections[1]
    count, pos = _leb(payload, 0)
    for _ in range(count):
        if payload[pos] != 0x60:
            raise SnapshotError("unexpected type form")
        n, pos = _leb(payload, pos + 1)
        params = payload[pos:pos + n]
        pos += n
        n, pos = _leb(payload, pos)
        results = payload[pos:pos + n]
        pos += n
        types.append((bytes(params), bytes(results)))
    imported = 0
    payload = sections.get(2, b"\x00")
    count, pos = _leb(payload, 0)
    for _ in range(count):
        for _ in range(2):
            n, pos = _leb(payload, pos)
            pos += n
        kind = payload[pos]
        pos += 1
        if kind != 0:
            raise SnapshotError("the runtime imports something other than functions")
        _, pos = _leb(payload, pos)
        imported += 1
    payload = sections[3]
    count, pos = _leb(payload, 0)
    defined = []
    for _ in range(count):
        index, pos = _leb(payload, pos)
        defined.append(index)
    return types, imported, defined


def _table(payload: bytes) -> dict[int, int]:
    """Table index -> function index, from active element segments of the plain form."""
    table: dict[int, int] = {}
    count, pos = _leb(payload, 0)
    for _ in range(count):
        flags, pos = _leb(payload, pos)
        if flags != 0 or payload[pos] != 0x41:
            raise SnapshotError("unexpected element segment form")
        offset, pos = _leb(payload, pos + 1)  # i32.const, non-negative and small here
        if payload[pos] != 0x0B:
            raise SnapshotError("unexpected element segment offset")
        n, pos = _leb(payload, pos + 1)
        for i in range(n):
            table[offset + i], pos = _leb(payload, pos)
    return table


def _rewrite(original: bytes, memory: bytes, stack_at: int, serve: int, empty_tuple: int,
             function_type: int) -> tuple[bytes, list[int]]:
    sections = _sections(original)
    by_id = {sid: payload for sid, payload in sections if sid}
    if 6 not in by_id or by_id[6][:4] != b"\x01\x7f\x01\x41":
        raise SnapshotError("the runtime does not have exactly one global, its stack pointer")
    if 12 in by_id or 8 in by_id:
        raise SnapshotError("the runtime has a start function or passive data")
    # PyFunction_Type's tp_call (offset 64 on wasm32: refcnt, type, size, name, basicsize, itemsize,
    # dealloc, vectorcall_offset, getattr, setattr, as_async, repr, as_number, as_sequence,
    # as_mapping, hash, call) is PyVectorcall_Call
    if _cstring(memory, _u32(memory, function_type + 12)) != b"function":
        raise SnapshotError("the reported function type is not 'function'")
    table_index = _u32(memory, function_type + 64)
    table = _table(by_id[9])
    if table_index not in table:
        raise SnapshotError("tp_call is not in the function table")
    call = table[table_index]
    types, imported, defined = _function_types(by_id)
    if call < imported or types[defined[call - imported]] != (b"\x7f\x7f\x7f", b"\x7f"):
        raise SnapshotError("tp_call does not have the signature (i32, i32, i32) -> i32")
    if _u32(memory, serve + 4) != function_type:
        raise SnapshotError("the reported serve is not a function")
    # the slots: one copy of each placeholder, pointed at by exactly one (prefix, fd) table entry
    slots = []
    for i in range(SLOTS):
        text = slot_placeholder(i).lstrip("/").encode() + b"\x00"
        found = []
        start = 0
        while (hit := memory.find(text, start)) >= 0:
            if memory.count(struct.pack("<II", hit, 3 + i)) == 1:
                found.append(hit)
            start = hit + 1
        if len(found) != 1:
            raise SnapshotError(f"preopen slot {i} is not where it was expected ({len(found)} candidates)")
        slots.append(found[0])
    # new memory: its size at the stop, and the non-zero 4 KiB pages as data segments
    page = 4096
    zero = bytes(page)
    runs: list[tuple[int, int]] = []
    begin = None
    for offset in range(0, len(memory), page):
        if memory[offset:offset + page] != zero:
            if begin is None:
                begin = offset
        elif begin is not None:
            runs.append((begin, offset))
            begin = None
    if begin is not None:
        runs.append((begin, len(memory)))
    data = _uleb(len(runs)) + b"".join(b"\x00\x41" + _sleb(a) + b"\x0b" + _uleb(b - a) + memory[a:b] for a, b in runs)
    stack = (stack_at - 256) & ~15
    if not 4096 <= stack < stack_at:
        raise SnapshotError("the boot's stack pointer is out of range")
    count, pos = _leb(by_id[1], 0)
    new_type = count
    type_section = _uleb(count + 1) + by_id[1][pos:] + b"\x60\x00\x01\x7f"
    count, pos = _leb(by_id[3], 0)
    new_function = imported + count
    function_section = _uleb(count + 1) + by_id[3][pos:] + _uleb(new_type)
    body = (b"\x00\x41" + _sleb(serve) + b"\x41" + _sleb(empty_tuple) + b"\x41\x00\x10" + _uleb(call) + b"\x0b")
    count, pos = _leb(by_id[10], 0)
    code_section = _uleb(count + 1) + by_id[10][pos:] + _uleb(len(body)) + body
    export_section = _uleb(2) + _name("memory") + b"\x02\x00" + _name(RUN_EXPORT) + b"\x00" + _uleb(new_function)
    memory_section = b"\x01\x00" + _uleb(len(memory) // 65536)
    global_section = b"\x01\x7f\x01\x41" + _sleb(stack) + b"\x0b"
    replaced = {1: type_section, 3: function_section, 5: memory_section, 6: global_section, 7: export_section,
                10: code_section, 11: data}
    out = bytearray(original[:8])
    for sid, payload in sections:
        if sid == 0:
            continue  # custom sections (debug info, producers) are not needed to run it
        out += _section(sid, replaced.get(sid, payload))
    return bytes(out), slots
