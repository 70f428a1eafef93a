"""The gateway against a real uvicorn on loopback, with real HTTP and WebSocket clients: docs/server.md
("Authentication", "Routes", "Binary inputs and outputs", "Limits", "Errors", streams under "Routes")."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx
import numpy as np
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

from edgecompute import errors, wire
from edgecompute.client import Client, NotFound, RateLimited, Unauthorized

from .conftest import GATES, KEYS, TOKENS, Server, running, settings


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


def is_problem(response: httpx.Response, status: int, slug: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["type"] == f"/problems/{slug}"
    assert body["status"] == status
    assert body["title"] and body["detail"]
    assert body["request_id"] == response.headers["x-request-id"]
    return dict(body)


def submit(server: Server, key: str, algorithm: str, inputs: Any = None, wait: str | None = "true") -> httpx.Response:
    params = {"wait": wait} if wait else None
    return httpx.post(f"{server.url}/v1/tasks", json={"algorithm": algorithm, "inputs": inputs},
                      params=params, headers=auth(key))


# -- tasks ------------------------------------------------------------------------------------------


def test_submit_and_wait_returns_the_outputs(server: Server) -> None:
    response = submit(server, "alice", "app/echo", {"text": "hi", "n": [1, 2]})
    assert response.status_code == 200
    task = response.json()
    assert task["state"] == "succeeded"
    assert task["outputs"] == {"text": "hi", "n": [1, 2]}
    assert task["timings"]["total"] >= task["timings"]["run"] >= 0


def test_submit_without_wait_is_accepted_then_readable_and_cancellable(server: Server) -> None:
    response = submit(server, "alice", "app/sleep", 5, wait=None)
    assert response.status_code == 202
    task_id = response.json()["id"]
    assert response.headers["location"] == f"/v1/tasks/{task_id}"
    assert httpx.get(f"{server.url}/v1/tasks/{task_id}", headers=auth("alice")).json()["state"] in ("queued", "running")
    cancelled = httpx.delete(f"{server.url}/v1/tasks/{task_id}", headers=auth("alice")).json()
    assert cancelled["state"] == "cancelled"
    assert cancelled["error"]["error"] == "TaskCancelled"


def test_a_failing_task_reports_its_error_as_a_problem(server: Server) -> None:
    task = submit(server, "alice", "app/fail", "x").json()
    assert task["state"] == "failed"
    assert task["error"]["type"] == "/problems/task-failed"
    assert "failing on purpose: x" in task["error"]["detail"]


def test_numpy_arrays_cross_as_raw_buffers_and_as_base64_json(server: Server) -> None:
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    frame = wire.encode_frame({"algorithm": "app/total", "inputs": array})
    assert len(frame) < array.nbytes + 200  # raw bytes, not base64
    response = httpx.post(f"{server.url}/v1/tasks?wait=true", content=frame,
                          headers={**auth("alice"), "content-type": wire.BINARY, "accept": wire.BINARY})
    assert response.headers["content-type"] == wire.BINARY
    task = wire.decode_frame(response.content)
    assert task["outputs"]["sum"] == 66.0
    np.testing.assert_array_equal(task["outputs"]["doubled"], array * 2)
    assert task["outputs"]["doubled"].dtype == np.float32
    # the JSON fallback: the same array as tagged base64
    body = {"algorithm": "app/total", "inputs": wire.to_jsonable(array)}
    task = httpx.post(f"{server.url}/v1/tasks?wait=true", json=body, headers=auth("alice")).json()
    doubled = wire.from_jsonable(task["outputs"]["doubled"])
    np.testing.assert_array_equal(doubled, array * 2)


def test_bad_bodies_get_problem_details(server: Server) -> None:
    url = f"{server.url}/v1/tasks"
    is_problem(httpx.post(url, content=b"{not json", headers={**auth("alice"), "content-type": "application/json"}),
               400, "bad-request")
    is_problem(httpx.post(url, json={"algorithm": "app/echo", "bogus": 1}, headers=auth("alice")),
               422, "invalid-request")
    is_problem(httpx.post(url, json={"algorithm": "app/echo", "priority": "high"}, headers=auth("alice")),
               422, "invalid-request")
    is_problem(httpx.post(url, content=b"ECF1\xff\xff\xff\xff", headers={**auth("alice"), "content-type": wire.BINARY}),
               422, "invalid-request")
    is_problem(httpx.post(url, content=b"x", headers={**auth("alice"), "content-type": "text/plain"}),
               415, "unsupported-media-type")
    is_problem(httpx.post(url, json={"algorithm": "app/nope"}, headers=auth("alice")), 404, "unknown-algorithm")
    is_problem(httpx.get(f"{server.url}/v1/nothing-here"), 404, "not-found")
    is_problem(httpx.put(url, headers=auth("alice")), 405, "method-not-allowed")


def test_bodies_over_the_limit_get_413_declared_or_streamed(server: Server) -> None:
    big = b"x" * 1_100_000
    is_problem(httpx.post(f"{server.url}/v1/tasks", content=big,
                          headers={**auth("alice"), "content-type": "application/json"}), 413, "payload-too-large")

    def chunks() -> Any:  # no Content-Length: the server must count as it reads
        for _ in range(12):
            yield b"y" * 100_000

    is_problem(httpx.post(f"{server.url}/v1/tasks", content=chunks(),
                          headers={**auth("alice"), "content-type": "application/json"}), 413, "payload-too-large")


# -- auth bypass attempts ----------------------------------------------------------------------------


def test_no_key_a_wrong_key_or_a_malformed_header_get_401(server: Server) -> None:
    url = f"{server.url}/v1/tasks?wait=true"
    body = {"algorithm": "app/echo", "inputs": 1}
    for headers in ({}, {"Authorization": "Bearer ec_wrong"}, {"Authorization": f"Basic {KEYS['alice']}"},
                    {"Authorization": "Bearer"}, {"X-API-Key": KEYS["alice"] + "x"},
                    {"Authorization": f"Bearer {KEYS['alice'].upper()}"}):
        response = httpx.post(url, json=body, headers=headers)
        is_problem(response, 401, "unauthorized")
        assert response.headers["www-authenticate"].startswith("Bearer")
    for path in ("/v1/algorithms", "/v1/executors", "/v1/tasks/abc", "/v1/tasks/abc/events"):
        is_problem(httpx.get(server.url + path), 401, "unauthorized")
    # the X-API-Key header works as well as Bearer
    assert httpx.post(url, json=body, headers={"X-API-Key": KEYS["alice"]}).json()["outputs"] == 1


def test_another_keys_task_is_invisible(server: Server) -> None:
    task_id = submit(server, "alice", "app/sleep", 2, wait=None).json()["id"]
    url = f"{server.url}/v1/tasks/{task_id}"
    is_problem(httpx.get(url, headers=auth("bob")), 404, "not-found")
    is_problem(httpx.delete(url, headers=auth("bob")), 404, "not-found")
    is_problem(httpx.get(url + "/events", headers=auth("bob")), 404, "not-found")
    with pytest.raises(InvalidStatus) as refused, ws_connect(f"ws{server.url[4:]}/v1/tasks/{task_id}/ws",
                                                               additional_headers=auth("bob")):
        pass
    assert refused.value.response.status_code == 404
    with pytest.raises(InvalidStatus) as refused, ws_connect(f"ws{server.url[4:]}/v1/tasks/{task_id}/ws"):
        pass
    assert refused.value.response.status_code == 401
    # bob's cancel did nothing: the task is still alive for alice
    assert httpx.get(url, headers=auth("alice")).json()["state"] in ("queued", "running")
    httpx.delete(url, headers=auth("alice"))


def test_scopes_hold_for_qualified_and_bare_names_and_listings(server: Server) -> None:
    # out of scope answers exactly as unknown does: a key cannot probe what exists
    is_problem(submit(server, "alice", "secret/echo2", 1), 404, "unknown-algorithm")
    is_problem(submit(server, "alice", "echo2", 1), 404, "unknown-algorithm")  # a bare name resolves, is checked
    is_problem(submit(server, "narrow", "app/total", [1]), 404, "unknown-algorithm")
    assert submit(server, "narrow", "app/echo", 1).json()["outputs"] == 1
    assert submit(server, "bob", "secret/echo2", 1).json()["outputs"] == 1
    # an unknown name leaks no list of the other keys' algorithms
    problem = is_problem(submit(server, "narrow", "nothing/here", 1), 404, "unknown-algorithm")
    assert "secret" not in problem["detail"] and "app/total" not in problem["detail"]
    names = [a["name"] for a in httpx.get(f"{server.url}/v1/algorithms", headers=auth("narrow")).json()["algorithms"]]
    assert names == ["app/echo"]
    executors = httpx.get(f"{server.url}/v1/executors", headers=auth("alice")).json()["executors"]
    assert [e["name"] for e in executors] == ["app"]


# -- limits ----------------------------------------------------------------------------------------


def test_the_rate_limit_admits_the_burst_then_refuses(server: Server) -> None:
    # counts, not timing: the key's burst (5) goes through, and a client that keeps asking is
    # refused with 429 and Retry-After. The rate itself is the bucket's, checked on a clock the
    # test sets (test_parts.py::test_token_bucket_admits_burst_then_rate)
    statuses = []
    with httpx.Client(base_url=server.url, headers=auth("rated")) as client:
        for _ in range(200):
            response = client.get("/v1/tasks/none")
            statuses.append(response.status_code)
            if response.status_code == 429:
                assert response.json()["type"] == "/problems/rate-limited"
                assert response.headers["retry-after"] == "1"
    assert statuses[:5] == [404] * 5  # the burst: a full bucket at the start
    assert set(statuses) == {404, 429} and statuses.count(429) > 0


def test_the_in_flight_cap_answers_429_then_frees_up(server: Server) -> None:
    ids = [submit(server, "limited", "app/sleep", 0.5, wait=None).json()["id"] for _ in range(3)]
    response = submit(server, "limited", "app/echo", 1)
    problem = is_problem(response, 429, "too-many-in-flight")
    assert response.headers["retry-after"] == "1" and problem["retry_after"] == 1
    for task_id in ids:
        httpx.get(f"{server.url}/v1/tasks/{task_id}?wait=5", headers=auth("limited"))
    assert submit(server, "limited", "app/echo", 1).json()["outputs"] == 1


# -- streaming -------------------------------------------------------------------------------------


def gated_generate(server: Server, gate: str) -> str:
    """Start app/generate that holds back its second token until the test has read the first."""
    GATES[gate] = threading.Event()
    response = httpx.post(f"{server.url}/v1/tasks", headers=auth("alice"),
                          json={"algorithm": "app/generate", "inputs": None, "params": {"gate": gate}})
    return str(response.json()["id"])


def test_sse_streams_token_by_token(server: Server) -> None:
    # order, not timing: the task cannot end before this reader has the first token, so a stream
    # that held chunks back until the end would fail the task ("nobody read the first token")
    task_id = gated_generate(server, "sse")
    tokens: list[Any] = []
    end = None
    with httpx.stream("GET", f"{server.url}/v1/tasks/{task_id}/events", headers=auth("alice")) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        event = ""
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                if event == "chunk":
                    tokens.append(json.loads(line[6:]))
                    GATES["sse"].set()
                else:
                    end = json.loads(line[6:])
    assert tokens == TOKENS
    assert end is not None and end["state"] == "succeeded" and end["outputs"] == "".join(TOKENS)


def test_websocket_streams_token_by_token(server: Server) -> None:
    task_id = gated_generate(server, "ws")  # as above: the second token waits for our read of the first
    tokens = []
    with ws_connect(f"ws{server.url[4:]}/v1/tasks/{task_id}/ws", additional_headers=auth("alice")) as ws:
        for message in ws:
            document = json.loads(message)
            if document["type"] == "chunk":
                tokens.append(document["data"])
                GATES["ws"].set()
            else:
                assert document["type"] == "end" and document["task"]["state"] == "succeeded"
    assert tokens == TOKENS


def test_a_second_reader_of_one_stream_gets_409(server: Server) -> None:
    task_id = submit(server, "alice", "app/generate", None, wait=None).json()["id"]
    with httpx.stream("GET", f"{server.url}/v1/tasks/{task_id}/events", headers=auth("alice")) as first:
        lines = first.iter_lines()  # kept: a collected iterator would close the first stream
        assert next(lines) == "event: chunk"
        is_problem(httpx.get(f"{server.url}/v1/tasks/{task_id}/events", headers=auth("alice")), 409, "conflict")


# -- the Python client -----------------------------------------------------------------------------


def test_the_client_has_the_runtime_shape(server: Server) -> None:
    with Client(server.url, KEYS["alice"], timeout=10) as rt:
        assert rt.run("app/echo", {"a": b"\x00\x01"}).outputs == {"a": b"\x00\x01"}
        array = np.linspace(0, 1, 1000)
        assert rt.run("app/total", array).outputs["sum"] == pytest.approx(500.0)
        assert rt.map("app/echo", range(20)) == list(range(20))
        assert list(rt.stream("app/generate", params={"delay": 0.001})) == TOKENS
        assert list(rt.stream("app/generate", params={"delay": 0.001}, transport="ws")) == TOKENS
        task = rt.submit("app/sleep", 0.05)
        assert task.result(timeout=5).outputs == 0.05 and task.done()
        with pytest.raises(errors.TaskTimeout):
            rt.run("app/sleep", 2, timeout=0.1)
        with pytest.raises(errors.ExecutorError, match="failing on purpose"):
            rt.run("app/fail", 1)
        with pytest.raises(errors.ExecutorError):
            list(rt.stream("app/fail", 1))
        with pytest.raises((NotFound, errors.UnknownAlgorithm)):
            rt.run("secret/echo2", 1)  # out of scope looks like missing
        with pytest.raises((NotFound, errors.UnknownAlgorithm)):
            rt.run("app/missing", 1)
        with pytest.raises(errors.InvalidRequest, match="unknown option"):
            rt.run("app/echo", 1, resources=None)
        results = rt.map("app/fail", [1, 2], return_exceptions=True)
        assert all(isinstance(r, errors.ExecutorError) for r in results)
    with Client(server.url, "ec_wrong", timeout=5) as rt, pytest.raises(Unauthorized):
        rt.run("app/echo", 1)


def test_the_client_waits_out_429_within_its_budget(server: Server) -> None:
    with Client(server.url, KEYS["rated"], timeout=0.5) as rt, pytest.raises(RateLimited):
        for _ in range(100):
            rt.run("app/echo", 1)
    time.sleep(0.5)
    with Client(server.url, KEYS["rated"], timeout=10) as rt:
        assert [rt.run("app/echo", i).outputs for i in range(30)] == list(range(30))  # > burst: it waited


# -- operations ------------------------------------------------------------------------------------


def test_health_readiness_metrics_docs_and_request_ids(server: Server) -> None:
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{server.url}/readyz").json()
    assert ready["status"] == "ready" and ready["executors"]["app"]["status"] == "ok"
    submit(server, "alice", "app/echo", 1)
    submit(server, "alice", "app/fail", 1)
    text = httpx.get(f"{server.url}/metrics").text
    for line in ("edgecompute_queue_depth ", "edgecompute_running_tasks ",
                 'edgecompute_executor_up{executor="app"} 1.0',
                 'edgecompute_resources_in_use{resource="cpu"}',
                 'edgecompute_task_seconds_bucket{algorithm="app/echo",le="0.005",state="succeeded"}',
                 'edgecompute_task_errors_total{algorithm="app/fail",error="ExecutorError"}',
                 'edgecompute_http_requests_total{route="POST /v1/tasks",status="200"}'):
        assert line in text, line
    document = httpx.get(f"{server.url}/openapi.json").json()
    assert document["openapi"].startswith("3.1") and "/v1/tasks" in document["paths"]
    assert "/v1/tasks/{task_id}/events" in httpx.get(f"{server.url}/docs").text
    response = httpx.get(f"{server.url}/healthz", headers={"X-Request-ID": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"
    odd = httpx.get(f"{server.url}/healthz", headers={"X-Request-ID": "bad id\twith spaces"})
    assert odd.headers["x-request-id"] != "bad id\twith spaces"


def test_private_metrics_need_the_metrics_scope() -> None:
    with running(settings(public_metrics=False)) as server:
        is_problem(httpx.get(f"{server.url}/metrics"), 401, "unauthorized")
        is_problem(httpx.get(f"{server.url}/metrics", headers=auth("alice")), 403, "forbidden")
