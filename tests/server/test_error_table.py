"""The same bad request raises the same error class embedded (Runtime) and remote (Client, AsyncClient).

A real uvicorn server on loopback over a real scheduler, and a real Runtime over the same
functions, capacity and queue bound. The table (request, embedded, remote sync, remote async) is
printed (``pytest -s``) and every row must read the same across.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgecompute import Config, FunctionExecutor, Registry, Request, Resources, Runtime, Scheduler, TaskHandle
from edgecompute.client import AsyncClient, Client, Forbidden, RemoteUnavailable, Unauthorized
from edgecompute.errors import EdgeComputeError
from edgecompute.server import ServerSettings, build_app, hash_key

KEY = "ec_table-test-key-000000000000000000000000000"
NARROW = "ec_table-narrow-key-0000000000000000000000000"
CAPACITY = Resources(cpu=2)
MAX_QUEUE = 2


def executors() -> list[FunctionExecutor]:
    app = FunctionExecutor("app")

    @app.algorithm(resources=Resources(cpu=0))
    async def echo(inputs: Any) -> Any:
        return inputs

    @app.algorithm(resources=Resources(cpu=0))
    async def sleep(inputs: Any) -> Any:
        await asyncio.sleep(float(inputs))
        return inputs

    @app.algorithm(resources=Resources(cpu=0))
    async def fail(inputs: Any) -> Any:
        raise RuntimeError(f"failing on purpose: {inputs}")

    @app.algorithm(resources=Resources(cpu=2))
    async def hog(inputs: Any) -> Any:
        """Takes the whole capacity, so that the next ones queue."""
        await asyncio.sleep(float(inputs))
        return inputs

    @app.algorithm(resources=Resources(cpu=64))
    async def huge(inputs: Any) -> Any:
        return inputs

    @app.algorithm(resources=Resources(cpu=0))
    async def dup(inputs: Any) -> Any:
        return inputs

    other = FunctionExecutor("other")

    @other.algorithm(name="dup", resources=Resources(cpu=0))
    async def other_dup(inputs: Any) -> Any:  # "dup" alone is now ambiguous
        return inputs

    return [app, other]


def registry() -> Registry:
    return Registry(executors())  # type: ignore[arg-type]


class _Server:
    def __init__(self) -> None:
        keys = [{"name": "table", "hash": hash_key(KEY), "scopes": ["*"]},
                {"name": "narrow", "hash": hash_key(NARROW), "scopes": ["app/echo"]}]
        app_settings = ServerSettings.from_mapping({"keys": keys, "access_log": False, "max_wait": 10.0})
        scheduler = Scheduler(registry(), config=Config(), capacity=CAPACITY, max_queue=MAX_QUEUE)
        self.app = build_app(app_settings, scheduler)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="on",
                                                    ws="websockets-sansio"))

    def __enter__(self) -> _Server:
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)
        self.sock.close()


@pytest.fixture(scope="module")
def server() -> Iterator[_Server]:
    with _Server() as running:
        yield running


@pytest.fixture(scope="module")
def runtime() -> Iterator[Runtime]:
    with Runtime(registry(), config=Config(), capacity=CAPACITY, max_queue=MAX_QUEUE) as rt:
        yield rt


def _class_of(call: Callable[[], Any]) -> str:
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - the class is what is compared
        return type(exc).__name__
    return "ok"


async def _aclass_of(call: Callable[[], Any]) -> str:
    try:
        await call()
    except Exception as exc:  # noqa: BLE001
        return type(exc).__name__
    return "ok"


def _closed_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"  # nothing listens once the socket is closed


# -- the cases ---------------------------------------------------------------------------------------
# Each runs one request three ways; ``embedded`` is None for what only exists remotely.


def _embedded_cancelled(rt: Runtime) -> None:
    # a future's cancel() raises concurrent.futures.CancelledError; cancelling by id is the shape
    # both remote faces mirror: cancel, then result() raises the task's TaskCancelled
    future = rt.submit("app/sleep", 30, id="cancel-me")
    for _ in range(500):  # the submission reaches the scheduler's loop soon after submit returns
        if rt.cancel("cancel-me"):
            break
        time.sleep(0.01)
    future.result()


def _sync_cancelled(c: Client) -> None:
    task = c.submit("app/sleep", 30)
    task.cancel()
    task.result()


async def _async_cancelled(c: AsyncClient) -> None:
    task = await c.submit("app/sleep", 30)
    await task.cancel()
    await task.result()


def _scheduler_submit(rt: Runtime, request: Request) -> TaskHandle:
    # in a tuple: the portal awaits an awaitable result, and a handle is awaitable
    return rt.portal.call(lambda: (rt.scheduler.submit(request),))[0]


def _embedded_queue_full(rt: Runtime) -> None:
    # Runtime.run waits for queue room; Scheduler.submit (what the server does) refuses
    handles = [_scheduler_submit(rt, Request("app/hog", 30)) for _ in range(1 + MAX_QUEUE)]
    try:
        _scheduler_submit(rt, Request("app/hog", 30))
    finally:
        for handle in handles:
            rt.portal.call(handle.cancel)


def _sync_queue_full(c: Client) -> None:
    tasks = [c.submit("app/hog", 30) for _ in range(1 + MAX_QUEUE)]
    try:
        c.submit("app/hog", 30)  # 503 + Retry-After 1: past the client's 0.5 s budget, so no retry
    finally:
        for task in tasks:
            task.cancel()


async def _async_queue_full(c: AsyncClient) -> None:
    tasks = [await c.submit("app/hog", 30) for _ in range(1 + MAX_QUEUE)]
    try:
        await c.submit("app/hog", 30)
    finally:
        for task in tasks:
            await task.cancel()


RUNS: dict[str, tuple[str, Any, dict[str, Any]]] = {
    "unknown algorithm": ("app/missing", 1, {}),
    "ambiguous bare name": ("dup", 1, {}),
    "params not a mapping": ("app/echo", 1, {"params": [1, 2]}),
    "unknown param": ("app/echo", 1, {"params": {"nope": 1}}),
    "invalid param value": ("app/sleep", "soon", {}),
    "priority not an int": ("app/echo", 1, {"priority": "high"}),
    "unknown option": ("app/echo", 1, {"colour": "red"}),
    "task timeout": ("app/sleep", 5, {"timeout": 0.1}),
    "executor error": ("app/fail", 1, {}),
    "infeasible": ("app/huge", 1, {}),
}


def _table(server: _Server, runtime: Runtime) -> list[tuple[str, str, str, str]]:
    rows: list[tuple[str, str, str, str]] = []

    async def remote_async(url: str, key: str, fn: Callable[[AsyncClient], Any]) -> str:
        async with AsyncClient(url, key, timeout=0.5) as c:
            return await _aclass_of(lambda: fn(c))

    def remote(url: str, key: str, fn: Callable[[Client], Any], afn: Callable[[AsyncClient], Any]) -> tuple[str, str]:
        with Client(url, key, timeout=0.5) as c:
            sync = _class_of(lambda: fn(c))
        return sync, asyncio.run(remote_async(url, key, afn))

    for name, (algorithm, inputs, options) in RUNS.items():
        def run(target: Any, algorithm: str = algorithm, inputs: Any = inputs, options: Any = options) -> Any:
            return target.run(algorithm, inputs, **options)

        embedded = _class_of(lambda: run(runtime))
        rows.append((name, embedded, *remote(server.url, KEY, run, run)))
    rows.append(("task cancelled", _class_of(lambda: _embedded_cancelled(runtime)),
                 *remote(server.url, KEY, _sync_cancelled, _async_cancelled)))
    rows.append(("queue full", _class_of(lambda: _embedded_queue_full(runtime)),
                 *remote(server.url, KEY, _sync_queue_full, _async_queue_full)))
    rows.append(("server down", "-", *remote(_closed_url(), KEY, lambda c: c.run("app/echo", 1),
                                             lambda c: c.run("app/echo", 1))))
    rows.append(("wrong API key", "-", *remote(server.url, "ec_wrong", lambda c: c.run("app/echo", 1),
                                               lambda c: c.run("app/echo", 1))))
    rows.append(("key out of scope", "-", *remote(server.url, NARROW, lambda c: c.run("app/sleep", 0),
                                                  lambda c: c.run("app/sleep", 0))))
    return rows


def test_every_bad_request_raises_the_same_class_embedded_and_remote(server: _Server, runtime: Runtime) -> None:
    rows = _table(server, runtime)
    header = ("request", "embedded", "remote sync", "remote async")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
    print()
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    # out of scope: the server may refuse (403) or answer as for a missing algorithm, so ids leak nothing
    expected_remote_only = {"server down": {RemoteUnavailable.__name__}, "wrong API key": {Unauthorized.__name__},
                            "key out of scope": {Forbidden.__name__, "UnknownAlgorithm"}}
    for name, embedded, sync, async_ in rows:
        if embedded == "-":
            assert sync == async_ and sync in expected_remote_only[name], (name, sync, async_)
        else:
            assert embedded != "ok", name  # every case is a bad request
            assert sync == embedded and async_ == embedded, (name, embedded, sync, async_)
    named = {name: embedded for name, embedded, _, _ in rows}
    assert named["unknown algorithm"] == "UnknownAlgorithm" and named["ambiguous bare name"] == "AmbiguousAlgorithm"
    assert named["task timeout"] == "TaskTimeout" and named["task cancelled"] == "TaskCancelled"
    assert named["queue full"] == "QueueFull" and named["infeasible"] == "InfeasibleRequest"


def test_every_remote_failure_is_an_edgecompute_error(server: _Server) -> None:
    for url, key in ((_closed_url(), KEY), (server.url, "ec_wrong"), (server.url, KEY)):
        with Client(url, key, timeout=0.5) as c, pytest.raises(EdgeComputeError):
            c.run("app/missing", 1)
        with Client(url, key, timeout=0.5) as c, pytest.raises(EdgeComputeError):
            c.submit("app/missing", 1)


_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(-1, 1, allow_nan=False),
                    st.text(max_size=3), st.lists(st.integers(), max_size=2),
                    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(options=st.dictionaries(st.sampled_from(["params", "priority", "metadata", "retries", "timeout"]),
                               _VALUES, max_size=3))
def test_options_are_judged_alike_embedded_and_remote(server: _Server, runtime: Runtime,
                                                      options: dict[str, Any]) -> None:
    """Whatever option values a caller passes, the remote faces accept or refuse them as the
    Runtime does, with the same class."""
    if "params" in options and isinstance(options["params"], dict) and options["params"]:
        options["params"] = {}  # echo takes no params: what is judged here is the options' form
    embedded = _class_of(lambda: runtime.run("app/echo", 1, **options))

    async def remote_async() -> str:
        async with AsyncClient(server.url, KEY, timeout=5) as c:
            return await _aclass_of(lambda: c.run("app/echo", 1, **options))

    with Client(server.url, KEY, timeout=5) as c:
        sync = _class_of(lambda: c.run("app/echo", 1, **options))
    assert (embedded, sync, asyncio.run(remote_async())) == (embedded, embedded, embedded), options

