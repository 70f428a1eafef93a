"""Connection limits uvicorn does not have: slow headers, slow bodies, header size, connection count.

uvicorn times out only idle keep-alive connections, and only after a first response: a client that
sends its headers one byte a second (slowloris), or a body that never ends, holds a connection
forever, and httptools accepts headers of any size. :func:`guarded_protocol` subclasses uvicorn's
HTTP protocol (httptools, else h11) and watches each connection through the phases of a request:

=========  ===========================================  ==========================================
phase      deadline                                     when it passes
=========  ===========================================  ==========================================
idle       ``keep_alive_timeout`` from connect          closed (nothing is owed to the client)
head       ``header_timeout`` from the request's first  408 problem, closed
           byte; ``max_header_bytes``, ``max_headers``, 431 / 414 problem, closed
           ``max_url_bytes``
body       ``body_timeout`` + received/``body_min_rate``  408 problem if no answer started, closed
app        none (the request's own ``wait``/``timeout``
           bound it)
=========  ===========================================  ==========================================

After a response uvicorn's own keep-alive timer (``keep_alive_timeout``) takes over. One timer per
connection, re-armed at phase changes; the per-byte work is a length addition. A connection over
``max_connections`` is answered 503 and closed at once. Errors uvicorn writes itself (a malformed
request) are problem+json too. Limits are checked after each read is parsed, so a head can pass its
limit by at most one read (64 KiB to 256 KiB) before it is refused.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from typing import Any

from ._problems import PROBLEM_JSON, PROBLEMS
from ._settings import ServerSettings

__all__ = ["guarded_protocol", "problem_bytes", "uvicorn_config"]

_IDLE, _HEAD, _BODY, _APP, _CLOSING = range(5)
#: after refusing a request whose bytes still arrive, read and drop them this long before closing:
#: closing with unread data makes the kernel send a reset, which can destroy the answer in flight
_LINGER = 2.0

_REASONS = {400: b"Bad Request", 408: b"Request Timeout", 413: b"Content Too Large", 414: b"URI Too Long",
            431: b"Request Header Fields Too Large", 503: b"Service Unavailable"}
_SLUGS = {400: "bad-request", 408: "request-timeout", 413: "payload-too-large", 414: "uri-too-long",
          431: "headers-too-large", 503: "unavailable"}


def problem_bytes(status: int, detail: str) -> bytes:
    """A whole HTTP/1.1 answer with a problem+json body, closing the connection: what the
    protocol writes when it refuses a request before the app sees it."""
    slug = _SLUGS[status]
    rid = secrets.token_hex(8)
    body = json.dumps({"type": f"/problems/{slug}", "title": PROBLEMS[slug][1], "status": status,
                       "detail": detail, "request_id": rid}, separators=(",", ":")).encode()
    head = (b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\nconnection: close\r\n"
            b"x-request-id: %s\r\nx-content-type-options: nosniff\r\ncache-control: no-store\r\n\r\n"
            % (status, _REASONS[status], PROBLEM_JSON.encode(), len(body), rid.encode()))
    return head + body


def _base_protocol() -> type[asyncio.Protocol]:
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # pragma: no cover - uvicorn without httptools
        from uvicorn.protocols.http.h11_impl import H11Protocol

        return H11Protocol
    return HttpToolsProtocol


def guarded_protocol(settings: ServerSettings) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class with ``settings``' connection limits (pass it as ``http=``)."""
    base: Any = _base_protocol()
    header_timeout = settings.header_timeout
    body_timeout = settings.body_timeout
    min_rate = settings.body_min_rate
    idle_timeout = settings.keep_alive_timeout
    max_head = settings.max_header_bytes
    max_headers = settings.max_headers
    max_url = settings.max_url_bytes
    max_body = settings.max_body_bytes
    max_connections = settings.max_connections

    class GuardedProtocol(base):  # type: ignore[misc]
        _guard_phase = _IDLE
        _guard_timer: asyncio.TimerHandle | None = None
        _guard_started = 0.0
        _guard_bytes = 0
        _guard_headers = 0
        _guard_url = 0
        _guard_head = 0
        _guard_cycle: Any = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                self._refuse(503, f"the server has {max_connections} open connections, its limit "
                             "(server.max_connections); retry shortly")
                return
            # nothing sent yet: uvicorn would wait forever, so the keep-alive timeout applies
            self._guard_arm(_IDLE, idle_timeout)

        def connection_lost(self, exc: Exception | None) -> None:
            self._guard_cancel()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            phase = self._guard_phase
            if phase == _CLOSING:
                return  # refused: the rest of the request is dropped unread
            if phase == _IDLE:
                # a request's first byte: its headers are due within header_timeout
                self._guard_cycle = self.cycle
                self._guard_bytes = self._guard_headers = self._guard_url = self._guard_head = 0
                self._guard_arm(_HEAD, header_timeout)
                phase = _HEAD
            self._guard_bytes += len(data)
            super().data_received(data)
            if self._guard_phase == _CLOSING:
                return
            if self.transport.is_closing():
                self._guard_cancel()
                return
            if self.transport.get_protocol() is not self:  # upgraded to a WebSocket: its own limits apply
                self._guard_cancel()
                return
            cycle = self.cycle
            if phase == _HEAD:
                if cycle is self._guard_cycle:  # the headers are not complete yet: all bytes are head
                    detail = self._guard_head_problem(self._guard_bytes)
                    if detail is not None:
                        self._refuse(*detail)
                    return
                # the head ended in this read: what followed it is body
                self._guard_bytes = 0
                self._guard_arm(_BODY, body_timeout)
                phase = _BODY
            if phase == _BODY:
                if cycle.more_body and not cycle.response_complete:
                    if self._guard_bytes > max_body + 65536:  # room for chunked framing
                        # the app answers 413 as it reads; this stops a body that is never read
                        self._refuse(413, f"the body is over {max_body} bytes (server.max_body_bytes)")
                    return
                self._guard_arm(_APP, None)

        # httptools' callbacks (h11 never calls them; its head limit is h11_max_incomplete_event_size)

        def on_url(self, url: bytes) -> None:
            self._guard_url += len(url)
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._guard_headers += 1
            self._guard_head += len(name) + len(value) + 4
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            # a head that arrived in one read is checked here, before the app sees it
            detail = self._guard_head_problem(self._guard_head + self._guard_url)
            if detail is not None:
                self._refuse(*detail)
                return  # no cycle: the app never runs, the rest of the request is dropped
            super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            if self._guard_phase != _CLOSING:
                super().on_body(body)

        def on_message_complete(self) -> None:
            if self._guard_phase != _CLOSING:
                super().on_message_complete()

        def _guard_head_problem(self, size: int) -> tuple[int, str] | None:
            if self._guard_url > max_url:
                return 414, f"the request target is over {max_url} bytes (server.max_url_bytes)"
            if size > max_head or self._guard_headers > max_headers:
                return 431, (f"the request head is over {max_head} bytes or {max_headers} fields "
                             "(server.max_header_bytes, server.max_headers)")
            return None

        def on_response_complete(self) -> None:
            # uvicorn arms its keep-alive timer here; the next request's first byte re-arms ours
            self._guard_cancel()
            self._guard_phase = _IDLE
            super().on_response_complete()
            if getattr(self, "pipeline", None) or self.transport.is_closing():
                return
            self._guard_arm(_IDLE, idle_timeout)

        def send_400_response(self, msg: str) -> None:
            # uvicorn's own text/plain answer to a malformed request, as problem+json
            if not self.transport.is_closing():
                self._refuse(400, msg)

        # -- the timer -------------------------------------------------------------------------

        def _guard_arm(self, phase: int, seconds: float | None) -> None:
            self._guard_cancel()
            self._guard_phase = phase
            self._guard_started = time.monotonic()
            if seconds is not None:
                self._guard_timer = self.loop.call_later(seconds, self._guard_expired)

        def _guard_cancel(self) -> None:
            timer = self._guard_timer
            if timer is not None:
                self._guard_timer = None
                timer.cancel()

        def _guard_expired(self) -> None:
            self._guard_timer = None
            if self.transport.is_closing():
                return
            phase = self._guard_phase
            if phase == _IDLE:
                self.transport.close()
            elif phase == _HEAD:
                self._refuse(408, f"the request's headers took over {header_timeout:g} s "
                             "(server.header_timeout)")
            elif phase == _BODY:
                # the deadline grows with what has arrived: a slow but steady body may go on
                allowed = body_timeout + self._guard_bytes / min_rate
                left = self._guard_started + allowed - time.monotonic()
                if left > 0:
                    self._guard_timer = self.loop.call_later(left, self._guard_expired)
                    return
                cycle = self.cycle
                if cycle is not None and not cycle.response_started:
                    self._refuse(408, f"the body arrived slower than server.body_min_rate ({min_rate} bytes/s) "
                                 f"after server.body_timeout ({body_timeout:g} s)")
                else:
                    self.transport.close()

        def _refuse(self, status: int, detail: str) -> None:
            if self._guard_phase == _CLOSING:
                return
            self._guard_cancel()
            self._guard_phase = _APP
            cycle = self.cycle
            transport = self.transport
            if cycle is not None and not cycle.response_complete:
                # the app is still on this request: close at once (it sees a disconnect)
                if not cycle.response_started:
                    transport.write(problem_bytes(status, detail))
                transport.close()
                return
            # between requests: answer, send our FIN, then drop what the client still sends
            # for a moment, so the answer is read rather than reset away
            transport.write(problem_bytes(status, detail))
            self._guard_phase = _CLOSING
            if transport.can_write_eof():
                transport.write_eof()
            transport.resume_reading()
            self._guard_timer = self.loop.call_later(_LINGER, transport.close)

    GuardedProtocol.__qualname__ = GuardedProtocol.__name__ = f"Guarded{base.__name__}"
    return GuardedProtocol


def uvicorn_config(app: Any, settings: ServerSettings, **options: Any) -> Any:
    """A ``uvicorn.Config`` for ``app`` with ``settings``' limits: the guarded HTTP protocol, the
    keep-alive timeout, h11's head limit, a small WebSocket message limit. ``options`` go to
    ``uvicorn.Config`` as they are (host, port, log_level, ...)."""
    import uvicorn

    defaults: dict[str, Any] = {
        "http": guarded_protocol(settings),
        "timeout_keep_alive": max(1, round(settings.keep_alive_timeout)),
        "h11_max_incomplete_event_size": settings.max_header_bytes,
        # a reader sends nothing but a close (and, at most, one small hello): no big frames
        "ws_max_size": 64 * 1024,
        "log_config": None,
        "access_log": False,
        "server_header": False,
    }
    defaults.update(options)
    return uvicorn.Config(app, **defaults)
