"""A blocking face over the scheduler, for scripts and notebooks.

The scheduler runs on its own event loop in a background thread (an anyio blocking portal), so
``Runtime`` works the same from a plain script and from a Jupyter cell whose thread already runs
an event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import queue
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from typing import Any, NamedTuple, Never, TypeVar

from anyio.from_thread import BlockingPortal, start_blocking_portal

from . import _atexit
from ._options import reject_unknown
from ._registry import Registry
from ._scheduler import Scheduler, SchedulerStats, TaskHandle
from .config import Config
from .errors import ConfigError, EdgeComputeError, InvalidRequest, QueueFull, SchedulerClosed, TaskCancelled
from .models import Health, Request, Resources, Response, TaskEvent

__all__ = ["MapIterator", "Runtime"]

_END = object()
_T = TypeVar("_T")


def _request(algorithm: str | Request, inputs: Any, options: dict[str, Any]) -> Request:
    if isinstance(algorithm, Request):
        if inputs is not None or options:
            raise InvalidRequest("pass either a Request or an algorithm with inputs and options, not both")
        return algorithm
    try:
        return Request(algorithm, inputs, **options)
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(str(exc)) from exc


class _Failed(Exception):
    """An item of an ``as_completed`` map failed: its index travels with its error."""

    def __init__(self, index: int, error: Exception) -> None:
        super().__init__(index, error)
        self.index = index
        self.error = error


class _Call:
    """What one blocking call (run, stream, map) started on the loop, so that an exception in the
    caller's thread (KeyboardInterrupt) or a close from another thread can cancel all of it."""

    __slots__ = ("changed", "finished", "handles", "stopped", "task")

    def __init__(self) -> None:
        self.handles: list[TaskHandle] = []
        self.finished: list[int] = []  # indexes into handles, in the order the tasks ended
        self.stopped = False
        self.task: asyncio.Task[Any] | None = None
        # set on the loop: woken when a handle is added or the call stops (see _handle_at)
        self.changed: asyncio.Future[None] | None = None

    def add(self, handle: TaskHandle) -> None:
        index = len(self.handles)
        self.handles.append(handle)
        handle.add_done_callback(lambda _: self._ended(index))
        self._wake()

    def hold(self, handle: TaskHandle) -> None:
        """Keep ``handle`` to cancel on stop, without watching it end (what run() needs: a done
        callback would also take the task off the scheduler's shortest way to its end)."""
        self.handles.append(handle)

    def _ended(self, index: int) -> None:
        self.finished.append(index)
        self._wake()

    def is_stopped(self) -> bool:
        return self.stopped

    def stop(self) -> None:
        """On the loop: cancel every task of this call and the coroutine still submitting them."""
        self.stopped = True
        for handle in self.handles:
            handle.cancel()
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()
        self._wake()

    def _wake(self) -> None:
        changed, self.changed = self.changed, None
        if changed is not None and not changed.done():
            changed.set_result(None)


class _MapLink(NamedTuple):
    """What a :class:`MapIterator` uses of its :class:`Runtime`, handed over by the runtime."""

    portal: BlockingPortal
    submit_all: Callable[[list[Request], _Call], Awaitable[None]]
    output: Callable[[_Call, int], Coroutine[Any, Any, Any]]
    completed: Callable[[_Call, int], Coroutine[Any, Any, tuple[int, Any]]]
    wait: Callable[[Callable[[], Coroutine[Any, Any, Any]], _Call, float | None], Any]
    stop: Callable[[_Call], None]


class MapIterator(Iterator[Any]):
    """The outputs of :meth:`Runtime.map_iter` in input order, or of :meth:`Runtime.as_completed`
    as ``(index, output)`` pairs in the order the tasks end, as they become available.

    Every task is submitted at once (as queue room allows); iterating waits for each in turn.
    :meth:`next` waits at most a given time. :meth:`close` (from any thread, or leaving a ``with``
    block) cancels the tasks not yet consumed; iteration then stops.
    """

    def __init__(self, link: _MapLink, requests: list[Request], return_exceptions: bool,
                 ordered: bool = True) -> None:
        self._link = link
        self._count = len(requests)
        self._next = 0
        self._return_exceptions = return_exceptions
        self._ordered = ordered
        self._call = _Call()
        self._submitting = link.portal.start_task_soon(link.submit_all, requests, self._call)

    def __iter__(self) -> MapIterator:
        return self

    def __next__(self) -> Any:
        return self.next()

    def next(self, timeout: float | None = None) -> Any:
        """The next item; past ``timeout`` seconds without one, ``TimeoutError`` (the tasks go on,
        and a later call returns that item), as ``concurrent.futures`` does. At the end,
        ``StopIteration``."""
        if self._next >= self._count or self._call.stopped:
            raise StopIteration
        index = self._next
        link = self._link
        fetch = link.output if self._ordered else link.completed
        try:
            item = link.wait(functools.partial(fetch, self._call, index), self._call, timeout)
            self._next += 1
            return item
        except TimeoutError:
            raise
        except Exception as exc:
            self._next += 1
            if not self._ordered and isinstance(exc, _Failed):
                if self._return_exceptions and isinstance(exc.error, EdgeComputeError):
                    return exc.index, exc.error
                self.close()
                raise exc.error from None
            # (read again: another thread may have closed the map while we waited)
            if self._call.is_stopped() and isinstance(exc, TaskCancelled):
                submitting = self._submitting
                failed = submitting.exception() if submitting.done() and not submitting.cancelled() else None
                if failed is not None and not isinstance(failed, TaskCancelled):
                    raise failed from None  # a submission failed (an unknown algorithm): say why
                raise StopIteration from None  # closed (maybe by another thread) while we waited
            if self._return_exceptions and isinstance(exc, EdgeComputeError):
                return exc
            self.close()
            raise

    def __enter__(self) -> MapIterator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Cancel the tasks not consumed yet; thread-safe, idempotent."""
        if not self._call.stopped:
            self._link.stop(self._call)


class Runtime:
    """``with Runtime() as rt: rt.run("cpp/sobel", {"image": img})``.

    Takes the same arguments as :class:`Scheduler`, and ``loop``: the event loop its thread runs,
    ``"uvloop"``, ``"asyncio"`` (the standard library's), or ``"auto"`` (the default: uvloop when
    it is installed, as it is with edgecompute on Linux and macOS). Every blocking call crosses to
    that loop and back, and uvloop makes each crossing cheaper (docs/performance.md).
    """

    def __init__(self, registry: Registry | None = None, *, config: Config | None = None, loop: str = "auto",
                 **scheduler_options: Any) -> None:
        self._loop_factory = _loop_factory(loop)  # first: a bad choice fails here, not at start()
        self.scheduler = Scheduler(registry, config=config, **scheduler_options)
        self._portal_cm: AbstractContextManager[BlockingPortal] | None = None
        self._portal: BlockingPortal | None = None
        # the portal's loop: run/submit/map start their coroutines on it directly (see _start)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scheduler_cm: AbstractContextManager[Scheduler] | None = None
        # the futures of _start not settled yet: a call handed over as the loop stopped may never
        # run there, and close() fails these once the loop's thread has ended
        self._unsettled: set[concurrent.futures.Future[Any]] = set()
        self._closing = [False]  # read on the loop (_settle_with): a cancellation there is the close

    def __enter__(self) -> Runtime:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        _atexit.closed(self)
        if self._scheduler_cm is not None:
            cm, self._scheduler_cm = self._scheduler_cm, None
            try:
                if exc is not None and self._portal is not None:
                    # leaving by an exception (Ctrl-C): cancel everything, and do not wait for
                    # blocking code of cancelled tasks still on worker threads (daemon threads,
                    # left to finish on their own)
                    self._portal.call(functools.partial(self.scheduler.aclose, cancel=True, wait_for_threads=False))
                cm.__exit__(exc_type, exc, tb)
            finally:
                self._stop_portal()

    def start(self) -> None:
        if self._portal is not None:
            raise SchedulerClosed("this Runtime is already started")
        self._closing = [False]
        options = {} if self._loop_factory is None else {"loop_factory": self._loop_factory}
        self._portal_cm = start_blocking_portal(backend="asyncio", backend_options=options)
        self._portal = self._portal_cm.__enter__()
        try:
            self._loop = self._portal.call(_running_loop)
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
        self._loop = None
        self._closing[0] = True
        if self._portal_cm is not None:
            cm, self._portal_cm, self._portal = self._portal_cm, None, None
            try:
                cm.__exit__(None, None, None)
            finally:
                # the loop's thread has ended: a call that reached the loop as it stopped (after
                # its last task ran, or between the steps of its shutdown) will never be answered
                # there. Every _start put its future in the set before handing it over, and one
                # handed over after the loop closed raised at once.
                for future in list(self._unsettled):
                    if future.set_running_or_notify_cancel():
                        future.set_exception(SchedulerClosed("the Runtime closed before this call could run"))
                self._unsettled.clear()

    def _start(self, fn: Callable[..., Coroutine[Any, Any, _T]], *args: Any) -> concurrent.futures.Future[_T]:
        """``fn(*args)`` as a task on the loop; its future (whose ``cancel()`` cancels the task).

        What the portal's ``start_task_soon`` does, minus its cost: that one waits in the caller's
        thread until the loop has spawned the task (a round trip of thread wake-ups) and wraps the
        task in a task group and cancel scope. Here the caller hands the coroutine over and goes on
        to wait for its result: a trivial ``run()`` took 122 us through the portal and 64 us so
        (docs/performance.md). The task runs in a copy of the caller's context (its context
        variables), as the portal's tasks did.
        """
        loop = self._loop
        if loop is None:
            raise SchedulerClosed("the Runtime is not running: use 'with Runtime() as rt'")
        future: concurrent.futures.Future[_T] = concurrent.futures.Future()
        unsettled = self._unsettled
        unsettled.add(future)  # before the hand-off: see _stop_portal
        future.add_done_callback(unsettled.discard)
        try:
            loop.call_soon_threadsafe(_spawn, loop, fn, args, future, self._closing)
        except RuntimeError as exc:  # the loop has closed meanwhile
            unsettled.discard(future)
            raise SchedulerClosed("the Runtime is closed") from exc
        return future

    @property
    def portal(self) -> BlockingPortal:
        if self._portal is None:
            raise SchedulerClosed("the Runtime is not running: use 'with Runtime() as rt'")
        return self._portal

    # -- work -------------------------------------------------------------------------------------

    def run(self, algorithm: str | Request, inputs: Any = None, *, params: Mapping[str, Any] | None = None,
            priority: int | None = None, timeout: float | None = None, resources: Resources | None = None,
            metadata: Mapping[str, Any] | None = None, retries: int | None = None,
            id: str | None = None, **unknown: Never) -> Response:
        """Run one request and return its response (raising its error).

        The keyword arguments are the :class:`Request` fields. An exception in the calling thread
        while it waits (KeyboardInterrupt) cancels the task.
        """
        options = _options(params, priority, timeout, resources, metadata, retries, id, unknown)
        request = _request(algorithm, inputs, options)
        call = _Call()
        return self._wait(functools.partial(self._run, request, call), call)

    def submit(self, algorithm: str | Request, inputs: Any = None, *, params: Mapping[str, Any] | None = None,
               priority: int | None = None, timeout: float | None = None, resources: Resources | None = None,
               metadata: Mapping[str, Any] | None = None, retries: int | None = None,
               id: str | None = None, **unknown: Never) -> concurrent.futures.Future[Response]:
        """Queue one request; the future's ``cancel()`` cancels the task."""
        options = _options(params, priority, timeout, resources, metadata, retries, id, unknown)
        request = _request(algorithm, inputs, options)
        return self._start(self._run, request, _Call())

    def stream(self, algorithm: str | Request, inputs: Any = None, *, params: Mapping[str, Any] | None = None,
               priority: int | None = None, timeout: float | None = None, resources: Resources | None = None,
               metadata: Mapping[str, Any] | None = None, retries: int | None = None,
               id: str | None = None, **unknown: Never) -> Iterator[Any]:
        """Run one request and yield its chunks as they come; raises the task's error at the end.

        Closing the iterator early, or an exception in the caller while it waits, cancels the task.
        """
        options = _options(params, priority, timeout, resources, metadata, retries, id, unknown)
        request = _request(algorithm, inputs, options)
        chunks: queue.SimpleQueue[Any] = queue.SimpleQueue()
        call = _Call()
        future = self.portal.start_task_soon(self._stream, request, chunks.put, call)
        try:
            while True:
                chunk = chunks.get()
                if chunk is _END:
                    break
                yield chunk
            future.result()
        finally:
            if not future.done():
                self._stop(call)
                future.cancel()

    def map(self, algorithm: str, items: Iterable[Any], *, progress: bool = False,
            return_exceptions: bool = False, params: Mapping[str, Any] | None = None,
            priority: int | None = None, timeout: float | None = None, resources: Resources | None = None,
            metadata: Mapping[str, Any] | None = None, retries: int | None = None,
            **unknown: Never) -> list[Any]:
        """Run ``algorithm`` on every item (as inputs) concurrently; return the outputs in order.

        With ``progress=True`` a tqdm bar counts finished items (a widget in Jupyter). The first
        failure is raised (and the rest cancelled) unless ``return_exceptions=True``, which puts
        errors in the list. An exception in the calling thread while it waits (KeyboardInterrupt)
        cancels every task of the map: none starts after it. To stop a map from another thread,
        use :meth:`map_iter`.
        """
        options = _options(params, priority, timeout, resources, metadata, retries, None, unknown)
        requests = [_request(algorithm, item, options) for item in items]
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(requests), desc=algorithm, unit="task")
        call = _Call()
        try:
            return self._wait(functools.partial(self._map, requests, bar, return_exceptions, call), call)
        finally:
            if bar is not None:
                bar.close()

    def map_iter(self, algorithm: str, items: Iterable[Any], *, return_exceptions: bool = False,
                 params: Mapping[str, Any] | None = None, priority: int | None = None,
                 timeout: float | None = None, resources: Resources | None = None,
                 metadata: Mapping[str, Any] | None = None, retries: int | None = None,
                 **unknown: Never) -> MapIterator:
        """Like :meth:`map`, but lazy, as ``concurrent.futures.Executor.map``: submits every task at
        once and returns an iterator over the outputs in input order. Its ``close()``, callable
        from any thread, cancels what has not been consumed yet.
        """
        options = _options(params, priority, timeout, resources, metadata, retries, None, unknown)
        requests = [_request(algorithm, item, options) for item in items]
        return MapIterator(self._map_link(), requests, return_exceptions)

    def as_completed(self, algorithm: str, items: Iterable[Any], *, return_exceptions: bool = False,
                     params: Mapping[str, Any] | None = None, priority: int | None = None,
                     timeout: float | None = None, resources: Resources | None = None,
                     metadata: Mapping[str, Any] | None = None, retries: int | None = None,
                     **unknown: Never) -> MapIterator:
        """Like :meth:`map_iter`, but yields ``(index, output)`` in the order the tasks end (as
        ``concurrent.futures.as_completed`` or Ray's ``wait``), so a slow item holds up nothing:
        ``index`` is the item's position in ``items``. With ``return_exceptions=True`` a failed
        item yields ``(index, error)``; otherwise its error is raised and the rest cancelled.
        """
        options = _options(params, priority, timeout, resources, metadata, retries, None, unknown)
        requests = [_request(algorithm, item, options) for item in items]
        return MapIterator(self._map_link(), requests, return_exceptions, ordered=False)

    def _map_link(self) -> _MapLink:
        return _MapLink(self.portal, self._submit_all, self._output, self._completed, self._wait, self._stop)

    # -- looking at tasks ---------------------------------------------------------------------------

    def tasks(self) -> list[TaskHandle]:
        """The tasks queued, retrying or running now, oldest first (see :meth:`Scheduler.tasks`).

        The handles belong to the loop thread: read their attributes here, and cancel one with
        :meth:`cancel`, not ``handle.cancel()``.
        """
        return self.portal.call(self._tasks)

    def task(self, task_id: str) -> TaskHandle | None:
        """The live task with this id (the request's ``id``), or None if there is none."""
        return self.portal.call(self._task, task_id)

    def cancel(self, task_id: str) -> bool:
        """Cancel the live task with this id, from any thread. False if there is none (ended)."""
        return self.portal.call(self._cancel, task_id)

    def subscribe(self, observer: Callable[[TaskEvent], None]) -> Callable[[], None]:
        """Call ``observer(event)`` on every task event (see :meth:`Scheduler.subscribe`); returns
        a function that unsubscribes. The observer runs on the Runtime's loop thread, not the
        caller's: it must be quick and thread-safe (append to a list, put on a queue)."""
        unsubscribe = self.portal.call(self._subscribe, observer)

        def _unsubscribe() -> None:
            if self._portal is not None:
                self._portal.call(self._unsubscribe, unsubscribe)

        return _unsubscribe

    @property
    def registry(self) -> Registry:
        """The registry the scheduler runs executors from."""
        return self.scheduler.registry

    def health(self) -> dict[str, Health]:
        return self.portal.call(self.scheduler.registry.health)

    def stats(self) -> SchedulerStats:
        return self.portal.call(self._stats)

    # -- from the caller's thread --------------------------------------------------------------------

    def _wait(self, fn: Callable[[], Coroutine[Any, Any, _T]], call: _Call, timeout: float | None = None) -> _T:
        """Run ``fn`` on the loop and wait for it; an exception here (KeyboardInterrupt while
        waiting) stops everything the call started before it propagates. Past ``timeout``, only
        ``fn`` is cancelled (``TimeoutError``): the call's tasks go on."""
        future = self._start(fn)
        try:
            return future.result(timeout)
        except TimeoutError:
            if future.cancel() or not future.done():
                raise
            return future.result()  # it ended as the wait timed out
        except BaseException:
            if not future.done():
                self._stop(call)
                future.cancel()
            raise

    def _stop(self, call: _Call) -> None:
        # on the loop, and waited for: once this returns, no task of the call starts any more
        try:
            self.portal.call(self._stop_call, call)
        except (SchedulerClosed, RuntimeError):
            pass  # the loop is gone: nothing of the call can start

    # -- on the loop --------------------------------------------------------------------------------

    async def _stop_call(self, call: _Call) -> None:
        call.stop()

    async def _run(self, request: Request, call: _Call) -> Response:
        scheduler = self.scheduler
        try:
            # a task that can start at once runs here, in this coroutine's task, as Scheduler.run
            # runs it: no task of its own to spawn and switch to
            handle = scheduler.submit(request, inline=True)
        except QueueFull:
            handle = await scheduler.asubmit(request)
        call.hold(handle)
        try:
            await scheduler.run_inline(handle)  # nothing to do unless it was set to run inline
            return await handle.result()
        finally:
            handle.cancel()  # no-op once done; cancels the task if our caller gave up

    async def _stream(self, request: Request, put: Any, call: _Call) -> None:
        try:
            handle = await self.scheduler.asubmit(request)
            call.add(handle)
            try:
                async for chunk in handle.stream():
                    put(chunk)
            finally:
                handle.cancel()
        finally:
            put(_END)

    async def _submit_all(self, requests: list[Request], call: _Call) -> None:
        call.task = asyncio.current_task()
        try:
            for request in requests:
                if call.stopped:
                    return
                call.add(await self.scheduler.asubmit(request))
        except BaseException:
            call.stop()  # a submission failed (or we were cancelled): the map stops
            raise
        finally:
            call.task = None

    async def _output(self, call: _Call, index: int) -> Any:
        while len(call.handles) <= index:
            if call.stopped:
                raise TaskCancelled(f"the map stopped before its item {index} was submitted")
            call.changed = asyncio.get_running_loop().create_future()
            await call.changed
        return (await call.handles[index].result()).outputs

    async def _completed(self, call: _Call, position: int) -> tuple[int, Any]:
        # the position-th task to end, whichever it is
        while len(call.finished) <= position:
            if call.stopped:
                raise TaskCancelled("the map stopped")
            call.changed = asyncio.get_running_loop().create_future()
            await call.changed
        index = call.finished[position]
        try:
            return index, (await call.handles[index].result()).outputs
        except Exception as exc:
            raise _Failed(index, exc) from exc

    async def _map(self, requests: list[Request], bar: Any, return_exceptions: bool, call: _Call) -> list[Any]:
        call.task = asyncio.current_task()
        try:
            for request in requests:
                handle = await self.scheduler.asubmit(request)
                if bar is not None:
                    handle.add_done_callback(lambda _: bar.update(1))  # in the order they finish
                call.add(handle)
            results: list[Any] = []
            for handle in call.handles:
                try:
                    results.append((await handle.result()).outputs)
                except Exception as exc:
                    if not return_exceptions:
                        raise
                    results.append(exc)
            return results
        finally:
            call.task = None
            call.stop()  # no-op for tasks that ended; cancels the rest if we failed or were stopped

    async def _stats(self) -> SchedulerStats:
        return self.scheduler.stats()

    async def _tasks(self) -> list[TaskHandle]:
        return self.scheduler.tasks()

    async def _task(self, task_id: str) -> TaskHandle | None:
        return self.scheduler.task(task_id)

    async def _cancel(self, task_id: str) -> bool:
        handle = self.scheduler.task(task_id)
        return handle is not None and handle.cancel()

    async def _subscribe(self, observer: Callable[[TaskEvent], None]) -> Callable[[], None]:
        return self.scheduler.subscribe(observer)

    async def _unsubscribe(self, unsubscribe: Callable[[], None]) -> None:
        unsubscribe()


def _loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """What makes the Runtime's loop for ``Runtime(loop=choice)`` (None: asyncio's default)."""
    if choice not in ("auto", "uvloop", "asyncio"):
        raise ConfigError(f"Runtime(loop={choice!r}): choose 'auto', 'uvloop' or 'asyncio'")
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError as exc:
        if choice == "uvloop":
            raise ConfigError("Runtime(loop='uvloop') needs uvloop: pip install uvloop") from exc
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


async def _running_loop() -> asyncio.AbstractEventLoop:
    return asyncio.get_running_loop()


def _spawn(loop: asyncio.AbstractEventLoop, fn: Callable[..., Coroutine[Any, Any, Any]], args: tuple[Any, ...],
           future: concurrent.futures.Future[Any], closing: list[bool]) -> None:
    """On the loop: start ``fn(*args)`` as a task whose outcome settles ``future``. The future
    stays pending while the task runs, so that its ``cancel()`` (from any thread) cancels the
    task, as with ``asyncio.run_coroutine_threadsafe`` and the portal."""
    if future.cancelled():
        return
    try:
        task: asyncio.Task[Any] = loop.create_task(_settle_with(fn(*args), future, closing))
    except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
        if future.set_running_or_notify_cancel():
            future.set_exception(exc)
        return

    def cancel(f: concurrent.futures.Future[Any]) -> None:
        if f.cancelled() and not task.done():
            try:
                loop.call_soon_threadsafe(task.cancel)
            except RuntimeError:
                pass  # the loop has closed: the task went with it

    future.add_done_callback(cancel)


async def _settle_with(coro: Coroutine[Any, Any, Any], future: concurrent.futures.Future[Any],
                       closing: list[bool]) -> None:
    """Await ``coro`` and settle ``future`` with its outcome from inside the task, as its last
    step: the waiting thread wakes one loop iteration sooner than from a done callback (which
    the loop runs on its next pass), and on a path that has just run, so warm in the caches."""
    try:
        result = await coro
    except asyncio.CancelledError:
        if closing[0] and not future.cancelled():
            # the loop's shutdown cancelled it (the caller did not): the Runtime closed under it
            if future.set_running_or_notify_cancel():
                future.set_exception(SchedulerClosed("the Runtime closed while this call ran"))
        else:
            future.cancel()
        raise
    except BaseException as exc:  # handed to the waiting thread
        if future.set_running_or_notify_cancel():
            future.set_exception(exc)
        if not isinstance(exc, Exception):
            raise  # KeyboardInterrupt, SystemExit: the loop still sees them, as before
    else:
        if future.set_running_or_notify_cancel():
            future.set_result(result)


def _options(params: Mapping[str, Any] | None, priority: int | None, timeout: float | None,
             resources: Resources | None, metadata: Mapping[str, Any] | None, retries: int | None,
             id: str | None, unknown: Mapping[str, Any]) -> dict[str, Any]:
    """The :class:`Request` fields given (not None); Request checks their types at run time."""
    reject_unknown(unknown)
    given = {"params": params, "priority": priority, "timeout": timeout, "resources": resources,
             "metadata": metadata, "retries": retries, "id": id}
    return {name: value for name, value in given.items() if value is not None}
