"""The gateway: a Starlette app over one in-process :class:`~edgecompute.Scheduler`.

Per request the work is kept small (the budget is well under a millisecond): the key is found by a
dict lookup (verified keys are cached), the bucket and the in-flight counter are plain numbers on
the event loop, and a task submitted with ``?wait=`` is awaited through a done callback, not a
polling loop or an extra asyncio task.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HttpRequest
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from .. import Registry, Scheduler, TaskHandle, wire
from ..config import Config
from ..errors import AmbiguousAlgorithm, EdgeComputeError, InvalidRequest, PluginError, UnknownAlgorithm
from ..logs import request_id as request_id_var
from ..metrics import SchedulerMetrics
from ..models import Request
from ._auth import ApiKey, KeyRing
from ._openapi import docs_page, openapi_document
from ._problems import PROBLEM_JSON, Problem, problem_for_error
from ._ratelimit import InFlight, TokenBucket
from ._settings import ANONYMOUS, ServerSettings

__all__ = ["Gateway", "build_app", "serve"]

log = logging.getLogger("edgecompute.server")
access_log = logging.getLogger("edgecompute.access")

_SUBMIT_FIELDS = frozenset({"algorithm", "inputs", "params", "priority", "timeout", "metadata", "retries"})
_MAX_PRIORITY = 1000
_MAX_RETRIES = 10
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
#: the capability part of an anonymous task's id, ``<task id>.<token>``: folded out of logs
_TOKEN_IN_PATH = re.compile(r"^(/v1/tasks/[^/.]*)\.[^/]*")
#: Sec-WebSocket-Protocol values: the one the server answers with, and the prefix carrying a key
WS_PROTOCOL = "edgecompute"
WS_KEY_PREFIX = "edgecompute.key."
#: what a container, number or other small item is counted as in a result's size
_ITEM_BYTES = 16


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()


class _Owned:
    """A task as the gateway keeps it: who owns it, its capability (anonymous tasks), the size of
    its kept result, and, once the result is dropped, why."""

    __slots__ = ("algorithm", "gone", "handle", "id", "key", "seq", "size", "token")

    def __init__(self, key: str, handle: TaskHandle, token: str | None) -> None:
        self.key = key
        self.handle = handle
        self.id = handle.id
        self.algorithm = handle.algorithm
        self.token = token
        self.size = 0  # bytes counted against keep_finished_bytes while the result is kept
        self.gone: Problem | None = None  # set when the result was evicted: reads answer it
        self.seq = 0  # chunks delivered to stream readers so far: the next chunk's id

    @property
    def public_id(self) -> str:
        return self.id if self.token is None else f"{self.id}.{self.token}"


def _result_bytes(value: Any, limit: int) -> int:
    """About how many bytes ``value`` takes on the wire (raw buffers, strings, 16 per other item),
    counted without recursion; stops once past ``limit``."""
    total = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, (bytes, bytearray)):
            total += len(item)
        elif isinstance(item, str):
            total += len(item) if item.isascii() else 4 * len(item)
        elif isinstance(item, memoryview):
            total += item.nbytes
        elif isinstance(item, dict):
            total += _ITEM_BYTES
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            total += _ITEM_BYTES
            stack.extend(item)
        else:
            nbytes = getattr(item, "nbytes", None)
            total += nbytes if type(nbytes) is int else _ITEM_BYTES
        if total > limit:
            return total
    return total


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
        # finished tasks whose results are still kept, oldest first, and their bytes in all
        self.kept: collections.OrderedDict[str, _Owned] = collections.OrderedDict()
        self.kept_bytes = 0
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

    def authenticate(self, headers: Any, *, websocket: bool = False) -> ApiKey:
        presented = headers.get("authorization")
        if presented is None and websocket:
            # browsers cannot set headers on a WebSocket: the key may come as a subprotocol,
            # "edgecompute.key.<key>" (headers are not logged the way URLs are)
            for offered in headers.get("sec-websocket-protocol", "").split(","):
                offered = offered.strip()
                if offered.startswith(WS_KEY_PREFIX):
                    presented = "Bearer " + offered[len(WS_KEY_PREFIX):]
                    break
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

    def owned(self, key: ApiKey, task_id: str) -> _Owned:
        """The task ``task_id`` if ``key`` owns it; its result evicted: 410."""
        base, dot, token = task_id.partition(".")
        owned = self.tasks.get(base)
        # another key's task is answered exactly like a missing one: ids leak nothing. Anonymous
        # tasks all share one key, so each needs its own capability: the token after the dot
        if (owned is None or owned.key != key.name
                or (owned.token is None) != (not dot)
                or (owned.token is not None and not hmac.compare_digest(owned.token, token))):
            raise Problem("not-found", f"no task {task_id[:80]!r} for this API key")
        if owned.gone is not None:
            raise owned.gone
        return owned

    def document(self, owned: _Owned) -> dict[str, Any]:
        """The task as the API shows it; a result over ``max_output_bytes`` shows as its error."""
        handle = owned.handle
        document = task_document(handle, owned.public_id)
        if handle.done() and handle.exception() is None and owned.size > self.settings.max_output_bytes:
            document.pop("outputs", None)
            document.pop("timings", None)
            document["error"] = Problem(
                "task-failed", f"the task's outputs are about {owned.size} bytes, over the server's limit of "
                f"{self.settings.max_output_bytes} (server.max_output_bytes): ask for less output",
                error="InvalidRequest").body()
        return document

    # -- tasks ------------------------------------------------------------------------------------

    def submit(self, key: ApiKey, document: Any, rid: str | None, *, inline: bool = False) -> _Owned:
        """Check and submit a task for ``key``. With ``inline``, a task that can start at once is
        set to run in the calling request's own asyncio task (the caller then awaits
        ``scheduler.run_inline(handle)``), as ``Scheduler.run`` does: no task of its own, no loop
        round trips."""
        if not isinstance(document, dict):
            raise Problem("invalid-request", "the body must be an object with at least 'algorithm'")
        extra = set(document) - _SUBMIT_FIELDS
        if extra:
            raise Problem("invalid-request", f"unknown field(s) {', '.join(sorted(extra))[:500]}; "
                          f"valid: {', '.join(sorted(_SUBMIT_FIELDS))}")
        algorithm = document.get("algorithm")
        if not isinstance(algorithm, str) or not algorithm.strip():
            raise Problem("invalid-request", "'algorithm' must be a non-empty string (executor/algorithm)")
        # a key sees only what it may run: out of scope answers exactly as unknown does (same
        # status, same body), and an ambiguous name lists only the candidates the key may run
        unknown = Problem("unknown-algorithm", f"no algorithm {algorithm[:200]!r} that this API key may use",
                          error="UnknownAlgorithm")
        try:
            selection = self.scheduler.registry.select(algorithm)
        except AmbiguousAlgorithm as exc:
            allowed = sorted(c for c in exc.candidates if key.allows(c))
            if len(allowed) > 1:
                raise Problem("invalid-request", f"{algorithm!r} is ambiguous: name one of {', '.join(allowed)}",
                              error="AmbiguousAlgorithm") from None
            if not allowed:
                self.rejections.labels("unknown_algorithm").inc()
                raise unknown from None
            selection = self.scheduler.registry.select(allowed[0])
        except UnknownAlgorithm:
            self.rejections.labels("unknown_algorithm").inc()
            raise unknown from None
        except EdgeComputeError as exc:
            if isinstance(exc, PluginError) and not key.allows(algorithm):
                raise unknown from None  # a key does not learn what is installed outside its scope
            raise problem_for_error(exc) from None
        name = selection.qualified_name
        if not key.allows(name):
            self.rejections.labels("unknown_algorithm").inc()
            raise unknown
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
            handle = self.scheduler.submit(request, inline=inline)
        except (TypeError, ValueError) as exc:
            self.in_flight.remove(key.name)
            if isinstance(exc, EdgeComputeError):
                raise problem_for_error(exc) from None
            raise Problem("invalid-request", str(exc)) from None
        except EdgeComputeError as exc:
            self.in_flight.remove(key.name)
            raise problem_for_error(exc) from None
        owned = self.tasks[handle.id] = _Owned(key.name, handle,
                                               secrets.token_urlsafe(16) if key.name == ANONYMOUS else None)
        handle.add_done_callback(lambda h: self._ended(owned))
        return owned

    def _ended(self, owned: _Owned) -> None:
        self.in_flight.remove(owned.key)
        settings = self.settings
        handle = owned.handle
        if handle.exception() is None:
            response = handle.response
            assert response is not None
            owned.size = _result_bytes(response.outputs, settings.max_output_bytes)
            if owned.size > settings.max_output_bytes:
                # refuse to keep it: drop the outputs now, the task answers with the error
                handle.drop_outputs()
            else:
                self.kept[owned.id] = owned
                self.kept_bytes += owned.size
                while self.kept_bytes > settings.keep_finished_bytes and self.kept:
                    self._evict(self.kept.popitem(last=False)[1])
        finished = self.finished
        finished.append(owned.id)
        while len(finished) > settings.keep_finished:
            gone = self.tasks.pop(finished.popleft(), None)
            if gone is not None and self.kept.pop(gone.id, None) is not None:
                self.kept_bytes -= gone.size

    def _evict(self, owned: _Owned) -> None:
        """Drop a kept result (oldest first) to stay under keep_finished_bytes; reads answer 410."""
        self.kept_bytes -= owned.size
        owned.gone = Problem("result-evicted", f"the result of task {owned.id} ({owned.algorithm}) was dropped "
                             f"to keep finished results under {self.settings.keep_finished_bytes} bytes "
                             "(server.keep_finished_bytes); read results sooner, or submit with ?wait=true")
        owned.handle.drop_outputs()

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
        running = self.scheduler.state == "running"
        ok = running and all(h["status"] != "down" for h in executors.values())
        return ok, {"status": "ready" if ok else "not ready", "scheduler": self.scheduler.state,
                    "executors": executors}

    def algorithms(self, key: ApiKey) -> dict[str, Any]:
        """The algorithms ``key`` may run, as both protocols list them."""
        found = self.scheduler.registry.algorithms()
        return {"algorithms": [
            {"name": name, "executor": name.partition("/")[0], "description": algorithm.description,
             "resources": {"cpu": algorithm.resources.cpu, "memory_mb": algorithm.resources.memory_mb,
                           "gpus": algorithm.resources.gpus, "gpu_memory_mb": algorithm.resources.gpu_memory_mb}}
            for name, algorithm in sorted(found.items()) if key.allows(name)]}

    async def executors(self, key: ApiKey) -> dict[str, Any]:
        """The executors with an algorithm ``key`` may run, their versions and health, as both
        protocols list them."""
        await self.ready()
        rows = []
        for entry in self.scheduler.registry.executors():
            # an executor is listed only when the key may run one of its algorithms
            names = sorted(f"{entry.name}/{a}" for a in entry.algorithms if key.allows(f"{entry.name}/{a}"))
            if not names:
                continue
            health = self.metrics.health.get(entry.name)
            rows.append({"name": entry.name, "version": entry.instance.version if entry.instance else None,
                         "algorithms": names,
                         "health": {"status": health.status.value, "message": health.message} if health else None})
        return {"executors": rows}


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


def task_document(handle: TaskHandle, public_id: str | None = None) -> dict[str, Any]:
    """A task as the API shows it (``public_id``: the id the client uses, with its capability)."""
    document: dict[str, Any] = {"id": public_id or handle.id, "algorithm": handle.algorithm,
                                "state": handle.state.value}
    if handle.progress is not None:
        document["progress"] = handle.progress
    if handle.done():
        error = handle.exception()
        if error is None:
            response = handle.response
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


def _encode(document: dict[str, Any], binary: bool, max_depth: int = wire.MAX_DEPTH) -> tuple[bytes, str]:
    try:
        if binary:
            return wire.encode_frame(document, max_depth=max_depth), wire.BINARY
        try:
            # the common case, plain JSON with no "$" keys, skips the tagging walk (C speed)
            content = _dumps(document)
            if b'"$' not in content:
                if content.count(b"[") + content.count(b"{") > max_depth:
                    wire.check_depth(document, max_depth)  # the same rule as every other way
                return content, wire.JSON
        except TypeError:
            pass  # bytes or arrays inside: tag them
        except RecursionError:
            wire.check_depth(document, max_depth)  # raises InvalidRequest naming the limit
            raise
        return _dumps(wire.to_jsonable(document, max_depth=max_depth)), wire.JSON
    except (InvalidRequest, ValueError) as exc:
        # the executor returned something the wire cannot carry: say so instead of a bare 500
        outputs_type = type(document.get("outputs")).__name__
        failed = {key: value for key, value in document.items() if key not in ("outputs", "timings")}
        failed["error"] = Problem("task-failed", f"the task's outputs ({outputs_type}) cannot be encoded: {exc}",
                                  error="InvalidRequest").body()
        return _dumps(failed), wire.JSON


def _problem_response(problem: Problem, path: str | None) -> Response:
    return Response(problem.encode(_fold_token(path) if path else path, request_id_var.get()),
                    status_code=problem.status, media_type=PROBLEM_JSON, headers=problem.headers)


def _fold_token(path: str) -> str:
    """``path`` without an anonymous task's capability (for logs and echoed ``instance``)."""
    return _TOKEN_IN_PATH.sub(r"\1.<token>", path) if "." in path else path


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
            raise Problem("payload-too-large", f"the body is over the limit of {limit} bytes "
                          "(server.max_body_bytes)")
        parts.append(part)
    return b"".join(parts)


def _decode_body(body: bytes, content_type: str | None, max_depth: int) -> Any:
    media = (content_type or wire.JSON).split(";", 1)[0].strip().lower()
    try:
        if media == wire.BINARY:
            return wire.decode_frame(body, max_depth=max_depth)
        if media == wire.JSON or media.endswith("+json"):
            try:
                return wire.decode_json(body, max_depth)
            except InvalidRequest:
                raise
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise Problem("bad-request", f"the body is not valid JSON: {exc}") from None
    except InvalidRequest as exc:
        raise Problem("invalid-request", str(exc), error="InvalidRequest") from None
    raise Problem("unsupported-media-type", f"send {wire.JSON} or {wire.BINARY}, not {media[:100]!r}")


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

    max_depth = settings.max_depth

    def answer(owned: _Owned, request: HttpRequest, status: int = 200,
               headers: dict[str, str] | None = None) -> Response:
        content, media = _encode(gateway.document(owned), _wants_binary(request.headers), max_depth)
        return Response(content, status_code=status, media_type=media, headers=headers)

    async def submit(request: HttpRequest, key: ApiKey) -> Response:
        wait = _wait_seconds(request, gateway)
        body = await _read_body(request, settings.max_body_bytes)
        document = _decode_body(body, request.headers.get("content-type"), max_depth)
        # waiting as long as the server allows: run inline (the answer comes when the task ends)
        owned = gateway.submit(key, document, request_id_var.get(), inline=wait >= settings.max_wait)
        handle = owned.handle
        if handle.inline:
            await scheduler.run_inline(handle)
        elif wait:
            await gateway.wait(handle, wait)
        if owned.gone is not None:
            raise owned.gone
        done = handle.done()
        return answer(owned, request, 200 if done else 202,
                      None if done else {"Location": f"/v1/tasks/{owned.public_id}"})

    async def get_task(request: HttpRequest, key: ApiKey) -> Response:
        owned = gateway.owned(key, request.path_params["task_id"])
        wait = _wait_seconds(request, gateway)
        if wait:
            await gateway.wait(owned.handle, wait)
            if owned.gone is not None:
                raise owned.gone
        return answer(owned, request)

    async def cancel_task(request: HttpRequest, key: ApiKey) -> Response:
        owned = gateway.owned(key, request.path_params["task_id"])
        owned.handle.cancel()
        return answer(owned, request)

    async def task(request: HttpRequest, key: ApiKey) -> Response:
        # one route for both methods, so a 405 lists them both in Allow
        return await (get_task if request.method != "DELETE" else cancel_task)(request, key)

    async def events(request: HttpRequest, key: ApiKey) -> Response:
        owned = gateway.owned(key, request.path_params["task_id"])
        handle = owned.handle
        if handle.streaming:
            raise Problem("conflict", f"task {handle.id} is already being streamed by another reader")

        async def frames() -> AsyncIterator[bytes]:
            # each chunk carries its index as the event id: a reader that reconnects (with
            # Last-Event-ID or not) goes on from the first chunk not yet delivered
            async for seq, chunk in _follow(owned):
                yield (b"event: chunk\ndata: " + _dumps(wire.to_jsonable(chunk, max_depth=max_depth))
                       + b"\nid: %d\n\n" % seq)
            content, _ = _encode(gateway.document(owned), False, max_depth)
            yield b"event: end\ndata: " + content + b"\n\n"

        return StreamingResponse(frames(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    async def list_algorithms(request: HttpRequest, key: ApiKey) -> Response:
        return JSONResponse(gateway.algorithms(key))

    async def list_executors(request: HttpRequest, key: ApiKey) -> Response:
        return JSONResponse(await gateway.executors(key))

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
            key = gateway.authenticate(websocket.headers, websocket=True)
            owned = gateway.owned(key, websocket.path_params["task_id"])
            if owned.handle.streaming:
                raise Problem("conflict", f"task {owned.id} is already being streamed by another reader")
        except Problem as problem:
            await _deny(websocket, problem)
            return
        offered = [p.strip() for p in websocket.headers.get("sec-websocket-protocol", "").split(",")]
        # never echo the key back: answer with the plain protocol name when one was offered
        await websocket.accept(subprotocol=WS_PROTOCOL if WS_PROTOCOL in offered else None)
        await _stream_ws(websocket, owned, gateway, max_depth)

    async def on_problem(request: Any, exc: Exception) -> Response:
        assert isinstance(exc, Problem)
        return _problem_response(exc, request.url.path)

    async def on_http(request: Any, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        slug = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "bad-request")
        problem = Problem(slug, str(exc.detail), headers=dict(exc.headers or {}), status=exc.status_code)
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
    # no handler for Exception here: Starlette would run it outside the middleware below, with
    # no request id and no status to count; _RequestContext answers unexpected errors itself
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={Problem: on_problem, HTTPException: on_http})
    app.state.gateway = gateway
    app.add_middleware(_RequestContext, gateway=gateway)
    return app


async def _follow(owned: _Owned) -> AsyncIterator[tuple[int, Any]]:
    """The task's chunks with their indexes, until it ends. A chunk leaves the task's buffer only
    once the reader has taken it (the consumer came back for the next one): a reader that fails
    while sending one leaves it for the next reader, so a dropped reader loses nothing."""
    handle = owned.handle
    if handle.streaming:
        raise Problem("conflict", f"task {handle.id} is already being streamed by another reader")
    try:
        async for chunk in handle.stream():  # lossless: a chunk leaves once the next is asked for
            yield owned.seq, chunk
            owned.seq += 1
    except Exception:  # noqa: BLE001 - the task's own error: the reader learns it from the task's end
        return


async def _stream_ws(websocket: WebSocket, owned: _Owned, gateway: Gateway, max_depth: int) -> None:
    """Send the chunks, then the end, while watching for the reader leaving: a reader that goes
    away is noticed at once (not at the next chunk), so the stream is free for a new reader."""
    left = asyncio.Event()

    async def watch() -> None:
        # a reader sends nothing we need; any message is read and dropped, a close ends the stream
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                left.set()
                return

    async def send_all() -> None:
        async for seq, chunk in _follow(owned):
            await websocket.send_text(_dumps({"type": "chunk", "seq": seq,
                                              "data": wire.to_jsonable(chunk, max_depth=max_depth)}).decode())
        content, _ = _encode(gateway.document(owned), False, max_depth)
        await websocket.send_text('{"type":"end","task":' + content.decode() + "}")
        await websocket.close()

    watcher = asyncio.ensure_future(watch())
    sender = asyncio.ensure_future(send_all())
    try:
        await asyncio.wait([watcher, sender], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for job in (sender, watcher):
            job.cancel()
        for job in (sender, watcher):
            try:
                await job
            except (asyncio.CancelledError, WebSocketDisconnect, OSError, RuntimeError):
                pass  # the reader left: the task goes on and stays readable (and streamable)
    if sender.done() and not sender.cancelled() and sender.exception() is not None:
        error = sender.exception()
        if not isinstance(error, (WebSocketDisconnect, OSError, RuntimeError)):
            raise error  # type: ignore[misc]


async def _deny(websocket: WebSocket, problem: Problem) -> None:
    """Refuse a WebSocket handshake with the problem as an HTTP answer (when the server can)."""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(_problem_response(problem, websocket.url.path))
    else:
        await websocket.close(code=1008, reason=problem.detail[:120])


#: headers every answer carries (unless the handler set its own)
_SECURITY_HEADERS = ((b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"))
#: and answers under /v1/ (task results are private to a key): never cached
_NO_STORE = (b"cache-control", b"no-store")


class _RequestContext:
    """Gives each request an id (``X-Request-ID``), logs it as one JSON line, counts it, and answers
    errors nothing else handled: a 500 problem carrying the id, logged once with its traceback; a
    client gone mid-request is logged at info, without one (status 499, as nginx counts it)."""

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
            rid = secrets.token_hex(12)
        token = request_id_var.set(rid)
        status = 0
        close_code: int | None = None
        started = time.perf_counter()
        path = scope["path"]
        extra_headers = [(b"x-request-id", rid.encode()), *_SECURITY_HEADERS]
        if path.startswith("/v1/"):
            extra_headers.append(_NO_STORE)

        async def send_with_id(message: Message) -> None:
            nonlocal status, close_code
            kind = message["type"]
            if kind == "http.response.start" or kind == "websocket.http.response.start":
                status = message["status"]
                headers = list(message.get("headers", ()))
                present = {name.lower() for name, _ in headers}
                message["headers"] = [*headers, *(h for h in extra_headers if h[0] not in present)]
            elif kind == "websocket.accept":
                status = 101
                message["headers"] = [*message.get("headers", ()), extra_headers[0]]
            elif kind == "websocket.close":
                close_code = message.get("code", 1000)
                if status == 0:
                    status = 403  # closed before the handshake: uvicorn answers 403
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:
            # the client left mid-body: nothing to answer, nothing wrong with the server
            status = 499
            log.info("client disconnected during %s %s", scope.get("method", "WS"), _fold_token(path))
        except Exception as exc:
            log.error("unhandled error on %s %s", scope.get("method", "WS"), _fold_token(path), exc_info=exc)
            if status != 0 or kind != "http":
                raise  # an answer is under way: the server can only drop the connection
            status = 500
            problem = Problem("internal", f"{type(exc).__name__}: the server failed; see its log (request id {rid})")
            await _problem_response(problem, _fold_token(path))(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
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
                fields: dict[str, Any] = {"status": status, "ms": round(elapsed * 1000, 3)}
                if close_code is not None:
                    fields["close_code"] = close_code
                access_log.info("%s %s %d", scope.get("method", "WS"), _fold_token(path), status, extra=fields)
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
    """Run the gateway with uvicorn (httptools and uvloop when installed) until interrupted, with
    the connection limits of ``[server]`` (:mod:`edgecompute.server.protocol`)."""
    import uvicorn

    from ..logs import configure_json_logging
    from .protocol import uvicorn_config

    settings = ServerSettings.from_config(config)
    configure_json_logging(log_level.upper())
    app = build_app(settings, Scheduler(registry, config=config), config=config)
    uvicorn.Server(uvicorn_config(app, settings, host=host or settings.host,
                                  port=port if port is not None else settings.port,
                                  log_level=log_level, loop="auto", ws="auto")).run()
