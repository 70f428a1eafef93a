"""The remote client's two faces have one shape (the Runtime's and the scheduler's), wait as long as
a task may run, and cancel what their caller gives up on. A real uvicorn server on loopback.
docs/client.md: "One core, two faces", "Waiting and timeouts", "Cancellation"."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgecompute import errors
from edgecompute.client import AsyncClient, AsyncRemoteTask, Client, RemoteError, RemoteTask, RemoteUnavailable

from .conftest import KEYS, TOKENS, Server

# the client's HTTP timeout, far below how long the task runs: it must bound each step, not the task
_STEP_TIMEOUT = 0.2
# longer than the old client's read timeout (its timeout + 5 s), so a client that let the HTTP
# timeout bound the whole wait fails here
_LONG_TASK = 5.5


def _tasks_of(server: Server, key: str, algorithm: str) -> list[Any]:
    gateway = server.app.state.gateway
    return [owned.handle for owned in list(gateway.tasks.values())
            if owned.key == key and owned.handle.algorithm == algorithm]


def test_a_task_longer_than_the_http_timeout_is_waited_for_through_both_faces(server: Server) -> None:
    results: dict[str, Any] = {}

    def sync_run() -> None:
        with Client(server.url, KEYS["alice"], timeout=_STEP_TIMEOUT) as c:
            results["sync run"] = c.run("app/sleep", _LONG_TASK, timeout=30).outputs

    def sync_result() -> None:
        with Client(server.url, KEYS["alice"], timeout=_STEP_TIMEOUT) as c:
            results["sync submit/result"] = c.submit("app/sleep", _LONG_TASK).result().outputs

    async def async_both() -> None:
        async with AsyncClient(server.url, KEYS["alice"], timeout=_STEP_TIMEOUT) as c:
            task = await c.submit("app/sleep", _LONG_TASK)
            run = c.run("app/sleep", _LONG_TASK, timeout=30)
            results["async run"], response = await asyncio.gather(run, task.result())
            results["async run"] = results["async run"].outputs
            results["async submit/result"] = response.outputs

    threads = [threading.Thread(target=sync_run), threading.Thread(target=sync_result),
               threading.Thread(target=asyncio.run, args=(async_both(),))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == dict.fromkeys(("sync run", "sync submit/result", "async run", "async submit/result"),
                                    _LONG_TASK)


def test_a_server_that_is_down_is_a_typed_error() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with Client(url, "k", timeout=1) as c, pytest.raises(RemoteUnavailable) as caught:
        c.run("app/echo", 1)
    assert isinstance(caught.value, errors.EdgeComputeError) and caught.value.retryable

    async def remote() -> None:
        async with AsyncClient(url, "k", timeout=1) as c:
            with pytest.raises(RemoteUnavailable):
                await c.run("app/echo", 1)
            with pytest.raises(RemoteUnavailable):
                await c.algorithms()

    asyncio.run(remote())


def test_both_faces_have_the_same_task_shape(server: Server) -> None:
    with Client(server.url, KEYS["alice"], timeout=5) as c:
        task = c.submit("app/sleep", 30)
        assert isinstance(task, RemoteTask) and task.state in ("queued", "running") and task.algorithm == "app/sleep"
        assert task.cancel() is True and task.state == "cancelled"
        with pytest.raises(errors.TaskCancelled):
            task.result()
        assert task.cancel() is False  # already ended
        names = {a["name"] for a in c.algorithms()}
        executors = {e["name"] for e in c.executors()}

    async def remote() -> None:
        async with AsyncClient(server.url, KEYS["alice"], timeout=5) as c:
            task = await c.submit("app/sleep", 30)
            assert isinstance(task, AsyncRemoteTask) and not task.done() and task.algorithm == "app/sleep"
            assert await task.refresh() in ("queued", "running")
            assert await task.cancel() is True and task.done() and task.state == "cancelled"
            with pytest.raises(errors.TaskCancelled):
                await task.result()
            assert await task.cancel() is False
            assert {a["name"] for a in await c.algorithms()} == names
            assert {e["name"] for e in await c.executors()} == executors
            generated = await c.submit("app/generate", params={"delay": 0.001})
            assert [chunk async for chunk in generated.stream()] == TOKENS
            assert (await generated.result()).outputs == "".join(TOKENS)
            assert [chunk async for chunk in c.stream("app/generate", params={"delay": 0.001}, transport="ws")] \
                == TOKENS
            assert await c.map("app/echo", range(30)) == list(range(30))
            failed = await c.map("app/fail", [1, 2], return_exceptions=True)
            assert all(isinstance(error, errors.ExecutorError) for error in failed)

    asyncio.run(remote())
    assert "app/sleep" in names and "app" in executors


def test_leaving_a_stream_early_cancels_the_task_remotely(server: Server) -> None:
    # as Runtime.stream does embedded: whoever stops reading has given up on the task
    with Client(server.url, KEYS["limited"], timeout=5) as c:
        for _ in c.stream("app/generate", params={"delay": 0.05}):
            break
    sync_tasks = _tasks_of(server, "limited", "app/generate")
    assert [t.state.value for t in sync_tasks] == ["cancelled"]

    async def remote() -> None:
        async with AsyncClient(server.url, KEYS["limited"], timeout=5) as c, \
                contextlib.aclosing(c.stream("app/generate", params={"delay": 0.05})) as chunks:
            async for _ in chunks:
                break

    asyncio.run(remote())
    tasks = _tasks_of(server, "limited", "app/generate")
    assert len(tasks) == 2 and [t.state.value for t in tasks] == ["cancelled", "cancelled"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(inputs=st.recursive(st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.text(max_size=8)
                           | st.binary(max_size=8),
                           lambda children: st.lists(children, max_size=3)
                           | st.dictionaries(st.text(max_size=4), children, max_size=3), max_leaves=8),
       priority=st.integers(-1000, 1000), retries=st.integers(0, 3))
def test_inputs_and_options_round_trip_alike_through_both_faces(server: Server, inputs: Any, priority: int,
                                                                 retries: int) -> None:
    options = {"priority": priority, "retries": retries, "metadata": {"n": priority}, "timeout": 30}
    with Client(server.url, KEYS["bob"], timeout=5) as c:
        sync = c.run("app/echo", inputs, **options).outputs

    async def remote() -> Any:
        async with AsyncClient(server.url, KEYS["bob"], timeout=5) as c:
            task = await c.submit("app/echo", inputs, **options)
            return (await task.result()).outputs, (await c.run("app/echo", inputs, **options)).outputs

    assert asyncio.run(remote()) == (sync, sync)
    assert sync == (list(inputs) if isinstance(inputs, tuple) else inputs)


def test_an_answer_over_max_answer_bytes_is_refused_before_it_is_read() -> None:
    # a faulty or hostile server announces 10 GB and sends nothing more: the client must refuse
    # from the header (a client that waited for the body would end in a timeout instead)
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 10000000000\r\n\r\n")
                stop.wait(3)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with Client(url, "k", timeout=2, max_answer_bytes=1 << 20) as c, \
                pytest.raises(RemoteError, match="max_answer_bytes") as caught:
            c.run("app/echo", 1)
        assert not isinstance(caught.value, RemoteUnavailable)

        async def remote() -> None:
            async with AsyncClient(url, "k", timeout=2, max_answer_bytes=1 << 20) as c:
                with pytest.raises(RemoteError, match="max_answer_bytes") as caught:
                    await c.run("app/echo", 1)
                assert not isinstance(caught.value, RemoteUnavailable)

        asyncio.run(remote())
    finally:
        stop.set()
        thread.join()
        listener.close()
