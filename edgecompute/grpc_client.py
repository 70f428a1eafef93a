"""A gRPC client for ``edgecompute serve`` (``pip install "edgecompute[grpc]"``), with the shape
and the errors of :mod:`edgecompute.client`.

::

    from edgecompute.grpc_client import AsyncGrpcClient, GrpcClient

    with GrpcClient("127.0.0.1:50051", api_key) as rt:      # "grpcs://host:port" for TLS
        rt.run("cpp/sobel", {"image": img}).outputs
        for token in rt.stream("ml/generate", "Once upon"):
            print(token, end="")

:class:`GrpcClient` is shaped like :class:`~edgecompute.client.Client` (and so like ``Runtime``):
``run``, ``submit`` (a :class:`GrpcTask`: ``result``, ``cancel``, ``done``, ``stream``, ``id``,
``state``, ``algorithm``), ``stream``, ``map``, ``algorithms``, ``executors``;
:class:`AsyncGrpcClient` like :class:`~edgecompute.client.AsyncClient`. They take the same options
(``params``, ``priority``, ``timeout``, ``metadata``, ``retries``) and raise the same classes: the
embedded class the server names in the problem it sends in trailing metadata, else
:class:`~edgecompute.client.RemoteError` and its subclasses (``Unauthorized``, ``Forbidden``,
``NotFound``, ``RateLimited``, ``RemoteUnavailable``). As over HTTP, ``timeout`` bounds each call
beyond the wait it asked the server for, never the task; a refusal carrying ``retry-after`` (429,
503) is retried while the request's ``timeout`` (or the client's) allows.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

import grpc
import grpc.aio

from . import errors
from .client import Forbidden, NotFound, RateLimited, RemoteError, RemoteUnavailable, Unauthorized
from .errors import EdgeComputeError, InvalidRequest
from .grpc_proto import JSON, METHODS, PROBLEM_KEY, RETRY_AFTER_KEY, decode_value, encode_value, pb
from .models import Response

__all__ = ["MAX_ANSWER_BYTES", "AsyncGrpcClient", "AsyncGrpcTask", "GrpcClient", "GrpcTask"]

_OPTIONS = frozenset({"params", "priority", "timeout", "metadata", "retries"})
_LIVE = frozenset({"queued", "running"})
#: the longest wait one long-poll Get asks for; the server clamps it to its max_wait
_STEP = 20.0
#: how long a best-effort Cancel (a caller that gave up) may take
_CANCEL_BUDGET = 5.0
#: a Submit that should wait for the end asks for this long; the server clamps it to its max_wait
_UNTIL_END = 86400.0
#: the largest message the client accepts (grpc refuses a larger one before reading it)
MAX_ANSWER_BYTES = 256 * 1024 * 1024
_T = TypeVar("_T")
_L = TypeVar("_L")  # what a task view uses of its face: a _Link or an _AsyncLink

_BY_SLUG: dict[str, type[EdgeComputeError]] = {
    "unknown-algorithm": errors.UnknownAlgorithm, "invalid-request": errors.InvalidRequest,
    "bad-request": errors.InvalidRequest, "payload-too-large": errors.InvalidRequest,
    "uri-too-long": errors.InvalidRequest, "headers-too-large": errors.InvalidRequest,
    "infeasible": errors.InfeasibleRequest, "task-timeout": errors.TaskTimeout,
    "task-cancelled": errors.TaskCancelled, "task-failed": errors.ExecutorError,
}
_BY_STATUS: dict[int, type[RemoteError]] = {401: Unauthorized, 403: Forbidden, 404: NotFound, 408: RemoteUnavailable,
                                           410: NotFound, 429: RateLimited}


class _Failed(Protocol):
    """What a failed call (``grpc.RpcError`` of either face) tells."""

    def code(self) -> grpc.StatusCode: ...
    def details(self) -> str | None: ...
    def trailing_metadata(self) -> Any: ...


# -- errors: the same classes as edgecompute.client, from the same problem bodies --------------------


def _edgecompute_class(name: Any) -> type[EdgeComputeError] | None:
    if not isinstance(name, str) or name not in errors.__all__:
        return None
    cls = getattr(errors, name)
    return cls if isinstance(cls, type) and issubclass(cls, EdgeComputeError) else None


def _rebuild(cls: type[EdgeComputeError], detail: str, problem: dict[str, Any]) -> EdgeComputeError:
    """An instance of ``cls`` carrying the server's message, built as edgecompute.client builds it
    (classes whose constructor takes more than a message get their fields from the message)."""
    error = cls.__new__(cls)
    Exception.__init__(error, detail)
    if isinstance(error, errors.ExecutorError):
        error.retryable = isinstance(error, errors.ExecutorCrashed)
    if isinstance(error, (errors.UnknownAlgorithm, errors.AmbiguousAlgorithm)):
        error.algorithm = ""
    if isinstance(error, (errors.UnknownAlgorithm, errors.UnknownExecutor)):
        error.known = []
    if isinstance(error, errors.AmbiguousAlgorithm):
        error.candidates = []
    if isinstance(error, errors.UnknownExecutor):
        error.name = ""
    if isinstance(error, errors.PluginError):
        error.plugin, error.reason = "", detail
    error.problem = problem  # type: ignore[attr-defined]  # for diagnostics: request_id, instance
    return error


def _from_problem(problem: dict[str, Any], status: int) -> EdgeComputeError:
    detail = str(problem.get("detail") or problem.get("title") or f"status {status}")
    cls = _edgecompute_class(problem.get("error"))
    if cls is None and status not in _BY_STATUS:
        cls = _BY_SLUG.get(str(problem.get("type", "")).rpartition("/")[2])
    if cls is not None:
        return _rebuild(cls, detail, problem)
    return _BY_STATUS.get(status, RemoteError)(detail, status=status, problem=problem)


def _problem(failed: _Failed) -> dict[str, Any] | None:
    for key, value in failed.trailing_metadata() or ():
        if key == PROBLEM_KEY:
            try:
                problem = json.loads(value)
            except ValueError:
                return None
            return problem if isinstance(problem, dict) else None
    return None


def _error(failed: _Failed, target: str) -> EdgeComputeError:
    """The exception for a failed call: from its problem when the service sent one, else (grpc's
    own refusals, transport failures) from its status code."""
    problem = _problem(failed)
    if problem is not None:
        status = problem.get("status")
        return _from_problem(problem, status if type(status) is int else 0)
    code = failed.code()
    detail = failed.details() or code.name
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
        return RemoteUnavailable(f"{target}: {code.name}: {detail}; the task, if submitted, may still run")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return RemoteError(f"{target}: {detail} (a message over a size limit: the server's max_body_bytes "
                           "for a request, the client's max_answer_bytes for an answer)", status=413)
    cls = {grpc.StatusCode.UNAUTHENTICATED: Unauthorized, grpc.StatusCode.PERMISSION_DENIED: Forbidden,
           grpc.StatusCode.NOT_FOUND: NotFound}.get(code, RemoteError)
    return cls(f"{target}: gRPC {code.name}: {detail}")


def _retry_delay(failed: _Failed) -> float | None:
    """Seconds to wait before retrying a 429/503 refusal (None: not retryable)."""
    problem = _problem(failed)
    if problem is None or problem.get("status") not in (429, 503):
        return None
    for key, value in failed.trailing_metadata() or ():
        if key == RETRY_AFTER_KEY:
            try:
                return max(0.0, float(value))
            except ValueError:
                break
    return 1.0


# -- what both faces share -----------------------------------------------------------------------


def _check_options(options: dict[str, Any]) -> dict[str, Any]:
    unknown = set(options) - _OPTIONS
    if unknown:
        raise InvalidRequest(f"unknown option(s) {', '.join(sorted(unknown))}; valid remotely: "
                             f"{', '.join(sorted(_OPTIONS))}")
    timeout = options.get("timeout")
    if timeout is not None and (type(timeout) not in (int, float) or not timeout > 0):
        raise InvalidRequest(f"timeout must be a number of seconds > 0, not {timeout!r}")
    for key in ("params", "metadata", "priority"):
        if key in options and options[key] is None:
            raise InvalidRequest(f"{key} must be {'an int' if key == 'priority' else 'a mapping'}, not None")
    return {key: value for key, value in options.items() if value is not None}


def _response(task: pb.Task) -> Response:
    if task.HasField("error"):
        error = task.error
        problem: dict[str, Any] = {"type": error.type, "title": error.title, "status": error.status,
                                   "detail": error.detail, "error": error.error or None, "request_id": error.request_id}
        raise _from_problem(problem, 200)
    return Response(decode_value(task.outputs), task.executor, dict(task.timings))


def _listing(listing: pb.Listing, key: str) -> list[dict[str, Any]]:
    return list(decode_value(listing.document)[key])


class _Core:
    """The client's settings and the messages it sends; the faces do the I/O."""

    def __init__(self, target: str, api_key: str | None, timeout: float, max_answer_bytes: int,
                 encoding: str) -> None:
        if not isinstance(timeout, (int, float)) or not timeout > 0:
            raise InvalidRequest(f"the client's timeout must be a number of seconds > 0, not {timeout!r}")
        if type(max_answer_bytes) is not int or max_answer_bytes < 1:
            raise InvalidRequest(f"max_answer_bytes must be an integer >= 1, not {max_answer_bytes!r}")
        if encoding not in ("frame", "json"):
            raise InvalidRequest(f"encoding must be 'frame' or 'json', not {encoding!r}")
        if not isinstance(target, str) or not target:
            raise InvalidRequest(f"the server must be 'host:port', 'grpc://host:port' or 'grpcs://host:port', "
                                 f"not {target!r}")
        scheme, sep, rest = target.partition("://")
        if sep and scheme not in ("grpc", "grpcs"):
            raise InvalidRequest(f"the server must be 'host:port', 'grpc://host:port' or 'grpcs://host:port', "
                                 f"not {target!r}")
        self.secure = sep != "" and scheme == "grpcs"
        self.address = (rest if sep else target).rstrip("/")
        self.target = target
        self.timeout = float(timeout)
        self.encoding = JSON if encoding == "json" else pb.FRAME
        api_key = api_key if api_key is not None else os.environ.get("EDGECOMPUTE_API_KEY")
        self.metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.options = [("grpc.max_receive_message_length", min(max_answer_bytes, 2**31 - 1)),
                        ("grpc.max_send_message_length", -1)]

    def submit_request(self, algorithm: str, inputs: Any, options: dict[str, Any], wait: float) -> pb.SubmitRequest:
        if not isinstance(algorithm, str):
            raise InvalidRequest(f"algorithm must be a string, not {type(algorithm).__name__}")
        options = _check_options(options)
        request = pb.SubmitRequest(algorithm=algorithm, wait=wait, accept=self.encoding)
        if inputs is not None:
            request.inputs.CopyFrom(encode_value(inputs))
        if "params" in options:
            request.params.CopyFrom(encode_value(options["params"]))
        if "metadata" in options:
            request.metadata.CopyFrom(encode_value(options["metadata"]))
        for name in ("priority", "retries"):
            if name in options:
                value = options[name]
                if type(value) is not int or not -2**31 <= value < 2**31:
                    raise InvalidRequest(f"{name} must be an int, not {value!r}")
                setattr(request, name, value)
        if "timeout" in options:
            request.timeout = float(options["timeout"])
        return request

    def task_request(self, task_id: str, wait: float = 0.0) -> pb.TaskRequest:
        return pb.TaskRequest(id=task_id, wait=wait, accept=self.encoding)

    def deadline(self, wait: float | None) -> float | None:
        """A call's gRPC timeout: its wait plus the client's timeout (None: as long as the task runs)."""
        return None if wait is None else wait + self.timeout


class _Link(NamedTuple):
    """What a :class:`GrpcTask` uses of its :class:`GrpcClient`, handed over by the client."""

    get: Callable[[str, float], pb.Task]
    cancel: Callable[[str], pb.Task]
    stream: Callable[[str], Iterator[Any]]


class _AsyncLink(NamedTuple):
    """What an :class:`AsyncGrpcTask` uses of its :class:`AsyncGrpcClient`, handed over by the client."""

    get: Callable[[str, float], Awaitable[pb.Task]]
    cancel: Callable[[str], Awaitable[pb.Task]]
    stream: Callable[[str], AsyncIterator[Any]]


class _TaskView(Generic[_L]):
    def __init__(self, link: _L, task: pb.Task) -> None:
        self._link = link
        self.id: str = task.id
        self.algorithm: str = task.algorithm
        self._task = task

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id} {self.algorithm} {self.state}>"

    @property
    def state(self) -> str:
        """The last state the server reported (``queued``, ``running``, ``succeeded``, ...)."""
        return self._task.state


# -- the blocking face -------------------------------------------------------------------------------


class GrpcTask(_TaskView[_Link]):
    """A task submitted through :class:`GrpcClient`, like :class:`~edgecompute.client.RemoteTask`."""

    def done(self) -> bool:
        if self._task.state in _LIVE:
            self._task = self._link.get(self.id, 0.0)
        return self._task.state not in _LIVE

    def result(self, timeout: float | None = None) -> Response:
        """Wait for the task to end (at most ``timeout`` seconds, then ``TimeoutError``); return its
        response or raise its error."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._task.state in _LIVE:
            left = _STEP if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"task {self.id} did not end within {timeout} s")
            self._task = self._link.get(self.id, min(left, _STEP))
        return _response(self._task)

    def cancel(self) -> bool:
        """Cancel the task; False if it had already ended."""
        was_live = self._task.state in _LIVE
        self._task = self._link.cancel(self.id)
        return was_live and self._task.state == "cancelled"

    def stream(self) -> Iterator[Any]:
        """Yield the task's chunks as they come; raises its error at the end. Leaving early does not
        cancel the task (as ``TaskHandle.stream``)."""
        return self._link.stream(self.id)


class GrpcClient:
    """The blocking face: ``with GrpcClient("host:port", api_key) as rt: rt.run(...)``.

    ``credentials`` (``grpc.ssl_channel_credentials(...)``) for a ``grpcs://`` server with its own CA;
    ``encoding`` ``"frame"`` (raw buffers, the default) or ``"json"`` for the outputs it asks for.
    """

    def __init__(self, target: str, api_key: str | None = None, *, timeout: float = 60.0,
                 credentials: grpc.ChannelCredentials | None = None, max_answer_bytes: int = MAX_ANSWER_BYTES,
                 encoding: str = "frame") -> None:
        core = self._core = _Core(target, api_key, timeout, max_answer_bytes, encoding)
        if core.secure or credentials is not None:
            self._channel = grpc.secure_channel(core.address, credentials or grpc.ssl_channel_credentials(),
                                                options=core.options)
        else:
            self._channel = grpc.insecure_channel(core.address, options=core.options)
        channel = self._channel
        task = pb.Task.FromString
        self._submit = channel.unary_unary(METHODS["Submit"], pb.SubmitRequest.SerializeToString, task)
        self._get_task = channel.unary_unary(METHODS["Get"], pb.TaskRequest.SerializeToString, task)
        self._cancel = channel.unary_unary(METHODS["Cancel"], pb.TaskRequest.SerializeToString, task)
        self._events = channel.unary_stream(METHODS["Stream"], pb.TaskRequest.SerializeToString,
                                            pb.StreamEvent.FromString)
        self._algorithms = channel.unary_unary(METHODS["Algorithms"], pb.ListRequest.SerializeToString,
                                               pb.Listing.FromString)
        self._executors = channel.unary_unary(METHODS["Executors"], pb.ListRequest.SerializeToString,
                                              pb.Listing.FromString)
        self._link = _Link(self._get, self._cancel_task, self._stream)

    @property
    def target(self) -> str:
        return self._core.target

    @property
    def timeout(self) -> float:
        return self._core.timeout

    def __enter__(self) -> GrpcClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: Any, request: Any, *, wait: float | None, budget: float | None = None) -> Any:
        """One call, retried after a 429/503 refusal while ``budget`` (default: the client's timeout) lasts."""
        core = self._core
        until = time.monotonic() + (budget if budget is not None else core.timeout)
        while True:
            try:
                return method(request, timeout=core.deadline(wait), metadata=core.metadata)
            except grpc.RpcError as exc:
                failed: _Failed = exc
                delay = _retry_delay(failed)
                if delay is not None and time.monotonic() + delay < until:
                    time.sleep(delay)
                    continue
                raise _error(failed, core.target) from None

    def _get(self, task_id: str, wait: float) -> pb.Task:
        result: pb.Task = self._call(self._get_task, self._core.task_request(task_id, wait), wait=wait)
        return result

    def _cancel_task(self, task_id: str) -> pb.Task:
        result: pb.Task = self._call(self._cancel, self._core.task_request(task_id), wait=0.0)
        return result

    def submit(self, algorithm: str, inputs: Any = None, **options: Any) -> GrpcTask:
        """Queue one request on the server; returns at once."""
        request = self._core.submit_request(algorithm, inputs, options, 0.0)
        return GrpcTask(self._link, self._call(self._submit, request, wait=0.0, budget=options.get("timeout")))

    def run(self, algorithm: str, inputs: Any = None, **options: Any) -> Response:
        """Run one request and return its response (raising its error). If the caller gives up
        (``KeyboardInterrupt``), the task is cancelled, as ``Runtime.run`` does."""
        timeout = options.get("timeout")
        request = self._core.submit_request(algorithm, inputs, options, timeout if timeout else _UNTIL_END)
        submitted: pb.Task = self._call(self._submit, request, wait=timeout, budget=timeout)
        if submitted.state in _LIVE:
            task = GrpcTask(self._link, submitted)
            try:
                return task.result()
            finally:
                if task.state in _LIVE:  # the last state the server reported: no round trip
                    self._cancel_quietly(task.id)
        return _response(submitted)

    def stream(self, algorithm: str, inputs: Any = None, **options: Any) -> Iterator[Any]:
        """Run one request and yield its chunks as they come; raises its error at the end. Leaving the
        loop early cancels the task, as ``Runtime.stream``."""
        task = self.submit(algorithm, inputs, **options)
        ended = False
        try:
            yield from self._stream(task.id)
            ended = True
        finally:
            if not ended:
                self._cancel_quietly(task.id)

    def map(self, algorithm: str, items: Iterable[Any], *, progress: bool = False,
            return_exceptions: bool = False, **options: Any) -> list[Any]:
        """Run ``algorithm`` on every item; return the outputs in order (the server runs them concurrently)."""
        tasks = [self.submit(algorithm, item, **options) for item in items]
        results: list[Any] = []
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(tasks), desc=algorithm, unit="task")
        try:
            for task in tasks:
                try:
                    results.append(task.result().outputs)
                except EdgeComputeError as exc:
                    if not return_exceptions:
                        raise
                    results.append(exc)
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
            for task in tasks[len(results):]:
                self._cancel_quietly(task.id)
        return results

    def algorithms(self) -> list[dict[str, Any]]:
        """The algorithms this key may run."""
        return _listing(self._call(self._algorithms, pb.ListRequest(), wait=0.0), "algorithms")

    def executors(self) -> list[dict[str, Any]]:
        """The executors this key reaches, with their health."""
        return _listing(self._call(self._executors, pb.ListRequest(), wait=0.0), "executors")

    def _cancel_quietly(self, task_id: str) -> None:
        try:
            self._call(self._cancel, self._core.task_request(task_id), wait=0.0)
        except EdgeComputeError:
            pass  # best effort: the caller's own error matters more

    def _stream(self, task_id: str) -> Iterator[Any]:
        call = self._events(self._core.task_request(task_id), metadata=self._core.metadata)
        try:
            for event in call:
                if event.HasField("chunk"):
                    yield decode_value(event.chunk.data)
                else:
                    _response(event.end)
                    return
        except grpc.RpcError as exc:
            raise _error(exc, self._core.target) from None
        finally:
            call.cancel()  # a reader that left: the server's stream ends at once
        raise RemoteUnavailable(f"the stream of task {task_id} ended before the task did")


# -- the asyncio face --------------------------------------------------------------------------------


class AsyncGrpcTask(_TaskView[_AsyncLink]):
    """A task submitted through :class:`AsyncGrpcClient`, like :class:`~edgecompute.client.AsyncRemoteTask`."""

    def done(self) -> bool:
        """Whether the task had ended when the server last answered about it (no I/O)."""
        return self._task.state not in _LIVE

    async def refresh(self) -> str:
        """Ask the server for the task's state now."""
        self._task = await self._link.get(self.id, 0.0)
        return self.state

    async def result(self, timeout: float | None = None) -> Response:
        """Wait for the task to end (at most ``timeout`` seconds, then ``TimeoutError``); return its
        response or raise its error. Cancelling the caller does not cancel the task."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._task.state in _LIVE:
            left = _STEP if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"task {self.id} did not end within {timeout} s")
            self._task = await self._link.get(self.id, min(left, _STEP))
        return _response(self._task)

    async def cancel(self) -> bool:
        """Cancel the task, queued or running. Returns False if it had already ended."""
        was_live = self._task.state in _LIVE
        self._task = await self._link.cancel(self.id)
        return was_live and self._task.state == "cancelled"

    def stream(self) -> AsyncIterator[Any]:
        """Yield the task's chunks as they come; raises its error at the end. Leaving early does not
        cancel the task (as ``TaskHandle.stream``)."""
        return self._link.stream(self.id)


class AsyncGrpcClient:
    """The asyncio face: ``async with AsyncGrpcClient("host:port", key) as c: await c.run(...)``; the
    same methods as :class:`GrpcClient`, awaited. Calls share one HTTP/2 connection."""

    def __init__(self, target: str, api_key: str | None = None, *, timeout: float = 60.0,
                 credentials: grpc.ChannelCredentials | None = None, max_answer_bytes: int = MAX_ANSWER_BYTES,
                 encoding: str = "frame") -> None:
        core = self._core = _Core(target, api_key, timeout, max_answer_bytes, encoding)
        if core.secure or credentials is not None:
            self._channel = grpc.aio.secure_channel(core.address, credentials or grpc.ssl_channel_credentials(),
                                                    options=core.options)
        else:
            self._channel = grpc.aio.insecure_channel(core.address, options=core.options)
        channel = self._channel
        task = pb.Task.FromString
        self._submit = channel.unary_unary(METHODS["Submit"], pb.SubmitRequest.SerializeToString, task)
        self._get_task = channel.unary_unary(METHODS["Get"], pb.TaskRequest.SerializeToString, task)
        self._cancel = channel.unary_unary(METHODS["Cancel"], pb.TaskRequest.SerializeToString, task)
        self._events = channel.unary_stream(METHODS["Stream"], pb.TaskRequest.SerializeToString,
                                            pb.StreamEvent.FromString)
        self._algorithms = channel.unary_unary(METHODS["Algorithms"], pb.ListRequest.SerializeToString,
                                               pb.Listing.FromString)
        self._executors = channel.unary_unary(METHODS["Executors"], pb.ListRequest.SerializeToString,
                                              pb.Listing.FromString)
        self._link = _AsyncLink(self._get, self._cancel_task, self._stream)

    @property
    def target(self) -> str:
        return self._core.target

    @property
    def timeout(self) -> float:
        return self._core.timeout

    async def __aenter__(self) -> AsyncGrpcClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._channel.close()

    async def _call(self, method: Any, request: Any, *, wait: float | None, budget: float | None = None) -> Any:
        core = self._core
        until = time.monotonic() + (budget if budget is not None else core.timeout)
        while True:
            try:
                return await method(request, timeout=core.deadline(wait), metadata=core.metadata)
            except grpc.aio.AioRpcError as exc:
                delay = _retry_delay(exc)
                if delay is not None and time.monotonic() + delay < until:
                    await asyncio.sleep(delay)
                    continue
                raise _error(exc, core.target) from None

    async def _get(self, task_id: str, wait: float) -> pb.Task:
        result: pb.Task = await self._call(self._get_task, self._core.task_request(task_id, wait), wait=wait)
        return result

    async def _cancel_task(self, task_id: str) -> pb.Task:
        result: pb.Task = await self._call(self._cancel, self._core.task_request(task_id), wait=0.0)
        return result

    async def submit(self, algorithm: str, inputs: Any = None, **options: Any) -> AsyncGrpcTask:
        """Queue one request on the server; returns its task at once."""
        request = self._core.submit_request(algorithm, inputs, options, 0.0)
        submitted = await self._call(self._submit, request, wait=0.0, budget=options.get("timeout"))
        return AsyncGrpcTask(self._link, submitted)

    async def run(self, algorithm: str, inputs: Any = None, **options: Any) -> Response:
        """Run one request (one round trip for a short task) and return its response or raise its
        error. A caller cancelled after the server answered "still running" cancels the task."""
        timeout = options.get("timeout")
        request = self._core.submit_request(algorithm, inputs, options, timeout if timeout else _UNTIL_END)
        submitted: pb.Task = await self._call(self._submit, request, wait=timeout, budget=timeout)
        if submitted.state in _LIVE:
            task = AsyncGrpcTask(self._link, submitted)
            try:
                return await task.result()
            finally:
                if not task.done():
                    await self._cancel_quietly(task.id)
        return _response(submitted)

    async def stream(self, algorithm: str, inputs: Any = None, **options: Any) -> AsyncIterator[Any]:
        """Run one request and yield its chunks as they come; raises its error at the end. Leaving the
        loop early cancels the task, as ``Runtime.stream``."""
        task = await self.submit(algorithm, inputs, **options)
        ended = False
        try:
            async for chunk in self._stream(task.id):
                yield chunk
            ended = True
        finally:
            if not ended:
                await self._cancel_quietly(task.id)

    async def map(self, algorithm: str, items: Iterable[Any], *, return_exceptions: bool = False,
                  **options: Any) -> list[Any]:
        """Run ``algorithm`` on every item concurrently; return the outputs in order. The first
        failure is raised unless ``return_exceptions=True``."""
        async def one(item: Any) -> Any:
            try:
                return (await self.run(algorithm, item, **options)).outputs
            except EdgeComputeError as exc:
                if not return_exceptions:
                    raise
                return exc

        return list(await asyncio.gather(*(one(item) for item in items)))

    async def algorithms(self) -> list[dict[str, Any]]:
        """The algorithms this key may run."""
        return _listing(await self._call(self._algorithms, pb.ListRequest(), wait=0.0), "algorithms")

    async def executors(self) -> list[dict[str, Any]]:
        """The executors this key reaches, with their health."""
        return _listing(await self._call(self._executors, pb.ListRequest(), wait=0.0), "executors")

    async def _cancel_quietly(self, task_id: str) -> None:
        try:
            async with asyncio.timeout(_CANCEL_BUDGET):
                await self._call(self._cancel, self._core.task_request(task_id), wait=0.0)
        except (EdgeComputeError, TimeoutError):
            pass  # best effort: the caller's own error matters more

    async def _stream(self, task_id: str) -> AsyncIterator[Any]:
        call = self._events(self._core.task_request(task_id), metadata=self._core.metadata)
        try:
            async for event in call:
                if event.HasField("chunk"):
                    yield decode_value(event.chunk.data)
                else:
                    _response(event.end)
                    return
        except grpc.aio.AioRpcError as exc:
            raise _error(exc, self._core.target) from None
        finally:
            call.cancel()
        raise RemoteUnavailable(f"the stream of task {task_id} ended before the task did")
