"""A real uvicorn server on 127.0.0.1 (a free port), in a thread, over a real scheduler."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import attrs
import numpy as np
import pytest
import uvicorn

from edgecompute import Config, FunctionExecutor, Registry, Resources, Scheduler
from edgecompute.server import ServerSettings, build_app, hash_key
from edgecompute.server.protocol import uvicorn_config

KEYS = {"alice": "ec_alice-test-key-0000000000000000000000000", "bob": "ec_bob-test-key-00000000000000000000000000",
        "limited": "ec_limited-test-key-000000000000000000000", "narrow": "ec_narrow-test-key-0000000000000000000000",
        "rated": "ec_rated-test-key-00000000000000000000000000"}
#: opened by a test once it has read a stream's first token (generate's ``gate``)
GATES: dict[str, threading.Event] = {}
TOKENS = ["The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", "."]


def functions() -> FunctionExecutor:
    app = FunctionExecutor("app")

    @app.algorithm(resources=Resources(cpu=0))
    async def echo(inputs: Any) -> Any:
        """Return the inputs unchanged."""
        return inputs

    @app.algorithm(resources=Resources(cpu=0))
    def total(inputs: Any) -> Any:
        """Sum an array, and return it doubled."""
        array = np.asarray(inputs)
        return {"sum": float(array.sum()), "doubled": array * 2}

    @app.algorithm(resources=Resources(cpu=0))
    async def generate(inputs: Any, *, ctx: Any, delay: float = 0.05, gate: str = "") -> Any:
        """Emit a fixed sentence token by token, like a language model. With ``gate``, wait after
        the first token until the test that named the gate has read that token."""
        for index, token in enumerate(TOKENS):
            await asyncio.sleep(delay)
            await ctx.emit(token)
            if gate and index == 0 and not await asyncio.to_thread(GATES[gate].wait, 10):
                raise RuntimeError("nobody read the first token")
        return "".join(TOKENS)

    @app.algorithm(resources=Resources(cpu=0))
    async def sleep(inputs: Any) -> Any:
        """Sleep for `inputs` seconds."""
        await asyncio.sleep(float(inputs))
        return inputs

    @app.algorithm(resources=Resources(cpu=0))
    async def fail(inputs: Any) -> Any:
        """Always fail."""
        raise RuntimeError(f"failing on purpose: {inputs}")

    other = FunctionExecutor("secret")

    @other.algorithm(resources=Resources(cpu=0))
    async def echo2(inputs: Any) -> Any:
        return inputs

    return app, other  # type: ignore[return-value]


def settings(**overrides: Any) -> ServerSettings:
    keys = [
        {"name": "alice", "hash": hash_key(KEYS["alice"]), "scopes": ["app/*"]},
        {"name": "bob", "hash": hash_key(KEYS["bob"]), "scopes": ["app/*", "secret/*"]},
        {"name": "limited", "hash": hash_key(KEYS["limited"]), "scopes": ["app/*"], "max_in_flight": 3},
        {"name": "rated", "hash": hash_key(KEYS["rated"]), "scopes": ["app/*"], "rate": 20.0, "burst": 5},
        {"name": "narrow", "hash": hash_key(KEYS["narrow"]), "scopes": ["app/echo"]},
    ]
    return ServerSettings.from_mapping({"keys": keys, "access_log": False, "max_body_bytes": 1_000_000,
                                        "max_wait": 10.0, **overrides})


@attrs.frozen
class Server:
    url: str
    app: Any


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    with running(settings()) as s:
        yield s


class running:
    def __init__(self, server_settings: ServerSettings, extra: tuple[Any, ...] = ()) -> None:
        registry = Registry([*functions(), *extra])  # type: ignore[misc]
        scheduler = Scheduler(registry, config=Config(), capacity=Resources(cpu=2))
        self.app = build_app(server_settings, scheduler)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.sock = sock
        # the server's own uvicorn set-up (its connection limits), as `edgecompute serve` runs it
        self.server = uvicorn.Server(uvicorn_config(self.app, server_settings, lifespan="on", ws="websockets-sansio"))

    def __enter__(self) -> Server:
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return Server(f"http://127.0.0.1:{self.port}", self.app)

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)
        self.sock.close()
