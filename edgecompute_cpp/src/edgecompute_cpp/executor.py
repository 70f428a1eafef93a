"""The ``cpp`` executor: native C++ plugins, in-process through cffi or in worker processes.

This module imports only the standard library and edgecompute: cffi, numpy and the compiler are
used when the executor first loads its plugins (on ``algorithms()``, i.e. when the registry first
builds it), never on import or construction. ``process`` isolation is the placement layer's
:class:`~edgecompute.placement.WorkerExecutor` running this executor (``inprocess``) in
supervised worker processes: one arena, one protocol, one supervisor for every worker process.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from pickle import PickleBuffer
from typing import TYPE_CHECKING, Any

from edgecompute.context import TaskContext
from edgecompute.errors import (
    EdgeComputeError,
    ExecutorCrashed,
    ExecutorError,
    InvalidRequest,
    PluginError,
    TaskTimeout,
)
from edgecompute.models import Algorithm, Health, HealthStatus, Request, Resources, Response

from . import __version__
from ._limits import Limits
from .settings import CppSettings

if TYPE_CHECKING:
    from edgecompute.placement import WorkerExecutor

    from ._native import NativePlugin

__all__ = ["ENTRY_POINT_GROUP", "PLUGIN_PATH_ENV", "CppExecutor"]

log = logging.getLogger("edgecompute.cpp")

ENTRY_POINT_GROUP = "edgecompute_cpp.plugins"
PLUGIN_PATH_ENV = "EDGECOMPUTE_CPP_PLUGIN_PATH"
_MiB = float(1 << 20)


class _Plugin:
    __slots__ = ("abi_version", "algorithms", "name", "native", "path", "source", "version")

    def __init__(self, name: str, version: str, abi_version: int, path: str, source: str,
                 native: NativePlugin | None) -> None:
        self.name = name
        self.version = version
        self.abi_version = abi_version
        self.path = path
        self.source = source
        self.native = native
        self.algorithms: list[str] = []


class _Entry:
    __slots__ = ("algorithm", "builtin", "check", "fast", "metrics", "native_name", "plugin", "qualified")

    def __init__(self, algorithm: Algorithm, plugin: _Plugin | None, native_name: str,
                 check: Callable[[Any, Mapping[str, Any], Limits, str], int], builtin: bool) -> None:
        self.algorithm = algorithm
        self.plugin = plugin
        self.native_name = native_name
        self.qualified = f"cpp/{algorithm.name}"
        #: (arrays, params, limits, where) -> bytes the call allocates besides its inputs; raises
        #: InvalidRequest for what the request may not ask (see _checks)
        self.check = check
        #: a bundled algorithm: its outputs were bounded before the call (a plugin's are after it)
        self.builtin = builtin
        # calls, errors, crashes, timeouts, total seconds, max seconds
        self.metrics = [0, 0, 0, 0, 0.0, 0.0]
        #: the last call's seconds (in process isolation, its round trip), by the bit length of
        #: the input size
        self.fast: dict[int, float] = {}


class _Loaded:
    def __init__(self) -> None:
        self.plugins: dict[str, _Plugin] = {}
        self.entries: dict[str, _Entry] = {}
        self.problems: list[PluginError] = []
        #: why the bundled plugin failed to load, when it did: its algorithms stay listed, and a
        #: request for one is told this instead of hearing that cpp has no such algorithm
        self.builtin_down: PluginError | None = None
        self.down: list[Algorithm] = []


class _CallContext(TaskContext):
    """What a synchronous :meth:`CppExecutor.call` in ``process`` isolation hands the worker layer:
    its deadline; a plugin streams nothing."""

    __slots__ = ("_until",)

    def __init__(self, algorithm: Algorithm, deadline: float | None) -> None:
        # not TaskContext.__init__: no scheduler runs this call
        self.algorithm = algorithm
        self.devices = ()
        self._until = deadline

    @property
    def deadline(self) -> float | None:
        return self._until

    @property
    def running(self) -> int:
        return 1  # the executor's own loop runs nothing else

    def emit_nowait(self, chunk: Any) -> None:
        pass

    def progress(self, done: float, total: float | None = None) -> None:
        pass


class CppExecutor:
    """Runs the algorithms of native C++ plugins.

    Settings (the ``[executors.cpp]`` table, or keyword arguments, which win): see
    :class:`~edgecompute_cpp.settings.CppSettings`. Every request is checked against the limits
    before native code runs (in ``process`` isolation, before it is sent).

    Plugins come from the bundled plugin, ``plugins``, the ``edgecompute_cpp.plugins`` entry points
    and ``$EDGECOMPUTE_CPP_PLUGIN_PATH``. The bundled plugin's algorithms have bare names
    (``cpp/gaussian_blur``); every other plugin's are ``<plugin>.<algorithm>``.

    In ``process`` isolation a worker gets its inputs read-only in memory only the host writes, and
    the host copies every output out as it arrives: a plugin that writes past its buffers cannot
    change another task's outputs. A crashed worker fails only the tasks it had in hand and is
    replaced in the background while the other workers serve.
    """

    name = "cpp"
    version = __version__

    def __init__(self, config: Mapping[str, Any] | None = None, *, isolation: str | None = None,
                 workers: int | None = None, plugins: Sequence[str | os.PathLike[str]] | None = None,
                 builtin: bool | None = None, inline_below_us: float | None = None) -> None:
        settings = self.settings = CppSettings.from_config(
            config, isolation=isolation, workers=workers, plugins=plugins, builtin=builtin,
            inline_below_us=inline_below_us)
        self.isolation = settings.isolation
        self.workers = settings.workers
        self.extra_plugins = list(settings.plugins)
        self.builtin = settings.builtin
        self._inline_s = settings.inline_below_us / 1e6
        self._block_s = settings.block_below_us / 1e6
        self.compile_flags = list(settings.compile_flags)
        #: what one request may ask (see _limits.LIMITS and docs/cpp.md, "Limits")
        self.limits: Limits = settings.limits
        #: the request requirements() last checked, with its checked inputs and params, for
        #: execute() to take instead of checking again: (request, arrays, encoded params, bytes)
        self._checked: tuple[Request, Any, bytes, int] | None = None
        # reservations by (declared resources, whole MiB): requests of one size class share one object
        # (a Resources costs ~1.4 us to validate, and the scheduler groups queued tasks by identity)
        self._reservations: dict[tuple[Resources, int], Resources] = {}
        self._loaded: _Loaded | None = None
        self._load_lock = threading.Lock()
        #: process isolation: this executor, in-process, in supervised worker processes
        self._remote: WorkerExecutor | None = None
        #: the event loop that synchronous call()s of process isolation run, one at a time
        self._calls_loop: asyncio.AbstractEventLoop | None = None
        self._calls_lock = threading.Lock()
        #: whether the workers were last used by a synchronous call (they live on that loop then)
        self._called_last = False
        self._metrics_lock = threading.Lock()
        self._closed = False

    @property
    def pids(self) -> list[int | None]:
        """In ``process`` isolation, each worker process's pid (None where none is alive now);
        empty in ``inprocess`` isolation and before the plugins are loaded."""
        remote = self._remote
        return [] if remote is None else remote.pids

    # -- loading ----------------------------------------------------------------------------------

    def _ensure(self) -> _Loaded:
        loaded = self._loaded
        if loaded is not None:
            return loaded
        with self._load_lock:
            if self._loaded is None:
                self._loaded = self._load()
            return self._loaded

    def _sources(self, problems: list[PluginError]) -> list[tuple[str, Any]]:
        found = self._found(problems)
        excluded = self.settings.exclude
        if not excluded:
            return found
        return [(source, target) for source, target in found
                if ("builtin" if source == "builtin" else str(target)) not in excluded]

    def _found(self, problems: list[PluginError]) -> list[tuple[str, Any]]:
        from ._build import build_builtin

        found: list[tuple[str, Any]] = []
        if self.builtin:
            found.append(("builtin", build_builtin))
        found.extend(("config", path) for path in self.extra_plugins)
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            label = f"entry point {ep.name} ({ep.dist.name if ep.dist is not None else '?'})"
            try:
                value = ep.load()
                if callable(value):
                    value = value()
                values = [value] if isinstance(value, (str, os.PathLike)) else list(value)
                found.extend((label, str(v)) for v in values)
            except Exception as exc:  # noqa: BLE001 - a broken third-party plugin is reported, not fatal
                problems.append(PluginError(label, f"could not be loaded: {type(exc).__name__}: {exc}"))
        from ._build import SOURCE_SUFFIXES

        for item in filter(None, os.environ.get(PLUGIN_PATH_ENV, "").split(os.pathsep)):
            path = Path(item)
            if path.is_dir():
                for file in sorted(path.iterdir()):
                    if file.suffix == ".so" or file.suffix in SOURCE_SUFFIXES:
                        found.append((PLUGIN_PATH_ENV, str(file)))
            else:
                found.append((PLUGIN_PATH_ENV, str(path)))
        return found

    def _library(self, source: str, target: Any, label: str) -> str:
        """The plugin library's path, compiled first when ``target`` is a source (or the bundled
        plugin's builder)."""
        from ._build import SOURCE_SUFFIXES, build_plugin

        if callable(target):
            return str(target())
        if Path(target).suffix in SOURCE_SUFFIXES:
            return str(build_plugin(target, flags=self.compile_flags))
        if not Path(target).exists():
            raise PluginError(label, "the file does not exist")
        return str(target)

    @staticmethod
    def _label(source: str, target: Any) -> str:
        return "the bundled plugin" if source == "builtin" else f"{target} (from {source})"

    def _load(self) -> _Loaded:
        if self.isolation == "process":
            return self._load_remote()
        loaded = _Loaded()
        for source, target in self._sources(loaded.problems):
            label = self._label(source, target)
            try:
                self._add(loaded, self._library(source, target, label), source, label)
            except PluginError as exc:
                loaded.problems.append(exc)
            except EdgeComputeError as exc:
                loaded.problems.append(PluginError(label, str(exc)))
            else:
                continue
            if source == "builtin":
                self._mark_builtin_down(loaded, loaded.problems[-1])
        for problem in loaded.problems:
            log.warning("%s", problem)
        return loaded

    def _load_remote(self) -> _Loaded:
        """Start the worker processes (each loads the plugins, in-process there) and learn the
        algorithms from the first one's hello: the host checks requests against them before any
        is sent, but loads no plugin itself (a plugin that crashes a starting worker is found in a
        throwaway process, see _crashing_plugins)."""
        from functools import partial

        from edgecompute.placement import Placement, WorkerExecutor

        from ._checks import check_builtin, check_plugin, has_spec

        table = {**self.settings.table(), "isolation": "inprocess"}
        loaded = _Loaded()
        # a plugin call cannot notice a cancellation: cancelling a running task kills its worker
        start = partial(WorkerExecutor, "cpp", Placement.process(), factory=type(self), workers=self.workers,
                        kill_on_cancel=True)
        try:
            remote = start(table)
        except PluginError:
            # a plugin may have crashed the worker while it loaded: find which, start without them
            crashed = self._crashing_plugins()
            if not crashed:
                raise
            table["exclude"] = [*table["exclude"], *crashed]
            remote = start(table)
            loaded.problems.extend(crashed.values())
            for problem in crashed.values():
                log.warning("%s", problem)
        for algorithm in remote.algorithms():
            bare = "." not in algorithm.name  # the bundled plugin's algorithms have bare names
            native_name = algorithm.name if bare else algorithm.name.partition(".")[2]
            known = bare and has_spec(algorithm.name)
            check = partial(check_builtin, algorithm.name) if known else check_plugin
            loaded.entries[algorithm.name] = _Entry(algorithm, None, native_name, check, known)
        down = next((p for p in loaded.problems if p.plugin == "the bundled plugin"), None)
        if down is not None:
            self._mark_builtin_down(loaded, down)
        self._remote = remote
        return loaded

    def _crashing_plugins(self) -> dict[str, PluginError]:
        """Each plugin a worker would load, loaded alone in a throwaway process: those whose load
        crashed it, by what ``exclude`` calls them (a path or source as given, or ``builtin``)."""
        import subprocess
        import sys

        crashed: dict[str, PluginError] = {}
        for source, target in self._sources([]):  # what fails without crashing, the worker reports
            label = self._label(source, target)
            try:
                path = self._library(source, target, label)
            except EdgeComputeError:
                continue
            try:
                probe = subprocess.run([sys.executable, "-m", "edgecompute_cpp._probe", path],
                                       stdin=subprocess.DEVNULL, capture_output=True, timeout=120, check=False)
            except subprocess.TimeoutExpired:
                crashed_how = "hung for 120 s"
            else:
                if probe.returncode >= 0:
                    continue
                try:
                    crashed_how = f"was killed by signal {-probe.returncode} ({signal.Signals(-probe.returncode).name})"
                except ValueError:
                    crashed_how = f"was killed by signal {-probe.returncode}"
            key = "builtin" if source == "builtin" else str(target)
            crashed[key] = PluginError(label, f"loading it crashed the worker process: it {crashed_how}; "
                                              "the workers run without it")
        return crashed

    @staticmethod
    def _mark_builtin_down(loaded: _Loaded, problem: PluginError) -> None:
        from ._checks import BUNDLED

        loaded.builtin_down = problem
        loaded.down = [Algorithm(name, f"unavailable: the bundled plugin failed to load ({problem.reason})",
                                 Resources(cpu=1.0), True)
                       for name in BUNDLED if name not in loaded.entries]

    def _add(self, loaded: _Loaded, path: str, source: str, label: str) -> None:
        from ._native import NativePlugin

        native = NativePlugin(path, label)
        info = native.describe()
        name = info["name"]
        if name in loaded.plugins:
            raise PluginError(label, f"a plugin named {name!r} is already loaded from {loaded.plugins[name].path}")
        plugin = _Plugin(name, info["version"], info["abi_version"], path, source, native)
        bare = source == "builtin"
        from functools import partial

        from ._checks import check_builtin, check_plugin, has_spec

        for a in info["algorithms"]:
            algorithm_name = a["name"] if bare else f"{name}.{a['name']}"
            algorithm = Algorithm(algorithm_name, a["description"], Resources(cpu=a["cpu"], memory_mb=a["memory_mb"]),
                                  a["thread_safe"])
            known = bare and has_spec(a["name"])
            check = partial(check_builtin, a["name"]) if known else check_plugin
            loaded.entries[algorithm_name] = _Entry(algorithm, plugin, a["name"], check, known)
            plugin.algorithms.append(algorithm_name)
        loaded.plugins[name] = plugin

    # -- the Executor protocol --------------------------------------------------------------------

    def algorithms(self) -> Sequence[Algorithm]:
        """The loaded plugins' algorithms; with the bundled plugin down, its algorithms too, so that
        a request for one hears why it cannot run (see :class:`BundledPluginDown`)."""
        loaded = self._ensure()
        return [*(entry.algorithm for entry in loaded.entries.values()), *loaded.down]

    def requirements(self, request: Request) -> Resources:
        """The declared cpu, and memory for the inputs, the outputs and the working memory that
        the checked request will really use (computed from its shapes and params)."""
        name = request.algorithm.rpartition("/")[2]
        entry = (self._loaded or self._ensure()).entries.get(name) or self._lookup(name)
        arrays, encoded, extra = self._prepare(entry, request.inputs, request.params)
        self._checked = (request, arrays, encoded, extra)
        declared = entry.algorithm.resources
        size = extra
        for _, array in arrays:
            size += array.nbytes
        if size <= declared.memory_mb * _MiB:
            return declared
        key = (declared, -int(-size // _MiB))  # rounded up to whole MiB
        found = self._reservations.get(key)
        if found is None:
            if len(self._reservations) >= 4096:
                self._reservations.clear()
            found = self._reservations[key] = Resources(cpu=declared.cpu, memory_mb=float(key[1]))
        return found

    def _prepare(self, entry: _Entry, inputs: Any, params: Mapping[str, Any]) -> tuple[Any, bytes, int]:
        """Checked inputs as (name, C-contiguous array) pairs, the params as JSON, and the bytes
        the call allocates besides its inputs; raises InvalidRequest before any native code runs."""
        native = _native_module or _native()
        if type(inputs) is np_ndarray and inputs.flags.c_contiguous and inputs.dtype in native.DTYPE_CODES:
            arrays = [(None, inputs)]  # the common case, without the general conversion
        else:
            arrays = native.normalise_inputs(inputs, entry.qualified)
        extra = entry.check(arrays, params, self.limits, entry.qualified)
        encoded = native.encode_params(params, entry.qualified) if params else native.EMPTY_PARAMS
        return arrays, encoded, extra

    def _lookup(self, name: str) -> _Entry:
        loaded = self._ensure()
        entries = loaded.entries
        entry = entries.get(name)
        if entry is None:
            if loaded.builtin_down is not None and any(a.name == name for a in loaded.down):
                from .errors import BundledPluginDown

                raise BundledPluginDown(f"cpp/{name}", loaded.builtin_down)
            failed = "".join(f"; {problem}" for problem in loaded.problems)
            raise InvalidRequest(f"cpp has no algorithm {name!r}; it has: {', '.join(sorted(entries)) or 'none'}"
                                 + (f" (plugins that failed to load{failed})" if failed else ""))
        return entry

    async def execute(self, request: Request, ctx: TaskContext) -> Response:
        entry = (self._loaded or self._ensure()).entries.get(ctx.algorithm.name)
        if entry is None:
            entry = self._lookup(ctx.algorithm.name)  # raises the error that lists what there is
        native = _native_module or _native()
        checked = self._checked
        if checked is not None and checked[0] is request:
            # requirements() checked this very request: its inputs as it checked them
            self._checked = None
            arrays, params = checked[1], checked[2]
        else:
            arrays, params, _ = self._prepare(entry, request.inputs, request.params)
        size = 0
        for _, array in arrays:
            size += array.nbytes
        key = size.bit_length()
        if self._remote is not None:
            self._called_last = False
            # checked here, run there as checked: the worker checks nothing again
            outputs = await self._execute_remote(entry, _checked_payload(entry, arrays, params), ctx, key)
            return Response(outputs)
        last = entry.fast.get(key)
        if last is not None and last < self._inline_s:
            outputs = self._run_inprocess(entry, arrays, params, None, key)  # cheaper than a thread hop
        else:
            flag = native.ffi.new("int32_t*")
            try:
                outputs = await ctx.run_sync(self._run_inprocess, entry, arrays, params, flag, key)
            except asyncio.CancelledError:
                flag[0] = 1  # the plugin may poll result->cancelled and stop early
                raise
        if not entry.builtin:
            self._bound_outputs(entry, outputs)
        return Response(outputs[0][1] if len(outputs) == 1 else _shape_outputs(outputs))

    async def _execute_remote(self, entry: _Entry, payload: tuple[str, Any, bytes], ctx: TaskContext,
                              key: int) -> Any:
        """The outputs of a checked request (``payload``: what :meth:`run_checked` takes), run by a worker."""
        remote = self._remote
        assert remote is not None
        start = time.perf_counter()
        try:
            last = entry.fast.get(key)
            outputs: Any = remote.NOT_SENT
            if last is not None and last < self._block_s and ctx.running <= 1:
                # alone, and quick last time: waiting on the loop costs less than the loop's turns
                # (the loop has nothing else to run meanwhile), as a short in-process call runs on it
                try:
                    outputs = remote.run_checked_blocking(payload, ctx.deadline, entry.qualified)
                except TimeoutError:
                    raise TaskTimeout(f"{entry.qualified} passed its deadline; its worker process was killed") from None
            through_loop = outputs is remote.NOT_SENT
            if through_loop:
                outputs = await remote.run_checked(payload, ctx, entry.qualified)
        except BaseException as exc:
            self._record(entry, time.perf_counter() - start, exc)
            raise
        elapsed = time.perf_counter() - start
        if last is None or not through_loop:
            # the estimate falls at once but at most doubles per call (see _run_inprocess)
            entry.fast[key] = elapsed if last is None else min(elapsed, 2 * last)
        elif elapsed < last:
            # through the loop it may only fall: that time holds the loop's turns and, in a burst,
            # the wait for the worker, neither of which a lone blocking call pays (a burst raised
            # it past block_below_us, and the lone tasks after it then all took the slower way)
            entry.fast[key] = elapsed
        self._record(entry, elapsed, None)
        return outputs

    def run_checked(self, payload: tuple[str, Any, bytes], ctx: TaskContext) -> Any:
        """The call of ``process`` isolation, in a worker process (see
        ``WorkerExecutor.run_checked``): the host's executor has checked the request and sends
        ``(algorithm, [(input name or None, dtype string, shape, buffer)], encoded params)`` as
        its check left them, so nothing is checked again here (a plugin's outputs still are,
        against max_output_bytes, as only a run can)."""
        if self._remote is not None:
            raise ExecutorError("run_checked runs in the worker process of process isolation, not on its host")
        name, inputs, params = payload
        entry = (self._loaded or self._ensure()).entries.get(name) or self._lookup(name)
        if _native_module is None:
            _native()  # sets np_ndarray
        new = np_ndarray
        arrays = [(label, new(shape, dtype, buffer)) for label, dtype, shape, buffer in inputs]
        plugin = entry.plugin
        assert plugin is not None and plugin.native is not None
        # no metrics kept here: the host's, which time the whole round trip, are the ones reported
        outputs = plugin.native.call(entry.native_name, arrays, params, None)
        if not entry.builtin:
            self._bound_outputs(entry, outputs)
        return outputs[0][1] if len(outputs) == 1 else _shape_outputs(outputs)

    def blocking(self, request: Request) -> Callable[[Request, TaskContext], Response] | None:
        """The in-process call as a plain function, for callers with a thread that may block.

        A worker process of the placement layer runs it on the thread that read the request, which
        saves two thread hops per call (see ``edgecompute.executor.blocking_call``); ``process``
        isolation is such a worker running this executor ``inprocess``, and answers None itself.
        """
        return self._call_blocking if self.isolation == "inprocess" else None

    def _call_blocking(self, request: Request, ctx: TaskContext) -> Response:
        entry = self._lookup(ctx.algorithm.name)
        arrays, params, _ = self._prepare(entry, request.inputs, request.params)
        outputs = self._run_inprocess(entry, arrays, params, None, None)
        if not entry.builtin:
            self._bound_outputs(entry, outputs)
        return Response(_shape_outputs(outputs))

    def call(self, algorithm: str, inputs: Any = None, params: Mapping[str, Any] | None = None, *,
             timeout: float | None = None) -> Any:
        """Run an algorithm now, without a scheduler (for scripts and benchmarks): on this thread,
        or in ``process`` isolation on a worker process, waiting for it at most ``timeout`` seconds
        (past it the worker is killed and :class:`TaskTimeout` raised)."""
        entry = self._lookup(algorithm.rpartition("/")[2])
        arrays, encoded, _ = self._prepare(entry, inputs, params or {})
        if self._remote is not None:
            deadline = None if timeout is None else time.monotonic() + timeout
            self._called_last = True
            return self._run_call(entry, _checked_payload(entry, arrays, encoded), deadline)
        outputs = self._run_inprocess(entry, arrays, encoded, None, None)
        if not entry.builtin:
            self._bound_outputs(entry, outputs)
        return _shape_outputs(outputs)

    async def _call_remote(self, entry: _Entry, payload: tuple[str, Any, bytes], deadline: float | None) -> Any:
        ctx = _CallContext(entry.algorithm, deadline)
        try:
            return await asyncio.wait_for(self._execute_remote(entry, payload, ctx, -1),
                                          None if deadline is None else max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise TaskTimeout(f"{entry.qualified} passed its timeout; its worker process was killed") from None

    def _run_call(self, entry: _Entry, payload: tuple[str, Any, bytes], deadline: float | None) -> Any:
        """A call of process isolation from synchronous code: one packet out and one back on
        this thread when a worker is idle and no other running event loop reads it (the common
        case), else the executor's own event loop run until the answer, on this thread or, where
        an event loop already runs on this thread, on a helper thread."""
        remote = self._remote
        assert remote is not None
        with self._calls_lock:
            start = time.perf_counter()
            try:
                outputs = remote.run_checked_blocking(payload, deadline, entry.qualified)
            except TimeoutError:
                error = TaskTimeout(f"{entry.qualified} passed its timeout; its worker process was killed")
                self._record(entry, time.perf_counter() - start, error)
                raise error from None
            except BaseException as exc:
                self._record(entry, time.perf_counter() - start, exc)
                raise
            if outputs is not remote.NOT_SENT:
                self._record(entry, time.perf_counter() - start, None)
                return outputs
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return self._drive(entry, payload, deadline)
        result: list[Any] = []
        failure: list[BaseException] = []

        def on_a_thread() -> None:
            try:
                result.append(self._drive(entry, payload, deadline))
            except BaseException as exc:  # noqa: BLE001 - raised again on the caller's thread
                failure.append(exc)

        helper = threading.Thread(target=on_a_thread, name="edgecompute-cpp-call")
        helper.start()
        helper.join()
        if failure:
            raise failure[0]
        return result[0]

    def _drive(self, entry: _Entry, payload: tuple[str, Any, bytes], deadline: float | None) -> Any:
        """The call through the executor's own event loop, run on this thread until the answer."""
        with self._calls_lock:
            loop = self._calls_loop
            if loop is None:
                loop = self._calls_loop = asyncio.new_event_loop()
            return loop.run_until_complete(self._call_remote(entry, payload, deadline))

    def _bound_outputs(self, entry: _Entry, outputs: list[tuple[str, Any]]) -> None:
        """A plugin's outputs against max_output_bytes: the ABI lets the host bound them only
        after the plugin allocated them (the bundled plugin's are bounded before the call)."""
        total = 0
        for _, array in outputs:
            total += array.nbytes
        if total > self.limits.max_output_bytes:
            outputs.clear()  # drop the arrays: the plugin's memory goes back now
            raise InvalidRequest(f"{entry.qualified}: the outputs total {total:,} bytes, above the limit "
                                 f"{self.limits.max_output_bytes:,} ([executors.cpp] max_output_bytes)")

    def empty(self, shape: int | Sequence[int], dtype: Any = "float32") -> Any:
        """A new, uninitialised numpy array for inputs (``numpy.empty``, of a dtype the plugin ABI
        carries). In ``process`` isolation every input is copied once into memory the worker
        reads and cannot write."""
        import numpy as np

        native = _native()
        try:
            dtype = np.dtype(dtype)
            array = np.empty(shape, dtype)
        except (TypeError, ValueError) as exc:
            raise InvalidRequest(f"cpp.empty: {exc}") from exc
        if dtype not in native.DTYPE_CODES:
            raise InvalidRequest(f"cpp.empty: dtype {dtype} is not one the plugin ABI carries; "
                                 f"use one of {', '.join(sorted(str(d) for d in native.DTYPE_CODES))}")
        return array

    def _run_inprocess(self, entry: _Entry, inputs: Any, params: bytes, flag: Any, key: int | None) -> Any:
        assert entry.plugin is not None
        native = entry.plugin.native
        assert native is not None
        start = time.perf_counter()
        try:
            outputs = native.call(entry.native_name, inputs, params, flag)
        except BaseException as exc:
            self._record(entry, time.perf_counter() - start, exc)
            raise
        elapsed = time.perf_counter() - start
        if key is not None:
            # The estimate falls at once but at most doubles per call: one call that the OS
            # preempted must not send the next thousand through a thread hop, while an algorithm
            # that really got slower leaves the event loop within a few calls.
            last = entry.fast.get(key)
            entry.fast[key] = elapsed if last is None else min(elapsed, 2 * last)
        m = entry.metrics
        with self._metrics_lock:  # _record's success case, without its call
            m[0] += 1
            m[4] += elapsed
            if elapsed > m[5]:
                m[5] = elapsed
        return outputs

    def _record(self, entry: _Entry, elapsed: float, error: BaseException | None) -> None:
        m = entry.metrics
        with self._metrics_lock:
            m[0] += 1
            if error is not None:
                m[1] += 1
                if isinstance(error, ExecutorCrashed):
                    m[2] += 1
                elif isinstance(error, TaskTimeout):
                    m[3] += 1
            m[4] += elapsed
            if elapsed > m[5]:
                m[5] = elapsed

    def metrics(self) -> dict[str, dict[str, float]]:
        """Per algorithm: calls, errors, crashes, timeouts, total_s, mean_s, max_s."""
        loaded = self._loaded
        if loaded is None:
            return {}
        report = {}
        with self._metrics_lock:
            for name, entry in loaded.entries.items():
                calls, errors, crashes, timeouts, total, longest = entry.metrics
                if calls:
                    report[name] = {"calls": calls, "errors": errors, "crashes": crashes, "timeouts": timeouts,
                                    "total_s": total, "mean_s": total / calls, "max_s": longest}
        return report

    async def health(self) -> Health:
        if self.isolation == "process":
            return await self._remote_health()
        try:
            loaded = await asyncio.to_thread(self._ensure)
        except Exception as exc:  # noqa: BLE001 - health must answer
            return Health(HealthStatus.DOWN, f"loading plugins failed: {type(exc).__name__}: {exc}")
        details: dict[str, Any] = {
            "isolation": self.isolation,
            "plugins": [
                {"name": p.name, "version": p.version, "abi_version": p.abi_version, "path": p.path,
                 "source": p.source, "algorithms": list(p.algorithms)}
                for p in loaded.plugins.values()
            ],
            "problems": [str(p) for p in loaded.problems],
            "metrics": self.metrics(),
        }
        if loaded.builtin_down is not None:
            details["builtin_down"] = str(loaded.builtin_down)
        if not loaded.entries:
            why = f": the bundled plugin failed to load: {loaded.builtin_down.reason}" if loaded.builtin_down else ""
            return Health(HealthStatus.DOWN, f"no C++ plugin loaded{why}", details)
        if loaded.problems:
            return Health(HealthStatus.DEGRADED, f"{len(loaded.problems)} plugin(s) failed to load", details)
        return Health(HealthStatus.OK, f"{len(loaded.plugins)} plugin(s), {len(loaded.entries)} algorithm(s)", details)

    async def _remote_health(self) -> Health:
        """The workers' health (plugins, problems: what the worker's executor reports), with the
        host's view: isolation, the supervisor's crashes and restarts, each worker's state, and
        the metrics of the calls made from here."""
        try:
            await asyncio.to_thread(self._ensure)
        except Exception as exc:  # noqa: BLE001 - health must answer
            return Health(HealthStatus.DOWN, f"starting the worker processes failed: {type(exc).__name__}: {exc}",
                          {"isolation": self.isolation})
        remote = self._remote
        assert remote is not None
        health = await remote.health()
        status, message = health.status, health.message
        problems = [*health.details.get("problems", ()), *(str(p) for p in self._ensure().problems)]
        if status is HealthStatus.OK and problems:
            status, message = HealthStatus.DEGRADED, f"{len(problems)} plugin(s) failed to load"
        return Health(status, message, {**health.details, "isolation": self.isolation, "problems": problems,
                                        "metrics": self.metrics()})

    async def aclose(self) -> None:
        self._closed = True
        remote, self._remote = self._remote, None
        # a call in progress ends first; the loop of the synchronous calls is not running after it,
        # so the workers attached to it are closed from here with nothing else touching that loop
        await asyncio.to_thread(self._calls_lock.acquire)
        try:
            loop, self._calls_loop = self._calls_loop, None
            if remote is not None and loop is not None and self._called_last:
                # the workers (and the starts in progress) of synchronous calls belong to that loop
                await asyncio.to_thread(loop.run_until_complete, remote.aclose())
            elif remote is not None:
                await remote.aclose()
            if loop is not None:
                loop.close()
        finally:
            self._calls_lock.release()


_native_module: Any = None
np_ndarray: Any = None  # numpy.ndarray once the cffi/numpy layer is imported


def _native() -> Any:
    """The cffi/numpy layer, imported on first use (a global lookup afterwards)."""
    global _native_module, np_ndarray
    if _native_module is None:
        import numpy

        from . import _native as module

        np_ndarray = numpy.ndarray
        _native_module = module
    return _native_module


def _checked_payload(entry: _Entry, arrays: Any, params: bytes) -> tuple[str, Any, bytes]:
    """What :meth:`CppExecutor.run_checked` takes: the checked arrays as dtype string, shape and
    buffer (pickled without numpy's reduction or ours: the cheapest way across, both ways)."""
    return entry.algorithm.name, [(label, array.dtype.str, array.shape, PickleBuffer(array))
                                  for label, array in arrays], params


def _shape_outputs(outputs: list[tuple[str, Any]]) -> Any:
    if len(outputs) == 1:
        return outputs[0][1]
    if not outputs:
        return None
    return dict(outputs)

