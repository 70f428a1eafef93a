"""A client for ``edgecompute serve``, shaped like :class:`~edgecompute.Runtime`.

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
:mod:`edgecompute.wire` (numpy arrays and bytes without base64). A 429 or 503 answer is retried
after its ``Retry-After`` until the request's ``timeout`` (or the client's) runs out.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import httpx

from . import errors, wire
from .errors import EdgeComputeError, InvalidRequest
from .models import Response

if TYPE_CHECKING:
    from .config import Config
    from .runtime import Runtime

__all__ = ["AsyncClient", "Client", "RemoteError", "RemoteTask", "connect"]

_OPTIONS = frozenset({"params", "priority", "timeout", "metadata", "retries"})
# errors whose constructor takes just a message: the client raises the same class as the Runtime
_SAME_CLASS = {name: getattr(errors, name) for name in (
    "InvalidRequest", "InfeasibleRequest", "QueueFull", "SchedulerClosed", "TaskTimeout", "TaskCancelled",
    "ExecutorError", "ExecutorCrashed", "SandboxViolation")}


class RemoteError(EdgeComputeError):
    """The server refused a request, or a task failed with an error the client has no class for.

    ``status`` is the HTTP status, ``problem`` the RFC 9457 body, ``kind`` the server's error class.
    """

    def __init__(self, message: str, *, status: int = 0, problem: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.problem = problem or {}
        self.kind = str(self.problem.get("error", ""))
        self.retry_after = self.problem.get("retry_after")


class Unauthorized(RemoteError):
    """401: no key, or a wrong one."""


class Forbidden(RemoteError):
    """403: the key's scopes do not reach this algorithm."""


class RateLimited(RemoteError):
    """429: the key's rate limit or in-flight cap; ``retry_after`` says when to come back."""

    retryable = True


class NotFound(RemoteError, LookupError):
    """404: no such task for this key, or no such algorithm."""


def _error(problem: dict[str, Any], status: int) -> EdgeComputeError:
    detail = str(problem.get("detail") or problem.get("title") or f"HTTP {status}")
    kind = problem.get("error")
    cls = _SAME_CLASS.get(kind) if isinstance(kind, str) else None
    if cls is not None:
        error: EdgeComputeError = cls(detail)
        return error
    by_status: dict[int, type[RemoteError]] = {401: Unauthorized, 403: Forbidden, 404: NotFound, 429: RateLimited}
    return by_status.get(status, RemoteError)(detail, status=status, problem=problem)


def _check_options(options: dict[str, Any]) -> dict[str, Any]:
    unknown = set(options) - _OPTIONS
    if unknown:
        raise InvalidRequest(f"unknown option(s) {', '.join(sorted(unknown))}; valid remotely: "
                             f"{', '.join(sorted(_OPTIONS))}")
    return {key: value for key, value in options.items() if value is not None}


def _response(document: dict[str, Any], status: int = 200) -> Response:
    error = document.get("error")
    if error is not None:
        raise _error(error, status)
    return Response(document.get("outputs"), document.get("executor", ""), document.get("timings") or {})


def _decode(response: httpx.Response) -> dict[str, Any]:
    media = response.headers.get("content-type", "").split(";", 1)[0].strip()
    if media == wire.BINARY:
        return wire.decode_frame(response.content)
    document = response.json()
    if not isinstance(document, dict):
        raise RemoteError(f"the server answered {type(document).__name__}, not an object", status=response.status_code)
    return document if media == "application/problem+json" else dict(wire.from_jsonable(document))


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


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        problem = response.json()
    except ValueError:
        problem = {"detail": response.text[:500] or response.reason_phrase}
    raise _error(problem if isinstance(problem, dict) else {"detail": str(problem)}, response.status_code)


def _retry_delay(response: httpx.Response) -> float | None:
    if response.status_code not in (429, 503):
        return None
    try:
        return float(response.headers.get("retry-after", "1"))
    except ValueError:
        return 1.0


class _Base:
    def __init__(self, url: str, api_key: str | None, timeout: float) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("EDGECOMPUTE_API_KEY")
        self.timeout = timeout
        self.headers = {"accept": f"{wire.BINARY}, {wire.JSON};q=0.5"}
        if self.api_key:
            self.headers["authorization"] = f"Bearer {self.api_key}"

    def _body(self, algorithm: str, inputs: Any, options: dict[str, Any]) -> bytes:
        return wire.encode_frame({"algorithm": algorithm, "inputs": inputs, **_check_options(options)})

    def _ws_url(self, task_id: str) -> str:
        base = "ws" + self.url[4:] if self.url.startswith("http") else self.url
        return f"{base}/v1/tasks/{task_id}/ws"


class RemoteTask:
    """A task submitted to a server: like the Runtime's future, ``result()``, ``cancel()``, ``done()``."""

    def __init__(self, client: Client, document: dict[str, Any]) -> None:
        self._client = client
        self.id: str = document["id"]
        self.algorithm: str = document["algorithm"]
        self._document = document

    @property
    def state(self) -> str:
        return str(self._document["state"])

    def done(self) -> bool:
        if self._document["state"] in ("queued", "running"):
            self._document = self._client._get(self.id, 0)
        return self._document["state"] not in ("queued", "running")

    def result(self, timeout: float | None = None) -> Response:
        """Wait for the task to end (at most ``timeout`` seconds) and return its response or raise its error."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._document["state"] in ("queued", "running"):
            left = 30.0 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"task {self.id} did not end within {timeout} s")
            self._document = self._client._get(self.id, min(left, 30.0))
        return _response(self._document)

    def cancel(self) -> bool:
        """Cancel the task; False if it had already ended."""
        was_live = self._document["state"] in ("queued", "running")
        self._document = self._client._request("DELETE", f"/v1/tasks/{self.id}")
        return was_live and self._document["state"] == "cancelled"

    def stream(self, *, transport: str = "sse") -> Iterator[Any]:
        return self._client._stream(self.id, transport)


class Client(_Base):
    """A blocking client: ``with Client(url, api_key) as rt: rt.run(...)``."""

    def __init__(self, url: str, api_key: str | None = None, *, timeout: float = 60.0) -> None:
        super().__init__(url, api_key, timeout)
        self._http = httpx.Client(base_url=self.url, headers=self.headers, timeout=timeout + 5)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, *, content: bytes | None = None,
                 params: dict[str, Any] | None = None, budget: float | None = None) -> dict[str, Any]:
        deadline = time.monotonic() + (budget if budget is not None else self.timeout)
        headers = {"content-type": wire.BINARY} if content is not None else None
        while True:
            response = self._http.request(method, path, content=content, params=params, headers=headers)
            delay = _retry_delay(response)
            if delay is not None and time.monotonic() + delay < deadline:
                time.sleep(delay)
                continue
            _raise_for(response)
            return _decode(response)

    def _get(self, task_id: str, wait: float) -> dict[str, Any]:
        return self._request("GET", f"/v1/tasks/{task_id}", params={"wait": f"{wait:.3f}"} if wait else None)

    def submit(self, algorithm: str, inputs: Any = None, **options: Any) -> RemoteTask:
        """Queue one request on the server; returns at once."""
        body = self._body(algorithm, inputs, options)
        return RemoteTask(self, self._request("POST", "/v1/tasks", content=body, budget=options.get("timeout")))

    def run(self, algorithm: str, inputs: Any = None, **options: Any) -> Response:
        """Run one request and return its response (raising its error)."""
        body = self._body(algorithm, inputs, options)
        wait = options.get("timeout") or self.timeout
        document = self._request("POST", "/v1/tasks", content=body, params={"wait": f"{wait:.3f}"},
                                 budget=options.get("timeout"))
        if document["state"] in ("queued", "running"):
            return RemoteTask(self, document).result()
        return _response(document)

    def stream(self, algorithm: str, inputs: Any = None, *, transport: str = "sse", **options: Any) -> Iterator[Any]:
        """Run one request and yield its chunks as they come (over SSE, or ``transport="ws"``)."""
        task = self.submit(algorithm, inputs, **options)
        return self._stream(task.id, transport)

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
        return results

    def algorithms(self) -> list[dict[str, Any]]:
        return list(self._request("GET", "/v1/algorithms")["algorithms"])

    def executors(self) -> list[dict[str, Any]]:
        return list(self._request("GET", "/v1/executors")["executors"])

    def _stream(self, task_id: str, transport: str) -> Iterator[Any]:
        if transport == "ws":
            yield from self._stream_ws(task_id)
            return
        if transport != "sse":
            raise InvalidRequest(f"transport must be 'sse' or 'ws', not {transport!r}")
        with self._http.stream("GET", f"/v1/tasks/{task_id}/events", headers={"accept": "text/event-stream"},
                               timeout=httpx.Timeout(self.timeout, read=None)) as response:
            if response.status_code >= 400:
                response.read()
                _raise_for(response)
            events = _ServerSentEvents()
            for line in response.iter_lines():
                chunk = events.feed(line)
                if chunk is not _NOTHING:
                    yield chunk
                if events.ended:
                    return

    def _stream_ws(self, task_id: str) -> Iterator[Any]:
        from websockets.exceptions import InvalidStatus
        from websockets.sync.client import connect as ws_connect

        headers = {"authorization": self.headers["authorization"]} if self.api_key else {}
        try:
            with ws_connect(self._ws_url(task_id), additional_headers=headers, open_timeout=self.timeout) as ws:
                for message in ws:
                    document = json.loads(message)
                    if document["type"] == "chunk":
                        yield wire.from_jsonable(document["data"])
                    else:
                        _response(wire.from_jsonable(document["task"]))
                        return
        except InvalidStatus as exc:
            body = exc.response.body or b"{}"
            problem = json.loads(body) if body.startswith(b"{") else {"detail": body.decode(errors="replace")}
            raise _error(problem, exc.response.status_code) from None


class AsyncClient(_Base):
    """The asyncio face: ``async with AsyncClient(url, key) as c: await c.run(...)``."""

    def __init__(self, url: str, api_key: str | None = None, *, timeout: float = 60.0) -> None:
        super().__init__(url, api_key, timeout)
        self._http = httpx.AsyncClient(base_url=self.url, headers=self.headers, timeout=timeout + 5)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, *, content: bytes | None = None,
                       params: dict[str, Any] | None = None, budget: float | None = None) -> dict[str, Any]:
        import asyncio

        deadline = time.monotonic() + (budget if budget is not None else self.timeout)
        headers = {"content-type": wire.BINARY} if content is not None else None
        while True:
            response = await self._http.request(method, path, content=content, params=params, headers=headers)
            delay = _retry_delay(response)
            if delay is not None and time.monotonic() + delay < deadline:
                await asyncio.sleep(delay)
                continue
            _raise_for(response)
            return _decode(response)

    async def submit(self, algorithm: str, inputs: Any = None, **options: Any) -> str:
        """Queue one request; returns the task id (await :meth:`result` for its response)."""
        document = await self._request("POST", "/v1/tasks", content=self._body(algorithm, inputs, options),
                                       budget=options.get("timeout"))
        return str(document["id"])

    async def result(self, task_id: str, timeout: float | None = None) -> Response:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = 30.0 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"task {task_id} did not end within {timeout} s")
            document = await self._request("GET", f"/v1/tasks/{task_id}", params={"wait": f"{min(left, 30.0):.3f}"})
            if document["state"] not in ("queued", "running"):
                return _response(document)

    async def cancel(self, task_id: str) -> None:
        await self._request("DELETE", f"/v1/tasks/{task_id}")

    async def run(self, algorithm: str, inputs: Any = None, **options: Any) -> Response:
        wait = options.get("timeout") or self.timeout
        document = await self._request("POST", "/v1/tasks", content=self._body(algorithm, inputs, options),
                                       params={"wait": f"{wait:.3f}"}, budget=options.get("timeout"))
        if document["state"] in ("queued", "running"):
            return await self.result(str(document["id"]))
        return _response(document)

    async def stream(self, algorithm: str, inputs: Any = None, **options: Any) -> AsyncIterator[Any]:
        """Run one request and yield its chunks as they come (SSE)."""
        task_id = await self.submit(algorithm, inputs, **options)
        async with self._http.stream("GET", f"/v1/tasks/{task_id}/events",
                                     timeout=httpx.Timeout(self.timeout, read=None)) as response:
            if response.status_code >= 400:
                await response.aread()
                _raise_for(response)
            events = _ServerSentEvents()
            async for line in response.aiter_lines():
                chunk = events.feed(line)
                if chunk is not _NOTHING:
                    yield chunk
                if events.ended:
                    return

    async def map(self, algorithm: str, items: Iterable[Any], *, return_exceptions: bool = False,
                  **options: Any) -> list[Any]:
        import asyncio

        ids = [await self.submit(algorithm, item, **options) for item in items]
        results = await asyncio.gather(*(self.result(task_id) for task_id in ids), return_exceptions=True)
        out: list[Any] = []
        for result in results:
            if isinstance(result, BaseException):
                if not return_exceptions or not isinstance(result, Exception):
                    raise result
                out.append(result)
            else:
                out.append(result.outputs)
        return out


def connect(url: str | None = None, *, api_key: str | None = None, config: Config | None = None,
            timeout: float = 60.0) -> Runtime | Client:
    """A started :class:`Runtime` when no server is named, else a :class:`Client` of ``url``
    (default ``$EDGECOMPUTE_URL``). Both are context managers with ``run``/``submit``/``stream``/``map``."""
    url = url if url is not None else os.environ.get("EDGECOMPUTE_URL")
    if url:
        return Client(url, api_key, timeout=timeout)
    from .runtime import Runtime

    runtime = Runtime(config=config)
    return runtime
