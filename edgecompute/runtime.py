"""A blocking face over the scheduler, for scripts and notebooks.

The scheduler runs on its own event loop in a background thread (an anyio blocking portal), so
``Runtime`` works the same from a plain script and from a Jupyter cell whose thread already runs
an event loop.
"""

from __future__ import annotations

import concurrent.futures
import functools
import queue
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from typing import Any

from anyio.from_thread import BlockingPortal, start_blocking_portal

from . import _atexit
from .config import Config
from .errors import InvalidRequest, SchedulerClosed
from .models import Health, Request, Response
from .registry import Registry
from .scheduler import _REQUEST_OPTIONS, Scheduler, SchedulerStats

__all__ = ["Runtime"]

_END = object()


def _request(algorithm: str | Request, inputs: Any, options: dict[str, Any]) -> Request:
    if isinstance(algorithm, Request):
        if inputs is not None or options:
            raise InvalidRequest("pass either a Request or an algorithm with inputs and options, not both")
        return algorithm
    unknown = set(options) - _REQUEST_OPTIONS
    if unknown:
        raise InvalidRequest(f"unknown option(s) {', '.join(sorted(unknown))}; "
                             f"valid: {', '.join(sorted(_REQUEST_OPTIONS))}")
    try:
        return Request(algorithm, inputs, **options)
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(str(exc)) from exc


class Runtime:
    """``with Runtime() as rt: rt.run("cpp/sobel", {"image": img})``.

    Takes the same arguments as :class:`Scheduler`.
    """

    def __init__(self, registry: Registry | None = None, *, config: Config | None = None,
                 **scheduler_options: Any) -> None:
        self.scheduler = Scheduler(registry, config=config, **scheduler_options)
        self._portal_cm: AbstractContextManager[BlockingPortal] | None = None
        self._portal: BlockingPortal | None = None
        self._scheduler_cm: AbstractContextManager[Scheduler] | None = None

    def __enter__(self) -> Runtime:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        _atexit.closed(self)
        if self._scheduler_cm is not None:
            cm, self._scheduler_cm = self._scheduler_cm, None
            try:
                cm.__exit__(exc_type, exc, tb)
            finally:
                self._stop_portal()

    def start(self) -> None:
        if self._portal is not None:
            raise SchedulerClosed("this Runtime is already started")
        self._portal_cm = start_blocking_portal(backend="asyncio")
        self._portal = self._portal_cm.__enter__()
        try:
            self._scheduler_cm = self._portal.wrap_async_context_manager(self.scheduler)
            self._scheduler_cm.__enter__()
        except BaseException:
            self._stop_portal()
            raise
        _atexit.close_at_exit(self)

    def close(self) -> None:
        """Finish queued work (or cancel it, per the configuration) and stop the loop thread."""
        self.__exit__(None, None, None)

    def _stop_portal(self) -> None:
        if self._portal_cm is not None:
            cm, self._portal_cm, self._portal = self._portal_cm, None, None
            cm.__exit__(None, None, None)

    @property
    def portal(self) -> BlockingPortal:
        if self._portal is None:
            raise SchedulerClosed("the Runtime is not running: use 'with Runtime() as rt'")
        return self._portal

    # -- work -------------------------------------------------------------------------------------

    def run(self, algorithm: str | Request, inputs: Any = None, **options: Any) -> Response:
        """Run one request and return its response (raising its error)."""
        request = _request(algorithm, inputs, options)
        return self.portal.call(self._run, request)

    def submit(self, algorithm: str | Request, inputs: Any = None,
               **options: Any) -> concurrent.futures.Future[Response]:
        """Queue one request; the future's ``cancel()`` cancels the task."""
        request = _request(algorithm, inputs, options)
        return self.portal.start_task_soon(self._run, request)

    def stream(self, algorithm: str | Request, inputs: Any = None, **options: Any) -> Iterator[Any]:
        """Run one request and yield its chunks as they come; raises the task's error at the end."""
        request = _request(algorithm, inputs, options)
        chunks: queue.SimpleQueue[Any] = queue.SimpleQueue()
        future = self.portal.start_task_soon(self._stream, request, chunks.put)
        try:
            while True:
                chunk = chunks.get()
                if chunk is _END:
                    break
                yield chunk
            future.result()
        finally:
            if not future.done():
                future.cancel()

    def map(self, algorithm: str, items: Iterable[Any], *, progress: bool = False,
            return_exceptions: bool = False, **options: Any) -> list[Any]:
        """Run ``algorithm`` on every item (as inputs) concurrently; return the outputs in order.

        With ``progress=True`` a tqdm bar counts finished items (a widget in Jupyter). The first
        failure is raised unless ``return_exceptions=True``, which puts errors in the list.
        """
        requests = [_request(algorithm, item, dict(options)) for item in items]
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(requests), desc=algorithm, unit="task")
        try:
            return self.portal.call(functools.partial(self._map, requests, bar, return_exceptions))
        finally:
            if bar is not None:
                bar.close()

    @property
    def registry(self) -> Registry:
        """The registry the scheduler runs executors from."""
        return self.scheduler.registry

    def health(self) -> dict[str, Health]:
        return self.portal.call(self.scheduler.registry.health)

    def stats(self) -> SchedulerStats:
        return self.portal.call(self._stats)

    # -- on the loop --------------------------------------------------------------------------------

    async def _run(self, request: Request) -> Response:
        handle = await self.scheduler.asubmit(request)
        try:
            return await handle.result()
        finally:
            handle.cancel()  # no-op once done; cancels the task if our caller gave up

    async def _stream(self, request: Request, put: Any) -> None:
        handle = await self.scheduler.asubmit(request)
        try:
            async for chunk in handle.stream():
                put(chunk)
        finally:
            handle.cancel()
            put(_END)

    async def _map(self, requests: list[Request], bar: Any, return_exceptions: bool) -> list[Any]:
        handles = []
        try:
            for request in requests:
                handle = await self.scheduler.asubmit(request)
                if bar is not None:
                    handle.add_done_callback(lambda _: bar.update(1))  # in the order they finish
                handles.append(handle)
            results: list[Any] = []
            for handle in handles:
                try:
                    results.append((await handle.result()).outputs)
                except Exception as exc:
                    if not return_exceptions:
                        raise
                    results.append(exc)
            return results
        finally:
            for handle in handles:
                handle.cancel()

    async def _stats(self) -> SchedulerStats:
        return self.scheduler.stats()
