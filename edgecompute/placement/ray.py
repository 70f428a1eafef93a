"""Ray placement: the executor runs in a Ray actor (models stay loaded between tasks).

Only this module imports ``ray``, and only when an executor placed on Ray is built. Our scheduler
keeps priorities, deadlines and backpressure (Ray has none of them); Ray places the actor on a
node that has the resources it asks for. A request that the cluster can never hold fails at once
with ``InfeasibleRequest`` (Ray itself would log a warning and wait forever).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import os
import pickle
import signal
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, ExecutorCrashed, InfeasibleRequest, PluginError
from ..models import Algorithm, Health, HealthStatus, Request, Resources, Response
from . import PLACEMENT_KEYS, Placement
from ._proxy import by_reference
from ._supervisor import Supervisor

if TYPE_CHECKING:
    from ..context import TaskContext

__all__ = ["RayExecutor", "ray_options", "shutdown"]

_lock = threading.Lock()
_started_here = False


def _ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ConfigError("placement 'ray' needs Ray: pip install 'edgecompute[ray]'") from exc
    return ray


def default_temp_dir() -> str:
    # Ray's default is /tmp/ray; ours is a folder we own. Kept short: Ray puts Unix sockets in it.
    return os.path.join(tempfile.gettempdir(), f"edgecompute-ray-{os.getuid()}")


def connect(placement: Placement) -> Any:
    """Join the cluster ``placement`` names, or start a local one (once per process)."""
    global _started_here
    ray = _ray()
    with _lock:
        if not ray.is_initialized():
            options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                       "configure_logging": False}
            if placement.ray_address is None:
                options["_temp_dir"] = placement.ray_temp_dir or default_temp_dir()
                if placement.ray_num_cpus is not None:
                    options["num_cpus"] = placement.ray_num_cpus
            with _host_signal_handlers_kept():
                ray.init(address=placement.ray_address, **options)
            _started_here = True
            atexit.register(shutdown)
    return ray


# Ray's driver installs crash-report handlers (absl's, and faulthandler when none is enabled) for
# these. They end the process on any such signal, and wasmtime turns a guest's trap into SIGILL,
# SIGSEGV or SIGFPE that its own handler answers: with Ray's in front, one wasm request trapping
# would end the host. The host keeps the handlers it had.
_FATAL_SIGNALS = tuple(getattr(signal, name) for name in
                       ("SIGSEGV", "SIGBUS", "SIGILL", "SIGFPE", "SIGABRT", "SIGTRAP", "SIGTERM")
                       if hasattr(signal, name))


@contextlib.contextmanager
def _host_signal_handlers_kept() -> Iterator[None]:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        sigaction = libc.sigaction
    except (OSError, AttributeError):  # no C library to ask (not a POSIX host)
        yield
        return
    # each handler saved as the C library's opaque ``struct sigaction`` (at most 152 bytes on Linux)
    saved = {}
    for signum in _FATAL_SIGNALS:
        buffer = ctypes.create_string_buffer(512)
        if sigaction(signum, None, buffer) == 0:
            saved[signum] = buffer
    try:
        yield
    finally:
        for signum, buffer in saved.items():
            sigaction(signum, buffer, None)


def shutdown() -> None:
    """Stop the Ray runtime this process started (a cluster it only joined stays up)."""
    global _started_here
    with _lock:
        if _started_here:
            _ray().shutdown()
            _started_here = False


def ray_options(needs: Resources, custom: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Our ``Resources`` in Ray's terms: ``num_cpus``, ``num_gpus``, ``memory`` (bytes), custom."""
    options: dict[str, Any] = {"num_cpus": needs.cpu, "num_gpus": needs.devices_needed}
    if needs.memory_mb:
        options["memory"] = int(needs.memory_mb * 2**20)
    if custom:
        options["resources"] = dict(custom)
    return options


def _never_fits(options: Mapping[str, Any], cluster: Mapping[str, float]) -> list[str]:
    short = []
    wanted = {"CPU": options.get("num_cpus", 0), "GPU": options.get("num_gpus", 0),
              "memory": options.get("memory", 0), **options.get("resources", {})}
    for key, amount in wanted.items():
        if amount and amount > cluster.get(key, 0.0):
            short.append(f"{key}={amount:g} (cluster has {cluster.get(key, 0.0):g})")
    return short


class _ActorHost:
    """Runs in the Ray actor: builds the executor there and serves it through a local scheduler."""

    def __init__(self, name: str, settings: Mapping[str, Any], factory: bytes | None) -> None:
        from .._registry import Registry

        registry = Registry(settings={name: dict(settings)}) if factory else Registry.discover(
            settings={name: dict(settings)})
        if factory:
            registry.register(pickle.loads(factory), name=name)
        self.name = name
        self.registry = registry
        self.executor = registry.get(name)
        self.scheduler: Any = None
        self.handles: dict[str, Any] = {}

    def hello(self) -> dict[str, Any]:
        return {"version": self.executor.version, "algorithms": list(self.executor.algorithms()),
                "executors": self.registry.names(), "pid": os.getpid()}

    async def _scheduler(self) -> Any:
        if self.scheduler is None:
            from .._scheduler import Scheduler
            from ..config import Config

            self.scheduler = Scheduler(self.registry, capacity=Resources(cpu=1e9, memory_mb=1e15),
                                       config=Config(), retries=0, max_queue=1 << 30, threads=4)
            await self.scheduler.start()
        return self.scheduler

    async def run(self, task: str, body: tuple[Any, ...]) -> AsyncIterator[tuple[str, Any]]:
        from ..models import NO_RESOURCES
        from ._worker import portable

        scheduler = await self._scheduler()
        algorithm, inputs, params, priority, metadata = body
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def observe(event: Any) -> None:
            if event.task_id == task and event.kind == "progress":
                events.put_nowait(("progress", event.progress))

        unsubscribe = scheduler.subscribe(observe)
        try:
            handle = scheduler.submit(Request(algorithm, inputs, params, priority, None, NO_RESOURCES, metadata,
                                              retries=0, id=task))
            self.handles[task] = handle

            async def pump() -> None:
                try:
                    async for chunk in handle.stream():
                        events.put_nowait(("chunk", chunk))
                    response = await handle.result()
                    events.put_nowait(("done", (response.outputs, dict(response.timings))))
                except Exception as exc:  # noqa: BLE001 - goes back to the host's task
                    events.put_nowait(("error", portable(exc)))

            pumping = asyncio.ensure_future(pump())
            while True:
                kind, value = await events.get()
                yield kind, value
                if kind in ("done", "error"):
                    break
            await pumping
        finally:
            unsubscribe()
            self.handles.pop(task, None)

    def cancel(self, task: str) -> None:
        handle = self.handles.get(task)
        if handle is not None:
            handle.cancel()

    async def health(self) -> Health:
        return await self.executor.health()

    async def aclose(self) -> None:
        if self.scheduler is not None:
            await self.scheduler.aclose(cancel=True, timeout=5)
        await self.registry.aclose()


class RayExecutor:
    """An executor served by a Ray actor; the host-side ``Executor`` the scheduler sees."""

    def __init__(self, name: str, placement: Placement, settings: Mapping[str, Any] | None = None,
                 factory: Any = None) -> None:
        self.name = name
        self.placement = placement
        self._ray = connect(placement)
        try:
            fields: dict[str, Any] = dict(placement.ray_actor)
            needs = Resources(**fields)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"placement ray_actor of {name!r}: {exc}") from exc
        self._options = ray_options(needs, placement.ray_custom_resources)
        short = _never_fits(self._options, self._ray.cluster_resources())
        if short:
            raise InfeasibleRequest(f"the Ray cluster can never place the actor of {name!r}: needs {', '.join(short)}")
        self._args = (name, {k: v for k, v in (settings or {}).items() if k not in PLACEMENT_KEYS},
                      by_reference(factory))
        self._actor_class = self._ray.remote(_ActorHost)
        self.supervisor = Supervisor(placement)
        self._actor: Any = None
        self._starting: asyncio.Future[None] | None = None
        hello = self._start()
        self.version = str(hello["version"])
        self._algorithms: list[Algorithm] = list(hello["algorithms"])
        self._resources = {a.name: a.resources for a in self._algorithms}
        self.report = hello
        self._ids = 0
        self._cluster_totals: Mapping[str, float] = {}
        self._cluster_at = -1e9

    def _start(self) -> dict[str, Any]:
        actor = self._actor_class.options(**self._options).remote(*self._args)
        try:
            hello: dict[str, Any] = self._ray.get(actor.hello.remote(), timeout=self.placement.start_timeout)
        except Exception as exc:
            self._ray.kill(actor)
            raise PluginError(f"placement of {self.name!r}", f"Ray actor did not start: {type(exc).__name__}: "
                                                            f"{exc}") from exc
        self._actor = actor
        return hello

    def algorithms(self) -> Sequence[Algorithm]:
        return self._algorithms

    def requirements(self, request: Request) -> Resources:
        return self._resources.get(request.algorithm.rpartition("/")[2], Resources(cpu=1.0))

    async def _ready(self) -> Any:
        if self._actor is not None:
            return self._actor
        if self.supervisor.open:
            raise ExecutorCrashed(f"executor {self.name!r}: {self.supervisor.describe()}", retryable=False)
        if self._starting is None:  # one restart, however many tasks are waiting for it
            self._starting = asyncio.ensure_future(self._restart())
        starting = self._starting
        try:
            await asyncio.shield(starting)
        finally:
            if self._starting is starting and starting.done():
                self._starting = None
        return self._actor

    async def _restart(self) -> None:
        await asyncio.sleep(self.supervisor.delay())
        try:
            await asyncio.to_thread(self._start)
        except PluginError as exc:
            self.supervisor.crashed(str(exc))
            raise ExecutorCrashed(f"executor {self.name!r} could not restart: {exc}") from exc
        self.supervisor.restarts += 1

    def _cluster(self) -> Mapping[str, float]:
        # what the cluster holds in all, refreshed every few seconds (the call costs a round trip)
        now = time.monotonic()
        if now - self._cluster_at > 5.0:
            self._cluster_totals = self._ray.cluster_resources()
            self._cluster_at = now
        return self._cluster_totals

    async def execute(self, request: Request, ctx: TaskContext) -> Response:
        ray = self._ray
        needs = request.resources or self.requirements(request)
        short = _never_fits(ray_options(needs, self.placement.ray_custom_resources), self._cluster())
        if short:
            raise InfeasibleRequest(f"{request.algorithm} needs more than the Ray cluster will ever have: "
                                    f"{', '.join(short)}")
        actor = await self._ready()
        self._ids += 1
        task = f"{request.id}-{self._ids}"
        body = (request.algorithm, request.inputs, dict(request.params), request.priority, dict(request.metadata))
        try:
            async for ref in actor.run.options(num_returns="streaming").remote(task, body):
                kind, value = await ref
                if kind == "chunk":
                    await ctx.emit(value)
                elif kind == "progress":
                    ctx.progress(value)
                elif kind == "done":
                    outputs, timings = value
                    return Response(outputs, timings=timings)
                else:
                    raise value
        except asyncio.CancelledError:
            if ctx.deadline is not None and time.monotonic() >= ctx.deadline:
                ray.kill(actor)  # stuck past its deadline: a fresh actor serves the next task
                if self._actor is actor:
                    self._actor = None
            else:
                actor.cancel.remote(task)
            raise
        except (ray.exceptions.RayActorError, ray.exceptions.ActorDiedError) as exc:
            if self._actor is actor:
                self._actor = None
                self.supervisor.crashed(f"Ray actor of {self.name!r} died: {type(exc).__name__}")
            raise ExecutorCrashed(f"Ray actor of {self.name!r} died: {exc}") from exc
        raise ExecutorCrashed(f"Ray actor of {self.name!r} ended task {task} without an answer")

    async def health(self) -> Health:
        details: dict[str, Any] = {"placement": "ray", "crashes": self.supervisor.total_crashes,
                                   "restarts": self.supervisor.restarts, "actor": self._options}
        if self.supervisor.open:
            return Health(HealthStatus.DOWN, self.supervisor.describe(), details)
        try:
            actor = await self._ready()
            inner = await actor.health.remote()
        except Exception as exc:  # noqa: BLE001 - health must answer
            return Health(HealthStatus.DOWN, f"{type(exc).__name__}: {exc}", details)
        return Health(inner.status, inner.message, {**inner.details, **details})

    async def aclose(self) -> None:
        actor, self._actor = self._actor, None
        if actor is not None:
            try:
                await asyncio.wait_for(actor.aclose.remote(), 10)
            except Exception:  # noqa: BLE001 - it goes anyway
                pass
            self._ray.kill(actor)

    def kill_actor(self) -> None:
        """Kill the actor now, as a crash would (for tests and operators)."""
        if self._actor is not None:
            self._ray.kill(self._actor, no_restart=True)
