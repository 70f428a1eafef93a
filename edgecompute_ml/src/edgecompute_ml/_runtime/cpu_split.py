"""Batched forward passes on CPU: one slice of the batch per core, one intra-op thread each.

Measured on a 2-core AVX-512 Xeon (docs/performance.md): a MobileNetV2 forward costs the same per
image on one thread at batch 1 and at batch 16 (convolutions are as efficient either way), so the
gain of batching on CPU is parallel efficiency. Splitting every convolution of one forward across
cores (torch's intra-op threads) pays a barrier per layer, about 50 of them, and each barrier waits
for the slowest core: costly on a shared machine where a core is often busy elsewhere. Independent
slices of a batch need no barrier at all: each worker runs its slice start to end on one thread.

Text batches (``embeddings.embed_texts``) go through :meth:`SplitRunner.map` instead, as groups of
sentences of similar length, each padded only to its own longest.

The workers are long-lived threads whose intra-op thread count is 1 (set once, when they start);
the process-wide setting that other threads use is restored right after.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["SplitRunner", "shared_runner"]


class SplitRunner:
    """``runner(fn, batch)`` == ``fn(batch)``, computed as ``torch.cat`` of ``fn`` over slices of
    ``batch`` (dim 0) on ``workers`` single-threaded workers. Batches of one image, and runners of
    one worker, run ``fn`` on the caller's thread."""

    def __init__(self, workers: int) -> None:
        import torch

        if workers < 1:
            raise ValueError(f"workers must be >= 1, not {workers}")
        self.workers = workers
        self._lock = threading.Lock()  # one batch at a time: each uses every worker
        self._inboxes: list[queue.SimpleQueue[Any]] = []
        self._threads: list[threading.Thread] = []
        if workers == 1:
            return
        threads = torch.get_num_threads()
        started = threading.Barrier(workers + 1)
        for index in range(workers):
            inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
            self._inboxes.append(inbox)
            thread = threading.Thread(target=self._work, args=(inbox, started), name=f"ml-split-{index}",
                                      daemon=True)
            thread.start()
            self._threads.append(thread)
        started.wait()
        # set_num_threads(1) in a worker also lowered the process default (what threads that have
        # not run torch yet start with): put it back; the workers keep their own setting
        torch.set_num_threads(threads)

    @staticmethod
    def _work(inbox: queue.SimpleQueue[Any], started: threading.Barrier) -> None:
        import torch

        torch.get_num_threads()  # torch initialises a thread's count on first use: do it before setting it
        torch.set_num_threads(1)
        started.wait()
        while True:
            job = inbox.get()
            if job is None:
                return
            fn, part, out, done = job
            try:
                out.append(fn(part))
            except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
                out.append(exc)
            done.release()

    def __call__(self, fn: Callable[[Any], Any], batch: Any) -> Any:
        import torch

        rows = int(batch.shape[0])
        if self.workers == 1 or rows < 2 or not self._inboxes:
            return fn(batch)
        return torch.cat(self.map(fn, list(torch.tensor_split(batch, min(self.workers, rows)))))

    def map(self, fn: Callable[[Any], Any], parts: Sequence[Any]) -> list[Any]:
        """``[fn(part) for part in parts]``, one part per worker at the same time (at most
        ``workers`` parts; with one part, or one worker, on the caller's thread)."""
        if len(parts) > max(1, len(self._inboxes)):
            raise ValueError(f"{len(parts)} parts for {self.workers} workers")
        if len(parts) == 1 or not self._inboxes:
            return [fn(part) for part in parts]
        with self._lock:
            done = threading.Semaphore(0)
            outs: list[list[Any]] = [[] for _ in parts]
            for inbox, part, out in zip(self._inboxes, parts, outs, strict=False):
                inbox.put((fn, part, out, done))
            for _ in parts:
                done.acquire()
        results = [out[0] for out in outs]
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results

    def close(self, timeout: float | None = None) -> bool:
        """Stop the workers and join them (at most ``timeout`` seconds in all); later calls run on
        the caller's thread. A worker must not outlive its owner: a thread still inside torch when
        the interpreter finalises aborts the process ("terminate called without an active
        exception"). Returns whether every worker has ended."""
        with self._lock:  # after the batch in flight, if any: each worker then finds None next
            for inbox in self._inboxes:
                inbox.put(None)
            self._inboxes = []
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        self._threads = [thread for thread in self._threads if thread.is_alive()]
        return not self._threads


_shared: SplitRunner | None = None
_shared_lock = threading.Lock()


def shared_runner() -> SplitRunner:
    """The process's runner, with one worker per intra-op thread torch is set to use (the cores
    the executor was given), created on first use."""
    global _shared
    with _shared_lock:
        if _shared is None:
            import torch

            _shared = SplitRunner(torch.get_num_threads())
        return _shared
