"""gRPC beside HTTP, against a real uvicorn + grpc.aio server on loopback over one real scheduler.

The gateway's auth, scope, limit and hostile-input cases of test_gateway.py and test_hostile.py,
sent over gRPC: each must be refused with the same problem (type, status, detail) HTTP answers,
under the gRPC status code of docs/grpc.md, and a task is the same task through either.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import attrs
import grpc
import httpx
import numpy as np
import pytest

from edgecompute import FunctionExecutor, Resources, errors, wire
from edgecompute.client import NotFound, RateLimited, RemoteError, RemoteUnavailable, Unauthorized
from edgecompute.grpc_client import AsyncGrpcClient, AsyncGrpcTask, GrpcClient, GrpcTask
from edgecompute.grpc_proto import METHODS, PROBLEM_KEY, REQUEST_ID_KEY, RETRY_AFTER_KEY, encode_value, pb
from edgecompute.server import ServerSettings, hash_key
from edgecompute.server.grpc import attach

from .conftest import KEYS, TOKENS, running

SLOW_KEY = "ec_slow-test-key-00000000000000000000000000000"
BIG_CHUNK = 1 << 20
BIG_CHUNKS = 40


def grpc_settings(**overrides: Any) -> ServerSettings:
    keys = [
        {"name": "alice", "hash": hash_key(KEYS["alice"]), "scopes": ["app/*", "big/*"]},
        {"name": "bob", "hash": hash_key(KEYS["bob"]), "scopes": ["app/*", "secret/*"]},
        {"name": "limited", "hash": hash_key(KEYS["limited"]), "scopes": ["app/*"], "max_in_flight": 3},
        {"name": "narrow", "hash": hash_key(KEYS["narrow"]), "scopes": ["app/echo"]},
        # one token per 5 s: a third call in a row is refused however slow the machine is
        {"name": "slow", "hash": hash_key(SLOW_KEY), "scopes": ["app/*"], "rate": 0.2, "burst": 2},
    ]
    return ServerSettings.from_mapping({"keys": keys, "access_log": False, "max_body_bytes": 1_000_000,
                                        "max_wait": 10.0, **overrides})


def big() -> FunctionExecutor:
    executor = FunctionExecutor("big")

    @executor.algorithm(resources=Resources(cpu=0))
    async def chunks(inputs: Any, *, ctx: Any) -> Any:
        """Emit BIG_CHUNKS chunks of 1 MiB each, as fast as the reader takes them."""
        for index in range(BIG_CHUNKS):
            await ctx.emit(bytes([index % 256]) * BIG_CHUNK)
        return BIG_CHUNKS

    @executor.algorithm(resources=Resources(cpu=0))
    async def opaque(inputs: Any, *, ctx: Any) -> Any:
        """Emit a plain chunk, then one no wire can carry; return one too."""
        await ctx.emit("fine")
        await ctx.emit(object())
        return object()

    return executor


@attrs.frozen
class Both:
    url: str  # HTTP
    target: str  # gRPC host:port
    app: Any


@pytest.fixture(scope="module")
def both() -> Iterator[Both]:
    server = running(grpc_settings(), extra=(big(),))
    listener = attach(server.app, host="127.0.0.1", port=0)
    with server as http:
        yield Both(http.url, f"127.0.0.1:{listener.port}", http.app)


@pytest.fixture(scope="module")
def channel(both: Both) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(both.target) as channel:
        yield channel


def meta(name: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {KEYS[name]}"),) if name else ()


def call(channel: Any, method: str, message: Any, metadata: Any = ()) -> pb.Task:
    """One unary call with the message as raw bytes (so a test can send what no stub would)."""
    raw = message if isinstance(message, bytes) else message.SerializeToString()
    answer = channel.unary_unary(METHODS[method])(raw, metadata=metadata, timeout=20)
    return pb.Task.FromString(answer)


def refused(channel: grpc.Channel, method: str, message: Any, metadata: Any, code: grpc.StatusCode,
            slug: str) -> dict[str, Any]:
    """The call fails with ``code`` and the problem ``slug`` in its trailing metadata."""
    with pytest.raises(grpc.RpcError) as caught:
        call(channel, method, message, metadata)
    error: Any = caught.value
    assert error.code() == code, (error.code(), error.details())
    trailing = dict(error.trailing_metadata())
    problem = json.loads(trailing[PROBLEM_KEY])
    assert problem["type"] == f"/problems/{slug}" and problem["title"] and problem["detail"] == error.details()
    assert problem["request_id"] == trailing[REQUEST_ID_KEY]
    assert problem["instance"] == METHODS[method]
    return dict(problem)


def failure(caught: Any) -> Any:
    """The failed call behind a ``pytest.raises(grpc.RpcError)`` (a grpc.Call too)."""
    return caught.value


def http_problem(response: httpx.Response) -> dict[str, Any]:
    assert response.headers["content-type"] == "application/problem+json", response.text
    return dict(response.json())


def same(problem: dict[str, Any]) -> dict[str, Any]:
    """A problem without what differs per call and per protocol."""
    return {k: v for k, v in problem.items() if k not in ("request_id", "instance")}


def submit(algorithm: str, inputs: Any = None, wait: float = 10.0, **fields: Any) -> pb.SubmitRequest:
    request = pb.SubmitRequest(algorithm=algorithm, wait=wait, **fields)
    if inputs is not None:
        request.inputs.CopyFrom(encode_value(inputs))
    return request


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


# -- tasks -----------------------------------------------------------------------------------------


def test_submit_get_cancel_and_one_task_through_both_protocols(both: Both, channel: grpc.Channel) -> None:
    task = call(channel, "Submit", submit("app/echo", {"text": "hi", "n": [1, 2]}), meta("alice"))
    assert task.state == "succeeded" and task.executor == "app" and task.timings["total"] >= 0
    assert wire.decode_frame(task.outputs.frame)["v"] == {"text": "hi", "n": [1, 2]}
    # arrays cross as raw buffers, and JSON is there for who asks for it
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    task = call(channel, "Submit", submit("app/total", array), meta("alice"))
    np.testing.assert_array_equal(wire.decode_frame(task.outputs.frame)["v"]["doubled"], array * 2)
    task = call(channel, "Submit", submit("app/echo", [1, b"\x00"], accept=pb.JSON), meta("alice"))
    assert wire.decode_json(task.outputs.json) == {"v": [1, b"\x00"]}
    # a task submitted over gRPC is the same task over HTTP, and the other way round
    live = call(channel, "Submit", submit("app/sleep", 30, wait=0), meta("alice"))
    assert live.state in ("queued", "running")
    assert httpx.get(f"{both.url}/v1/tasks/{live.id}", headers=dict(meta("alice"))).json()["state"] == live.state
    cancelled = call(channel, "Cancel", pb.TaskRequest(id=live.id), meta("alice"))
    assert cancelled.state == "cancelled" and cancelled.error.error == "TaskCancelled"
    assert cancelled.error.type == "/problems/task-cancelled"
    from_http = httpx.post(f"{both.url}/v1/tasks", json={"algorithm": "app/echo", "inputs": 7},
                           headers=dict(meta("alice"))).json()
    task = call(channel, "Get", pb.TaskRequest(id=from_http["id"], wait=5), meta("alice"))
    assert task.state == "succeeded" and wire.decode_frame(task.outputs.frame)["v"] == 7
    failed = call(channel, "Submit", submit("app/fail", "x"), meta("alice"))
    assert failed.state == "failed" and "failing on purpose: x" in failed.error.detail


# -- auth ------------------------------------------------------------------------------------------


def test_no_key_a_wrong_key_or_a_malformed_one_is_unauthenticated(both: Both, channel: grpc.Channel) -> None:
    request = submit("app/echo", 1)
    for metadata in ((), (("authorization", "Bearer ec_wrong"),), (("authorization", f"Basic {KEYS['alice']}"),),
                     (("authorization", "Bearer"),), (("x-api-key", KEYS["alice"] + "x"),),
                     (("authorization", f"Bearer {KEYS['alice'].upper()}"),)):
        refused(channel, "Submit", request, metadata, grpc.StatusCode.UNAUTHENTICATED, "unauthorized")
    for method, message in (("Get", pb.TaskRequest(id="abc")), ("Cancel", pb.TaskRequest(id="abc")),
                            ("Algorithms", pb.ListRequest()), ("Executors", pb.ListRequest())):
        refused(channel, method, message, (), grpc.StatusCode.UNAUTHENTICATED, "unauthorized")
    # the x-api-key metadata works as well as Bearer
    task = call(channel, "Submit", request, (("x-api-key", KEYS["alice"]),))
    assert wire.decode_frame(task.outputs.frame)["v"] == 1
    with GrpcClient(f"grpc://{both.target}", "ec_wrong", timeout=5) as client, pytest.raises(Unauthorized):
        client.run("app/echo", 1)


def test_scopes_hide_what_a_key_may_not_use_and_tasks_of_other_keys(both: Both, channel: grpc.Channel) -> None:
    def unknown(key: str, algorithm: str) -> dict[str, Any]:
        problem = refused(channel, "Submit", submit(algorithm, 1), meta(key), grpc.StatusCode.NOT_FOUND,
                          "unknown-algorithm")
        http = http_problem(httpx.post(f"{both.url}/v1/tasks?wait=true", json={"algorithm": algorithm, "inputs": 1},
                                       headers=dict(meta(key))))
        assert same(problem) == same(http)  # the same answer, word for word
        return {k: v.replace(algorithm, "NAME") if k == "detail" else v for k, v in same(problem).items()}

    # out of scope answers exactly as unknown does
    assert unknown("alice", "secret/echo2") == unknown("alice", "secret/missing") == unknown("alice", "nothing/x")
    unknown("alice", "echo2")  # a bare name resolves, then its scope is checked
    unknown("narrow", "app/total")
    with GrpcClient(both.target, KEYS["narrow"], timeout=5) as narrow:
        assert narrow.run("app/echo", 1).outputs == 1
        assert [a["name"] for a in narrow.algorithms()] == ["app/echo"]
        assert [(e["name"], e["algorithms"]) for e in narrow.executors()] == [("app", ["app/echo"])]
        with pytest.raises(errors.UnknownAlgorithm):
            narrow.run("app/total", [1])
    # another key's task is answered exactly like a missing one, and bob's cancel does nothing
    task = call(channel, "Submit", submit("app/sleep", 30, wait=0), meta("alice"))
    for method in ("Get", "Cancel"):
        refused(channel, method, pb.TaskRequest(id=task.id), meta("bob"), grpc.StatusCode.NOT_FOUND, "not-found")
    with pytest.raises(grpc.RpcError) as caught:
        next(events(channel, task.id, "bob"))
    assert failure(caught).code() == grpc.StatusCode.NOT_FOUND
    assert call(channel, "Get", pb.TaskRequest(id=task.id), meta("alice")).state in ("queued", "running")
    call(channel, "Cancel", pb.TaskRequest(id=task.id), meta("alice"))


# -- what a request may hold ------------------------------------------------------------------------


def test_bad_requests_get_the_problems_http_answers(both: Both, channel: grpc.Channel) -> None:
    """Each bad request in both protocols: the same problem, field for field."""
    cases: list[tuple[dict[str, Any], pb.SubmitRequest]] = [
        ({"algorithm": "app/echo", "params": {"bogus": 1}}, submit("app/echo", params=encode_value({"bogus": 1}))),
        ({"algorithm": "app/echo", "params": [1]}, submit("app/echo", params=encode_value([1]))),
        ({"algorithm": "app/echo", "metadata": "x"}, submit("app/echo", metadata=encode_value("x"))),
        ({"algorithm": "app/echo", "priority": 1001}, submit("app/echo", priority=1001)),
        ({"algorithm": "app/echo", "timeout": 0}, submit("app/echo", timeout=0.0)),
        ({"algorithm": "app/echo", "timeout": -1}, submit("app/echo", timeout=-1.0)),
        ({"algorithm": "app/echo", "retries": 11}, submit("app/echo", retries=11)),
        ({"algorithm": ""}, submit("")),
        ({"algorithm": "app/echo", "inputs": nested(64)}, submit("app/echo", nested(60))),
    ]
    # the deep one: built past the encoder's own check, as a hostile client would
    deep = json.dumps({"v": nested(64)}).encode()
    cases[-1][1].inputs.CopyFrom(pb.Value(json=deep))
    for document, message in cases:
        http = httpx.post(f"{both.url}/v1/tasks?wait=true", json=document, headers=dict(meta("alice")))
        if http.status_code == 200:  # a task's own failure (a function's unknown param): the same error
            task = call(channel, "Submit", message, meta("alice"))
            assert task.error.error == http.json()["error"]["error"], document
            continue
        expected = http_problem(http)
        code = {400: grpc.StatusCode.INVALID_ARGUMENT, 422: grpc.StatusCode.INVALID_ARGUMENT,
                404: grpc.StatusCode.NOT_FOUND}[expected["status"]]
        problem = refused(channel, "Submit", message, meta("alice"), code, expected["type"].rpartition("/")[2])
        assert same(problem) == same(expected), document
    # the deepest allowed value crosses both ways: the rule is the same in and out
    task = call(channel, "Submit", submit("app/echo", nested(63)), meta("alice"))
    assert wire.decode_frame(task.outputs.frame)["v"] == nested(63)


def test_malformed_messages_and_unknown_fields_are_refused_with_problems(channel: grpc.Channel) -> None:
    alice = meta("alice")
    invalid, bad = grpc.StatusCode.INVALID_ARGUMENT, "bad-request"
    refused(channel, "Submit", b"\xff\xff\xff\xff", alice, invalid, bad)  # not a protobuf message
    refused(channel, "Get", b"\x0a\xff", alice, invalid, bad)  # a length past the end
    # a field the schema does not know is refused, as HTTP refuses an unknown body field
    unknown = submit("app/echo", 1).SerializeToString() + b"\xf8\x06\x01"  # field 111, varint 1
    assert "111" in refused(channel, "Submit", unknown, alice, invalid, "invalid-request")["detail"]
    nested_unknown = submit("app/echo").SerializeToString() + b"\x12\x02\x18\x01"  # inputs {field 3: 1}
    refused(channel, "Submit", nested_unknown, alice, invalid, "invalid-request")
    # values: JSON that does not parse, a frame that lies about its length, a Value not {"v": ...}
    for value, slug in ((pb.Value(json=b"{not json"), bad),
                        (pb.Value(frame=b"ECF1\xff\xff\xff\xff"), "invalid-request"),
                        (pb.Value(json=b'{"w": 1}'), "invalid-request")):
        request = submit("app/echo")
        request.inputs.CopyFrom(value)
        refused(channel, "Submit", request, alice, invalid, slug)
    task_id = call(channel, "Submit", submit("app/echo", 1), alice).id
    refused(channel, "Get", pb.TaskRequest(id=task_id, wait=-1), alice, invalid, bad)
    refused(channel, "Get", pb.TaskRequest(id=task_id, wait=float("nan")), alice, invalid, bad)
    refused(channel, "Submit", submit("app/echo", 1, wait=-1), alice, invalid, bad)


def test_requests_over_the_size_limit_are_refused(both: Both, channel: grpc.Channel) -> None:
    # over server.max_body_bytes (1 MB): the service's problem, as HTTP's 413
    problem = refused(channel, "Submit", submit("app/echo", b"x" * 1_010_000), meta("alice"),
                      grpc.StatusCode.RESOURCE_EXHAUSTED, "payload-too-large")
    assert problem["status"] == 413 and "max_body_bytes" in problem["detail"]
    # far over it: grpc core refuses it before reading it, with the same code
    with pytest.raises(grpc.RpcError) as caught:
        call(channel, "Submit", submit("app/echo", b"x" * 3_000_000), meta("alice"))
    assert failure(caught).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with GrpcClient(both.target, KEYS["alice"], timeout=5) as client:
        with pytest.raises(errors.InvalidRequest, match="max_body_bytes"):
            client.run("app/echo", b"x" * 1_010_000)
        with pytest.raises(RemoteError, match="max_body_bytes"):
            client.run("app/echo", b"x" * 3_000_000)
        assert client.run("app/echo", b"x" * 900_000).outputs == b"x" * 900_000
    # and the client refuses an answer over its own max_answer_bytes
    with GrpcClient(both.target, KEYS["alice"], timeout=5, max_answer_bytes=100_000) as client, \
            pytest.raises(RemoteError, match="max_answer_bytes"):
        client.run("app/echo", b"x" * 200_000)


# -- limits ----------------------------------------------------------------------------------------


def test_the_rate_limit_is_one_bucket_for_both_protocols(both: Both, channel: grpc.Channel) -> None:
    slow = (("authorization", f"Bearer {SLOW_KEY}"),)
    request = pb.TaskRequest(id="none")
    for _ in range(2):  # the burst
        refused(channel, "Get", request, slow, grpc.StatusCode.NOT_FOUND, "not-found")
    problem = refused(channel, "Get", request, slow, grpc.StatusCode.RESOURCE_EXHAUSTED, "rate-limited")
    assert problem["status"] == 429 and problem["retry_after"] >= 1
    with pytest.raises(grpc.RpcError) as caught:
        call(channel, "Get", request, slow)
    assert dict(failure(caught).trailing_metadata())[RETRY_AFTER_KEY] == str(problem["retry_after"])
    # the key's bucket is the same over HTTP
    response = httpx.get(f"{both.url}/v1/tasks/none", headers=dict(slow))
    assert response.status_code == 429 and response.json()["type"] == "/problems/rate-limited"
    with GrpcClient(both.target, SLOW_KEY, timeout=0.5) as client, pytest.raises(RateLimited):
        client.algorithms()  # retried only while its 0.5 s budget lasts: the bucket needs 5 s


def test_the_in_flight_cap_holds_across_protocols_then_frees_up(both: Both, channel: grpc.Channel) -> None:
    ids = [call(channel, "Submit", submit("app/sleep", 30, wait=0), meta("limited")).id for _ in range(3)]
    problem = refused(channel, "Submit", submit("app/echo", 1), meta("limited"), grpc.StatusCode.RESOURCE_EXHAUSTED,
                      "too-many-in-flight")
    assert problem["retry_after"] == 1
    assert httpx.post(f"{both.url}/v1/tasks", json={"algorithm": "app/echo"},
                      headers=dict(meta("limited"))).status_code == 429
    for task_id in ids:
        assert call(channel, "Cancel", pb.TaskRequest(id=task_id), meta("limited")).state == "cancelled"
    task = call(channel, "Submit", submit("app/echo", 1), meta("limited"))
    assert wire.decode_frame(task.outputs.frame)["v"] == 1


def test_the_client_waits_out_a_429_within_its_budget() -> None:
    keys = [{"name": "quick", "hash": hash_key(SLOW_KEY), "scopes": ["app/*"], "rate": 1.0, "burst": 1}]
    server = running(ServerSettings.from_mapping({"keys": keys, "access_log": False}))
    listener = attach(server.app, host="127.0.0.1", port=0)
    with server, GrpcClient(f"127.0.0.1:{listener.port}", SLOW_KEY, timeout=10) as client:
        assert [client.run("app/echo", n).outputs for n in range(3)] == [0, 1, 2]  # 2 of them waited


# -- streams ---------------------------------------------------------------------------------------


def events(channel: Any, task_id: str, key: str = "alice") -> Any:
    return channel.unary_stream(METHODS["Stream"], response_deserializer=pb.StreamEvent.FromString)(
        pb.TaskRequest(id=task_id).SerializeToString(), metadata=meta(key))


def test_chunks_stream_in_order_then_the_end(both: Both, channel: grpc.Channel) -> None:
    task = call(channel, "Submit", submit("app/generate", wait=0, params=encode_value({"delay": 0.01})), meta("alice"))
    received = list(events(channel, task.id))
    chunks = [(e.chunk.seq, wire.decode_frame(e.chunk.data.frame)["v"]) for e in received[:-1]]
    assert chunks == list(enumerate(TOKENS))
    end = received[-1].end
    assert end.state == "succeeded" and wire.decode_frame(end.outputs.frame)["v"] == "".join(TOKENS)
    # a second reader of one stream is refused while the first reads
    task = call(channel, "Submit", submit("app/generate", wait=0, params=encode_value({"delay": 0.2})), meta("alice"))
    first = events(channel, task.id)
    assert next(first).chunk.seq == 0
    with pytest.raises(grpc.RpcError) as caught:
        next(events(channel, task.id))
    assert failure(caught).code() == grpc.StatusCode.FAILED_PRECONDITION
    assert json.loads(dict(failure(caught).trailing_metadata())[PROBLEM_KEY])["type"] == "/problems/conflict"
    # the first reader leaves after two chunks: the next reader gets every later one, nothing lost
    assert next(first).chunk.seq == 1
    first.cancel()
    deadline = time.monotonic() + 10
    while True:
        try:
            rest = list(events(channel, task.id))
            break
        except grpc.RpcError:  # the server has not seen the first reader leave yet
            assert time.monotonic() < deadline
            time.sleep(0.02)
    assert [e.chunk.seq for e in rest[:-1]] == list(range(2, len(TOKENS)))


def test_a_reader_that_does_not_read_holds_nothing_but_its_own_stream(both: Both) -> None:
    # 40 MiB of chunks to a reader that takes one and stops: grpc's flow control stops the
    # server's stream at its next send, not the server; the chunks wait in the task
    with grpc.insecure_channel(both.target) as lazy_channel, grpc.insecure_channel(both.target) as other:
        task = call(other, "Submit", submit("big/chunks", wait=0), meta("alice"))
        lazy = events(lazy_channel, task.id)
        assert next(lazy).chunk.seq == 0
        # meanwhile every other call is served, over gRPC and HTTP
        with GrpcClient(both.target, KEYS["alice"], timeout=10) as client:
            assert client.map("app/echo", range(20)) == list(range(20))
            assert [chunk for chunk in client.stream("app/generate", params={"delay": 0.001})] == TOKENS
        assert httpx.post(f"{both.url}/v1/tasks?wait=true", json={"algorithm": "app/echo", "inputs": 5},
                          headers=dict(meta("alice"))).json()["outputs"] == 5
        owned = both.app.state.gateway.tasks[task.id]
        assert owned.seq < BIG_CHUNKS // 2  # the server did not push the whole stream into buffers
        lazy.cancel()
        # the reader gone, the rest of the stream goes to the next one, from where it stopped
        deadline = time.monotonic() + 10
        while owned.handle.streaming:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        sent = owned.seq
        rest = list(events(other, task.id))
        assert [e.chunk.seq for e in rest[:-1]] == list(range(sent, BIG_CHUNKS))
        assert rest[-1].end.state == "succeeded"


# -- the client ------------------------------------------------------------------------------------


def test_both_client_faces_have_the_runtime_shape(both: Both) -> None:
    with GrpcClient(both.target, KEYS["alice"], timeout=5) as c:
        task = c.submit("app/sleep", 30)
        assert isinstance(task, GrpcTask) and task.state in ("queued", "running") and task.algorithm == "app/sleep"
        assert not task.done()
        assert task.cancel() is True and task.state == "cancelled" and task.done()
        with pytest.raises(errors.TaskCancelled):
            task.result()
        assert task.cancel() is False
        with pytest.raises(errors.ExecutorError, match="failing on purpose"):
            c.run("app/fail", 1)
        sleeper = c.submit("app/sleep", 30)
        known, sleeper.id = sleeper.id, "nope"  # now a view of a task the server does not know
        with pytest.raises(NotFound):
            sleeper.result()
        sleeper.id = known
        assert sleeper.cancel() is True
        assert c.map("app/echo", range(10)) == list(range(10))
        generated = c.submit("app/generate", params={"delay": 0.001})
        assert list(generated.stream()) == TOKENS and generated.result().outputs == "".join(TOKENS)
        # leaving a stream early cancels its task, as Runtime.stream does
        for _ in c.stream("app/generate", params={"delay": 0.05}):
            break
        with pytest.raises(errors.InvalidRequest, match="unknown option"):
            c.run("app/echo", 1, resources=None)
        names = {a["name"] for a in c.algorithms()}
    gateway = both.app.state.gateway
    generate = [o.handle for o in list(gateway.tasks.values()) if o.handle.algorithm == "app/generate"
                and o.handle.done()]
    assert "cancelled" in [h.state.value for h in generate]

    async def remote() -> None:
        async with AsyncGrpcClient(both.target, KEYS["alice"], timeout=5) as c:
            task = await c.submit("app/sleep", 30)
            assert isinstance(task, AsyncGrpcTask) and not task.done()
            assert await task.refresh() in ("queued", "running")
            assert await task.cancel() is True and task.done()
            with pytest.raises(errors.TaskCancelled):
                await task.result()
            assert {a["name"] for a in await c.algorithms()} == names
            assert [chunk async for chunk in c.stream("app/generate", params={"delay": 0.001})] == TOKENS
            assert await c.map("app/echo", range(30)) == list(range(30))
            failed = await c.map("app/fail", [1, 2], return_exceptions=True)
            assert all(isinstance(error, errors.ExecutorError) for error in failed)
            array = np.arange(6, dtype=np.int16)
            np.testing.assert_array_equal((await c.run("app/total", array)).outputs["doubled"], array * 2)

    asyncio.run(remote())


def test_a_task_longer_than_the_client_timeout_is_waited_for(both: Both) -> None:
    with GrpcClient(both.target, KEYS["alice"], timeout=0.2) as c:
        assert c.run("app/sleep", 1.0, timeout=30).outputs == 1.0
        assert c.submit("app/sleep", 1.0).result().outputs == 1.0


def test_a_server_that_is_down_is_a_typed_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        target = f"127.0.0.1:{sock.getsockname()[1]}"
    with GrpcClient(target, "k", timeout=1) as c, pytest.raises(RemoteUnavailable) as caught:
        c.run("app/echo", 1, timeout=1)
    assert failure(caught).retryable

    async def remote() -> None:
        async with AsyncGrpcClient(target, "k", timeout=1) as c:
            with pytest.raises(RemoteUnavailable):
                await c.algorithms()

    asyncio.run(remote())


def test_request_ids_metrics_and_a_light_core_import(both: Both, channel: grpc.Channel) -> None:
    problem = refused(channel, "Get", pb.TaskRequest(id="nope"), (*meta("alice"), (REQUEST_ID_KEY, "trace-42")),
                      grpc.StatusCode.NOT_FOUND, "not-found")
    assert problem["request_id"] == "trace-42"
    metrics = httpx.get(f"{both.url}/metrics").text
    assert 'edgecompute_grpc_requests_total{code="NOT_FOUND",method="Get"}' in metrics
    assert 'edgecompute_grpc_requests_total{code="OK",method="Submit"}' in metrics
    code = "import sys, edgecompute; assert not [m for m in sys.modules if m.split('.')[0] in ('grpc', 'google')]"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_settings_check_the_grpc_port(tmp_path: Any) -> None:
    with pytest.raises(errors.ConfigError, match="grpc_port"):
        ServerSettings.from_mapping({"grpc_port": 70000})
    with pytest.raises(errors.ConfigError, match="grpc_host"):
        ServerSettings.from_mapping({"grpc_host": ""})
    assert ServerSettings().grpc_port is None  # off unless configured


def test_edgecompute_serve_serves_grpc_on_its_own_port(tmp_path: Any) -> None:
    ports = []
    for _ in range(2):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
    (tmp_path / "edgecompute.toml").write_text(
        f'[server]\nport = {ports[0]}\ngrpc_port = {ports[1]}\naccess_log = false\n'
        f'[[server.keys]]\nname = "app"\nhash = "{hash_key(KEYS["alice"])}"\nscopes = ["demo/*"]\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGECOMPUTE_")}
    process = subprocess.Popen([sys.executable, "-m", "edgecompute", "serve", "--config",
                                str(tmp_path / "edgecompute.toml"), "--log-level", "warning"],
                               cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        with GrpcClient(f"127.0.0.1:{ports[1]}", KEYS["alice"], timeout=2) as client:
            deadline = time.monotonic() + 60
            while True:
                try:
                    response = client.run("demo/upper", "hi")
                    break
                except RemoteUnavailable:
                    assert process.poll() is None and time.monotonic() < deadline
                    time.sleep(0.1)
            assert response.outputs == "HI"
            task = client.submit("demo/word_count", "one two three")
            document = httpx.get(f"http://127.0.0.1:{ports[0]}/v1/tasks/{task.id}?wait=5",
                                 headers=dict(meta("alice"))).json()
            assert document["outputs"] == 3  # the same scheduler and tasks behind both ports
    finally:
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    # uvicorn re-raises the SIGINT it handled once it has shut down: click says "Aborted!", exit 1
    assert process.returncode in (0, 1) and b"Traceback" not in stderr, stderr.decode()[-2000:]


def test_what_the_wire_cannot_carry_is_an_error_not_a_crash(both: Both, channel: grpc.Channel) -> None:
    task = call(channel, "Submit", submit("big/opaque", wait=10), meta("alice"))
    http = httpx.get(f"{both.url}/v1/tasks/{task.id}", headers=dict(meta("alice"))).json()
    assert task.state == http["state"] == "succeeded" and not task.HasField("outputs")
    assert task.error.type == http["error"]["type"] == "/problems/task-failed"
    assert task.error.error == http["error"]["error"] == "InvalidRequest"
    stream = events(channel, task.id)
    assert wire.decode_frame(next(stream).chunk.data.frame)["v"] == "fine"
    with pytest.raises(grpc.RpcError) as caught:
        next(stream)
    problem = json.loads(dict(failure(caught).trailing_metadata())[PROBLEM_KEY])
    assert failure(caught).code() == grpc.StatusCode.INTERNAL and "chunk 1" in problem["detail"]


def test_anonymous_callers_cannot_reach_each_others_tasks() -> None:
    server = running(grpc_settings(allow_anonymous=True))
    listener = attach(server.app, host="127.0.0.1", port=0)
    with server, grpc.insecure_channel(f"127.0.0.1:{listener.port}") as channel:
        task = call(channel, "Submit", submit("app/sleep", 30, wait=0))
        base, _, token = task.id.partition(".")
        assert len(token) >= 20
        # another keyless caller knows (or guesses) the task id, not its capability
        for guess in (base, f"{base}.", f"{base}.{token[:-1]}x"):
            for method in ("Get", "Cancel"):
                refused(channel, method, pb.TaskRequest(id=guess), (), grpc.StatusCode.NOT_FOUND, "not-found")
        assert call(channel, "Get", pb.TaskRequest(id=task.id)).state == "running"
        assert call(channel, "Cancel", pb.TaskRequest(id=task.id)).state == "cancelled"


def test_silent_and_idle_connections_are_closed_as_http_closes_them() -> None:
    # found 2026-12-06: a client that connected and sent nothing, or only the HTTP/2 preface, held
    # its gRPC connection for as long as it liked (header_timeout and keep_alive_timeout bound them
    # on HTTP only)
    server = running(grpc_settings(header_timeout=0.5, keep_alive_timeout=0.5))
    listener = attach(server.app, host="127.0.0.1", port=0)
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")  # + empty SETTINGS
    with server:
        for opening in (b"", preface):
            with socket.create_connection(("127.0.0.1", listener.port), timeout=30) as sock:
                sock.sendall(opening)
                received = b""
                while chunk := sock.recv(65536):  # a socket.timeout here: the server kept it open
                    received += chunk
            # closed by the server (recv gave b""), after its SETTINGS and a GOAWAY saying why: the
            # opening's timeout or the idle one, whichever grpc core's timers fire first
            assert received.endswith((b"connection idle", b"before handshake timeout")), received[-60:]
        with grpc.insecure_channel(f"127.0.0.1:{listener.port}") as channel:  # a real client is unaffected
            first = call(channel, "Submit", submit("app/echo", "one"), meta("alice"))
            time.sleep(1.0)  # idle past keep_alive_timeout: the server sent GOAWAY, the channel reconnects
            second = call(channel, "Submit", submit("app/echo", "two"), meta("alice"))
        assert first.state == second.state == "succeeded"
