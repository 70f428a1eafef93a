"""The gateway: a Starlette app over one in-process :class:`~edgecompute.scheduler.Scheduler`.

Per request the work is kept small (the budget is well under a millisecond): the key is found by a
dict lookup (verified keys are cached), the bucket and the in-flight counter are plain numbers on
the event loop, and a task submitted with ``?wait=`` is awaited through a done callback, not a
polling loop or an extra asyncio task.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from .. import wire
from ..config import Config
from ..errors import AmbiguousAlgorithm, EdgeComputeError, InvalidRequest, UnknownAlgorithm
from ..logs import request_id as request_id_var
from ..metrics import SchedulerMetrics
from ..models import Request
from ..registry import Registry
from ..scheduler import Scheduler, TaskHandle
from .auth import ApiKey, KeyRing
from .openapi import docs_page, openapi_document
from .problems import PROBLEM_JSON, Problem, problem_for_error
from .ratelimit import InFlight, TokenBucket
from .settings import ServerSettings

__all__ = ["Gateway", "build_app", "serve"]

log = logging.getLogger("edgecompute.server")
access_log = logging.getLogger("edgecompute.access")

_SUBMIT_FIELDS = frozenset({"algorithm", "inputs", "params", "priority", "timeout", "metadata", "retries"})
_MAX_PRIORITY = 1000
_MAX_RETRIES = 10
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()


class _Owned:
    __slots__ = ("handle", "key")

    def __init__(self, key: str, handle: TaskHandle) -> None:
        self.key = key
        self.handle = handle


class Gateway:
    """The state behind the routes: scheduler, keys, buckets, the tasks each key owns."""

    def __init__(self, settings: ServerSettings, scheduler: Scheduler) -> None:
        if not settings.keys and not settings.allow_anonymous:
            from ..errors import ConfigError

            raise ConfigError("the server has no API keys: add [[server.keys]] (edgecompute keys new) "
                              "or set server.allow_anonymous = true")
        self.settings = settings
        self.scheduler = scheduler
        self.keys = KeyRing(settings.keys)
        self.buckets: dict[str, TokenBucket] = {}
        for key in (*settings.keys, *([settings.anonymous] if settings.anonymous else [])):
            if key.rate > 0:
                self.buckets[key.name] = TokenBucket(key.rate, key.burst)
        self.in_flight = InFlight()
        self.tasks: dict[str, _Owned] = {}
        self.finished: collections.deque[str] = collections.deque()
        self.metrics = SchedulerMetrics(scheduler)
        from prometheus_client import Counter, Histogram

        self.http_requests = Counter("edgecompute_http_requests", "HTTP requests by route and status",
                                     ["route", "status"], registry=self.metrics.registry)
        self.http_seconds = Histogram("edgecompute_http_request_seconds", "HTTP request latency by route",
                                      ["route"], registry=self.metrics.registry,
                                      buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30))
        self.rejections = Counter("edgecompute_http_rejections", "Requests refused before reaching the scheduler",
                                  ["reason"], registry=self.metrics.registry)
        self._health_checked = 0.0

    # -- auth -------------------------------------------------------------------------------------

    def authenticate(self, headers: Any) -> ApiKey:
        presented = headers.get("authorization")
        if presented is not None:
            scheme, _, token = presented.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                self.rejections.labels("unauthorized").inc()
                raise Problem("unauthorized", "the Authorization header must be 'Bearer <API key>'",
                              headers={"WWW-Authenticate": 'Bearer realm="edgecompute"'})
            presented = token.strip()
        else:
            presented = headers.get("x-api-key")
        if presented is None:
            if self.settings.anonymous is not None:
                key = self.settings.anonymous
            else:
                self.rejections.labels("unauthorized").inc()
                raise Problem("unauthorized", "no API key: send 'Authorization: Bearer <key>'",
                              headers={"WWW-Authenticate": 'Bearer realm="edgecompute"'})
        else:
            found = self.keys.lookup(presented)
            if found is None:
                self.rejections.labels("unauthorized").inc()
                raise Problem("unauthorized", "the API key is not valid",
                              headers={"WWW-Authenticate": 'Bearer realm="edgecompute", error="invalid_token"'})
            key = found
        bucket = self.buckets.get(key.name)
        if bucket is not None:
            wait = bucket.take()
            if wait:
                self.rejections.labels("rate_limited").inc()
                raise Problem("rate-limited", f"key {key.name!r} is limited to {key.rate:g} requests/s "
                              f"(burst {bucket.burst:g})", retry_after=wait)
        return key

    def owned(self, key: ApiKey, task_id: str) -> TaskHandle:
        owned = self.tasks.get(task_id)
        if owned is None or owned.key != key.name:
            # another key's task is answered exactly like a missing one: ids leak nothing
            raise Problem("not-found", f"no task {task_id!r} for this API key")
        return owned.handle

    # -- tasks ------------------------------------------------------------------------------------

    def submit(self, key: ApiKey, document: Any, rid: str | None, *, inline: bool = False) -> TaskHandle:
        """Check and submit a task for ``key``. With ``inline``, a task that can start at once is
        set to run in the calling request's own asyncio task (the caller then awaits
        ``scheduler._execute(handle)``), as ``Scheduler.run`` does: no task of its own, no loop
        round trips."""
        if not isinstance(document, dict):
            raise Problem("invalid-request", "the body must be an object with at least 'algorithm'")
        unknown = set(document) - _SUBMIT_FIELDS
        if unknown:
            raise Problem("invalid-request", f"unknown field(s) {', '.join(sorted(unknown))}; "
                          f"valid: {', '.join(sorted(_SUBMIT_FIELDS))}")
        algorithm = document.get("algorithm")
        if not isinstance(algorithm, str) or not algorithm.strip():
            raise Problem("invalid-request", "'algorithm' must be a non-empty string (executor/algorithm)")
        try:
            selection = self.scheduler.registry.select(algorithm)
        except (UnknownAlgorithm, AmbiguousAlgorithm) as exc:
            if isinstance(exc, AmbiguousAlgorithm) and any(key.allows(c) for c in exc.candidates):
                raise Problem("invalid-request", str(exc), error=type(exc).__name__) from None
            # the core's message lists every algorithm; a key must learn only about its own
            raise Problem("unknown-algorithm", f"no algorithm {algorithm!r} that this API key may use",
                          error="UnknownAlgorithm") from None
        except EdgeComputeError as exc:
            raise problem_for_error(exc) from None
        name = selection.qualified_name
        if not key.allows(name):
            self.rejections.labels("forbidden").inc()
            raise Problem("forbidden", f"key {key.name!r} may not run {name}")
        options = _options(document)
        metadata = dict(options.pop("metadata", {}))
        metadata["api_key"] = key.name
        if rid is not None:
            metadata["request_id"] = rid
        if not self.in_flight.try_add(key.name, key.max_in_flight):
            self.rejections.labels("in_flight").inc()
            raise Problem("too-many-in-flight", f"key {key.name!r} has {key.max_in_flight} unfinished tasks, "
                          "its limit; wait for one to end", retry_after=1)
        try:
            request = Request(name, document.get("inputs"), metadata=metadata, **options)
            scheduler = self.scheduler
            if inline and scheduler._state == "running" and scheduler._queued < scheduler.max_queue:
                handle = scheduler._enqueue(request, caller=asyncio.current_task())
            else:
                handle = scheduler.submit(request)
        except (TypeError, ValueError) as exc:
            self.in_flight.remove(key.name)
            if isinstance(exc, EdgeComputeError):
                raise problem_for_error(exc) from None
            raise Problem("invalid-request", str(exc)) from None
        except EdgeComputeError as exc:
            self.in_flight.remove(key.name)
            raise problem_for_error(exc) from None
        self.tasks[handle.id] = _Owned(key.name, handle)
        owner = key.name
        handle.add_done_callback(lambda h: self._ended(owner, h))
        return handle

    def _ended(self, owner: str, handle: TaskHandle) -> None:
        self.in_flight.remove(owner)
        finished = self.finished
        finished.append(handle.id)
        while len(finished) > self.settings.keep_finished:
            self.tasks.pop(finished.popleft(), None)

    async def wait(self, handle: TaskHandle, seconds: float) -> None:
        if handle.done() or seconds <= 0:
            return
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()

        def wake(*_: Any) -> None:
            if not waiter.done():
                waiter.set_result(None)

        handle.add_done_callback(wake)
        timer = loop.call_later(seconds, wake)
        try:
            await waiter
        finally:
            timer.cancel()

    async def ready(self) -> tuple[bool, dict[str, Any]]:
        now = time.monotonic()
        if now - self._health_checked > 1.0 or not self.metrics.health:
            await self.metrics.check_health()
            self._health_checked = now
        executors = {name: {"status": h.status.value, "message": h.message} for name, h in self.metrics.health.items()}
        running = self.scheduler._state == "running"
        ok = running and all(h["status"] != "down" for h in executors.values())
        return ok, {"status": "ready" if ok else "not ready", "scheduler": self.scheduler._state,
                    "executors": executors}


def _options(document: dict[str, Any]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    params = document.get("params")
    if params is not None:
        if not isinstance(params, dict):
            raise Problem("invalid-request", "'params' must be an object")
        options["params"] = params
    priority = document.get("priority")
    if priority is not None:
        if type(priority) is not int or not -_MAX_PRIORITY <= priority <= _MAX_PRIORITY:
            raise Problem("invalid-request", f"'priority' must be an integer from -{_MAX_PRIORITY} to {_MAX_PRIORITY}")
        options["priority"] = priority
    timeout = document.get("timeout")
    if timeout is not None:
        if type(timeout) not in (int, float) or not 0 < timeout < 1e9:
            raise Problem("invalid-request", "'timeout' must be a number of seconds > 0")
        options["timeout"] = float(timeout)
    metadata = document.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise Problem("invalid-request", "'metadata' must be an object")
        options["metadata"] = metadata
    retries = document.get("retries")
    if retries is not None:
        if type(retries) is not int or not 0 <= retries <= _MAX_RETRIES:
            raise Problem("invalid-request", f"'retries' must be an integer from 0 to {_MAX_RETRIES}")
        options["retries"] = retries
    return options


def task_document(handle: TaskHandle) -> dict[str, Any]:
    """A task as the API shows it."""
    document: dict[str, Any] = {"id": handle.id, "algorithm": handle.algorithm, "state": handle.state.value}
    if handle.progress is not None:
        document["progress"] = handle.progress
    if handle.done():
        error = handle.exception()
        if error is None:
            response = handle._response
            assert response is not None
            document["outputs"] = response.outputs
            document["executor"] = response.executor
            document["timings"] = dict(response.timings)
        else:
            document["error"] = problem_for_error(error).body()
    return document


def _wants_binary(headers: Any) -> bool:
    accept = headers.get("accept")
    return accept is not None and wire.BINARY in accept


def _encode(document: dict[str, Any], binary: bool) -> tuple[bytes, str]:
    try:
        if binary:
            return wire.encode_frame(document), wire.BINARY
        try:
            # the common case, plain JSON with no "$" keys, skips the tagging walk (C speed)
            content = _dumps(document)
            if b'"$' not in content:
                return content, wire.JSON
        except TypeError:
            pass  # bytes or arrays inside: tag them
        return _dumps(wire.to_jsonable(document)), wire.JSON
    except (InvalidRequest, ValueError) as exc:
        # the executor returned something the wire cannot carry: say so instead of a bare 500
        outputs_type = type(document.get("outputs")).__name__
        failed = {key: value for key, value in document.items() if key not in ("outputs", "timings")}
        failed["error"] = Problem("task-failed", f"the task's outputs ({outputs_type}) cannot be encoded: {exc}",
                                  error="InvalidRequest").body()
        return _dumps(failed), wire.JSON


def _problem_response(problem: Problem, path: str | None) -> Response:
    return Response(problem.encode(path, request_id_var.get()), status_code=problem.status,
                    media_type=PROBLEM_JSON, headers=problem.headers)


def _wait_seconds(request: HttpRequest, gateway: Gateway) -> float:
    raw = request.query_params.get("wait")
    if raw is None or raw in ("", "false", "0"):
        return 0.0
    if raw == "true":
        return gateway.settings.max_wait
    try:
        seconds = float(raw)
    except ValueError:
        raise Problem("bad-request", f"'wait' must be true, false or a number of seconds, not {raw!r}") from None
    if not seconds >= 0:
        raise Problem("bad-request", f"'wait' must be >= 0, not {raw!r}")
    return min(seconds, gateway.settings.max_wait)


async def _read_body(request: HttpRequest, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise Problem("bad-request", "Content-Length must be a number")
        if int(declared) > limit:
            raise Problem("payload-too-large", f"the body has {declared} bytes; the limit is {limit}")
    parts = []
    size = 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise Problem("payload-too-large", f"the body is over the limit of {limit} bytes")
        parts.append(part)
    return b"".join(parts)


def _decode_body(body: bytes, content_type: str | None) -> Any:
    media = (content_type or wire.JSON).split(";", 1)[0].strip().lower()
    try:
        if media == wire.BINARY:
            return wire.decode_frame(body)
        if media == wire.JSON or media.endswith("+json"):
            try:
                document = json.loads(body)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise Problem("bad-request", f"the body is not valid JSON: {exc}") from None
            # without a '"$' anywhere there is no tag to resolve: skip the walk
            return wire.from_jsonable(document) if b'"$' in body or b'\\u0024' in body else document
    except InvalidRequest as exc:
        raise Problem("invalid-request", str(exc), error="InvalidRequest") from None
    except RecursionError:
        raise Problem("bad-request", "the body nests too deeply") from None
    raise Problem("unsupported-media-type", f"send {wire.JSON} or {wire.BINARY}, not {media!r}")


Handler = Callable[[HttpRequest], Awaitable[Response]]


def build_app(settings: ServerSettings | None = None, scheduler: Scheduler | None = None, *,
              config: Config | None = None, registry: Registry | None = None) -> Starlette:
    """The ASGI app. It starts ``scheduler`` (default: one built from ``config`` and ``registry``)
    when the server starts, and closes it when the server stops."""
    config = config if config is not None else (scheduler.config if scheduler is not None else Config.load())
    settings = settings if settings is not None else ServerSettings.from_config(config)
    scheduler = scheduler if scheduler is not None else Scheduler(registry, config=config)
    gateway = Gateway(settings, scheduler)

    def route(handler: Callable[[HttpRequest, ApiKey], Awaitable[Response]]) -> Handler:
        async def endpoint(request: HttpRequest) -> Response:
            key = gateway.authenticate(request.headers)
            return await handler(request, key)

        return endpoint

    async def submit(request: HttpRequest, key: ApiKey) -> Response:
        wait = _wait_seconds(request, gateway)
        body = await _read_body(request, settings.max_body_bytes)
        document = _decode_body(body, request.headers.get("content-type"))
        # waiting as long as the server allows: run inline (the answer comes when the task ends)
        handle = gateway.submit(key, document, request_id_var.get(), inline=wait >= settings.max_wait)
        if handle._inline:
            await scheduler._execute(handle)
        elif wait:
            await gateway.wait(handle, wait)
        content, media = _encode(task_document(handle), _wants_binary(request.headers))
        done = handle.done()
        return Response(content, status_code=200 if done else 202, media_type=media,
                        headers=None if done else {"Location": f"/v1/tasks/{handle.id}"})

    async def get_task(request: HttpRequest, key: ApiKey) -> Response:
        handle = gateway.owned(key, request.path_params["task_id"])
        wait = _wait_seconds(request, gateway)
        if wait:
            await gateway.wait(handle, wait)
        content, media = _encode(task_document(handle), _wants_binary(request.headers))
        return Response(content, media_type=media)

    async def cancel_task(request: HttpRequest, key: ApiKey) -> Response:
        handle = gateway.owned(key, request.path_params["task_id"])
        handle.cancel()
        content, media = _encode(task_document(handle), _wants_binary(request.headers))
        return Response(content, media_type=media)

    async def task(request: HttpRequest, key: ApiKey) -> Response:
        # one route for both methods, so a 405 lists them both in Allow
        return await (get_task if request.method != "DELETE" else cancel_task)(request, key)

    async def events(request: HttpRequest, key: ApiKey) -> Response:
        handle = gateway.owned(key, request.path_params["task_id"])
        if handle._streaming:
            raise Problem("conflict", f"task {handle.id} is already being streamed by another reader")

        async def frames() -> AsyncIterator[bytes]:
            try:
                async for chunk in handle.stream():
                    yield b"event: chunk\ndata: " + _dumps(wire.to_jsonable(chunk)) + b"\n\n"
            except EdgeComputeError:
                pass  # the end event below carries the task's error
            content, _ = _encode(task_document(handle), False)
            yield b"event: end\ndata: " + content + b"\n\n"

        return StreamingResponse(frames(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    async def list_algorithms(request: HttpRequest, key: ApiKey) -> Response:
        found = gateway.scheduler.registry.algorithms()
        return JSONResponse({"algorithms": [
            {"name": name, "executor": name.partition("/")[0], "description": algorithm.description,
             "resources": {"cpu": algorithm.resources.cpu, "memory_mb": algorithm.resources.memory_mb,
                           "gpus": algorithm.resources.gpus, "gpu_memory_mb": algorithm.resources.gpu_memory_mb}}
            for name, algorithm in sorted(found.items()) if key.allows(name)]})

    async def list_executors(request: HttpRequest, key: ApiKey) -> Response:
        await gateway.ready()
        rows = []
        for entry in gateway.scheduler.registry.executors():
            if not key.allows_executor(entry.name):
                continue
            health = gateway.metrics.health.get(entry.name)
            rows.append({"name": entry.name, "version": entry.instance.version if entry.instance else None,
                         "algorithms": sorted(f"{entry.name}/{a}" for a in entry.algorithms
                                              if key.allows(f"{entry.name}/{a}")),
                         "health": {"status": health.status.value, "message": health.message} if health else None})
        return JSONResponse({"executors": rows})

    async def healthz(request: HttpRequest) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: HttpRequest) -> Response:
        ok, body = await gateway.ready()
        if not ok:
            problem = Problem("unavailable", f"not ready: scheduler {body['scheduler']}, executors "
                              f"{ {n: h['status'] for n, h in body['executors'].items()} }", retry_after=5)
            return _problem_response(problem, request.url.path)
        return JSONResponse(body)

    async def metrics(request: HttpRequest) -> Response:
        if not settings.public_metrics:
            key = gateway.authenticate(request.headers)
            if not key.may_read_metrics:
                raise Problem("forbidden", f"key {key.name!r} lacks the 'metrics' scope")
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(gateway.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    document = openapi_document()

    async def openapi(request: HttpRequest) -> Response:
        return JSONResponse(document)

    async def docs(request: HttpRequest) -> Response:
        return HTMLResponse(docs_page(document))

    async def stream_ws(websocket: WebSocket) -> None:
        try:
            key = gateway.authenticate(websocket.headers)
            handle = gateway.owned(key, websocket.path_params["task_id"])
            if handle._streaming:
                raise Problem("conflict", f"task {handle.id} is already being streamed by another reader")
        except Problem as problem:
            await _deny(websocket, problem)
            return
        await websocket.accept()
        try:
            try:
                async for chunk in handle.stream():
                    await websocket.send_text(_dumps({"type": "chunk", "data": wire.to_jsonable(chunk)}).decode())
            except EdgeComputeError:
                pass
            content, _ = _encode(task_document(handle), False)
            await websocket.send_text('{"type":"end","task":' + content.decode() + "}")
            await websocket.close()
        except WebSocketDisconnect:
            return  # the reader left; the task goes on and stays readable with GET

    async def on_problem(request: Any, exc: Exception) -> Response:
        assert isinstance(exc, Problem)
        return _problem_response(exc, request.url.path)

    async def on_http(request: Any, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        slug = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "bad-request")
        problem = Problem(slug, str(exc.detail), headers=dict(exc.headers or {}), status=exc.status_code)
        return _problem_response(problem, request.url.path)

    async def on_error(request: Any, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        problem = Problem("internal", f"{type(exc).__name__}: the server failed; see its log "
                          f"(request id {request_id_var.get()})")
        return _problem_response(problem, request.url.path)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with scheduler:
            await gateway.metrics.check_health()
            log.info("gateway ready", extra={"executors": gateway.scheduler.registry.names()})
            yield
        gateway.metrics.close()

    routes = [
        Route("/v1/tasks", route(submit), methods=["POST"]),
        Route("/v1/tasks/{task_id}", route(task), methods=["GET", "DELETE"]),
        Route("/v1/tasks/{task_id}/events", route(events), methods=["GET"]),
        WebSocketRoute("/v1/tasks/{task_id}/ws", stream_ws),
        Route("/v1/algorithms", route(list_algorithms), methods=["GET"]),
        Route("/v1/executors", route(list_executors), methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/docs", docs, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={Problem: on_problem, HTTPException: on_http, Exception: on_error})
    app.state.gateway = gateway
    app.add_middleware(_RequestContext, gateway=gateway)
    return app


async def _deny(websocket: WebSocket, problem: Problem) -> None:
    """Refuse a WebSocket handshake with the problem as an HTTP answer (when the server can)."""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(_problem_response(problem, websocket.url.path))
    else:
        await websocket.close(code=1008, reason=problem.detail[:120])


class _RequestContext:
    """Gives each request an id (``X-Request-ID``), logs it as one JSON line, counts it."""

    def __init__(self, app: ASGIApp, gateway: Gateway) -> None:
        self.app = app
        self.gateway = gateway
        self.access = gateway.settings.access_log
        self._children: dict[tuple[str, int], Any] = {}
        self._timers: dict[str, Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self.app(scope, receive, send)
            return
        rid = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                text = value.decode("latin-1")
                if _REQUEST_ID.fullmatch(text):
                    rid = text
                break
        if rid is None:
            rid = f"{time.time_ns():x}{id(scope) & 0xFFFF:04x}"
        token = request_id_var.set(rid)
        status = 0
        started = time.perf_counter()
        header = (b"x-request-id", rid.encode())

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            path = scope["path"]
            route = _route_label(path, scope.get("method", "WS"))
            child = self._children.get((route, status))
            if child is None:
                child = self._children[(route, status)] = self.gateway.http_requests.labels(route, str(status))
            child.inc()
            timer = self._timers.get(route)
            if timer is None:
                timer = self._timers[route] = self.gateway.http_seconds.labels(route)
            timer.observe(elapsed)
            if self.access and access_log.isEnabledFor(logging.INFO):
                access_log.info("%s %s %d", scope.get("method", "WS"), path, status,
                                extra={"status": status, "ms": round(elapsed * 1000, 3)})
            request_id_var.reset(token)


def _route_label(path: str, method: str) -> str:
    # a bounded label set: task ids are folded away
    if path.startswith("/v1/tasks/"):
        rest = path[len("/v1/tasks/"):]
        suffix = rest.partition("/")[2]
        return f"{method} /v1/tasks/{{id}}" + (f"/{suffix}" if suffix in ("events", "ws") else "")
    if path in ("/v1/tasks", "/v1/algorithms", "/v1/executors", "/healthz", "/readyz", "/metrics",
                "/openapi.json", "/docs"):
        return f"{method} {path}"
    return f"{method} other"


def serve(config: Config, *, registry: Registry | None = None, host: str | None = None,
          port: int | None = None, log_level: str = "info") -> None:
    """Run the gateway with uvicorn (httptools and uvloop when installed) until interrupted."""
    import uvicorn

    from ..logs import configure_json_logging

    settings = ServerSettings.from_config(config)
    configure_json_logging(log_level.upper())
    app = build_app(settings, Scheduler(registry, config=config), config=config)
    uvicorn.run(app, host=host or settings.host, port=port if port is not None else settings.port,
                log_config=None, access_log=False, log_level=log_level, server_header=False,
                http="auto", loop="auto", ws="auto")
