"""gRPC beside the HTTP gateway (``pip install "edgecompute[server,grpc]"``; docs/grpc.md).

``edgecompute serve`` starts it when ``[server] grpc_port`` is set (or ``--grpc-port``): a
``grpc.aio`` server on the same event loop as uvicorn, over the same
:class:`~edgecompute.server._app.Gateway` (so the same scheduler, keys, budgets and tasks). It
starts after the app's lifespan has started the scheduler and stops before it closes. In your
own set-up::

    app = build_app(settings, scheduler)
    grpc_server = attach(app, port=50051)     # started and stopped with the app's lifespan
    uvicorn.run(app)

The service is defined by ``edgecompute/grpc_proto/edgecompute.proto``; the Python client is
:mod:`edgecompute.grpc_client`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc

from ... import Registry
from ...config import Config
from .._app import Gateway
from .._settings import ServerSettings
from ._service import TasksService

__all__ = ["GrpcServer", "TasksService", "attach", "serve"]

log = logging.getLogger("edgecompute.server")

#: how long in-flight calls may finish when the server stops (streams of long tasks are cut then)
STOP_GRACE = 5.0
#: room for a message's own fields beyond server.max_body_bytes, so that the service (not grpc
#: core) answers an oversized message, with its problem; larger ones grpc core refuses unread
_ENVELOPE = 64 * 1024


class GrpcServer:
    """A ``grpc.aio`` server of :class:`TasksService` over ``gateway``, on the running event loop."""

    def __init__(self, gateway: Gateway, *, host: str | None = None, port: int | None = None) -> None:
        settings = gateway.settings
        self.gateway = gateway
        self.host = host or settings.grpc_host or settings.host
        requested = port if port is not None else settings.grpc_port
        self.requested_port = 0 if requested is None else requested
        #: the bound port, once started (useful with port 0)
        self.port: int | None = None
        self.service = TasksService(gateway)
        self._server: grpc.aio.Server | None = None

    def options(self) -> list[tuple[str, Any]]:
        """The channel arguments that carry the gateway's limits over to grpc core."""
        settings = self.gateway.settings
        return [
            ("grpc.max_receive_message_length", min(2**31 - 1, settings.max_body_bytes + _ENVELOPE)),
            ("grpc.max_send_message_length", -1),
            # the request head (metadata) bound, as server.max_header_bytes bounds HTTP heads
            ("grpc.max_metadata_size", settings.max_header_bytes),
            # slow and idle clients, as server.header_timeout and keep_alive_timeout bound them on
            # HTTP: a connection that has not finished its opening (a client that connects and
            # sends nothing) is dropped after header_timeout, and one with no call in progress is
            # sent GOAWAY after keep_alive_timeout (grpc clients reconnect on their next call)
            ("grpc.server_handshake_timeout_ms", int(settings.header_timeout * 1000)),
            ("grpc.max_connection_idle_ms", int(settings.keep_alive_timeout * 1000)),
            ("grpc.so_reuseport", 0),
        ]

    async def start(self) -> int:
        """Listen and serve; returns the bound port."""
        settings = self.gateway.settings
        # at most server.max_connections calls at once, as HTTP holds at most that many connections:
        # more are refused by grpc with RESOURCE_EXHAUSTED before reaching the service
        server = grpc.aio.server(options=self.options(), maximum_concurrent_rpcs=settings.max_connections)
        server.add_generic_rpc_handlers((self.service.handler(),))
        address = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        self.port = server.add_insecure_port(f"{address}:{self.requested_port}")
        if not self.port:
            raise OSError(f"gRPC cannot listen on {self.host}:{self.requested_port}")
        await server.start()
        self._server = server
        log.info("gRPC listening", extra={"host": self.host, "port": self.port})
        return self.port

    async def stop(self, grace: float | None = STOP_GRACE) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.stop(grace)


def attach(app: Any, *, host: str | None = None, port: int | None = None) -> GrpcServer:
    """Serve gRPC with ``app`` (from :func:`~edgecompute.server.build_app`): started after the app's
    lifespan starts its scheduler, stopped before the scheduler closes; ``port`` (default
    ``server.grpc_port``, else 0: any free port, see :attr:`GrpcServer.port`)."""
    gateway = app.state.gateway
    if not isinstance(gateway, Gateway):
        raise TypeError("attach() needs an app made by edgecompute.server.build_app")
    server = GrpcServer(gateway, host=host, port=port)
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(target: Any) -> AsyncIterator[Any]:
        async with inner(target) as state:
            await server.start()
            try:
                yield state
            finally:
                await server.stop()

    app.router.lifespan_context = lifespan
    return server


def serve(config: Config, *, registry: Registry | None = None, host: str | None = None, port: int | None = None,
          grpc_port: int | None = None, log_level: str = "info") -> None:
    """:func:`edgecompute.server.serve` plus gRPC on ``grpc_port`` (default ``server.grpc_port``), in
    one process on one event loop."""
    import uvicorn

    from ... import Scheduler
    from ...logs import configure_json_logging
    from .._app import build_app
    from ..protocol import uvicorn_config

    settings = ServerSettings.from_config(config)
    configure_json_logging(log_level.upper())
    app = build_app(settings, Scheduler(registry, config=config), config=config)
    attach(app, port=grpc_port if grpc_port is not None else settings.grpc_port)
    uvicorn.Server(uvicorn_config(app, settings, host=host or settings.host,
                                  port=port if port is not None else settings.port,
                                  log_level=log_level, loop="auto", ws="auto")).run()
