"""Compiled modules cached on disk, in a private folder.

An entry is two files: ``<name>.cwasm`` holds ``Module.serialize()`` as it is (so wasmtime can map
it with ``deserialize_file`` instead of copying ~27 MB), and ``<name>.meta`` holds
``MAGIC | sha256(key) | payload length | crc32(payload)``, where the key names the wasmtime
version, the engine configuration and the module's sha256. An entry whose meta, key, length or
checksum does not match is never deserialized: it is deleted and the module compiled again. The
folder must belong to this user and be closed to everyone else (mode 0700); one that is not is
repaired when it is ours, refused when it is not. Files are written atomically (temporary file,
then rename).
"""

from __future__ import annotations

import logging
import mmap
import os
import stat
import struct
import sys
import threading
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgecompute.errors import ConfigError

log = logging.getLogger("edgecompute_wasm.cache")

MAGIC = b"ECWASM\x00\x01"
_HEADER = struct.Struct("<8s32sQI")
FORMAT = "edgecompute-wasm-cache/1"

__all__ = [
    "CacheStats",
    "Verification",
    "cache_key",
    "engine_key",
    "ensure_private_dir",
    "load_or_compile",
    "sha256",
    "wasmtime_version",
    "write_atomic",
]


class CacheStats:
    def __init__(self) -> None:
        self.hits = 0
        self.misses = 0
        self.rejected = 0


def ensure_private_dir(path: Path) -> Path:
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.stat(path, follow_symlinks=False)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"wasm cache folder {path} is not a plain folder")
    if st.st_uid != os.geteuid():
        raise ConfigError(f"wasm cache folder {path} belongs to uid {st.st_uid}, not to this user")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def cache_key(wasmtime_version: str, engine_key: str, module_sha256: str) -> str:
    return f"{FORMAT}|wasmtime={wasmtime_version}|{engine_key}|module={module_sha256}"


def engine_key(*, fuel: bool, max_wasm_stack: int) -> str:
    """What in an engine's configuration changes compiled code (part of the cache key)."""
    return f"epoch=1;fuel={int(fuel)};stack={max_wasm_stack};gc=0"


_VERSION: str | None = None


def wasmtime_version() -> str:
    """wasmtime's installed version, found without importing it (importlib.metadata costs ~40 ms;
    the dist-info folder's name next to the package is enough). This runs on a new process's
    first request before wasmtime is imported, so it imports nothing (not even importlib.util)."""
    global _VERSION
    if _VERSION is None:
        found: list[str] = []
        for entry in sys.path:
            folder = entry or os.getcwd()
            if os.path.isfile(os.path.join(folder, "wasmtime", "__init__.py")):
                try:
                    found = [name for name in os.listdir(folder)
                             if name.startswith("wasmtime-") and name.endswith(".dist-info")]
                except OSError:
                    pass
                break
        if len(found) == 1:
            _VERSION = found[0][len("wasmtime-"):-len(".dist-info")]
        else:
            from importlib.metadata import version

            _VERSION = version("wasmtime")
    return _VERSION


def sha256(data: bytes) -> bytes:
    """sha256 from the interpreter's built-in module: ``import hashlib`` loads OpenSSL (3-6 ms),
    which a new process's first request would wait for before it can start importing wasmtime."""
    new: Any = None
    for name in ("_sha2", "_sha256"):  # Python 3.12+, 3.11
        try:
            new = __import__(name).sha256
            break
        except (ImportError, AttributeError):
            continue
    if new is None:
        from hashlib import sha256 as new
    digest: bytes = new(data).digest()
    return digest


def _entry(key: str, cache_dir: Path) -> tuple[bytes, Path, Path]:
    digest = sha256(key.encode())
    name = digest.hex()[:48]
    return digest, Path(cache_dir) / f"{name}.cwasm", Path(cache_dir) / f"{name}.meta"


def entry_path(key: str, cache_dir: Path) -> Path:
    """The compiled code's file of a cache entry (it may not exist)."""
    return _entry(key, cache_dir)[1]


def remove_entry(key: str, cache_dir: Path) -> None:
    """Delete a cache entry (a process that mapped it keeps its mapping)."""
    _, path, meta = _entry(key, cache_dir)
    _remove(meta)
    _remove(path)


class Verification:
    """Checks a cache entry on a thread of its own, started before wasmtime is imported.

    Importing wasmtime (~60 ms of Python holding the GIL) and checksumming the 27 MB runtime entry
    (~20-30 ms in zlib, which releases the GIL) then overlap on a second core, which takes the
    checksum off a new process's first request.
    """

    def __init__(self, key: str, cache_dir: Path) -> None:
        self.key = key
        self.stats = CacheStats()
        self._valid = False
        digest, path, meta = _entry(key, cache_dir)
        self._thread = threading.Thread(target=self._run, args=(path, meta, digest),
                                        name="edgecompute-wasm-verify", daemon=True)
        self._thread.start()

    def _run(self, path: Path, meta: Path, digest: bytes) -> None:
        self._valid = _valid(path, meta, digest, self.stats)

    def result(self) -> bool:
        self._thread.join()
        return self._valid


def load_or_compile(engine: object, key: str, cache_dir: Path, compile_fn: Callable[[], object],
                    stats: CacheStats | None = None, verified: Verification | None = None) -> object:
    """The module for ``key``: deserialized from the cache, or ``compile_fn()`` and stored.

    ``verified``, when given for this key, is a check of the entry already under way."""
    import wasmtime

    stats = stats or CacheStats()
    digest, path, meta = _entry(key, cache_dir)
    if verified is not None and verified.key == key:
        valid = verified.result()
        stats.rejected += verified.stats.rejected
    else:
        valid = _valid(path, meta, digest, stats)
    if valid:
        try:
            module = wasmtime.Module.deserialize_file(engine, str(path))  # type: ignore[arg-type]
            stats.hits += 1
            return module
        except Exception as exc:  # noqa: BLE001 - an unusable cache file is rebuilt
            log.warning("wasm cache file %s did not deserialize (%s); rebuilding it", path, exc)
            stats.rejected += 1
            _remove(meta)
            _remove(path)
    stats.misses += 1
    compiled = compile_fn()
    try:
        payload = bytes(compiled.serialize())  # type: ignore[attr-defined]
        write_atomic(path, payload, cache_dir)
        write_atomic(meta, _HEADER.pack(MAGIC, digest, len(payload), zlib.crc32(payload)), cache_dir)
    except OSError as exc:  # a read-only or full disk costs speed, never correctness
        log.warning("could not write wasm cache file %s: %s", path, exc)
    return compiled


def write_atomic(path: Path, data: bytes, folder: Path) -> None:
    """Write ``data`` to ``path`` through a temporary file in ``folder`` and a rename."""
    import tempfile  # only when writing: it costs a first request 5-9 ms of imports (random, shutil)

    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    except BaseException:
        _remove(Path(tmp))
        raise


def _valid(path: Path, meta: Path, digest: bytes, stats: CacheStats) -> bool:
    try:
        with open(meta, "rb") as m, open(path, "rb") as f:
            for handle in (m, f):
                st = os.fstat(handle.fileno())
                if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                    raise ValueError("not a regular file of this user")
            header = m.read(_HEADER.size + 1)
            if len(header) != _HEADER.size:
                raise ValueError("bad meta file")
            magic, key, length, crc = _HEADER.unpack(header)
            if magic != MAGIC or key != digest:
                raise ValueError("foreign cache file")
            if length != os.fstat(f.fileno()).st_size:
                raise ValueError("truncated or padded cache file")
            if length:
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                    running = zlib.crc32(mapped)  # one call, no copy; zlib releases the GIL meanwhile
            else:
                running = 0
            if running != crc:
                raise ValueError("checksum mismatch")
            return True
    except FileNotFoundError:
        if path.exists() or meta.exists():  # half an entry
            stats.rejected += 1
            _remove(path)
            _remove(meta)
        return False
    except (OSError, ValueError) as exc:
        log.warning("wasm cache file %s rejected (%s); rebuilding it", path, exc)
        stats.rejected += 1
        _remove(path)
        _remove(meta)
        return False


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass
