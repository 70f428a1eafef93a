"""What a running task sees: its request, a way to stream, progress, cancellation, threads."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from .models import Algorithm

if TYPE_CHECKING:
    from ._task import Attempt, TaskRecord

__all__ = ["TaskContext"]

T = TypeVar("T")


class TaskContext:
    """Handed to ``Executor.execute``; one per attempt of a task.

    Everything here may be called from the event loop. ``emit_nowait``, ``progress`` and
    ``cancelled`` may also be called from a worker thread running the task's blocking code.

    The scheduler makes these; a subclass that runs tasks elsewhere (the placement worker)
    passes no record and overrides what reads it (``task_id``, ``deadline``, ``running``,
    ``emit``, ``progress``, ``run_sync``).
    """

    __slots__ = ("_attempt", "_record", "algorithm", "devices")

    def __init__(self, algorithm: Algorithm, devices: tuple[int, ...], attempt: Attempt,
                 record: TaskRecord | None = None) -> None:
        #: The algorithm being run (its bare name is ``algorithm.name``).
        self.algorithm = algorithm
        #: GPU device indices the scheduler gave this task (empty when it asked for none).
        self.devices = devices
        self._attempt = attempt
        self._record: TaskRecord = record  # type: ignore[assignment]  # None only in a subclass

    @property
    def task_id(self) -> str:
        return self._record.id

    @property
    def deadline(self) -> float | None:
        """The task's deadline on the ``time.monotonic()`` clock, or None."""
        return self._record.deadline

    def time_left(self) -> float | None:
        """Seconds until the deadline (never negative), or None when the task has none."""
        deadline = self.deadline
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    @property
    def running(self) -> int:
        """How many tasks the scheduler is running right now, this one included. An executor may
        block the event loop for a short wait when its task is the only one: nothing else then
        needs the loop (edgecompute-cpp's ``block_below_us`` does)."""
        return self._record.host.running()

    @property
    def cancelled(self) -> bool:
        """True once the task is cancelled or timed out; blocking code should poll it and stop."""
        return self._attempt.cancelled

    async def emit(self, chunk: Any) -> None:
        """Stream one chunk to whoever reads ``TaskHandle.stream()``."""
        self._record.push_chunk(chunk)

    def emit_nowait(self, chunk: Any) -> None:
        """Like :meth:`emit`; safe to call from the task's worker thread."""
        record = self._record
        if record.host.on_loop_thread():
            record.push_chunk(chunk)
        else:
            record.host.call_soon_threadsafe(record.push_chunk, chunk)

    def progress(self, done: float, total: float | None = None) -> None:
        """Report progress as a fraction (``done`` alone, 0..1) or as ``done`` of ``total``."""
        fraction = done / total if total else done
        record = self._record
        if record.host.on_loop_thread():
            record.set_progress(fraction)
        else:
            record.host.call_soon_threadsafe(record.set_progress, fraction)

    async def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking ``fn(*args)`` on a scheduler worker thread.

        If the task is cancelled meanwhile, the caller sees the cancellation at once; the thread
        runs to its end and the task's resources stay reserved until it does, so the pool never
        hands out more than it has.
        """
        attempt = self._attempt
        future = self._record.host.threads.submit(fn, *args, on_done=attempt.thread_finished)
        attempt.threads_open += 1  # after submit: a pool that refuses the call leaves nothing to wait for
        return await future
