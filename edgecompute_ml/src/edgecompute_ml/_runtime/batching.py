"""Dynamic batching: concurrent requests for one model run as one batch.

A dedicated thread per batcher takes whatever is queued (up to ``max_batch`` items). When the
last batch held more than one item (so requests are arriving concurrently) and this one is not
full, it waits up to ``max_delay`` seconds for more. A lone client therefore never waits: at batch
1 the cost is one thread hand-off.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["Batcher"]

# items, the future of their results, and its loop
_Entry = tuple[list[Any], "asyncio.Future[Any]", asyncio.AbstractEventLoop]


class Batcher:
    """``await batcher.submit(texts)`` -> ``fn(all texts of the batch)`` split back per request."""

    def __init__(self, fn: Callable[[list[Any]], Sequence[Any]], *, max_batch: int = 16,
                 max_delay: float = 0.002, name: str = "batcher") -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, not {max_batch}")
        self.fn = fn
        self.max_batch = max_batch
        self.max_delay = max_delay
        self.name = name
        # a SimpleQueue: its put and its blocking get are C, where a Condition's wait and notify
        # are a dozen Python calls on each side of every request's hand-off to the thread
        self._queue: queue.SimpleQueue[_Entry | None] = queue.SimpleQueue()
        self._lock = threading.Lock()  # submit against close: nothing is put after the stop
        self._thread: threading.Thread | None = None
        self._closed = False
        self._held: _Entry | None = None  # taken off the queue for the next batch (the thread's own)
        self._stopping = False  # the thread has taken the stop: it ends after its last batch
        self._last_size = 1
        #: Sizes (in items) of the batches run so far, for tests and stats.
        self.batch_sizes: collections.Counter[int] = collections.Counter()

    def submit(self, items: list[Any]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self.name} is closed")
            self._queue.put((items, future, loop))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
        return future

    def close(self, *, wait: bool = False, timeout: float | None = None) -> bool:
        """Take no more items; the thread runs what is queued, then ends. With ``wait``, join it
        (at most ``timeout`` seconds). Returns whether the thread has ended (or never started)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(None)  # the stop, behind everything submitted
            thread = self._thread
        if thread is None:
            return True
        if wait and thread is not threading.current_thread():
            thread.join(timeout)
        return not thread.is_alive()

    def _next(self, timeout: float | None = None) -> _Entry | None:
        """The next entry (None: the stop), waiting at most ``timeout`` seconds (then Empty)."""
        entry, self._held = self._held, None
        if entry is not None:
            return entry
        if timeout is None:
            return self._queue.get()
        return self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()

    def _take(self) -> list[_Entry] | None:
        if self._stopping:
            return None
        first = self._next()
        if first is None:
            return None
        batch = [first]
        count = len(first[0])
        deadline = 0.0
        while count < self.max_batch:
            try:
                entry = self._next(0)
            except queue.Empty:
                # a lone client never waits: only a batcher whose last batch held several requests
                # waits for more, up to max_delay
                if self._last_size <= 1:
                    break
                if not deadline:
                    deadline = time.monotonic() + self.max_delay
                try:
                    entry = self._next(deadline - time.monotonic())
                except queue.Empty:
                    break
            if entry is None:
                self._stopping = True  # run this batch, then end
                break
            if count + len(entry[0]) > self.max_batch:
                self._held = entry  # first in the next batch
                break
            batch.append(entry)
            count += len(entry[0])
        return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            batch = [entry for entry in batch if not entry[1].done()]  # cancelled meanwhile
            if not batch:
                continue
            items = [item for entry in batch for item in entry[0]]
            self._last_size = len(batch)
            self.batch_sizes[len(items)] += 1
            try:
                results = self.fn(items)
            except BaseException as exc:  # noqa: BLE001 - handed to every waiter
                for _, future, loop in batch:
                    _call(loop, _fail, future, exc)
                continue
            start = 0
            for entry_items, future, loop in batch:
                part = results[start:start + len(entry_items)]
                start += len(entry_items)
                _call(loop, _resolve, future, part)


def _call(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass  # the caller's loop has closed; nobody waits for this result any more


def _resolve(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
