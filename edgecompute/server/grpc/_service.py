"""The gRPC service over the HTTP gateway's own :class:`~edgecompute.server._app.Gateway`.

Every call goes through the gateway's public methods, exactly as an HTTP request does: the key is
found and its token bucket charged by ``Gateway.authenticate`` (the call's metadata stand in for
the headers), a submit is checked and admitted by ``Gateway.submit`` (fields, scopes, the in-flight
cap, the queue), a task is looked up by ``Gateway.owned`` and shown by ``Gateway.document``. So a
task submitted over gRPC is the same task over HTTP, and a key's rate and in-flight budgets are
shared by both. A refused call ends with the gRPC status of its problem type
(:data:`edgecompute.grpc_proto.STATUS_NAMES`) and the problem body in trailing metadata.

Messages arrive as raw bytes (no deserializer is registered) so that the service, not grpc, decides
what a malformed or oversized message is answered with: the same problems HTTP answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import math
import re
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar, cast

import grpc
from google.protobuf.message import DecodeError, Message
from google.protobuf.unknown_fields import UnknownFieldSet

from ...errors import InvalidRequest
from ...grpc_proto import METHODS, PROBLEM_KEY, REQUEST_ID_KEY, RETRY_AFTER_KEY, SERVICE, decode_value, encode_value, pb
from ...grpc_proto import status_name_for as _status_name_for
from ...logs import request_id as request_id_var
from .._app import Gateway
from .._auth import ApiKey
from .._problems import Problem

__all__ = ["TasksService"]

log = logging.getLogger("edgecompute.server")
access_log = logging.getLogger("edgecompute.access")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
#: the metadata the gateway reads, as Gateway.authenticate reads headers
_WANTED = frozenset({"authorization", "x-api-key", REQUEST_ID_KEY})
_M = TypeVar("_M", bound=Message)
Unary = Callable[[bytes, grpc.aio.ServicerContext[bytes, bytes]], Awaitable[bytes]]


def _code(slug: str) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, _status_name_for(slug))  # type: ignore[no-any-return]


def _unknown_fields(message: Message, path: str = "") -> list[str]:
    """Field numbers the schema does not know, anywhere in ``message`` (HTTP refuses unknown fields too)."""
    unknown = UnknownFieldSet(message)
    found = [f"{path}{unknown[index].field_number}" for index in range(len(unknown))]
    for descriptor, value in message.ListFields():
        if descriptor.message_type is not None and not descriptor.is_repeated:
            found += _unknown_fields(value, f"{path}{descriptor.name}.")
    return found


class TasksService:
    """The ``edgecompute.v1.Tasks`` methods, as a grpc generic handler over ``gateway``."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.settings = gateway.settings
        self.max_depth = gateway.settings.max_depth
        from prometheus_client import Counter, Histogram

        registry = gateway.metrics.registry
        self.requests = Counter("edgecompute_grpc_requests", "gRPC calls by method and status code",
                                ["method", "code"], registry=registry)
        self.seconds = Histogram("edgecompute_grpc_request_seconds", "gRPC call latency by method (streams: "
                                 "until the stream ends)", ["method"], registry=registry,
                                 buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30))
        self._counters: dict[tuple[str, grpc.StatusCode], Any] = {}
        self._timers: dict[str, Any] = {}

    def handler(self) -> grpc.GenericRpcHandler:
        unary: dict[str, Unary] = {
            "Submit": self._unary("Submit", pb.SubmitRequest, self._submit),
            "Get": self._unary("Get", pb.TaskRequest, self._get),
            "Cancel": self._unary("Cancel", pb.TaskRequest, self._cancel),
            "Algorithms": self._unary("Algorithms", pb.ListRequest, self._algorithms),
            "Executors": self._unary("Executors", pb.ListRequest, self._executors),
        }
        handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
            name: grpc.unary_unary_rpc_method_handler(call) for name, call in unary.items()}
        handlers["Stream"] = grpc.unary_stream_rpc_method_handler(self._stream)
        return grpc.method_handlers_generic_handler(SERVICE, handlers)

    # -- what every call shares --------------------------------------------------------------------

    def _begin(self, context: grpc.aio.ServicerContext[bytes, bytes]) -> tuple[dict[str, str], str]:
        metadata: dict[str, str] = {}
        for key, value in context.invocation_metadata() or ():
            if key in _WANTED and isinstance(value, str):
                metadata.setdefault(key, value)
        rid = metadata.get(REQUEST_ID_KEY)
        if rid is None or not _REQUEST_ID.fullmatch(rid):
            rid = secrets.token_hex(12)
        return metadata, rid

    def _parse(self, raw: bytes, kind: type[_M]) -> _M:
        limit = self.settings.max_body_bytes
        if len(raw) > limit:
            raise Problem("payload-too-large", f"the message has {len(raw)} bytes; the limit is {limit} "
                          "(server.max_body_bytes)")
        message = kind()
        try:
            message.ParseFromString(raw)
        except DecodeError as exc:
            raise Problem("bad-request", f"the message is not a valid {kind.DESCRIPTOR.full_name}: {exc}") from None
        unknown = _unknown_fields(message)
        if unknown:
            raise Problem("invalid-request", f"unknown field(s) {', '.join(unknown)[:500]} in "
                          f"{kind.DESCRIPTOR.full_name}; see edgecompute.proto")
        return message

    def _decode(self, value: pb.Value, name: str) -> Any:
        try:
            return decode_value(value, max_depth=self.max_depth)
        except InvalidRequest as exc:
            # worded as HTTP words it (the depth rule names its limit, not the field)
            raise Problem("invalid-request", str(exc), error="InvalidRequest") from None
        except (UnicodeDecodeError, ValueError) as exc:
            raise Problem("bad-request", f"{name}: the value is not valid JSON: {exc}") from None

    def _wait(self, seconds: float) -> float:
        if math.isnan(seconds) or seconds < 0:
            raise Problem("bad-request", f"'wait' must be >= 0, not {seconds!r}")
        return min(seconds, self.settings.max_wait)

    async def _refuse(self, context: grpc.aio.ServicerContext[bytes, bytes], problem: Problem, method: str,
                      rid: str) -> None:
        body = json.dumps(problem.body(METHODS[method], rid), separators=(",", ":")).encode()
        trailing: list[tuple[str, str | bytes]] = [(PROBLEM_KEY, body), (REQUEST_ID_KEY, rid)]
        if problem.retry_after is not None:
            trailing.append((RETRY_AFTER_KEY, str(max(1, math.ceil(problem.retry_after)))))
        await context.abort(_code(problem.slug), problem.detail, tuple(trailing))

    def _finish(self, method: str, code: grpc.StatusCode, started: float) -> None:
        elapsed = time.perf_counter() - started
        # label lookups cost more than the update: the children are kept (a bounded set)
        counter = self._counters.get((method, code))
        if counter is None:
            counter = self._counters[(method, code)] = self.requests.labels(method, code.name)
        counter.inc()
        timer = self._timers.get(method)
        if timer is None:
            timer = self._timers[method] = self.seconds.labels(method)
        timer.observe(elapsed)
        if self.settings.access_log and access_log.isEnabledFor(logging.INFO):
            access_log.info("GRPC %s %s", METHODS[method], code.name,
                            extra={"status": code.name, "ms": round(elapsed * 1000, 3)})

    def _unary(self, method: str, kind: type[_M],
               handler: Callable[[_M, ApiKey, str | None], Awaitable[Message]]) -> Unary:
        async def call(raw: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
            started = time.perf_counter()
            metadata, rid = self._begin(context)
            token = request_id_var.set(rid)
            code = grpc.StatusCode.OK
            try:
                try:
                    key = self.gateway.authenticate(metadata)
                    reply = await handler(self._parse(raw, kind), key, rid)
                    context.set_trailing_metadata(((REQUEST_ID_KEY, rid),))
                    return reply.SerializeToString()
                except Problem as problem:
                    code = _code(problem.slug)
                    await self._refuse(context, problem, method, rid)
                    raise  # not reached: abort raises
                except asyncio.CancelledError:
                    code = grpc.StatusCode.CANCELLED  # the caller left (a Submit's task goes on)
                    raise
                except Exception as exc:
                    if isinstance(exc, grpc.aio.AbortError):
                        raise
                    code = grpc.StatusCode.INTERNAL
                    log.error("unhandled error on gRPC %s", method, exc_info=exc)
                    await self._refuse(context, Problem(
                        "internal", f"{type(exc).__name__}: the server failed; see its log (request id {rid})"),
                        method, rid)
                    raise
            finally:
                self._finish(method, code, started)
                request_id_var.reset(token)

        return call

    # -- the methods -------------------------------------------------------------------------------

    def _task(self, owned: Any, encoding: int) -> pb.Task:
        """The task as Get answers it; outputs the wire cannot carry become its error, as over HTTP."""
        document = self.gateway.document(owned)
        task = pb.Task(id=document["id"], algorithm=document["algorithm"], state=document["state"])
        progress = document.get("progress")
        if isinstance(progress, (int, float)):
            task.progress = float(progress)
        if "outputs" in document:
            try:
                task.outputs.CopyFrom(encode_value(document["outputs"], encoding, max_depth=self.max_depth))
                task.executor = str(document.get("executor", ""))
                task.timings.update({str(k): float(v) for k, v in (document.get("timings") or {}).items()})
            except (InvalidRequest, ValueError, TypeError) as exc:
                task.ClearField("outputs")
                outputs_type = type(document["outputs"]).__name__
                document["error"] = Problem("task-failed", f"the task's outputs ({outputs_type}) cannot be "
                                            f"encoded: {exc}", error="InvalidRequest").body()
        error = document.get("error")
        if isinstance(error, dict):
            task.error.CopyFrom(pb.Problem(
                type=str(error.get("type", "")), title=str(error.get("title", "")), status=int(error.get("status", 0)),
                detail=str(error.get("detail", "")), error=str(error.get("error") or ""),
                request_id=str(error.get("request_id") or "")))
            if error.get("retry_after") is not None:
                task.error.retry_after = int(error["retry_after"])
        return task

    async def _submit(self, message: pb.SubmitRequest, key: ApiKey, rid: str | None) -> pb.Task:
        wait = self._wait(message.wait)
        # the same document an HTTP body is: Gateway.submit checks it the same way
        document: dict[str, Any] = {"algorithm": message.algorithm}
        if message.HasField("inputs"):
            document["inputs"] = self._decode(message.inputs, "inputs")
        if message.HasField("params"):
            document["params"] = self._decode(message.params, "params")
        if message.HasField("metadata"):
            document["metadata"] = self._decode(message.metadata, "metadata")
        if message.HasField("priority"):
            document["priority"] = message.priority
        if message.HasField("timeout"):
            document["timeout"] = message.timeout
        if message.HasField("retries"):
            document["retries"] = message.retries
        owned = self.gateway.submit(key, document, rid)
        if wait:
            await self.gateway.wait(owned.handle, wait)
        if owned.gone is not None:
            raise owned.gone
        return self._task(owned, message.accept)

    async def _get(self, message: pb.TaskRequest, key: ApiKey, rid: str | None) -> pb.Task:
        owned = self.gateway.owned(key, message.id)
        wait = self._wait(message.wait)
        if wait:
            await self.gateway.wait(owned.handle, wait)
            if owned.gone is not None:
                raise owned.gone
        return self._task(owned, message.accept)

    async def _cancel(self, message: pb.TaskRequest, key: ApiKey, rid: str | None) -> pb.Task:
        owned = self.gateway.owned(key, message.id)
        owned.handle.cancel()
        return self._task(owned, message.accept)

    async def _listing(self, document: dict[str, Any]) -> pb.Listing:
        return pb.Listing(document=encode_value(document, pb.JSON, max_depth=self.max_depth))

    async def _algorithms(self, message: pb.ListRequest, key: ApiKey, rid: str | None) -> pb.Listing:
        return await self._listing(self.gateway.algorithms(key))

    async def _executors(self, message: pb.ListRequest, key: ApiKey, rid: str | None) -> pb.Listing:
        return await self._listing(await self.gateway.executors(key))

    async def _stream(self, raw: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> AsyncIterator[bytes]:
        """The task's chunks, then its end. grpc sends one message at a time under HTTP/2 flow
        control: a reader that does not read stops this generator at its ``yield`` (the chunks wait
        in the task's buffer, nothing else waits), and a reader that leaves closes it there, so the
        chunk in flight stays for the next reader (as the HTTP streams do)."""
        started = time.perf_counter()
        metadata, rid = self._begin(context)
        token: contextvars.Token[str | None] | None = request_id_var.set(rid)
        code = grpc.StatusCode.OK
        try:
            try:
                key = self.gateway.authenticate(metadata)
                message = self._parse(raw, pb.TaskRequest)
                owned = self.gateway.owned(key, message.id)
                handle = owned.handle
                if handle.streaming:
                    raise Problem("conflict", f"task {handle.id} is already being streamed by another reader")
            except Problem as problem:
                code = _code(problem.slug)
                await self._refuse(context, problem, "Stream", rid)
                return
            encoding = message.accept
            if token is not None:
                request_id_var.reset(token)  # the stream outlives this step: no id left set between messages
                token = None
            async with contextlib.aclosing(cast(AsyncGenerator[Any, None], handle.stream())) as chunks:
                while True:
                    try:
                        chunk = await anext(chunks)
                    except StopAsyncIteration:
                        break
                    except Exception:  # noqa: BLE001 - the task's own error: the reader learns it from the end
                        break
                    try:
                        data = encode_value(chunk, encoding, max_depth=self.max_depth)
                    except (InvalidRequest, ValueError, TypeError) as exc:
                        # the executor emitted what the wire cannot carry: the stream ends with
                        # the reason (the chunk stays in the task, as it would for a reader that failed)
                        refusal = Problem("internal", f"chunk {owned.seq} of task {handle.id} ({type(chunk).__name__}) "
                                          f"cannot be encoded: {exc}", error="InvalidRequest")
                        code = _code(refusal.slug)
                        await self._refuse(context, refusal, "Stream", rid)
                        return
                    yield pb.StreamEvent(chunk=pb.Chunk(seq=owned.seq, data=data)).SerializeToString()
                    owned.seq += 1
            yield pb.StreamEvent(end=self._task(owned, encoding)).SerializeToString()
            context.set_trailing_metadata(((REQUEST_ID_KEY, rid),))
        except BaseException as exc:
            if not isinstance(exc, grpc.aio.AbortError):
                code = grpc.StatusCode.CANCELLED  # the reader left (or the server is stopping)
            raise
        finally:
            self._finish("Stream", code, started)
            if token is not None:
                request_id_var.reset(token)
