"""Supervision: crashes fail in-flight tasks with ExecutorCrashed, workers restart, the circuit
opens after repeated crashes, deadlines kill stuck workers, and shutdown leaves no process behind."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

import pytest

from edgecompute import Config, HealthStatus, Placement, Registry, Request, Resources, Scheduler
from edgecompute.errors import ConfigError, ExecutorCrashed, PluginError, TaskTimeout

from .apps import apps
from .conftest import alive, descendants, our_segments, running

pytestmark = pytest.mark.anyio
CAPACITY = Resources(cpu=8, memory_mb=1 << 16)


def placed(**policy: float) -> Registry:
    registry = Registry(placement={"apps": Placement.process(**policy)})
    registry.register(apps)
    return registry


async def test_kill_9_mid_task_fails_it_then_100_tasks_succeed_and_nothing_is_left() -> None:
    before = {pid for pid, _ in descendants()}
    registry = placed()
    async with Scheduler(registry, capacity=CAPACITY, retries=0) as scheduler:
        first = (await scheduler.run("apps/pid")).outputs
        grandchild = (await scheduler.run("apps/spawn_child")).outputs
        handle = scheduler.submit(Request("apps/sleep", 30.0))
        await running(handle)
        await asyncio.sleep(0.1)
        os.kill(first, signal.SIGKILL)
        with pytest.raises(ExecutorCrashed, match=r"killed by signal 9 \(SIGKILL\)"):
            await handle.result()
        for _ in range(500):  # SIGKILL lands asynchronously
            if not alive(grandchild):
                break
            await asyncio.sleep(0.01)
        assert not alive(grandchild)  # the worker's whole process group went with it
        results = await asyncio.gather(*(scheduler.run("apps/echo", i) for i in range(100)))
        assert [r.outputs for r in results] == list(range(100))
        second = (await scheduler.run("apps/pid")).outputs
        assert second != first and alive(second)
        health = await registry.get("apps").health()
        assert health.status is HealthStatus.DEGRADED and "SIGKILL" in health.message
        assert health.details["crashes"] == 1 and health.details["restarts"] == 1
    await registry.aclose()
    left = [(pid, state) for pid, state in descendants() if pid not in before]
    assert left == []  # no orphan, no zombie
    assert not alive(second)
    assert not our_segments()


async def test_a_crashed_task_succeeds_on_retry_when_retries_are_on() -> None:
    registry = placed()
    async with Scheduler(registry, capacity=CAPACITY, retries=0) as scheduler:
        worker = (await scheduler.run("apps/pid")).outputs
        handle = scheduler.submit(Request("apps/sleep", 0.5, retries=1))
        await running(handle)
        os.kill(worker, signal.SIGKILL)
        response = await handle.result()
        assert response.outputs == "slept" and handle.attempts == 2
    await registry.aclose()


async def test_every_in_flight_task_of_a_dead_worker_fails_and_other_executors_go_on() -> None:
    registry = Registry.discover(placement={"apps": Placement.process(), "text": Placement.process()})
    registry.register(apps)
    async with Scheduler(registry, capacity=CAPACITY, retries=0) as scheduler:
        handles = [scheduler.submit(Request("apps/sleep", 30.0)) for _ in range(3)]
        for handle in handles:
            await running(handle)
        crash = scheduler.submit(Request("apps/crash"))
        for handle in [*handles, crash]:
            with pytest.raises(ExecutorCrashed):
                await handle.result()
        assert (await scheduler.run("text/upper", "still here")).outputs == "STILL HERE"
    await registry.aclose()


async def test_repeated_crashes_open_the_circuit_and_health_says_so() -> None:
    registry = placed(max_crashes=3, restart_backoff=0.01)
    async with Scheduler(registry, capacity=CAPACITY, retries=0) as scheduler:
        started = time.monotonic()
        for _ in range(3):
            with pytest.raises(ExecutorCrashed) as caught:
                await scheduler.run("apps/crash")
            assert caught.value.retryable
        with pytest.raises(ExecutorCrashed, match="circuit open: 3 crashes") as caught:
            await scheduler.run("apps/echo", 1)
        assert not caught.value.retryable
        assert time.monotonic() - started < 30
        health = await registry.get("apps").health()
        assert health.status is HealthStatus.DOWN and "circuit open" in health.message
    await registry.aclose()


async def test_a_task_past_its_deadline_has_its_stuck_worker_killed() -> None:
    registry = placed()
    async with Scheduler(registry, capacity=CAPACITY, retries=0) as scheduler:
        stuck = (await scheduler.run("apps/pid")).outputs
        with pytest.raises(TaskTimeout):
            await scheduler.run("apps/hang", timeout=0.5)
        for _ in range(200):
            if not alive(stuck):
                break
            await asyncio.sleep(0.01)
        assert not alive(stuck)
        assert (await scheduler.run("apps/pid")).outputs != stuck
        health = await registry.get("apps").health()
        assert health.ok and health.details["crashes"] == 0  # our kill is no crash
    await registry.aclose()


def test_a_worker_that_cannot_build_the_executor_says_why() -> None:
    registry = Registry(placement={"nothing": Placement.process(python=sys.executable)})
    assert registry.names() == ["nothing"]
    with pytest.raises(PluginError, match="no executor named 'nothing'"):
        registry.get("nothing")


def test_a_missing_interpreter_is_a_plugin_error() -> None:
    registry = Registry(placement={"ml": Placement.process(python="/nonexistent/bin/python")})
    with pytest.raises(PluginError, match="cannot start '/nonexistent/bin/python'"):
        registry.get("ml")


async def test_placement_comes_from_the_configuration() -> None:
    config = Config.from_mapping({"executors": {"text": {"placement": "process", "max_crashes": 2}}})
    registry = Registry.discover(settings=config.executors)
    assert registry.placement("text") == Placement.process(max_crashes=2)
    assert registry.placement("cpp") == Placement.inprocess()
    async with Scheduler(registry, config=config, capacity=CAPACITY) as scheduler:
        assert (await scheduler.run("text/upper", "a")).outputs == "A"
        assert (await registry.get("text").health()).details["pid"] != os.getpid()
    await registry.aclose()


@pytest.mark.parametrize(("table", "message"), [
    ({"placement": "elsewhere"}, "placement must be one of 'inprocess', 'process', 'sandbox', 'ray'"),
    ({"placement": "ray", "ray_actor": {"tpus": 1}}, "not tpus"),
    ({"placement": "inprocess", "python": "/x/python"}, "needs placement 'process'"),
    ({"python": 3}, "path to an interpreter"),
    ({"placement": "process", "max_crashes": 0}, "max_crashes must be a number > 0"),
])
def test_bad_placement_settings_are_config_errors(table: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config.from_mapping({"executors": {"ml": table}})
