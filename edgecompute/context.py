"""What a running task sees: its request, a way to stream, progress, cancellation, threads."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from .models import Algorithm

if TYPE_CHECKING:
    from ._scheduler import TaskHandle

__all__ = ["TaskContext"]

T = TypeVar("T")


class TaskContext:
    """Handed to ``Executor.execute``; one per attempt of a task.

    Everything here may be called from the event loop. ``emit_nowait``, ``progress`` and
    ``cancelled`` may also be called from a worker thread running the task's blocking code.
    """

    __slots__ = (
        "_cancelled",
        "_entered",
        "_handle",
        "_on_threads_done",
        "_threads_open",
        "algorithm",
        "devices",
    )

    def __init__(self, handle: TaskHandle, algorithm: Algorithm, devices: tuple[int, ...]) -> None:
        self._handle = handle
        #: The algorithm being run (its bare name is ``algorithm.name``).
        self.algorithm = algorithm
        #: GPU device indices the scheduler gave this task (empty when it asked for none).
        self.devices = devices
        # a plain bool, not a threading.Event: worker threads only ever read it, and the GIL makes
        # that read safe; an Event per task cost more than the rest of the context together
        self._cancelled = False
        self._entered = False
        self._threads_open = 0
        self._on_threads_done: Callable[[], None] | None = None

    @property
    def task_id(self) -> str:
        return self._handle.id

    @property
    def deadline(self) -> float | None:
        """The task's deadline on the ``time.monotonic()`` clock, or None."""
        return self._handle._deadline

    def time_left(self) -> float | None:
        """Seconds until the deadline (never negative), or None when the task has none."""
        deadline = self._handle._deadline
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    @property
    def running(self) -> int:
        """How many tasks the scheduler is running right now, this one included. An executor may
        block the event loop for a short wait when its task is the only one: nothing else then
        needs the loop (edgecompute-cpp's ``wait_below_us`` does)."""
        return self._handle._scheduler._active

    @property
    def cancelled(self) -> bool:
        """True once the task is cancelled or timed out; blocking code should poll it and stop."""
        return self._cancelled

    async def emit(self, chunk: Any) -> None:
        """Stream one chunk to whoever reads ``TaskHandle.stream()``."""
        self._handle._push_chunk(chunk)

    def emit_nowait(self, chunk: Any) -> None:
        """Like :meth:`emit`; safe to call from the task's worker thread."""
        handle = self._handle
        if handle._scheduler._on_loop_thread():
            handle._push_chunk(chunk)
        else:
            handle._scheduler._call_soon_threadsafe(handle._push_chunk, chunk)

    def progress(self, done: float, total: float | None = None) -> None:
        """Report progress as a fraction (``done`` alone, 0..1) or as ``done`` of ``total``."""
        fraction = done / total if total else done
        handle = self._handle
        if handle._scheduler._on_loop_thread():
            handle._set_progress(fraction)
        else:
            handle._scheduler._call_soon_threadsafe(handle._set_progress, fraction)

    async def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking ``fn(*args)`` on a scheduler worker thread.

        If the task is cancelled meanwhile, the caller sees the cancellation at once; the thread
        runs to its end and the task's resources stay reserved until it does, so the pool never
        hands out more than it has.
        """
        future = self._handle._scheduler._threads.submit(fn, *args, on_done=self._thread_finished)
        self._threads_open += 1  # after submit: a pool that refuses the call leaves nothing to wait for
        return await future

    def _thread_finished(self) -> None:
        self._threads_open -= 1
        if self._threads_open == 0 and self._on_threads_done is not None:
            callback, self._on_threads_done = self._on_threads_done, None
            callback()

    def _release_when_threads_done(self, release: Callable[[], None]) -> None:
        if self._threads_open == 0:
            release()
        else:
            self._on_threads_done = release
