"""A task as the scheduler keeps it (:class:`TaskRecord`) and as its submitter holds it
(:class:`TaskHandle`), plus what both need of the scheduler (:class:`TaskHost`) and one attempt
(:class:`Attempt`: the executor's context and the attempt's bookkeeping in one object).

The record has every field the scheduler, the admission queue and the task's context work with;
its fields are public by name because they are this package's to share, and the module is private.
The handle is the small public face: state, result, stream, cancel. Keeping them apart lets the
scheduler change its bookkeeping without changing what users hold, and lets ``Scheduler.run``
skip the handle entirely (it works on the record).

Ownership of references (so that a finished task is freed by reference counting, not by the cyclic
GC): a handle refers to its record; a record refers back to its handle only while the task is live
(``tasks()`` must give back the same handle), and the scheduler drops that link when the task ends.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from .context import TaskContext
from .errors import EdgeComputeError, InvalidRequest, TaskCancelled
from .models import Algorithm, Request, Resources, Response, TaskState

if TYPE_CHECKING:
    from ._registry import Selection
    from ._threads import ThreadPool
    from .resources import Allocation

__all__ = ["Attempt", "TaskHandle", "TaskHost", "TaskRecord"]

log = logging.getLogger("edgecompute.scheduler")

T = TypeVar("T")

_QUEUED = TaskState.QUEUED
_RUNNING = TaskState.RUNNING
_SUCCEEDED = TaskState.SUCCEEDED


class TaskHost:
    """What a task's record, handle and context use of the scheduler that runs them. The scheduler
    fills it in (its loop and threads once started); none of them reads the scheduler itself."""

    __slots__ = ("cancel", "event", "loop", "loop_thread", "running", "threads")

    def __init__(self, cancel: Callable[[TaskRecord, EdgeComputeError], bool],
                 event: Callable[[str, TaskRecord], None], running: Callable[[], int]) -> None:
        #: ends a live task with the given error (the scheduler's cancel path)
        self.cancel = cancel
        #: tells the scheduler's observers about a task
        self.event = event
        #: how many tasks run now
        self.running = running
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set on start
        self.loop_thread = 0
        self.threads: ThreadPool = None  # type: ignore[assignment]  # set on start

    def on_loop_thread(self) -> bool:
        return threading.get_ident() == self.loop_thread

    def call_soon_threadsafe(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass  # the loop is closed: the task has long ended


class Attempt(TaskContext):
    """One attempt of a task: the context its executor gets, and the attempt's bookkeeping the
    scheduler keeps: whether it is cancelled, and the worker threads it still has running (which
    keep its resources reserved until they return). Made when the attempt's code begins."""

    __slots__ = ("cancelled", "on_threads_done", "record", "threads_open")
    cancelled: bool  # a settable slot where TaskContext has a read-only property

    def __init__(self, algorithm: Algorithm, devices: tuple[int, ...], record: TaskRecord) -> None:
        # TaskContext.__init__'s two fields, set here: one call less per task
        self.algorithm = algorithm
        self.devices = devices
        self.record = record
        # a plain bool, not a threading.Event: worker threads only ever read it, and the GIL makes
        # that read safe; an Event per task cost more than the rest of the context together
        self.cancelled = False
        self.threads_open = 0
        self.on_threads_done: Callable[[], None] | None = None

    @property
    def task_id(self) -> str:
        return self.record.id

    @property
    def deadline(self) -> float | None:
        return self.record.deadline

    @property
    def running(self) -> int:
        return self.record.host.running()

    async def emit(self, chunk: Any) -> None:
        self.record.push_chunk(chunk)

    def emit_nowait(self, chunk: Any) -> None:
        record = self.record
        if record.host.on_loop_thread():
            record.push_chunk(chunk)
        else:
            record.host.call_soon_threadsafe(record.push_chunk, chunk)

    def progress(self, done: float, total: float | None = None) -> None:
        fraction = done / total if total else done
        record = self.record
        if record.host.on_loop_thread():
            record.set_progress(fraction)
        else:
            record.host.call_soon_threadsafe(record.set_progress, fraction)

    def run_sync(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        # the pool's future itself, not a coroutine awaiting it: a burst of blocking tasks waits
        # here by the thousand, and a coroutine each was one more object for the cyclic GC to walk
        # the pool runs it in a copy of this context (the task's): see _threads
        future = self.record.host.threads.submit(fn, *args, on_done=self.thread_finished)
        self.threads_open += 1  # after submit: a pool that refuses the call leaves nothing to wait for
        return future

    def thread_finished(self) -> None:
        self.threads_open -= 1
        if self.threads_open == 0 and self.on_threads_done is not None:
            callback, self.on_threads_done = self.on_threads_done, None
            callback()

    def release_when_threads_done(self, release: Callable[[], None]) -> None:
        if self.threads_open == 0:
            release()
        else:
            self.on_threads_done = release


class TaskRecord:
    """The scheduler's record of one task: what it needs, where it is, how it ended, who waits."""

    __slots__ = (
        "allocation",
        "attempt",
        "attempts",
        "callbacks",
        "chunk_waiter",
        "chunks",
        "context",
        "deadline",
        "ended",
        "error",
        "executor_timings",
        "finished_at",
        "handle",
        "host",
        "id",
        "inline",
        "limits",
        "needs",
        "outputs",
        "progress",
        "request",
        "selection",
        "started_at",
        "state",
        "streaming",
        "submitted_at",
        "task",
        "timer",
        "waiters",
    )

    def __init__(self, host: TaskHost, request: Request, selection: Selection, needs: Resources,
                 limits: tuple[str, ...], deadline: float | None, now: float) -> None:
        self.id = request.id
        self.request = request
        self.state = _QUEUED
        self.progress: float | None = None
        self.attempts = 0
        self.host = host
        self.selection = selection
        self.needs = needs
        #: the concurrency-limit keys the task holds a slot of while it runs
        self.limits = limits
        self.deadline = deadline
        self.timer: asyncio.TimerHandle | None = None
        #: the outputs and timings of the executor's response, once the task succeeded (see
        #: response()): kept apart, not as that Response, so a finished task holds one object
        #: less for the cyclic GC while its handle lives (measured: the queued burst)
        self.outputs: Any = None
        self.executor_timings: Mapping[str, float] | None = None
        self.finished_at = 0.0
        self.error: BaseException | None = None
        self.waiters: list[asyncio.Future[None]] | None = None
        self.chunks: collections.deque[Any] | None = None
        self.chunk_waiter: asyncio.Future[None] | None = None
        self.task: asyncio.Task[None] | None = None
        self.allocation: Allocation | None = None
        self.attempt: Attempt | None = None
        self.submitted_at = now
        self.started_at = 0.0
        self.streaming = False
        self.ended = False  # state is terminal; a plain bool because enum hashing is slow
        self.inline = False  # runs in the task that called Scheduler.run, not a task of its own
        #: (callback, the handle it was added on), called when the task ends
        self.callbacks: list[tuple[Callable[[TaskHandle], None], TaskHandle]] | None = None
        self.handle: TaskHandle | None = None
        #: a copy of the context it was submitted from, for a queued task submitted from a
        #: context with anything set (see Scheduler._enqueue)
        self.context: contextvars.Context | None = None

    def take_context(self) -> contextvars.Context | None:
        """A copy of the context to run an attempt of the record's code in (None: a fresh empty
        one): what one attempt sets is seen by no other attempt."""
        context = self.context
        return None if context is None else context.copy()

    def __repr__(self) -> str:
        return f"<TaskRecord {self.id} {self.selection.qualified_name} {self.state.value}>"

    def public(self) -> TaskHandle:
        """The task's handle (the same one while it lives)."""
        handle = self.handle
        if handle is None:
            handle = TaskHandle(self)
            if not self.ended:
                self.handle = handle
        return handle

    def cancelled_error(self) -> TaskCancelled:
        return TaskCancelled(f"task {self.id} ({self.selection.qualified_name}) was cancelled")

    async def wait(self, timeout: float | None = None) -> Response:
        """Wait for the task to end; return its response or raise its error (TaskHandle.result)."""
        if not self.ended:
            waiter = self.host.loop.create_future()
            if self.waiters is None:
                self.waiters = [waiter]
            else:
                self.waiters.append(waiter)
            if timeout is None:
                await waiter
            else:
                try:
                    await asyncio.wait_for(waiter, timeout)
                except TimeoutError:
                    if self.waiters is not None and waiter in self.waiters:
                        self.waiters.remove(waiter)
                    raise TimeoutError(f"task {self.id} ({self.selection.qualified_name}) did not end within "
                                       f"{timeout:g} s; it is still {self.state.value}") from None
        if self.error is not None:
            raise self.error
        response = self.response()
        assert response is not None
        return response

    def response(self) -> Response | None:
        """The response of a task that succeeded: the executor's outputs, its name and the
        timings. Built each time it is asked for, not kept: a finished task then holds two objects
        less until its handle goes (this response and the executor's), which the cyclic GC
        measurably feels in a burst of queued tasks."""
        if self.state is not _SUCCEEDED:
            return None
        started, submitted, finished = self.started_at, self.submitted_at, self.finished_at
        timings = {"queued": started - submitted, "run": finished - started, "total": finished - submitted}
        if self.executor_timings:
            timings = {**self.executor_timings, **timings}
        return Response(self.outputs, self.selection.executor.name, timings)

    async def stream(self) -> AsyncIterator[Any]:
        """TaskHandle.stream: the chunks, in order, until the task ends."""
        if self.streaming:
            raise InvalidRequest(f"task {self.id} is already being streamed by another reader: a task's chunks "
                                 "go to one reader, each chunk once; read them in one place and share them")
        self.streaming = True
        try:
            while True:
                chunks = self.chunks
                while chunks:
                    # a chunk leaves the buffer once the reader comes back for the next one: a reader
                    # that fails while handling it leaves it for the next reader (nothing is lost)
                    yield chunks[0]
                    chunks.popleft()
                if self.ended:
                    break
                self.chunk_waiter = self.host.loop.create_future()
                await self.chunk_waiter
            if self.error is not None:
                raise self.error
        finally:
            self.streaming = False

    # -- called by the scheduler and the task context, on the loop ------------------------------

    def push_chunk(self, chunk: Any) -> None:
        if self.ended:
            return  # a late chunk from a cancelled task: nobody may read it any more
        if self.chunks is None:
            self.chunks = collections.deque()
        self.chunks.append(chunk)
        self.wake_stream()

    def wake_stream(self) -> None:
        waiter = self.chunk_waiter
        if waiter is not None:
            self.chunk_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def set_progress(self, fraction: float) -> None:
        if self.state is _RUNNING:
            self.progress = fraction
            self.host.event("progress", self)


class TaskHandle:
    """A submitted task: its state, its result, its stream of chunks, and a way to cancel it."""

    __slots__ = ("_record", "id", "request")

    def __init__(self, record: TaskRecord) -> None:
        self._record = record
        self.id = record.id
        self.request = record.request

    def __repr__(self) -> str:
        return f"<TaskHandle {self.id} {self.algorithm} {self.state.value}>"

    @property
    def state(self) -> TaskState:
        return self._record.state

    @property
    def progress(self) -> float | None:
        """The last progress the executor reported, 0..1, or None."""
        return self._record.progress

    @property
    def attempts(self) -> int:
        """How many times the task has started (more than one after retries)."""
        return self._record.attempts

    @property
    def algorithm(self) -> str:
        """The qualified name of the algorithm running this task (``executor/algorithm``)."""
        return self._record.selection.qualified_name

    @property
    def executor(self) -> str:
        return self._record.selection.executor.name

    @property
    def resources(self) -> Resources:
        """What the task reserves while it runs."""
        return self._record.needs

    def done(self) -> bool:
        return self._record.ended

    def exception(self) -> BaseException | None:
        """The error the task ended with, None if it succeeded; only valid once done."""
        record = self._record
        if not record.ended:
            raise InvalidRequest(f"task {self.id} has not finished ({record.state.value})")
        return record.error

    @property
    def response(self) -> Response | None:
        """The response of a task that succeeded; None while it runs or when it failed."""
        return self._record.response()

    def drop_outputs(self) -> None:
        """Let go of a finished task's outputs (its response keeps the rest): for a holder of many
        finished handles that must bound the memory their results keep."""
        self._record.outputs = None

    @property
    def inline(self) -> bool:
        """Whether the task waits to run in the asyncio task that submitted it with
        ``Scheduler.submit(request, inline=True)``: that task must then ``await
        scheduler.run_inline(handle)``."""
        record = self._record
        return record.inline and record.task is not None and not record.ended

    @property
    def streaming(self) -> bool:
        """Whether a reader is in :meth:`stream` now (one at a time)."""
        return self._record.streaming

    def result(self, timeout: float | None = None) -> Coroutine[Any, Any, Response]:
        """Wait for the task to end; return its response or raise its error.

        ``timeout`` (seconds) bounds the wait: past it, ``TimeoutError`` is raised and the task
        goes on (cancel it with :meth:`cancel`). Cancelling the caller does not cancel the task
        either. ``await handle`` is ``await handle.result()``.
        """
        # the record's coroutine itself, not one of our own around it: a frame less per task
        return self._record.wait(timeout)

    def __await__(self) -> Generator[Any, None, Response]:
        return self._record.wait().__await__()

    def add_done_callback(self, callback: Callable[[TaskHandle], None]) -> None:
        """Call ``callback(handle)`` on the loop when the task ends (at once if it has)."""
        record = self._record
        if record.ended:
            callback(self)
        elif record.callbacks is None:
            record.callbacks = [(callback, self)]
        else:
            record.callbacks.append((callback, self))

    def cancel(self) -> bool:
        """Cancel the task, queued or running. Returns False if it had already ended."""
        record = self._record
        if record.ended:
            return False  # Runtime.run() asks so of every task it ran: no error to build for it
        return record.host.cancel(record, record.cancelled_error())

    def stream(self) -> AsyncIterator[Any]:
        """Yield the chunks the executor emits, in order, until the task ends.

        Chunks emitted before the stream starts are kept and yielded first. One reader at a time.
        If the task fails, the error is raised after the last chunk.
        """
        return self._record.stream()
