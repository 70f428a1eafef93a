"""The in-process scheduler: priorities, resources, deadlines, retries, backpressure.

Order and admission (which waiting task starts next) live in ``_admission``, whose docstring
states the rules; this module runs what it admits: contexts, tasks, deadlines, retries, results.

Hot path. The per-task path uses asyncio directly (futures, ``call_at`` timers, one task per
running request): anyio's primitives checkpoint on every await, which costs one event-loop
iteration (~15 us on a small VM) each, more than the whole budget of a task here. Executors are
free to use anyio; the scheduler runs under asyncio (including Jupyter's loop).
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
import random
import threading
import time
from collections.abc import Callable, Generator, Mapping
from typing import Any, Literal, Never

from ._admission import Admission
from ._options import given, reject_unknown
from ._registry import Registry
from ._task import Attempt, TaskHandle, TaskHost, TaskRecord
from ._threads import ThreadPool
from .config import Config
from .errors import (
    ConfigError,
    EdgeComputeError,
    ExecutorError,
    InfeasibleRequest,
    InvalidRequest,
    QueueFull,
    SchedulerClosed,
    TaskCancelled,
    TaskTimeout,
)
from .models import Request, Resources, Response, TaskEvent, TaskState
from .resources import Allocation, Capacity, ResourcePool, machine_capacity, resolve_capacity

__all__ = ["Scheduler", "SchedulerStats", "TaskHandle"]

log = logging.getLogger("edgecompute.scheduler")

_QUEUED = TaskState.QUEUED
_RUNNING = TaskState.RUNNING
_SUCCEEDED = TaskState.SUCCEEDED
_current_task = asyncio.current_task

SchedulerState = Literal["new", "running", "closing", "closed"]


class _NextTurn:
    """Awaited by a task of ours between two records: a bare yield, after which asyncio resumes
    the task in the loop's next turn (what a new task's first step would wait for)."""

    __slots__ = ()

    def __await__(self) -> Generator[None, None, None]:
        yield None


_NEXT_TURN = _NextTurn()
_copy_context = contextvars.copy_context


class _InContext:
    """Awaits ``awaitable`` with each of its steps run in ``context``: how a task of ours runs a
    record handed to it in that record's context (an asyncio task enters one context, its own,
    for all its steps; making a task per record for that is what handing over saves)."""

    __slots__ = ("awaitable", "context")

    def __init__(self, awaitable: Any, context: contextvars.Context) -> None:
        self.awaitable = awaitable
        self.context = context

    def __await__(self) -> Generator[Any, Any, Any]:
        run = self.context.run
        steps = run(self.awaitable.__await__)
        send, throw = steps.send, steps.throw
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                yielded = run(send, value) if error is None else run(throw, error)
            except StopIteration as stop:
                return stop.value
            value = error = None
            try:
                value = yield yielded  # a future, for the asyncio task to wait on
            except BaseException as exc:  # noqa: BLE001 - a cancellation (or close) goes to the code
                error = exc


def _covering(a: Resources, b: Resources) -> Resources:
    """The least resources that cover both ``a`` and ``b`` (one of them when it covers the other:
    admission groups queued tasks by the identity of their needs)."""
    if b.cpu >= a.cpu and b.memory_mb >= a.memory_mb and b.gpu_memory_mb >= a.gpu_memory_mb and b.gpus >= a.gpus:
        return b
    if a.cpu >= b.cpu and a.memory_mb >= b.memory_mb and a.gpu_memory_mb >= b.gpu_memory_mb and a.gpus >= b.gpus:
        return a
    return Resources(max(a.cpu, b.cpu), max(a.memory_mb, b.memory_mb), max(a.gpu_memory_mb, b.gpu_memory_mb),
                     max(a.gpus, b.gpus))


class SchedulerStats:
    """A snapshot of the scheduler's counters."""

    __slots__ = ("capacity", "finished", "in_use", "queued", "retrying", "running", "submitted")

    def __init__(self, queued: int, running: int, retrying: int, in_use: Resources, capacity: Resources,
                 submitted: int, finished: dict[str, int]) -> None:
        self.queued = queued
        self.running = running
        self.retrying = retrying
        self.in_use = in_use
        self.capacity = capacity
        self.submitted = submitted
        self.finished = finished

    def __repr__(self) -> str:
        return (f"SchedulerStats(queued={self.queued}, running={self.running}, retrying={self.retrying}, "
                f"in_use=({self.in_use}), submitted={self.submitted}, finished={self.finished})")


class Scheduler:
    """Runs requests on executors, in this process, under one asyncio event loop.

    ::

        async with Scheduler() as scheduler:
            response = await scheduler.run("cpp/gaussian_blur", {"image": img}, params={"sigma": 2})

    Arguments override the matching :class:`Config` keys; ``config`` defaults to
    ``Config.load()`` (``edgecompute.toml`` and ``EDGECOMPUTE_*``), and ``registry`` to
    ``Registry.discover()``, which the scheduler then owns and closes on exit.
    """

    def __init__(self, registry: Registry | None = None, *, capacity: Resources | Capacity | None = None,
                 max_queue: int | None = None, config: Config | None = None,
                 threads: int | None = None, timeout: float | None = None,
                 retries: int | None = None) -> None:
        config = Config.load() if config is None else config
        self.config = config
        self._owns_registry = registry is None
        self._registry = registry
        # a Resources is the capacity exactly; a mapping ({"cpu": 4}) replaces only the fields it
        # names, the others keep the configuration's or this machine's (docs/scheduler.md)
        try:
            self.capacity = resolve_capacity(capacity, config.capacity or machine_capacity())
        except (TypeError, ValueError) as exc:
            raise InvalidRequest(f"capacity: {exc}") from exc
        self.max_queue = max_queue if max_queue is not None else config.max_queue
        if self.max_queue < 1:
            raise InvalidRequest(f"max_queue must be >= 1, not {self.max_queue}")
        self._timeout = timeout if timeout is not None else config.timeout
        self._max_timeout = config.max_timeout
        if self._max_timeout is not None and self._timeout is not None and self._timeout > self._max_timeout:
            raise ConfigError(f"the default timeout ({self._timeout:g} s) is above max_timeout "
                              f"({self._max_timeout:g} s)")
        self._retries = retries if retries is not None else config.retries
        self._threads_wanted = threads or config.threads or max(4, int(self.capacity.cpu) or 1)
        limits: dict[str, int] = {
            name: int(settings["max_concurrency"])
            for name, settings in config.executors.items()
            if settings.get("max_concurrency")
        }
        self._pool = ResourcePool(self.capacity)
        self._admission: Admission[TaskRecord] = Admission(self._pool, config.aging, limits, self._start)
        self._active = 0  # tasks in the RUNNING state
        self._host = TaskHost(self._cancel, self._event, lambda: self._active)
        self._lingering = 0  # ended tasks whose blocking code still runs on a worker thread
        self._live = 0
        # running tasks and their records; a task leaves when its coroutine has really ended
        self._tasks: dict[asyncio.Task[None], TaskRecord] = {}
        # while a task of ours that may run another record stops its last one, it is free to take
        # the record that the stop admits (_start hands it over in _handed, see _execute)
        self._free_runner: asyncio.Task[None] | None = None
        self._handed: TaskRecord | None = None
        self._retry_records: set[TaskRecord] = set()
        self._observers: list[Callable[[TaskEvent], None]] = []
        self._space_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._idle_waiters: list[asyncio.Future[None]] = []
        self._submitted = 0
        self._finished: dict[str, int] = dict.fromkeys((s.value for s in TaskState if s.terminal), 0)
        self._last_feasible: Resources | None = None
        self._state: SchedulerState = "new"
        self._loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set on start
        self._threads: ThreadPool = None  # type: ignore[assignment]  # set on start

    # -- lifecycle --------------------------------------------------------------------------------

    @property
    def state(self) -> SchedulerState:
        """Where the scheduler is in its life: it takes tasks only while ``"running"``."""
        return self._state

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            self._registry = Registry.discover(settings=self.config.executors)
        return self._registry

    async def __aenter__(self) -> Scheduler:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: object) -> None:
        await self.aclose(cancel=exc is not None or self.config.close == "cancel")

    async def start(self) -> None:
        if self._state != "new":
            raise SchedulerClosed(f"a scheduler starts once; this one is {self._state}")
        self._loop = asyncio.get_running_loop()
        self._threads = ThreadPool(self._threads_wanted)
        self._host.loop, self._host.loop_thread, self._host.threads = self._loop, threading.get_ident(), self._threads
        registry = self.registry
        hook = getattr(registry, "plugin_manager", None)
        if hook is not None and hook.hook.task_event.get_hookimpls():
            self._observers.append(lambda event: hook.hook.task_event(event=event))
        self._state = "running"

    async def aclose(self, *, cancel: bool = False, timeout: float | None = None,
                     wait_for_threads: bool = True) -> None:
        """Stop taking tasks, then finish the queued ones (or cancel everything), then release
        executors and threads. Waits at most ``timeout`` (default: ``close_timeout``) for running
        tasks to stop after cancellation. With ``wait_for_threads=False`` it does not wait for
        blocking code of cancelled tasks still running on worker threads (which cannot be
        interrupted): those daemon threads are left to finish on their own (what ``Runtime`` does
        when its ``with`` block is left by an exception, such as KeyboardInterrupt)."""
        if self._state in ("closing", "closed"):
            return
        if self._state == "new":
            self._state = "closed"
            return
        self._state = "closing"
        grace = self.config.close_timeout if timeout is None else timeout
        try:
            if not cancel and self._live:
                try:
                    await self._wait_idle()
                except BaseException:
                    cancel = True  # the caller was cancelled while draining: cancel what is left
                    raise
        finally:
            if cancel or self._live:
                self._cancel_all()
            await self._wait_settled(grace, wait_for_threads)
            self._state = "closed"
            for waiter in self._space_waiters:
                if not waiter.done():
                    waiter.set_exception(SchedulerClosed("the scheduler closed while waiting for queue space"))
            # idle workers stop at once and are joined; one still inside a lingering call cannot be
            # stopped, so it is left behind (logged above) rather than waited for
            self._threads.close(wait=self._settled(), timeout=1.0)
            if self._owns_registry and self._registry is not None:
                await self._registry.aclose()

    def _settled(self) -> bool:
        return self._live == 0 and not self._tasks and self._lingering == 0

    async def _wait_idle(self, threads: bool = True) -> None:
        while not (self._settled() if threads else self._live == 0 and not self._tasks):
            waiter = self._loop.create_future()
            self._idle_waiters.append(waiter)
            await waiter

    async def _wait_settled(self, grace: float, threads: bool = True) -> None:
        try:
            await asyncio.wait_for(self._wait_idle(threads), grace)
        except TimeoutError:
            log.warning("%d task(s) and %d worker thread(s) were still running %.1f s after cancellation; "
                        "leaving them behind", len(self._tasks), self._lingering, grace)

    def _cancel_all(self) -> None:
        records = list(self._admission.waiting())
        records.extend(r for r in self._tasks.values() if not r.ended)
        records.extend(self._retry_records)
        for record in records:
            self._cancel(record, TaskCancelled(f"task {record.id} ({record.selection.qualified_name}) was "
                                               "cancelled: the scheduler closed"))

    # -- submitting -------------------------------------------------------------------------------

    def submit(self, request: Request, *, inline: bool = False) -> TaskHandle:
        """Queue ``request`` and return its handle at once.

        Raises, without queueing anything: ``UnknownAlgorithm``/``AmbiguousAlgorithm`` for a bad
        name, ``InfeasibleRequest`` when the task could never fit the capacity, ``QueueFull``
        when the queue is at its bound, ``SchedulerClosed`` after close began.

        With ``inline=True`` (from a coroutine on the scheduler's loop), a task that can start at
        once is set to run in the calling asyncio task, as :meth:`run` does: no task of its own,
        no loop round trip. Its ``handle.inline`` is then true, and the caller must ``await
        scheduler.run_inline(handle)`` (before which the task only counts as running).
        """
        caller = _current_task(self._loop) if inline else None
        if self._state == "running" and type(request) is Request and self._admission.queued < self.max_queue:
            record = self._enqueue(request, caller)  # _accept's checks passed: a call less per task
        else:
            record = self._accept(request, caller)
        handle = TaskHandle(record)
        if not record.ended:
            record.handle = handle  # tasks() gives back this one while the task lives
        return handle

    def _accept(self, request: Request, caller: asyncio.Task[Any] | None) -> TaskRecord:
        """submit() without the handle: the checks, then the queue (or a start at once)."""
        if self._state != "running":
            raise SchedulerClosed(
                "submit() needs a started scheduler: use 'async with Scheduler() as s'"
                if self._state == "new" else f"the scheduler is {self._state} and takes no new tasks"
            )
        if not isinstance(request, Request):
            raise InvalidRequest(f"submit() takes a Request, not {type(request).__name__}")
        if self._admission.queued >= self.max_queue:
            raise QueueFull(f"the queue holds {self._admission.queued} tasks, its bound (max_queue={self.max_queue}); "
                            "retry later or use 'await scheduler.asubmit(request)' to wait for room")
        return self._enqueue(request, caller)

    async def run_inline(self, handle: TaskHandle) -> None:
        """Run a task that ``submit(request, inline=True)`` set to run here; returns when it
        ended (see its handle for how). Nothing to do for any other handle. It must be awaited
        in the asyncio task that submitted the request: the task runs there."""
        if not handle.inline:
            return
        # an inline task's asyncio task is its submitter's, so that is where its record is found
        here = asyncio.current_task()
        record = self._tasks.get(here) if here is not None else None
        if record is None or record.handle is not handle:
            raise InvalidRequest(f"run_inline() for task {handle.id} must be awaited in the asyncio task that "
                                 "submitted it with inline=True")
        await self._execute(record)

    async def asubmit(self, request: Request) -> TaskHandle:
        """Like :meth:`submit`, but waits for room in the queue instead of raising ``QueueFull``."""
        await self._room()
        return self.submit(request)

    async def _room(self) -> None:
        # wait until the queue has room for one more (or the scheduler stops taking tasks)
        while self._state == "running" and self._admission.queued >= self.max_queue:
            waiter = self._loop.create_future()
            self._space_waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                self._pass_space_on(waiter)
                raise

    async def run(self, algorithm: str, inputs: Any = None, *, params: Mapping[str, Any] | None = None,
                  priority: int | None = None, timeout: float | None = None, resources: Resources | None = None,
                  metadata: Mapping[str, Any] | None = None, retries: int | None = None,
                  id: str | None = None, **unknown: Never) -> Response:
        """Build a :class:`Request`, wait for queue room, run it, and return its response.

        The keyword arguments are the other ``Request`` fields (None: the field's default); any
        other keyword is an ``InvalidRequest`` (and a type error for a type checker).
        """
        if unknown:
            reject_unknown(unknown)
        try:
            if params is None and priority is None and timeout is None and resources is None \
                    and metadata is None and retries is None and id is None:
                request = Request(algorithm, inputs)  # the usual call: no dict of options to build
            else:
                request = Request(algorithm, inputs, **given(params=params, priority=priority, timeout=timeout,
                                                             resources=resources, metadata=metadata,
                                                             retries=retries, id=id))
        except (TypeError, ValueError) as exc:
            raise InvalidRequest(str(exc)) from exc
        if self._state == "running" and self._admission.queued < self.max_queue:
            # our loop, not asyncio's look-up of the running one: the same loop while running
            # (its futures could not be awaited from another), and a call less per task
            record = self._enqueue(request, _current_task(self._loop))
        else:
            await self._room()
            record = self._accept(request, None)
        if record.inline and record.task is not None:
            # admitted at once: the task runs here, in the caller's task (a task that ended before
            # this step, because an observer of "started" cancelled it, has no task to run)
            await self._execute(record)
        if record.ended:  # the usual case after an inline run: no coroutine for result()
            if record.error is not None:
                raise record.error
            response = record.response()
            assert response is not None
            return response
        try:
            return await record.wait()
        finally:
            if not record.ended:
                self._cancel(record, record.cancelled_error())  # our caller gave up, so does the task

    def _enqueue(self, request: Request, caller: asyncio.Task[Any] | None = None) -> TaskRecord:
        """Queue a request, or start it at once when nothing waits and it fits.

        With ``caller`` (from :meth:`run`), a task that starts at once runs inline in the calling
        task instead of a task of its own: a sequential caller then pays no event-loop round
        trips, which are most of the latency of a short request.
        """
        selection = (self._registry or self.registry).select(request.algorithm)
        executor = selection.executor
        try:
            needs = executor.requirements(request)
        except EdgeComputeError:
            raise
        except Exception as exc:
            raise InvalidRequest(f"{selection.qualified_name}: requirements() failed for request "
                                 f"{request.id}: {type(exc).__name__}: {exc}") from exc
        if request.resources is not None:
            # a request may reserve more than its executor says it needs, never less: what it costs
            # the host must stay what the scheduler reserved (docs/security.md, rule 2)
            needs = _covering(needs, request.resources)
        if request.timeout is not None and self._max_timeout is not None and request.timeout > self._max_timeout:
            raise InvalidRequest(f"request {request.id}: timeout {request.timeout:g} s is above the ceiling "
                                 f"max_timeout = {self._max_timeout:g} s that this scheduler's operator set")
        if needs is not self._last_feasible:  # executors mostly hand back the same object: check it once
            if not self._pool.feasible(needs):
                raise InfeasibleRequest(
                    f"request {request.id} for {selection.qualified_name} needs {needs}, "
                    f"more than the scheduler's whole capacity ({self.capacity}); it could never run"
                )
            self._last_feasible = needs
        limits: tuple[str, ...] = ()
        if self._admission.limits and executor.name in self._admission.limits:  # mostly none has one
            limits = (executor.name,)
        if not selection.algorithm.thread_safe:
            limits += (selection.qualified_name,)
        now = time.monotonic()
        timeout = request.timeout if request.timeout is not None else self._timeout
        if timeout is None:
            timeout = self._max_timeout
        deadline = None if timeout is None else now + timeout
        record = TaskRecord(self._host, request, selection, needs, limits, deadline, now)
        if deadline is not None:
            record.timer = self._loop.call_at(deadline, self._expire, record)
        self._submitted += 1
        self._live += 1
        if self._observers:
            self._event("submitted", record)
        admission = self._admission
        if not admission.heap and not limits and not admission.dispatching:
            # nothing waits ahead of it: admit straight away if it fits, skipping the heap
            allocation = self._pool.try_acquire(needs)
            if allocation is not None:
                if caller is None and (request.retries if request.retries is not None else self._retries):
                    self._keep_context(record)  # for a retry, which starts from the queue
                self._start(record, allocation, caller, now)  # never counted as queued
                return record
        context = _copy_context()  # _keep_context, inline: once per queued task
        if len(context):
            record.context = context
        if admission.queue(record, now - request.priority * admission.aging):
            admission.dispatch()
        return record

    @staticmethod
    def _keep_context(record: TaskRecord) -> None:
        # a task that starts from the queue runs in a copy of the context it was submitted from,
        # taken now; one with nothing set is not kept (it runs in a fresh context)
        context = _copy_context()
        if len(context):
            record.context = context

    def _start(self, record: TaskRecord, allocation: Allocation, caller: asyncio.Task[Any] | None = None,
               now: float | None = None) -> None:
        # a task taken off the heap has left the queue count already, and taken its concurrency
        # slots; one admitted as it was submitted never entered the queue, and has no limits
        self._transition(record, _RUNNING)
        record.attempts += 1
        record.allocation = allocation
        # admitted as it was submitted: the same moment, and one clock read less
        record.started_at = time.monotonic() if now is None else now
        record.inline = caller is not None
        task: asyncio.Task[Any]
        if caller is not None:
            task = caller  # inline: run() awaits _execute itself in the caller's task right after this
        elif self._free_runner is not None:
            # the end of a task of ours admitted this one: that asyncio task runs it next (_execute)
            task, self._free_runner = self._free_runner, None
            self._handed = record
        else:
            # its code runs in a copy of the context it was submitted from: admitted at submission,
            # the task copies that itself; else it is what the record kept (or nothing was set),
            # not the context of whatever ended before it and admitted it
            context = None if now is not None else record.take_context() or contextvars.Context()
            task = self._loop.create_task(self._execute(record, own=True), context=context)
        record.task = task
        self._tasks[task] = record
        if self._observers:
            self._event("started", record)
        if self._space_waiters:
            self._wake_space()

    # -- running ----------------------------------------------------------------------------------

    async def _execute(self, record: TaskRecord, own: bool = False) -> None:
        """Run a started record's attempt to its end, in its caller's asyncio task (run(),
        run_inline()) or, ``own``, as the coroutine of an asyncio task of our own (_start).

        A task of our own then goes on with the record that the end of its last one admitted,
        if _start handed it over (see _free_runner): a burst of queued tasks costs an asyncio
        task per running slot, not one per task (making and ending those were the largest part
        of a queued task's cost after the executor's). Each next record begins in the loop's next
        turn, as in a task of its own: timers, I/O and other tasks go first, and a deadline that
        passed meanwhile ends it unstarted.
        """
        runner = record.task if own else None
        first = record  # runs in the asyncio task's own context (see _start)
        # no task: it ended before its first step (cancelled at once) and is already cleaned up
        while record.task is not None:
            selection = record.selection
            allocation = record.allocation
            assert allocation is not None
            # made at its first step, not at its start: a burst of tasks started at once then holds
            # one object less each while they wait for the loop (the cyclic GC ran a full collection
            # more per 20,000 such tasks); no attempt yet means its code has not begun
            record.attempt = attempt = Attempt(selection.algorithm, allocation.devices, record)
            free = None  # the runner, once this attempt ended without an exception to pass on
            try:
                # a record handed to this task runs in its own context, not the one of the record
                # before, unless both are empty: its submitter set nothing, nor has the code that
                # ran here before (the usual burst: a context to step through costs ~1 us a task)
                if record is first or (record.context is None and not len(_copy_context())):
                    response = await selection.executor.execute(record.request, attempt)
                else:
                    context = record.take_context() or contextvars.Context()
                    response = await _InContext(context.run(selection.executor.execute, record.request, attempt),
                                                context)
                if type(response) is not Response and not isinstance(response, Response):
                    raise ExecutorError(f"{selection.qualified_name} returned {type(response).__name__}, "
                                        "not a Response")
            except asyncio.CancelledError:
                if not self._absorb_cancel(record):
                    raise
                free = runner
            except Exception as exc:  # noqa: BLE001 - every failure becomes a terminal state or a retry
                self._failed(record, exc)
                free = runner
            except BaseException as exc:  # KeyboardInterrupt, SystemExit: end the task, then let it fly
                if not record.ended:
                    self._finish(record, TaskState.FAILED, error=exc)
                raise
            else:
                if not record.ended:
                    self._succeed(record, response)
                free = runner
            finally:
                # nothing waiting, nothing to hand over (the free path); and a cancellation still
                # pending (code that swallowed ours) would hit the next record: such a task takes none
                if free is None or not self._admission.heap or free.cancelling():
                    self._stopped(record)
                else:
                    self._free_runner = free
                    try:
                        self._stopped(record)  # may admit a record and hand it this task (_start)
                    finally:
                        self._free_runner = None
            handed = self._handed
            if handed is None:
                return
            self._handed = None
            try:
                await _NEXT_TURN
            except asyncio.CancelledError:
                # not our doing (we cancel no record that has not begun, see _cancel): the record
                # handed to this task ends with it
                if handed.task is runner:
                    if not handed.ended:
                        self._finish(handed, TaskState.CANCELLED, error=handed.cancelled_error())
                    self._stopped(handed)
                raise
            record = handed

    def _absorb_cancel(self, record: TaskRecord) -> bool:
        """Whether the task's code may swallow the CancelledError it got.

        We cancel a task only after _cancel gave the record its terminal state, and take that
        request back here: our own tasks go on to the next record (see _execute), and a task run
        inline is our caller's. Any other cancellation (of the asyncio task by someone else, or a
        CancelledError the code met) ends the record and goes on.
        """
        task = record.task
        if record.ended and task is not None and task.uncancel() == 0:
            return True
        if not record.ended:
            self._finish(record, TaskState.CANCELLED,
                         error=record.cancelled_error())
        return False

    def _succeed(self, record: TaskRecord, response: Response) -> None:
        record.finished_at = time.monotonic()  # the response, with its timings, is built when read
        if (record.timer is None and record.waiters is None and record.chunk_waiter is None
                and record.callbacks is None and not self._observers and not self._idle_waiters):
            # _finish for the usual task: nobody waits on it or watches it
            record.outputs, record.executor_timings = response.outputs, response.timings
            record.error = None
            self._transition(record, _SUCCEEDED)
        else:
            self._finish(record, _SUCCEEDED, outcome=response)

    def _failed(self, record: TaskRecord, exc: Exception) -> None:
        if record.ended:
            return  # it already ended (cancelled, timed out); this failure is the executor unwinding
        if isinstance(exc, EdgeComputeError):
            error: EdgeComputeError = exc
        else:
            error = ExecutorError(f"{record.selection.qualified_name} failed on task {record.id}: "
                                  f"{type(exc).__name__}: {exc}")
            error.__cause__ = exc
        retries = record.request.retries if record.request.retries is not None else self._retries
        if error.retryable and record.attempts <= retries and self._state == "running":
            delay = min(self.config.retry_backoff * 2 ** (record.attempts - 1), self.config.retry_backoff_max)
            delay *= random.uniform(0.5, 1.0)  # jitter: retries of a burst do not return in lockstep
            if record.deadline is None or time.monotonic() + delay < record.deadline:
                self._transition(record, _QUEUED)
                record.error = error  # kept for the record; cleared if a later attempt succeeds
                self._retry_records.add(record)
                self._event("retrying", record, error)
                self._loop.call_later(delay, self._requeue, record)
                return
        self._finish(record, TaskState.FAILED, error=error)

    def _requeue(self, record: TaskRecord) -> None:
        if record not in self._retry_records:
            return
        self._retry_records.discard(record)
        if record.state is not _QUEUED:
            return
        record.error = None
        admission = self._admission
        # a retry keeps its place: it re-enters with its original submission time and priority
        if admission.queue(record, admission.key(record.submitted_at, record.request.priority)):
            admission.dispatch()

    def _stopped(self, record: TaskRecord) -> None:
        task = record.task
        if task is None:
            return  # already stopped
        del self._tasks[task]
        record.task = None
        attempt = record.attempt
        # The attempt (the context) refers back to its record. Without this cycle both are freed by
        # reference counting as soon as the caller lets go, instead of piling up (with their
        # request and response) for the cyclic GC, which then ran every ~100 tasks. Nothing reads
        # a stopped attempt through the record: a next attempt (a retry) makes its own, and until
        # its first step no attempt means its code has not begun (see _cancel).
        record.attempt = None
        allocation, record.allocation = record.allocation, None
        if (attempt is None or attempt.threads_open == 0) and not record.limits:
            # the common case, without a closure
            if allocation is not None:
                self._pool.release(allocation)
            admission = self._admission
            if admission.heap and not admission.dispatching:
                admission.dispatching = True  # dispatch(), inline: once per completion
                try:
                    admission.admit()
                finally:
                    admission.dispatching = False
            if self._idle_waiters:
                self._check_idle()
            return
        self._stopped_slowly(record, attempt, allocation)

    def _stopped_slowly(self, record: TaskRecord, attempt: Attempt | None, allocation: Allocation | None) -> None:
        """_stopped's other cases: concurrency limits, or blocking code still on a worker thread.

        A method of its own so that _stopped does not make the closure's cells on every call.
        """
        lingering = attempt is not None and attempt.threads_open > 0
        if lingering:
            self._lingering += 1

        def release() -> None:
            if lingering:
                self._lingering -= 1
            if allocation is not None:
                self._pool.release(allocation)
            if record.limits:
                self._admission.free_slots(record.limits)
            if self._admission.heap:
                self._admission.dispatch()
            self._check_idle()

        # blocking code still running on a worker thread keeps its share until it returns
        if attempt is None:
            release()
        else:
            attempt.release_when_threads_done(release)
        if lingering and self._idle_waiters:
            self._check_idle()  # a close that does not wait for threads may go on

    # -- ending -----------------------------------------------------------------------------------

    def _expire(self, record: TaskRecord) -> None:
        record.timer = None
        if record.ended:
            return
        timeout = record.deadline - record.submitted_at if record.deadline else 0.0
        where = "running" if record.state is _RUNNING else "in the queue"
        self._cancel(record, TaskTimeout(
            f"task {record.id} ({record.selection.qualified_name}) passed its deadline of {timeout:g} s ({where}, "
            f"attempt {max(record.attempts, 1)})"), TaskState.TIMED_OUT)

    def _cancel(self, record: TaskRecord, error: EdgeComputeError,
                state: TaskState = TaskState.CANCELLED) -> bool:
        if record.ended:
            return False
        was_queued = record.state is _QUEUED
        if was_queued:
            if record in self._retry_records:
                self._retry_records.discard(record)
            else:
                self._admission.ended(record.limits)
                self._wake_space()
        self._finish(record, state, error=error)
        if was_queued and self._admission.heap:
            self._admission.dispatch()  # it may have held back tasks behind it (backfill)
        attempt, task = record.attempt, record.task
        if not was_queued:
            if attempt is not None:
                attempt.cancelled = True
            if task is not None:
                if attempt is None:
                    # cancelled before its first step: its code never runs, so nothing would
                    # reach the finally that cleans up. The asyncio task is left alone: an inline
                    # caller's is not ours, and one of ours finds no record to run (_execute)
                    self._stopped(record)
                else:
                    task.cancel()
        return True

    def _finish(self, record: TaskRecord, state: TaskState, *, outcome: Response | None = None,
                error: BaseException | None = None) -> None:
        if outcome is not None:
            record.outputs, record.executor_timings = outcome.outputs, outcome.timings
        record.error = error
        self._transition(record, state)
        if record.timer is not None:
            record.timer.cancel()
            record.timer = None
        waiters = record.waiters
        if waiters is not None:
            record.waiters = None
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
        if record.chunk_waiter is not None:
            record.wake_stream()
        if record.callbacks is not None:
            callbacks, record.callbacks = record.callbacks, None
            for callback, handle in callbacks:
                try:
                    callback(handle)
                except Exception:
                    log.exception("done callback %r of task %s failed", callback, record.id)
        if self._observers:
            self._event(state._value_, record, error)
        if self._idle_waiters:
            self._check_idle()

    def _transition(self, record: TaskRecord, state: TaskState) -> None:
        """Give a task its next state: the one place that keeps the task counters in step with the
        states (running, live, finished by state).

        Where a waiting task waits is not a state: the queue counts its own tasks (``_admission``),
        and a task waiting out a retry's backoff is in ``_retry_records``.
        """
        before = record.state
        record.state = state
        if before is _RUNNING:
            self._active -= 1
        if state is _RUNNING:
            self._active += 1
        elif state is not _QUEUED:
            record.ended = True
            record.handle = None  # the back link a live task's handle needs (see _task); a cycle else
            self._finished[state._value_] += 1  # _value_: the plain attribute behind the slow .value
            self._live -= 1

    def _check_idle(self) -> None:
        # wakes when no task is live: each waiter checks its own condition (_wait_idle), which may
        # also ask for worker threads of cancelled tasks to have returned
        if self._idle_waiters and self._live == 0 and not self._tasks:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def _wake_space(self) -> None:
        waiters = self._space_waiters
        while waiters and self._admission.queued < self.max_queue:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _pass_space_on(self, waiter: asyncio.Future[None]) -> None:
        # a cancelled waiter that had already been woken hands its turn to the next one
        if waiter.done() and not waiter.cancelled():
            self._wake_space()
        else:
            try:
                self._space_waiters.remove(waiter)
            except ValueError:
                pass

    # -- observing --------------------------------------------------------------------------------

    def subscribe(self, observer: Callable[[TaskEvent], None]) -> Callable[[], None]:
        """Call ``observer(event)`` on every task event, on the loop; returns an unsubscribe
        function. Observers must be quick; their exceptions are logged and ignored."""
        self._observers.append(observer)

        def unsubscribe() -> None:
            if observer in self._observers:
                self._observers.remove(observer)

        return unsubscribe

    def _event(self, kind: str, record: TaskRecord, error: BaseException | None = None) -> None:
        if not self._observers:
            return
        selection = record.selection
        event = TaskEvent(kind, record.id, selection.qualified_name, selection.executor.name, record.state,
                          time.time(), error, record.progress)
        for observer in list(self._observers):
            try:
                observer(event)
            except Exception:
                log.exception("task observer %r failed on %s", observer, kind)

    def tasks(self) -> list[TaskHandle]:
        """The tasks queued, waiting to retry or running now, oldest submission first.

        A snapshot: the handles are live (their ``state`` moves on), but tasks submitted later are
        not in the list. Ended tasks are not kept (observe them with :meth:`subscribe`).
        """
        seen: dict[int, TaskRecord] = {}
        for record in self._admission.waiting():
            seen[id(record)] = record
        for record in self._tasks.values():
            seen[id(record)] = record
        for record in self._retry_records:
            seen[id(record)] = record
        # the heap keeps entries of tasks that ended while queued until it reaches them
        live = [record for record in seen.values() if not record.ended]
        live.sort(key=lambda record: record.submitted_at)
        return [record.public() for record in live]

    def task(self, task_id: str) -> TaskHandle | None:
        """The live task whose id (its request's ``id``) is ``task_id``, or None if there is none
        (unknown, or ended: the scheduler keeps no history)."""
        for handle in self.tasks():
            if handle.id == task_id:
                return handle
        return None

    def stats(self) -> SchedulerStats:
        return SchedulerStats(self._admission.queued, self._active, len(self._retry_records), self._pool.in_use,
                              self.capacity, self._submitted, dict(self._finished))

    @property
    def idle(self) -> bool:
        """True when no task is queued, retrying or running and every resource is back."""
        return self._settled() and self._pool.idle
