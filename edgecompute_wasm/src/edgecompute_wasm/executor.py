"""The ``wasm`` executor: ``wasm/python`` and ``wasm/module``.

Building it is cheap and imports no wasmtime: the engine, the compiled CPython runtime (from the
disk cache when it can) and the pool of pre-started interpreters are made on the first request.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

from edgecompute.errors import InvalidRequest
from edgecompute.models import Algorithm, Health, HealthStatus, Request, Resources, Response

from . import __version__
from ._paths import check_tree, read_file_under, real_path_under
from .settings import MiB, WasmSettings

if TYPE_CHECKING:
    from edgecompute.context import TaskContext

    from ._cache import Verification
    from ._python import PythonResult
    from ._runtime import Runtime

__all__ = ["WasmExecutor"]

_stdlib_guest = "/.stdlib"  # _stdlib.GUEST_PATH (not imported here: executor.py stays light)
_OVERHEAD_MB = 64.0  # host-side memory of one sandbox beyond its linear memory (compiled code is shared)


class WasmExecutor:
    """Runs untrusted code in wasmtime: ``wasm/python`` (Python source) and ``wasm/module`` (.wasm)."""

    name = "wasm"
    version = __version__

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        self.settings = WasmSettings.from_mapping(config)
        self._runtime: Runtime | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._config_mounts = _check_mounts(self.settings.mounts, "config")
        for host, guest in self._config_mounts:
            # the operator's folders are checked once, here; docs/wasm.md asks to keep special files out
            check_tree(host, self.settings.max_mount_entries, f"config mount {guest!r}", _config_error)

    # -- the Executor protocol --------------------------------------------------------------------------

    def algorithms(self) -> Sequence[Algorithm]:
        needs = Resources(cpu=1.0, memory_mb=self.settings.memory_mb + _OVERHEAD_MB)
        return [
            Algorithm("python", "Untrusted Python source defining main(inputs), run by CPython 3.12 for WASI in a "
                      "fresh sandbox (params: source, function, timeout, memory_mb, fuel, output_bytes, "
                      "mounts, requirements, capture)", needs),
            Algorithm("module", "A user WebAssembly module: a WASI command (argv, stdin) or one exported numeric "
                      "function (params: wasm, function, args, argv, limits)", needs),
        ]

    def requirements(self, request: Request) -> Resources:
        """One core, and the request's memory cap (at most the ceiling) plus the host's overhead."""
        memory_mb = request.params.get("memory_mb", self.settings.memory_mb)
        if type(memory_mb) is bool or not isinstance(memory_mb, (int, float)) or not memory_mb > 0:
            memory_mb = self.settings.memory_mb  # execute() reports the bad value
        # a value above the ceiling is refused by execute(); what can run is at most the ceiling
        memory_mb = min(float(memory_mb), float(self.settings.ceiling("memory_mb")))
        # the guest's answer is copied out (1x) and decoded within a budget of 8x its size + 64 KiB
        result = request.params.get("result_bytes", self.settings.result_bytes)
        if type(result) is not int or result <= 0:
            result = self.settings.result_bytes
        answer_mb = 9 * min(result, int(self.settings.ceiling("result_bytes"))) / MiB
        return Resources(cpu=1.0, memory_mb=memory_mb + _OVERHEAD_MB + answer_mb)

    async def execute(self, request: Request, ctx: TaskContext) -> Response:
        bare = request.algorithm.rpartition("/")[2]
        if bare == "python":
            return await self._python(request, ctx)
        if bare == "module":
            return await self._module(request, ctx)
        raise InvalidRequest(f"wasm has no algorithm {bare!r}; it has: module, python")

    async def health(self) -> Health:
        runtime = self._runtime
        if self._closed:
            return Health(HealthStatus.DOWN, "closed")
        if runtime is None:
            return Health(details={"loaded": False})
        python = runtime.loaded_python
        pool = python.stats() if python is not None else {}
        return Health(details={"loaded": True, "load_seconds": runtime.load_seconds,
                               "cache": dict(vars(runtime.cache_stats)), **pool})

    async def aclose(self) -> None:
        self._closed = True
        with self._lock:
            runtime, self._runtime = self._runtime, None
        if runtime is not None:
            runtime.close()
            # clean exit: every thread the runtime started ends (a running guest by its deadline, a
            # blocked one by its unstick grace); waited for off the event loop
            import anyio

            from ._python import UNSTICK_GRACE

            grace = float(self.settings.ceiling("timeout")) + 2.0 + UNSTICK_GRACE + 5.0
            await anyio.to_thread.run_sync(runtime.join, grace)

    # -- loading ------------------------------------------------------------------------------------------

    def runtime(self) -> Runtime:
        """The engine, compiled runtime and pools, built now if they were not (blocking)."""
        runtime = self._runtime
        if runtime is not None:
            return runtime
        with self._lock:
            if self._closed:
                from edgecompute.errors import ExecutorError

                raise ExecutorError("the wasm executor is closed")
            if self._runtime is None:
                verification = self._verify_runtime_entry()
                from ._runtime import Runtime  # imports wasmtime while the entry is checked

                self._runtime = Runtime(self.settings, verification)
            return self._runtime

    def _verify_runtime_entry(self) -> Verification | None:
        from . import _cache
        from . import _runtime_pin as pin

        settings = self.settings
        try:
            cache_dir = _cache.ensure_private_dir(settings.cache_dir)
        except Exception:  # noqa: BLE001 - Runtime() reports the folder's problem
            return None
        engine_key = _cache.engine_key(fuel=settings.fuel_enabled, max_wasm_stack=settings.max_wasm_stack)
        key = None
        if settings.snapshot:
            from ._snapshot import compiled_key

            key = compiled_key(cache_dir, settings.preload, engine_key)  # a new process maps only the snapshot
        if key is None:
            key = _cache.cache_key(_cache.wasmtime_version(), engine_key, pin.RUNTIME_SHA256)
        return _cache.Verification(key, cache_dir)

    def warm(self) -> None:
        """Load everything and start pre-starting interpreters for the default sandbox shape."""
        runtime = self.runtime()
        runtime.python.warm(int(self.settings.memory_mb * MiB), self._config_mounts)

    # -- wasm/python ----------------------------------------------------------------------------------------

    async def _python(self, request: Request, ctx: TaskContext) -> Response:
        params = request.params
        _known(params, {"source", "function", "timeout", "memory_mb", "fuel", "output_bytes", "result_bytes",
                        "mounts", "requirements", "capture"})
        source = params.get("source")
        if not isinstance(source, str):
            raise InvalidRequest("wasm/python needs params['source']: Python source text defining main(inputs)")
        if len(source.encode("utf-8", "surrogatepass")) > self.settings.max_source_bytes:
            raise InvalidRequest(f"the source is larger than max_source_bytes ({self.settings.max_source_bytes})")
        function = params.get("function", "main")
        if not isinstance(function, str) or not function.isidentifier():
            raise InvalidRequest(f"params['function'] must be a Python identifier, not {function!r}")
        limits = self.settings.limits(params, ctx.time_left())
        mounts = self._mounts(params)
        requirements = params.get("requirements", ())
        paths: list[str] = []
        if requirements:
            from .deps import resolve

            if isinstance(requirements, (list, tuple)) and len(requirements) > self.settings.max_requirements:
                raise InvalidRequest(f"params['requirements'] names {len(requirements)} wheels, above its ceiling "
                                     f"max_requirements = {self.settings.max_requirements}")

            site_mounts, paths = await ctx.run_sync(resolve, requirements, self.settings)
            mounts = sorted(set(mounts) | set(site_mounts), key=lambda m: m[1])
        result = await ctx.run_sync(self._run_python, source, function, request.inputs, limits, mounts, paths)
        timings = {"sandbox_start": result.startup, "sandbox_run": result.run}
        if params.get("capture"):
            return Response({"result": result.value, "stdout": result.stdout, "stderr": result.stderr},
                            timings=timings)
        if result.stdout or result.stderr:
            await ctx.emit({"stdout": result.stdout, "stderr": result.stderr})
        return Response(result.value, timings=timings)

    def _run_python(self, *args: Any) -> PythonResult:
        # blocking; the first request loads the runtime here too, in the same worker hop
        runtime = self._runtime
        if runtime is None or runtime.loaded_python is None:
            runtime = self.runtime()
        return runtime.python.run(*args)

    # -- wasm/module ----------------------------------------------------------------------------------------

    async def _module(self, request: Request, ctx: TaskContext) -> Response:
        params = request.params
        _known(params, {"wasm", "path", "function", "args", "argv", "timeout", "memory_mb", "fuel", "output_bytes",
                        "mounts"})
        settings = self.settings
        wasm = params.get("wasm")
        if wasm is None and params.get("path") is not None:
            real = real_path_under(params["path"], settings.module_roots, "params['path']", "module_roots")
            wasm = await ctx.run_sync(read_file_under, real, settings.module_roots, settings.max_module_bytes,
                                      "params['path']", "module_roots", "max_module_bytes")
        if not isinstance(wasm, (bytes, bytearray, memoryview, str)):
            raise InvalidRequest("wasm/module needs params['wasm'] (module bytes or WAT text) or params['path']")
        size = len(wasm.encode("utf-8", "surrogatepass")) if isinstance(wasm, str) else memoryview(wasm).nbytes
        if size > settings.max_module_bytes:
            raise InvalidRequest(f"the module is {size} bytes, above its ceiling max_module_bytes = "
                                 f"{settings.max_module_bytes}")
        function = params.get("function")
        if function is not None and not isinstance(function, str):
            raise InvalidRequest(f"params['function'] must be an export name, not {function!r}")
        args = params.get("args", ())
        if not isinstance(args, (list, tuple)):
            raise InvalidRequest("params['args'] must be a list of numbers")
        argv = params.get("argv", ["module"])
        if not isinstance(argv, (list, tuple)) or not all(isinstance(a, str) for a in argv):
            raise InvalidRequest("params['argv'] must be a list of strings")
        if any("\x00" in a for a in argv):
            raise InvalidRequest("params['argv'] entries may not hold NUL characters")
        argv_bytes = sum(len(a.encode("utf-8", "surrogatepass")) + 1 for a in argv)
        if argv_bytes > settings.max_argv_bytes:
            raise InvalidRequest(f"params['argv'] takes {argv_bytes} bytes, above its ceiling max_argv_bytes = "
                                 f"{settings.max_argv_bytes}")
        stdin = request.inputs
        if stdin is None:
            stdin = b""
        elif isinstance(stdin, str):
            stdin = stdin.encode()
        elif not isinstance(stdin, (bytes, bytearray)):
            raise InvalidRequest("wasm/module inputs are the command's stdin: bytes, str or None")
        if len(stdin) > settings.max_input_bytes:
            raise InvalidRequest(f"the stdin (inputs) is {len(stdin)} bytes, above its ceiling max_input_bytes = "
                                 f"{settings.max_input_bytes}")
        limits = self.settings.limits(params, ctx.time_left())
        mounts = self._mounts(params)
        runtime = self._runtime or await ctx.run_sync(self.runtime)
        from ._module import compile_user_module, run_module

        module = await ctx.run_sync(compile_user_module, runtime, wasm if isinstance(wasm, str) else bytes(wasm),
                                    function)
        outputs = await ctx.run_sync(lambda: run_module(runtime, module, function=function, args=list(args),
                                                        argv=list(argv), stdin=bytes(stdin), limits=limits,
                                                        mounts=mounts))
        return Response(outputs)

    # -- helpers --------------------------------------------------------------------------------------------

    def _mounts(self, params: Mapping[str, Any]) -> list[tuple[str, str]]:
        extra = params.get("mounts")
        if not extra:
            return self._config_mounts
        settings = self.settings
        if not settings.allow_request_mounts:
            raise InvalidRequest("params['mounts']: this wasm executor takes no mounts from requests (the operator "
                                 "allows them with allow_request_mounts and request_mount_roots)")
        if not isinstance(extra, Mapping):
            raise InvalidRequest("params['mounts'] must map guest paths to host directories")
        if len(extra) > settings.max_request_mounts:
            raise InvalidRequest(f"params['mounts'] names {len(extra)} mounts, above its ceiling max_request_mounts = "
                                 f"{settings.max_request_mounts}")
        checked = {}
        for guest, host in extra.items():
            real = real_path_under(host, settings.request_mount_roots, f"params['mounts'][{guest!r}]",
                                   "request_mount_roots")
            checked[guest] = real
        mounts = dict((guest, host) for host, guest in self._config_mounts)
        for host, guest in _check_mounts(checked, "request"):
            if guest == _stdlib_guest or guest.startswith(_stdlib_guest + "/") or guest == "/deps" \
                    or guest.startswith("/deps/"):
                raise InvalidRequest(f"params['mounts'] guest path {guest!r} is reserved")
            # checked on every request: a request names the folder, and files can appear in it
            check_tree(host, settings.max_mount_entries, f"params['mounts'][{guest!r}]")
            mounts[guest] = host
        return sorted(((host, guest) for guest, host in mounts.items()), key=lambda m: m[1])


def _known(params: Mapping[str, Any], known: set[str]) -> None:
    unknown = sorted(set(params) - known)
    if unknown:
        raise InvalidRequest(f"unknown params: {', '.join(unknown)}; known: {', '.join(sorted(known))}")


def _check_mounts(mounts: Mapping[str, Any], origin: str) -> list[tuple[str, str]]:
    """(host, guest) pairs: host an existing folder (symlinks resolved), guest a clean absolute path."""
    error = InvalidRequest if origin == "request" else _config_error
    result = []
    for guest, host in mounts.items():
        if not isinstance(guest, str) or not isinstance(host, (str, os.PathLike)):
            raise error(f"{origin} mount {guest!r} = {host!r}: both must be paths")
        clean = PurePosixPath(guest)
        if not clean.is_absolute() or ".." in clean.parts or str(clean) == "/" or str(clean) != guest.rstrip("/"):
            raise error(f"{origin} mount guest path {guest!r} must be a clean absolute path other than '/'")
        real = os.path.realpath(os.fspath(host))
        if not os.path.isdir(real):
            raise error(f"{origin} mount {guest!r}: {host!r} is not a folder")
        result.append((real, str(clean)))
    return sorted(result, key=lambda m: m[1])


def _config_error(message: str) -> Exception:
    from edgecompute.errors import ConfigError

    return ConfigError(message)
