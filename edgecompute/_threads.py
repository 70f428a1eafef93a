"""Worker threads for blocking executor code, with cheap hand-back to the event loop.

``anyio.to_thread`` costs ~110 us a call here, mostly one loop wake-up per call. This pool wakes
the loop at most once per *batch* of finished calls: a worker appends its result to a deque and
only schedules a drain when none is pending, so a burst of short calls shares one wake-up.

A call goes to the thread that went idle last (a stack, not a queue). A sequential caller then
always lands on the same thread, whose caches and thread-local pools are warm: torch's OpenMP
team, for one, belongs to the thread that calls it, and a call on a thread whose team has gone to
sleep pays for waking it (measured: +5-20% on a 10 ms MiniLM forward when calls rotated through
the pool's threads).

A call runs in a copy of the context it was submitted from, as with ``asyncio.to_thread``: a
thread runs the calls of many tasks, and shows each its own context variables and none that
another call set. A call from a context with nothing set runs in a fresh one, made on the thread
(a burst of calls waiting for a thread then holds no context each).
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import itertools
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["ThreadPool"]

T = TypeVar("T")

_STOP = object()
# pools are numbered in the thread names: the threads of two schedulers in one process are told
# apart (in a debugger, and by a check that a closed scheduler joined its own threads)
_POOL_NUMBERS = itertools.count(1)
_copy_context = contextvars.copy_context
_Context = contextvars.Context


class _Parked:
    """An idle worker: it sleeps on ``wake`` until a call is handed to it in ``item``."""

    __slots__ = ("item", "wake")

    def __init__(self) -> None:
        self.item: Any = None
        self.wake = threading.Lock()
        self.wake.acquire()


class ThreadPool:
    def __init__(self, size: int, name: str = "edgecompute-worker") -> None:
        if size < 1:
            raise ValueError(f"thread pool size must be >= 1, not {size}")
        self.size = size
        self._name = f"{name}-{next(_POOL_NUMBERS)}"
        self._lock = threading.Lock()
        self._idle: list[_Parked] = []  # a stack: the last to go idle is woken first
        self._backlog: collections.deque[Any] = collections.deque()  # calls no idle thread took
        self._done: collections.deque[Any] = collections.deque()
        self._drain_pending = False
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on a worker thread and return its result.

        If the awaiting task is cancelled the call still runs to its end (threads cannot be
        interrupted); the caller decides what waiting for that means.
        """
        return await self.submit(fn, *args)

    def submit(
        self, fn: Callable[..., T], *args: Any, on_done: Callable[[], None] | None = None
    ) -> asyncio.Future[T]:
        """Like :meth:`run`, but returns the future at once.

        ``on_done`` is called on the loop when the call has really finished, even when the future
        was cancelled long before: the thread's end is what frees what it was using.
        """
        if self._closed:
            raise RuntimeError("thread pool is closed")
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        if not self._threads:
            self._start_threads()
        context = _copy_context()
        self._hand((future, fn, args, on_done, context if len(context) else None))
        return future

    def _hand(self, item: Any) -> None:
        with self._lock:
            if not self._idle:
                self._backlog.append(item)
                return
            parked = self._idle.pop()
        parked.item = item
        parked.wake.release()

    def _start_threads(self) -> None:
        # all at once: an idle thread parked on its lock costs nothing, and counting idle
        # threads to start them one by one would add work to every call
        for index in range(self.size):
            thread = threading.Thread(target=self._worker, name=f"{self._name}-{index}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def _next(self, parked: _Parked) -> Any:
        """The next call for this thread: a queued one, else park and wait to be handed one."""
        with self._lock:
            if self._backlog:
                return self._backlog.popleft()
            self._idle.append(parked)
        return None

    def _worker(self) -> None:
        parked = _Parked()
        item = self._next(parked)
        while True:
            if item is None:
                parked.wake.acquire()
                item, parked.item = parked.item, None
            if item is _STOP:
                return
            future, fn, args, on_done, context = item
            try:
                result = (True, (context or _Context()).run(fn, *args))
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task as is
                result = (False, exc)
            # idle (or holding the next queued call) before the result goes back: the caller's next
            # call, made as soon as it has this result, must find this thread on top of the stack
            item = self._next(parked)
            self._done.append((future, *result, on_done))
            if not self._drain_pending:
                self._drain_pending = True
                loop = self._loop
                assert loop is not None
                try:
                    loop.call_soon_threadsafe(self._drain)
                except RuntimeError:  # the loop closed under us: nobody is waiting any more
                    pass
            # a parked thread must not keep its last call's arguments (a request's arrays) alive
            del future, fn, args, on_done, context, result

    def _drain(self) -> None:
        self._drain_pending = False
        done = self._done
        while done:
            future, ok, value, on_done = done.popleft()
            if not future.cancelled():
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)
            if on_done is not None:
                on_done()

    def close(self, wait: bool = True, timeout: float | None = None) -> bool:
        """Stop the workers once the queued calls have run.

        With ``wait``, join them, for at most ``timeout`` seconds in all; returns whether every
        worker has stopped (a thread stuck in native code cannot be stopped, only waited for).
        """
        if not self._closed:
            self._closed = True
            # one stop per thread, behind every queued call: idle threads (none while calls wait)
            # get theirs now, busy ones take theirs from the backlog when they finish
            for _ in self._threads:
                self._hand(_STOP)
        if wait:
            return self.join(timeout)
        return not any(thread.is_alive() for thread in self._threads)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the workers of a closed pool to stop; True when none is left running."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(deadline - time.monotonic(), 0.0))
        return not any(thread.is_alive() for thread in self._threads)
