"""The gateway's parts on their own: wire format, token bucket, keys, settings, metrics, JSON logs
(docs/server.md: "Binary inputs and outputs", "Limits", "Authentication", "Metrics", "Logs")."""

from __future__ import annotations

import io
import json
import logging
import time
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgecompute import Config, FunctionExecutor, Registry, Resources, Scheduler, wire
from edgecompute.cli import main
from edgecompute.errors import ConfigError, InvalidRequest
from edgecompute.logs import JsonFormatter, request_id
from edgecompute.metrics import SchedulerMetrics
from edgecompute.server import ServerSettings, hash_key, new_key
from edgecompute.server._auth import ApiKey, KeyRing
from edgecompute.server._ratelimit import TokenBucket

plain = st.recursive(
    st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20) | st.binary(max_size=64),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
arrays = hnp.arrays(st.sampled_from([np.float32, np.float64, np.int8, np.int64, np.uint16, np.bool_]),
                    hnp.array_shapes(min_dims=0, max_dims=3, max_side=5))


def same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, list) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


@settings(max_examples=150, deadline=None)
@given(value=st.one_of(plain, arrays, st.lists(arrays, max_size=3)))
def test_values_survive_both_encodings(value: Any) -> None:
    frame = wire.decode_frame(wire.encode_frame({"inputs": value}))
    assert same(value, frame["inputs"])
    text = json.dumps(wire.to_jsonable({"inputs": value}))
    assert same(value, wire.from_jsonable(json.loads(text))["inputs"])


@settings(max_examples=150, deadline=None)
@given(garbage=st.binary(max_size=64))
def test_garbage_frames_raise_invalid_request_only(garbage: bytes) -> None:
    for body in (garbage, b"ECF1" + garbage):
        try:
            wire.decode_frame(body)
        except InvalidRequest:
            pass


def test_dicts_with_dollar_keys_and_bad_tags() -> None:
    value = {"$buffer": 3, "$bytes": "not a tag"}
    assert wire.from_jsonable(json.loads(json.dumps(wire.to_jsonable(value)))) == value
    with pytest.raises(InvalidRequest, match="reserved"):
        wire.from_jsonable({"$nope": 1})
    with pytest.raises(InvalidRequest, match="needs 24 bytes"):
        wire.from_jsonable({"$array": "AAAA", "dtype": "<f8", "shape": [3]})
    with pytest.raises(InvalidRequest, match="cannot cross"):
        wire.to_jsonable(object())
    with pytest.raises(InvalidRequest, match="Python objects"):
        wire.to_jsonable(np.array([object()]))


def test_token_bucket_admits_burst_then_rate() -> None:
    bucket = TokenBucket(10.0, 5)
    t0 = time.monotonic() + 1  # a full bucket holds 5, however long it has waited
    assert [bucket.take(now=t0) for _ in range(5)] == [0.0] * 5
    assert bucket.take(now=t0) == pytest.approx(0.1)
    admitted = sum(bucket.take(now=t0 + i / 1000) == 0.0 for i in range(1, 2001))  # 2 s, 1000 tries/s
    assert admitted == pytest.approx(20, abs=1)


def test_keys_are_stored_hashed_and_looked_up_by_hash() -> None:
    key = new_key()
    assert key.startswith("ec_") and len(key) > 40 and new_key() != key
    stored = ApiKey("a", hash_key(key), ("cpp/*", "text/upper"))
    ring = KeyRing((stored,))
    assert ring.lookup(key) is stored and ring.lookup(key) is stored  # the second from the verified cache
    assert ring.lookup(key + "x") is None and ring.lookup("") is None
    assert stored.allows("cpp/blur") and stored.allows("text/upper")
    assert not stored.allows("text/words") and not stored.allows("cppx/blur")
    with pytest.raises(ConfigError, match="sha256"):
        ApiKey("b", "plaintext-key")


def test_server_settings_are_validated() -> None:
    config = Config.from_mapping({"server": {"port": 9000, "keys": [{"name": "a", "hash": hash_key("k"),
                                                                       "scopes": ["*"], "rate": 5}]}})
    parsed = ServerSettings.from_config(config)
    assert parsed.port == 9000 and parsed.keys[0].rate == 5.0
    for bad, message in (({"prot": 1}, "unknown server key"), ({"port": -1}, "port"),
                         ({"keys": [{"name": "a"}]}, "hash"), ({"keys": [{"name": "a", "hash": "x"}]}, "sha256"),
                         ({"keys": [{"name": "a", "hash": hash_key("k"), "scopes": "*"}]}, "scopes"),
                         ({"access_log": "yes"}, "true or false")):
        with pytest.raises(ConfigError, match=message):
            ServerSettings.from_mapping(bad)
    with pytest.raises(ConfigError, match="server must be a table"):
        Config.from_mapping({"server": 3})


def test_keys_commands_print_a_key_and_its_config_entry() -> None:
    result = CliRunner().invoke(main, ["keys", "new", "--name", "web", "--scope", "cpp/*"])
    assert result.exit_code == 0
    key = next(line[5:] for line in result.output.splitlines() if line.startswith("key: "))
    assert f'hash = "{hash_key(key)}"' in result.output and 'scopes = ["cpp/*"]' in result.output
    assert CliRunner().invoke(main, ["keys", "hash", key]).output.strip() == hash_key(key)


@pytest.mark.anyio
async def test_embedded_scheduler_exports_metrics_without_a_server() -> None:
    app = FunctionExecutor("m")

    @app.algorithm(resources=Resources(cpu=1))
    async def ok(inputs: Any) -> Any:
        return inputs

    @app.algorithm(resources=Resources(cpu=1))
    async def bad(inputs: Any) -> Any:
        raise ValueError("no")

    async with Scheduler(Registry([app]), config=Config(), capacity=Resources(cpu=2)) as scheduler:
        metrics = SchedulerMetrics(scheduler)
        for i in range(3):
            await scheduler.run("m/ok", i)
        with pytest.raises(Exception, match="no"):
            await scheduler.run("m/bad", 0)
        await metrics.check_health()
        text = metrics.exposition().decode()
    assert 'edgecompute_tasks_finished_total{algorithm="m/ok",state="succeeded"} 3.0' in text
    assert 'edgecompute_task_errors_total{algorithm="m/bad",error="ExecutorError"} 1.0' in text
    assert 'edgecompute_task_seconds_count{algorithm="m/ok",state="succeeded"} 3.0' in text
    assert 'edgecompute_resources_capacity{resource="cpu"} 2.0' in text
    assert 'edgecompute_executor_up{executor="m"} 1.0' in text
    assert "edgecompute_queue_depth 0.0" in text


def test_json_logs_carry_the_request_id() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("edgecompute.test-json")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    token = request_id.set("req-7")
    try:
        logger.info("hello %s", "world", extra={"task": "t1"})
    finally:
        request_id.reset(token)
        logger.removeHandler(handler)
    entry = json.loads(stream.getvalue())
    assert entry["message"] == "hello world" and entry["request_id"] == "req-7" and entry["task"] == "t1"
    assert entry["level"] == "info" and entry["logger"] == "edgecompute.test-json"
