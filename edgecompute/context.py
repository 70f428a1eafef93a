"""What a running task sees: its request, a way to stream, progress, cancellation, threads."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from .models import Algorithm

__all__ = ["TaskContext"]

T = TypeVar("T")


class TaskContext:
    """Handed to ``Executor.execute``; one per attempt of a task.

    Everything here may be called from the event loop. ``emit_nowait``, ``progress`` and
    ``cancelled`` may also be called from a worker thread running the task's blocking code.

    This class says what an executor may use; the scheduler gives each attempt a subclass that
    also holds the attempt's own bookkeeping (one object an attempt: a second one per task made the
    cyclic GC run measurably more often), and the placement worker has its own.
    """

    __slots__ = ("algorithm", "devices")

    def __init__(self, algorithm: Algorithm, devices: tuple[int, ...]) -> None:
        #: The algorithm being run (its bare name is ``algorithm.name``).
        self.algorithm = algorithm
        #: GPU device indices the scheduler gave this task (empty when it asked for none).
        self.devices = devices

    @property
    def task_id(self) -> str:
        """The task's id (the request's id)."""
        raise NotImplementedError

    @property
    def deadline(self) -> float | None:
        """The task's deadline on the ``time.monotonic()`` clock, or None."""
        raise NotImplementedError

    def time_left(self) -> float | None:
        """Seconds until the deadline (never negative), or None when the task has none."""
        deadline = self.deadline
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    @property
    def running(self) -> int:
        """How many tasks the scheduler is running right now, this one included. An executor may
        block the event loop for a short wait when its task is the only one: nothing else then
        needs the loop (edgecompute-cpp's ``block_below_us`` does)."""
        raise NotImplementedError

    @property
    def cancelled(self) -> bool:
        """True once the task is cancelled or timed out; blocking code should poll it and stop."""
        raise NotImplementedError

    async def emit(self, chunk: Any) -> None:
        """Stream one chunk to whoever reads ``TaskHandle.stream()``."""
        raise NotImplementedError

    def emit_nowait(self, chunk: Any) -> None:
        """Like :meth:`emit`; safe to call from the task's worker thread."""
        raise NotImplementedError

    def progress(self, done: float, total: float | None = None) -> None:
        """Report progress as a fraction (``done`` alone, 0..1) or as ``done`` of ``total``."""
        raise NotImplementedError

    def run_sync(self, fn: Callable[..., T], *args: Any) -> Awaitable[T]:
        """Run blocking ``fn(*args)`` on a worker thread: ``await ctx.run_sync(fn, *args)``.

        If the task is cancelled meanwhile, the caller sees the cancellation at once; the thread
        runs to its end and the task's resources stay reserved until it does, so the pool never
        hands out more than it has.
        """
        raise NotImplementedError
