"""Dynamic batching: concurrent requests for one model run as one batch.

A dedicated thread per batcher takes whatever is queued (up to ``max_batch`` items). When the
last batch held more than one item (so requests are arriving concurrently) and this one is not
full, it waits up to ``max_delay`` seconds for more. A lone client therefore never waits: at batch
1 the cost is one thread hand-off.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["Batcher"]


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
        self._queue: collections.deque[tuple[list[Any], asyncio.Future[Any], asyncio.AbstractEventLoop]] = \
            collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._last_size = 1
        #: Sizes (in items) of the batches run so far, for tests and stats.
        self.batch_sizes: collections.Counter[int] = collections.Counter()

    def submit(self, items: list[Any]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        with self._cond:
            if self._closed:
                raise RuntimeError(f"{self.name} is closed")
            self._queue.append((items, future, loop))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            self._cond.notify()
        return future

    def close(self, *, wait: bool = False, timeout: float | None = None) -> bool:
        """Take no more items; the thread runs what is queued, then ends. With ``wait``, join it
        (at most ``timeout`` seconds). Returns whether the thread has ended (or never started)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is None:
            return True
        if wait and thread is not threading.current_thread():
            thread.join(timeout)
        return not thread.is_alive()

    def _take(self) -> list[tuple[list[Any], asyncio.Future[Any], asyncio.AbstractEventLoop]] | None:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return None
            batch = [self._queue.popleft()]
            count = len(batch[0][0])
            deadline = time.monotonic() + self.max_delay
            while count < self.max_batch:
                if self._queue:
                    if count + len(self._queue[0][0]) > self.max_batch:
                        break
                    entry = self._queue.popleft()
                    batch.append(entry)
                    count += len(entry[0])
                    continue
                left = deadline - time.monotonic()
                if self._last_size <= 1 or left <= 0 or self._closed:
                    break
                self._cond.wait(left)
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
