"""A client for ``edgecompute serve``, shaped like :class:`~edgecompute.Runtime` and the scheduler.

Install it with ``pip install "edgecompute[client]"``.

::

    from edgecompute.client import connect

    with connect() as rt:        # a Runtime, or a Client when EDGECOMPUTE_URL (or url=) names a server
        rt.run("cpp/sobel", {"image": img})
        for token in rt.stream("ml/generate", "Once upon"):
            print(token, end="")

``run``/``submit``/``stream``/``map`` take the same arguments as the Runtime's (``params``,
``priority``, ``timeout``, ``metadata``, ``retries``) and raise the same error classes, so code moves
between embedded and remote by configuration. Inputs and outputs cross in the binary frame of
:mod:`edgecompute.wire` (numpy arrays and bytes without base64).

One core, two faces (as httpx does): :class:`_Core` decides every request and reads every answer
as a generator that yields :class:`_Call` (an HTTP exchange) or :class:`_Sleep` steps; :class:`Client`
runs those steps with blocking httpx, :class:`AsyncClient` with a small asyncio HTTP/1.1 keep-alive
pool. Only the I/O differs between the two.

Timeouts. The client's ``timeout`` bounds each HTTP step (connecting, sending, and an answer beyond
the wait the step asked the server for); it never bounds the task. A request waits as long as the
task may run: up to its own ``timeout`` (then the server's ``TaskTimeout`` comes back), or without
end when it has none, as ``Runtime.run`` does. A 429 or 503 answer is retried after its
``Retry-After`` while the request's ``timeout`` (or the client's) allows.
"""

from __future__ import annotations

import asyncio
import difflib
import json
import os
import ssl
import time
import urllib.parse
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Generator, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, TypedDict, TypeVar, Unpack

from . import errors, wire
from .errors import EdgeComputeError, InvalidRequest
from .models import Response

if TYPE_CHECKING:
    from ._runtime import Runtime
    from .config import Config

__all__ = ["AsyncClient", "AsyncRemoteTask", "Client", "Forbidden", "NotFound", "RateLimited", "RemoteError",
           "RemoteTask", "RemoteUnavailable", "Unauthorized", "connect"]

class RemoteOptions(TypedDict, total=False):
    """The keyword options of a remote call: the :class:`Request` fields the gateway takes.

    Typed, so that a type checker flags a misspelt option (``priorty=5``) by name; at run time the
    client names it too, with the close match. None means "not given", as in ``Runtime.run``.
    """

    params: Mapping[str, Any] | None
    priority: int | None
    timeout: float | None
    metadata: Mapping[str, Any] | None
    retries: int | None


_OPTIONS = frozenset(RemoteOptions.__annotations__)
_LIVE = frozenset({"queued", "running"})
#: the longest wait one long-poll GET asks for; the server clamps it to its max_wait
_STEP = 20.0
#: how long a best-effort DELETE (a caller that gave up) may take
_CANCEL_BUDGET = 5.0
#: the default bound on one answer's body (a task's outputs arrive in one); a larger answer is
#: refused before it is read, so a faulty or hostile server cannot make the client allocate more
MAX_ANSWER_BYTES = 256 * 1024 * 1024
_T = TypeVar("_T")
_L = TypeVar("_L")  # what a task view uses of its face: a _Link or an _AsyncLink


# -- errors ------------------------------------------------------------------------------------------


class RemoteError(EdgeComputeError):
    """The server refused a request for a reason the embedded Runtime has no class for.

    ``status`` is the HTTP status (0 when no answer came), ``problem`` the RFC 9457 body, ``kind``
    the server's error class.
    """

    def __init__(self, message: str, *, status: int = 0, problem: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.problem = problem or {}
        self.kind = str(self.problem.get("error", ""))
        self.retry_after = self.problem.get("retry_after")


class RemoteUnavailable(RemoteError, ConnectionError):
    """No answer: the server could not be reached, dropped the connection, or did not answer
    within the client's ``timeout`` for one HTTP step. The task, if it was submitted, may still run."""

    retryable = True


class Unauthorized(RemoteError):
    """401: no key, or a wrong one."""


class Forbidden(RemoteError):
    """403: the key's scopes do not reach this algorithm."""


class RateLimited(RemoteError):
    """429: the key's rate limit or in-flight cap; ``retry_after`` says when to come back."""

    retryable = True


class NotFound(RemoteError, LookupError):
    """404: no such task for this key (or no such route); 410: the task's result is no longer kept."""


# the server names the class in "error"; a problem without one falls back on its type (slug)
_BY_SLUG: dict[str, type[EdgeComputeError]] = {
    "unknown-algorithm": errors.UnknownAlgorithm, "invalid-request": errors.InvalidRequest,
    "bad-request": errors.InvalidRequest, "payload-too-large": errors.InvalidRequest,
    "uri-too-long": errors.InvalidRequest, "headers-too-large": errors.InvalidRequest,
    "infeasible": errors.InfeasibleRequest, "task-timeout": errors.TaskTimeout,
    "task-cancelled": errors.TaskCancelled, "task-failed": errors.ExecutorError,
}
# 410: a finished task whose result the server no longer keeps (its keep_finished budgets)
_BY_STATUS: dict[int, type[RemoteError]] = {401: Unauthorized, 403: Forbidden, 404: NotFound, 408: RemoteUnavailable,
                                           410: NotFound, 429: RateLimited}


def _edgecompute_class(name: Any) -> type[EdgeComputeError] | None:
    if not isinstance(name, str) or name not in errors.__all__:
        return None
    cls = getattr(errors, name)
    return cls if isinstance(cls, type) and issubclass(cls, EdgeComputeError) else None


def _rebuild(cls: type[EdgeComputeError], detail: str, problem: dict[str, Any]) -> EdgeComputeError:
    """An instance of ``cls`` carrying the server's message. Classes whose constructor takes more
    than a message (``UnknownAlgorithm(algorithm, known)``) are built without it, their fields
    set to what the message allows: the class and the text are what matter to a caller."""
    error = cls.__new__(cls)
    Exception.__init__(error, detail)
    if isinstance(error, errors.ExecutorError):
        error.retryable = isinstance(error, errors.ExecutorCrashed)
    if isinstance(error, (errors.UnknownAlgorithm, errors.AmbiguousAlgorithm)):
        error.algorithm = ""
    if isinstance(error, (errors.UnknownAlgorithm, errors.UnknownExecutor)):
        error.known = []  # the server names only what this key may use, in the message
    if isinstance(error, errors.AmbiguousAlgorithm):
        error.candidates = []
    if isinstance(error, errors.UnknownExecutor):
        error.name = ""
    if isinstance(error, errors.PluginError):
        error.plugin, error.reason = "", detail
    error.problem = problem  # type: ignore[attr-defined]  # for diagnostics: request_id, instance
    return error


def _error(problem: dict[str, Any], status: int) -> EdgeComputeError:
    """The exception for a problem body: the class the embedded Runtime raises for the same request."""
    detail = str(problem.get("detail") or problem.get("title") or f"HTTP {status}")
    cls = _edgecompute_class(problem.get("error"))
    if cls is None and status not in _BY_STATUS:
        slug = str(problem.get("type", "")).rpartition("/")[2]
        cls = _BY_SLUG.get(slug)
    if cls is not None:
        return _rebuild(cls, detail, problem)
    return _BY_STATUS.get(status, RemoteError)(detail, status=status, problem=problem)


def _check_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The options given (None is "not given", as in ``Runtime.run``), checked as the server would."""
    unknown = set(options) - _OPTIONS
    if unknown:
        hints = []
        for name in sorted(unknown):
            close = difflib.get_close_matches(name, _OPTIONS, n=1)
            hints.append(f"{name} (did you mean {close[0]}?)" if close else name)
        raise InvalidRequest(f"unknown option(s) {', '.join(hints)}; valid remotely: {', '.join(sorted(_OPTIONS))}")
    timeout = options.get("timeout")
    if timeout is not None and (type(timeout) not in (int, float) or not timeout > 0):
        raise InvalidRequest(f"timeout must be a number of seconds > 0, not {timeout!r}")
    return {key: value for key, value in options.items() if value is not None}


def _response(document: dict[str, Any]) -> Response:
    error = document.get("error")
    if error is not None:
        raise _error(error if isinstance(error, dict) else {"detail": str(error)}, 200)
    return Response(document.get("outputs"), document.get("executor", ""), document.get("timings") or {})


# -- the sans-I/O core -------------------------------------------------------------------------------


class _Call:
    """One HTTP exchange for a face to perform. ``read`` bounds the wait for the answer (None: no bound)."""

    __slots__ = ("body", "method", "read", "target")

    def __init__(self, method: str, target: str, body: bytes | None, read: float | None) -> None:
        self.method = method
        self.target = target  # path and query
        self.body = body
        self.read = read


class _Sleep:
    __slots__ = ("seconds",)

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds


class _Reply:
    """An answer as the core reads it: status, lower-case headers, the whole body."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


_Flow = Generator[_Call | _Sleep, _Reply | None, _T]


def _decode(reply: _Reply) -> dict[str, Any]:
    media = reply.headers.get("content-type", "").split(";", 1)[0].strip()
    if media == wire.BINARY:
        return wire.decode_frame(reply.body)
    try:
        document = json.loads(reply.body)
    except ValueError:
        raise RemoteError(f"the server answered HTTP {reply.status} with a body that is not JSON",
                          status=reply.status) from None
    if not isinstance(document, dict):
        raise RemoteError(f"the server answered {type(document).__name__}, not an object", status=reply.status)
    return document if media == "application/problem+json" else dict(wire.from_jsonable(document))


def _raise_for(reply: _Reply) -> None:
    if reply.status < 400:
        return
    try:
        problem = json.loads(reply.body)
    except ValueError:
        problem = {"detail": reply.body[:500].decode(errors="replace") or f"HTTP {reply.status}"}
    raise _error(problem if isinstance(problem, dict) else {"detail": str(problem)}, reply.status)


def _retry_delay(reply: _Reply) -> float | None:
    if reply.status not in (429, 503):
        return None
    try:
        return max(0.0, float(reply.headers.get("retry-after", "1")))
    except ValueError:
        return 1.0


_NOTHING = object()


class _ServerSentEvents:
    """Reads a task's SSE stream line by line: ``feed`` returns a chunk's value (or ``_NOTHING``);
    the ``end`` event raises the task's error, if it failed, and sets ``ended``."""

    def __init__(self) -> None:
        self.event = ""
        self.ended = False

    def feed(self, line: str) -> Any:
        if line.startswith("event: "):
            self.event = line[7:]
        elif line.startswith("data: "):
            data = wire.from_jsonable(json.loads(line[6:]))
            if self.event == "chunk":
                return data
            if self.event == "end":
                self.ended = True
                _response(data)
        return _NOTHING


def _ws_message(message: str | bytes, ended: list[bool]) -> Any:
    """One WebSocket message: a chunk's value, or (``end``) the task's error raised / ``_NOTHING``."""
    document = json.loads(message)
    if document["type"] == "chunk":
        return wire.from_jsonable(document["data"])
    ended.append(True)
    _response(wire.from_jsonable(document["task"]))
    return _NOTHING


def _ws_refusal(status: int, raw: bytes | bytearray | None) -> EdgeComputeError:
    body = bytes(raw or b"{}")
    problem = json.loads(body) if body.startswith(b"{") else {"detail": body.decode(errors="replace")}
    return _error(problem, status)


class _Core:
    """What both faces share: the requests to make and how to read their answers.

    Every public operation is a generator (a *flow*) that yields the steps to perform and receives
    each :class:`_Reply`; the faces only perform them.
    """

    def __init__(self, url: str, api_key: str | None, timeout: float, max_answer_bytes: int) -> None:
        if not isinstance(timeout, (int, float)) or not timeout > 0:
            raise InvalidRequest(f"the client's timeout must be a number of seconds > 0, not {timeout!r}")
        if type(max_answer_bytes) is not int or max_answer_bytes < 1:
            raise InvalidRequest(f"max_answer_bytes must be an integer >= 1, not {max_answer_bytes!r}")
        self.max_answer_bytes = max_answer_bytes
        self.url = url.rstrip("/")
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidRequest(f"the server URL must be http://host[:port] or https://..., not {url!r}")
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.prefix = parts.path.rstrip("/")
        self.origin = f"{parts.scheme}://{parts.netloc}"
        self.api_key = api_key if api_key is not None else os.environ.get("EDGECOMPUTE_API_KEY")
        self.timeout = float(timeout)
        self.headers = {"accept": f"{wire.BINARY}, {wire.JSON};q=0.5"}
        if self.api_key:
            self.headers["authorization"] = f"Bearer {self.api_key}"

    def too_large(self, size: int | str) -> RemoteError:
        return RemoteError(f"the server's answer has {size} bytes, over the client's max_answer_bytes "
                           f"({self.max_answer_bytes}); raise it with Client(..., max_answer_bytes=N)", status=0)

    def ws_url(self, task_id: str) -> str:
        return f"{'wss' if self.scheme == 'https' else 'ws'}{self.url[len(self.scheme):]}/v1/tasks/{task_id}/ws"

    # -- one exchange ------------------------------------------------------------------------------

    def call(self, method: str, target: str, body: bytes | None = None, *, wait: float | None = 0.0,
             budget: float | None = None) -> _Flow[dict[str, Any]]:
        """One exchange, retried after a 429/503 while ``budget`` (default: the client's timeout)
        lasts. ``wait`` is how long the server may hold the answer (None: as long as a task runs)."""
        deadline = time.monotonic() + (budget if budget is not None else self.timeout)
        read = None if wait is None else wait + self.timeout
        while True:
            reply = yield _Call(method, self.prefix + target, body, read)
            assert reply is not None
            delay = _retry_delay(reply)
            if delay is not None and time.monotonic() + delay < deadline:
                yield _Sleep(delay)
                continue
            _raise_for(reply)
            return _decode(reply)

    # -- tasks -------------------------------------------------------------------------------------

    def submit(self, algorithm: str, inputs: Any, options: Mapping[str, Any], *,
               wait: bool) -> _Flow[dict[str, Any]]:
        """POST the request. With ``wait`` the server holds the answer until the task ends (one
        round trip for a short task; the server runs it inline), bounded by the task's timeout."""
        if not isinstance(algorithm, str):
            raise InvalidRequest(f"algorithm must be a string, not {type(algorithm).__name__}")
        options = _check_options(options)
        body = wire.encode_frame({"algorithm": algorithm, "inputs": inputs, **options})
        timeout = options.get("timeout")
        if not wait:
            return (yield from self.call("POST", "/v1/tasks", body, budget=timeout))
        # the answer comes when the task ends: by its deadline when it has one, else whenever
        return (yield from self.call("POST", "/v1/tasks?wait=true", body, wait=timeout, budget=timeout))

    def poll(self, task_id: str, wait: float) -> _Flow[dict[str, Any]]:
        target = f"/v1/tasks/{task_id}" + (f"?wait={wait:.3f}" if wait > 0 else "")
        return (yield from self.call("GET", target, wait=wait))

    def cancel(self, task_id: str) -> _Flow[dict[str, Any]]:
        return (yield from self.call("DELETE", f"/v1/tasks/{task_id}"))

    def settle(self, document: dict[str, Any], timeout: float | None) -> _Flow[dict[str, Any]]:
        """Long-poll until the task ends, in steps of at most :data:`_STEP` seconds (each HTTP
        step bounded by the client's timeout beyond its wait); ``TimeoutError`` after ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while document["state"] in _LIVE:
            left = _STEP if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"task {document['id']} did not end within {timeout} s")
            document = yield from self.poll(str(document["id"]), min(left, _STEP))
        return document

    def run(self, algorithm: str, inputs: Any, options: Mapping[str, Any]) -> _Flow[dict[str, Any]]:
        """Submit and wait for the end; returns the last task document (ended, or live if the
        caller stopped the flow early: the face then cancels the task)."""
        return (yield from self.submit(algorithm, inputs, options, wait=True))

    @staticmethod
    def algorithms(document: dict[str, Any]) -> list[dict[str, Any]]:
        return list(document["algorithms"])

    @staticmethod
    def executors(document: dict[str, Any]) -> list[dict[str, Any]]:
        return list(document["executors"])


# -- the blocking face -------------------------------------------------------------------------------


def _transport_error(exc: BaseException, core: _Core) -> RemoteUnavailable:
    kind = type(exc).__name__
    if "Timeout" in kind or isinstance(exc, TimeoutError):
        return RemoteUnavailable(f"{core.url} did not answer within the client's timeout ({core.timeout:g} s "
                                 f"per HTTP step; {kind}); the task, if submitted, may still run")
    return RemoteUnavailable(f"cannot reach {core.url}: {kind}: {exc}")


class _Link(NamedTuple):
    """What a :class:`RemoteTask` uses of its :class:`Client`, handed over by the client."""

    drive: Callable[[_Flow[dict[str, Any]]], dict[str, Any]]
    core: _Core
    stream: Callable[[str, str], Iterator[Any]]


class _AsyncLink(NamedTuple):
    """What an :class:`AsyncRemoteTask` uses of its :class:`AsyncClient`, handed over by the client."""

    drive: Callable[[_Flow[dict[str, Any]]], Awaitable[dict[str, Any]]]
    core: _Core
    stream: Callable[[str, str], AsyncIterator[Any]]


class _TaskView(Generic[_L]):
    """What both faces' tasks hold: the server's last word about the task."""

    def __init__(self, link: _L, document: dict[str, Any]) -> None:
        self._link = link
        self.id: str = str(document["id"])
        self.algorithm: str = str(document["algorithm"])
        self._document = document

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id} {self.algorithm} {self.state}>"

    @property
    def state(self) -> str:
        """The last state the server reported (``queued``, ``running``, ``succeeded``, ...)."""
        return str(self._document["state"])


class RemoteTask(_TaskView[_Link]):
    """A task submitted through :class:`Client`: like the Runtime's future, ``result()``,
    ``cancel()``, ``done()``; plus ``id``, ``state``, ``algorithm`` and ``stream()``."""

    def done(self) -> bool:
        if self._document["state"] in _LIVE:
            self._document = self._link.drive(self._link.core.poll(self.id, 0))
        return self._document["state"] not in _LIVE

    def result(self, timeout: float | None = None) -> Response:
        """Wait for the task to end (at most ``timeout`` seconds, then ``TimeoutError``) and return
        its response or raise its error."""
        self._document = self._link.drive(self._link.core.settle(self._document, timeout))
        return _response(self._document)

    def cancel(self) -> bool:
        """Cancel the task; False if it had already ended."""
        was_live = self._document["state"] in _LIVE
        self._document = self._link.drive(self._link.core.cancel(self.id))
        return was_live and self._document["state"] == "cancelled"

    def stream(self, *, transport: str = "sse") -> Iterator[Any]:
        """Yield the task's chunks as they come; raises its error at the end. Leaving early does not
        cancel the task (as ``TaskHandle.stream``)."""
        return self._link.stream(self.id, transport)


class Client:
    """The blocking face: ``with Client(url, api_key) as rt: rt.run(...)``, shaped like :class:`Runtime`.

    ``timeout`` bounds each HTTP step, not the task (see the module docs).
    """

    def __init__(self, url: str, api_key: str | None = None, *, timeout: float = 60.0,
                 max_connections: int = 100, max_answer_bytes: int = MAX_ANSWER_BYTES) -> None:
        import httpx

        self._core = _Core(url, api_key, timeout, max_answer_bytes)
        self._httpx = httpx
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._http = httpx.Client(headers=self._core.headers, timeout=timeout, limits=limits)
        self._link = _Link(self._drive, self._core, self._stream)

    @property
    def url(self) -> str:
        return self._core.url

    @property
    def timeout(self) -> float:
        return self._core.timeout

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- I/O -----------------------------------------------------------------------------------------

    def _perform(self, call: _Call) -> _Reply:
        httpx = self._httpx
        headers = {"content-type": wire.BINARY} if call.body is not None else None
        timeout = httpx.Timeout(self._core.timeout, read=call.read)
        try:
            with self._http.stream(call.method, self._core.origin + call.target, content=call.body,
                                   headers=headers, timeout=timeout) as response:
                limit = self._core.max_answer_bytes
                declared = response.headers.get("content-length", "0")
                if not declared.isdigit() or int(declared) > limit:
                    raise self._core.too_large(declared)  # before reading any of it
                parts, size = [], 0
                for part in response.iter_bytes():
                    size += len(part)
                    if size > limit:
                        raise self._core.too_large(f"more than {limit}")
                    parts.append(part)
                return _Reply(response.status_code, dict(response.headers), b"".join(parts))
        except httpx.TransportError as exc:
            raise _transport_error(exc, self._core) from exc

    def _drive(self, flow: _Flow[_T]) -> _T:
        reply: _Reply | None = None
        while True:
            try:
                step = flow.send(reply)  # the first send(None) starts the flow
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            if isinstance(step, _Sleep):
                time.sleep(step.seconds)
                reply = None
            else:
                reply = self._perform(step)

    # -- work ----------------------------------------------------------------------------------------

    def submit(self, algorithm: str, inputs: Any = None, **options: Unpack[RemoteOptions]) -> RemoteTask:
        """Queue one request on the server; returns at once."""
        return RemoteTask(self._link, self._drive(self._core.submit(algorithm, inputs, options, wait=False)))

    def run(self, algorithm: str, inputs: Any = None, **options: Unpack[RemoteOptions]) -> Response:
        """Run one request and return its response (raising its error). If the caller gives up
        (``KeyboardInterrupt``), the task is cancelled, as ``Runtime.run`` does."""
        document = self._drive(self._core.run(algorithm, inputs, options))
        if document["state"] in _LIVE:
            task = RemoteTask(self._link, document)
            try:
                return task.result()
            finally:
                if task.state in _LIVE:
                    self._cancel_quietly(task.id)
        return _response(document)

    def stream(self, algorithm: str, inputs: Any = None, *, transport: str = "sse",
               **options: Unpack[RemoteOptions]) -> Iterator[Any]:
        """Run one request and yield its chunks as they come (over SSE, or ``transport="ws"``);
        raises its error at the end. Leaving the loop early cancels the task, as ``Runtime.stream``."""
        if transport not in ("sse", "ws"):
            raise InvalidRequest(f"transport must be 'sse' or 'ws', not {transport!r}")
        task = self.submit(algorithm, inputs, **options)
        ended = False
        try:
            yield from self._stream(task.id, transport)
            ended = True
        finally:
            if not ended:
                self._cancel_quietly(task.id)

    def map(self, algorithm: str, items: Iterable[Any], *, progress: bool = False,
            return_exceptions: bool = False, **options: Unpack[RemoteOptions]) -> list[Any]:
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
                self._cancel_quietly(task.id)  # the caller gave up on these, as Runtime.map does
        return results

    def algorithms(self) -> list[dict[str, Any]]:
        """The algorithms this key may run."""
        return _Core.algorithms(self._drive(self._core.call("GET", "/v1/algorithms")))

    def executors(self) -> list[dict[str, Any]]:
        """The executors this key reaches, with their health."""
        return _Core.executors(self._drive(self._core.call("GET", "/v1/executors")))

    def _cancel_quietly(self, task_id: str) -> None:
        try:
            self._drive(self._core.cancel(task_id))
        except EdgeComputeError:
            pass  # best effort: the caller's own error matters more

    def _stream(self, task_id: str, transport: str) -> Iterator[Any]:
        if transport == "ws":
            yield from self._stream_ws(task_id)
            return
        if transport != "sse":
            raise InvalidRequest(f"transport must be 'sse' or 'ws', not {transport!r}")
        httpx = self._httpx
        try:
            with self._http.stream("GET", f"{self._core.url}/v1/tasks/{task_id}/events",
                                   headers={"accept": "text/event-stream"},
                                   timeout=httpx.Timeout(self._core.timeout, read=None)) as response:
                if response.status_code >= 400:
                    response.read()
                    _raise_for(_Reply(response.status_code, dict(response.headers), response.content))
                events = _ServerSentEvents()
                for line in response.iter_lines():
                    chunk = events.feed(line)
                    if chunk is not _NOTHING:
                        yield chunk
                    if events.ended:
                        return
        except httpx.TransportError as exc:
            raise _transport_error(exc, self._core) from exc
        raise RemoteUnavailable(f"the event stream of task {task_id} ended before the task did")

    def _stream_ws(self, task_id: str) -> Iterator[Any]:
        from websockets.exceptions import InvalidStatus, WebSocketException
        from websockets.sync.client import connect as ws_connect

        headers = {"authorization": self._core.headers["authorization"]} if self._core.api_key else {}
        ended: list[bool] = []
        try:
            with ws_connect(self._core.ws_url(task_id), additional_headers=headers,
                            open_timeout=self._core.timeout) as ws:
                for message in ws:
                    chunk = _ws_message(message, ended)
                    if ended:
                        return
                    yield chunk
        except InvalidStatus as exc:
            raise _ws_refusal(exc.response.status_code, exc.response.body) from None
        except (OSError, WebSocketException) as exc:
            raise _transport_error(exc, self._core) from exc
        raise RemoteUnavailable(f"the WebSocket of task {task_id} closed before the task ended")


# -- the asyncio face --------------------------------------------------------------------------------


class _Connection:
    __slots__ = ("reader", "reused", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.reused = False  # served an answer before: the server may have closed it meanwhile

    def close(self) -> None:
        self.writer.close()


class _Pool:
    """HTTP/1.1 keep-alive connections to one server, at most ``size`` at a time.

    Measured, this is what makes :class:`AsyncClient` fast: httpx's async stack spent more per
    request than the whole gateway does (its pool's locks, and on installs without ``sniffio`` a
    failing import per request), so 50 concurrent callers got ~70 requests/s where a raw client got
    thousands. Each request is written in one ``write`` (head and body together: no Nagle wait for
    the body), and answers are read with ``Content-Length`` or chunked framing.
    """

    def __init__(self, core: _Core, size: int) -> None:
        if type(size) is not int or size < 1:
            raise InvalidRequest(f"max_connections must be an integer >= 1, not {size!r}")
        self._core = core
        self._idle: list[_Connection] = []
        self._size = size
        self._open = 0
        self._waiters: list[asyncio.Future[None]] = []
        self._closed = False
        host = core.host if ":" not in core.host else f"[{core.host}]"
        default = 443 if core.scheme == "https" else 80
        authority = host if core.port == default else f"{host}:{core.port}"
        head = [f"Host: {authority}"] + [f"{k}: {v}" for k, v in core.headers.items()]
        self._head = ("\r\n".join(head) + "\r\n").encode("latin-1")
        self._ssl = ssl.create_default_context() if core.scheme == "https" else None

    async def _acquire(self) -> _Connection:
        while True:
            if self._closed:
                raise RemoteUnavailable("the client is closed")
            while self._idle:
                connection = self._idle.pop()
                if not connection.reader.at_eof() and not connection.writer.is_closing():
                    return connection
                self._drop(connection)  # the server closed it while idle
            if self._open < self._size:
                self._open += 1
                try:
                    async with asyncio.timeout(self._core.timeout):
                        reader, writer = await asyncio.open_connection(
                            self._core.host, self._core.port, ssl=self._ssl,
                            server_hostname=self._core.host if self._ssl else None)
                except BaseException as exc:
                    self._open -= 1
                    self._wake()
                    if isinstance(exc, (OSError, TimeoutError)):
                        raise _transport_error(exc, self._core) from exc
                    raise
                return _Connection(reader, writer)
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                elif waiter.done() and not waiter.cancelled():
                    self._wake()  # pass the wake-up we were given on
                raise

    def _release(self, connection: _Connection, reusable: bool) -> None:
        if reusable and not self._closed:
            connection.reused = True
            self._idle.append(connection)
            self._wake()
        else:
            self._drop(connection)

    def _drop(self, connection: _Connection) -> None:
        connection.close()
        self._open -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.pop(0)
            if not waiter.done():
                waiter.set_result(None)
                return

    def _request_bytes(self, call: _Call, accept: bytes | None = None) -> bytes:
        line = f"{call.method} {call.target} HTTP/1.1\r\n".encode("latin-1")
        extra = b"accept: " + accept + b"\r\n" if accept is not None else b""
        if call.body is None:
            return line + self._head + extra + b"\r\n"
        length = f"content-type: {wire.BINARY}\r\ncontent-length: {len(call.body)}\r\n\r\n".encode()
        return line + self._head + extra + length + call.body

    async def perform(self, call: _Call) -> _Reply:
        data = self._request_bytes(call)
        for attempt in (0, 1):
            connection = await self._acquire()
            got_bytes = False
            try:
                connection.writer.write(data)
                async with asyncio.timeout(call.read):
                    head = await connection.reader.readuntil(b"\r\n\r\n")
                    got_bytes = True
                    status, headers, keep = _parse_head(head)
                    body = await _read_body(connection.reader, headers, status, call.method, self._core)
            except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    TimeoutError) as exc:
                self._drop(connection)
                stale = isinstance(exc, (asyncio.IncompleteReadError, ConnectionError)) and not got_bytes
                if stale and attempt == 0 and connection.reused:
                    continue  # a kept-alive connection the server had closed: once more on a new one
                raise _transport_error(exc, self._core) from exc
            except BaseException:
                self._drop(connection)  # cancelled mid-exchange: the connection's state is unknown
                raise
            # a body framed by the connection's end leaves nothing to reuse
            self._release(connection, keep and ("content-length" in headers or status in (204, 304)
                                                or headers.get("transfer-encoding", "").lower() == "chunked"))
            return _Reply(status, headers, body)
        raise AssertionError("unreachable")

    async def lines(self, call: _Call) -> AsyncGenerator[str, None]:
        """A streamed answer's lines (server-sent events); raises the problem if the answer is one."""
        connection = await self._acquire()
        done = False
        try:
            connection.writer.write(self._request_bytes(call, b"text/event-stream"))
            async with asyncio.timeout(self._core.timeout):
                status, headers, keep = _parse_head(await connection.reader.readuntil(b"\r\n\r\n"))
            if status >= 400:
                body = await _read_body(connection.reader, headers, status, call.method, self._core)
                done = keep
                _raise_for(_Reply(status, headers, body))
            pending = b""
            async for piece in _body_pieces(connection.reader, headers, self._core):
                pending += piece
                if len(pending) > self._core.max_answer_bytes:
                    raise self._core.too_large(f"a line of more than {self._core.max_answer_bytes}")
                *complete, pending = pending.split(b"\n")
                for line in complete:
                    yield line.rstrip(b"\r").decode()
            done = keep
        except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError) as exc:
            raise _transport_error(exc, self._core) from exc
        finally:
            # an answer read to its end keeps its connection; one left midway is closed
            self._release(connection, done)

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            self._drop(connection)
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)


def _parse_head(head: bytes) -> tuple[int, dict[str, str], bool]:
    lines = head.decode("latin-1").split("\r\n")
    status_line = lines[0]
    if not status_line.startswith("HTTP/1.") or len(status_line) < 12:
        raise OSError(f"not an HTTP/1.x answer: {status_line[:60]!r}")
    status = int(status_line[9:12])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    keep = status_line.startswith("HTTP/1.1") and headers.get("connection", "").lower() != "close"
    return status, headers, keep


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str], status: int, method: str,
                     core: _Core) -> bytes:
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return b""
    length = headers.get("content-length")
    if length is not None:
        if not length.isdigit() or int(length) > core.max_answer_bytes:
            raise core.too_large(length)  # decided before allocating
        return await reader.readexactly(int(length)) if length != "0" else b""
    parts, size = [], 0
    async for piece in _body_pieces(reader, headers, core):
        size += len(piece)
        if size > core.max_answer_bytes:
            raise core.too_large(f"more than {core.max_answer_bytes}")
        parts.append(piece)
    return b"".join(parts)


async def _body_pieces(reader: asyncio.StreamReader, headers: dict[str, str], core: _Core) -> AsyncIterator[bytes]:
    limit = core.max_answer_bytes
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0].strip(), 16)
            if size > limit:
                raise core.too_large(f"a chunk of {size}")  # before allocating it
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass  # trailers
                return
            piece = await reader.readexactly(size + 2)
            yield piece[:-2]
    elif "content-length" in headers:
        length = int(headers["content-length"])
        if length > limit:
            raise core.too_large(length)
        yield await reader.readexactly(length)
    else:
        while piece := await reader.read(65536):  # delimited by the connection's end
            yield piece


class AsyncRemoteTask(_TaskView[_AsyncLink]):
    """A task submitted through :class:`AsyncClient`, shaped like the scheduler's ``TaskHandle``:
    ``id``, ``algorithm``, ``state`` (``await refresh()`` asks again), ``done()``, ``await result()``,
    ``await cancel()``, ``stream()``."""

    def done(self) -> bool:
        """Whether the task had ended when the server last answered about it (no I/O)."""
        return self._document["state"] not in _LIVE

    async def refresh(self) -> str:
        """Ask the server for the task's state now."""
        self._document = await self._link.drive(self._link.core.poll(self.id, 0))
        return self.state

    async def result(self, timeout: float | None = None) -> Response:
        """Wait for the task to end (at most ``timeout`` seconds, then ``TimeoutError``); return its
        response or raise its error. Cancelling the caller does not cancel the task (as ``TaskHandle``)."""
        self._document = await self._link.drive(self._link.core.settle(self._document, timeout))
        return _response(self._document)

    async def cancel(self) -> bool:
        """Cancel the task, queued or running. Returns False if it had already ended."""
        was_live = self._document["state"] in _LIVE
        self._document = await self._link.drive(self._link.core.cancel(self.id))
        return was_live and self._document["state"] == "cancelled"

    def stream(self, *, transport: str = "sse") -> AsyncIterator[Any]:
        """Yield the task's chunks as they come; raises its error at the end. Leaving early does not
        cancel the task (as ``TaskHandle.stream``)."""
        return self._link.stream(self.id, transport)


class AsyncClient:
    """The asyncio face: ``async with AsyncClient(url, key) as c: await c.run(...)``.

    The same methods as :class:`Client` (``run``, ``submit``, ``stream``, ``map``, ``algorithms``,
    ``executors``), awaited; ``submit`` returns an :class:`AsyncRemoteTask`. Requests go over at most
    ``max_connections`` kept-alive HTTP/1.1 connections (more concurrent callers wait for one).
    """

    def __init__(self, url: str, api_key: str | None = None, *, timeout: float = 60.0,
                 max_connections: int = 100, max_answer_bytes: int = MAX_ANSWER_BYTES) -> None:
        self._core = _Core(url, api_key, timeout, max_answer_bytes)
        self._pool = _Pool(self._core, max_connections)
        self._link = _AsyncLink(self._drive, self._core, self._stream)

    @property
    def url(self) -> str:
        return self._core.url

    @property
    def timeout(self) -> float:
        return self._core.timeout

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._pool.aclose()

    async def _drive(self, flow: _Flow[_T]) -> _T:
        reply: _Reply | None = None
        while True:
            try:
                step = flow.send(reply)  # the first send(None) starts the flow
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            if isinstance(step, _Sleep):
                await asyncio.sleep(step.seconds)
                reply = None
            else:
                reply = await self._pool.perform(step)

    # -- work ----------------------------------------------------------------------------------------

    async def submit(self, algorithm: str, inputs: Any = None, **options: Unpack[RemoteOptions]) -> AsyncRemoteTask:
        """Queue one request on the server; returns its task at once."""
        return AsyncRemoteTask(self._link, await self._drive(self._core.submit(algorithm, inputs, options, wait=False)))

    async def run(self, algorithm: str, inputs: Any = None, **options: Unpack[RemoteOptions]) -> Response:
        """Run one request (one round trip for a short task) and return its response or raise its
        error. A caller cancelled after the server answered "still running" cancels the task."""
        document = await self._drive(self._core.run(algorithm, inputs, options))
        if document["state"] in _LIVE:
            task = AsyncRemoteTask(self._link, document)
            try:
                return await task.result()
            finally:
                if not task.done():
                    await self._cancel_quietly(task.id)
        return _response(document)

    async def stream(self, algorithm: str, inputs: Any = None, *, transport: str = "sse",
                     **options: Unpack[RemoteOptions]) -> AsyncIterator[Any]:
        """Run one request and yield its chunks as they come (SSE, or ``transport="ws"``); raises
        its error at the end. Leaving the loop early cancels the task, as ``Runtime.stream``."""
        if transport not in ("sse", "ws"):
            raise InvalidRequest(f"transport must be 'sse' or 'ws', not {transport!r}")
        task = await self.submit(algorithm, inputs, **options)
        ended = False
        try:
            async for chunk in self._stream(task.id, transport):
                yield chunk
            ended = True
        finally:
            if not ended:
                await self._cancel_quietly(task.id)

    async def map(self, algorithm: str, items: Iterable[Any], *, return_exceptions: bool = False,
                  **options: Unpack[RemoteOptions]) -> list[Any]:
        """Run ``algorithm`` on every item concurrently (bounded by the connection pool); return the
        outputs in order. The first failure is raised unless ``return_exceptions=True``."""
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
        return _Core.algorithms(await self._drive(self._core.call("GET", "/v1/algorithms")))

    async def executors(self) -> list[dict[str, Any]]:
        """The executors this key reaches, with their health."""
        return _Core.executors(await self._drive(self._core.call("GET", "/v1/executors")))

    async def _cancel_quietly(self, task_id: str) -> None:
        try:
            async with asyncio.timeout(_CANCEL_BUDGET):
                await self._drive(self._core.cancel(task_id))
        except (EdgeComputeError, TimeoutError):
            pass  # best effort: the caller's own error matters more

    async def _stream(self, task_id: str, transport: str) -> AsyncIterator[Any]:
        if transport == "ws":
            async for chunk in self._stream_ws(task_id):
                yield chunk
            return
        if transport != "sse":
            raise InvalidRequest(f"transport must be 'sse' or 'ws', not {transport!r}")
        events = _ServerSentEvents()
        lines = self._pool.lines(_Call("GET", f"{self._core.prefix}/v1/tasks/{task_id}/events", None, None))
        try:
            async for line in lines:
                chunk = events.feed(line)
                if chunk is not _NOTHING:
                    yield chunk
                if events.ended:
                    return
        finally:
            await lines.aclose()
        raise RemoteUnavailable(f"the event stream of task {task_id} ended before the task did")

    async def _stream_ws(self, task_id: str) -> AsyncIterator[Any]:
        from websockets.asyncio.client import connect as ws_connect
        from websockets.exceptions import InvalidStatus, WebSocketException

        headers = {"authorization": self._core.headers["authorization"]} if self._core.api_key else {}
        ended: list[bool] = []
        try:
            async with ws_connect(self._core.ws_url(task_id), additional_headers=headers,
                                  open_timeout=self._core.timeout) as ws:
                async for message in ws:
                    chunk = _ws_message(message, ended)
                    if ended:
                        return
                    yield chunk
        except InvalidStatus as exc:
            raise _ws_refusal(exc.response.status_code, exc.response.body) from None
        except (OSError, WebSocketException) as exc:
            raise _transport_error(exc, self._core) from exc
        raise RemoteUnavailable(f"the WebSocket of task {task_id} closed before the task ended")


def connect(url: str | None = None, *, api_key: str | None = None, config: Config | None = None,
            timeout: float = 60.0) -> Runtime | Client:
    """A started :class:`Runtime` when no server is named, else a :class:`Client` of ``url``
    (default ``$EDGECOMPUTE_URL``). Both are context managers with ``run``/``submit``/``stream``/``map``."""
    url = url if url is not None else os.environ.get("EDGECOMPUTE_URL")
    if url:
        return Client(url, api_key, timeout=timeout)
    from ._runtime import Runtime

    runtime = Runtime(config=config)
    return runtime
