"""``process`` isolation: plugins in worker processes, arrays through shared memory, crashes and
deadlines that fail only their own task."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from edgecompute import Config, HealthStatus, Registry, Request, Resources, Scheduler
from edgecompute.errors import ExecutorCrashed, ExecutorError, InvalidRequest, TaskCancelled, TaskTimeout
from edgecompute_cpp import CppExecutor, PluginABIError

from .conftest import PLUGINS

pytestmark = pytest.mark.anyio


async def test_results_match_inprocess_for_large_arrays(isolated: tuple[Scheduler, CppExecutor],
                                                       cpp: CppExecutor) -> None:
    s, executor = isolated
    image = np.random.default_rng(5).random((1080, 1920), dtype=np.float32)  # 8 MB: the arena grows
    blurred = (await s.run("cpp/gaussian_blur", image, params={"sigma": 2})).outputs
    np.testing.assert_array_equal(blurred, cpp.call("gaussian_blur", image, {"sigma": 2}))
    # an output far larger than the input: the worker writes it to a larger arena of its own, which
    # the host adopts
    small = image[:100, :100].copy()
    for _ in range(2):
        big = (await s.run("cpp/resize", small, params={"width": 1500, "height": 1500})).outputs
        np.testing.assert_array_equal(big, cpp.call("resize", small, {"width": 1500, "height": 1500}))
    parts = (await s.run("cpp/sobel", small, params={"output": "all"})).outputs
    assert set(parts) == {"magnitude", "gx", "gy"}
    product = (await s.run("cpp/matmul", {"a": np.eye(3), "b": np.arange(9.0).reshape(3, 3)})).outputs
    np.testing.assert_array_equal(product, np.arange(9.0).reshape(3, 3))
    assert (await s.run("cpp/sum", np.float64(2.5))).outputs == 2.5  # 0-d input
    workers = (await executor.health()).details["workers"]
    assert workers[0]["arena_mb"] >= 16 and workers[0]["starts"] == 1


async def test_large_params_travel_through_the_arena(isolated: tuple[Scheduler, CppExecutor]) -> None:
    # a message must fit one socket packet; 200 KB of JSON params does not
    s, executor = isolated
    params = {"ms": 0, "padding": "x" * 200_000}
    for _ in range(2):
        await s.run("testplug.spin", None, params=params)
    assert (await executor.health()).details["workers"][0]["starts"] == 1


async def test_a_segfault_fails_only_its_task_and_the_worker_restarts(isolated: tuple[Scheduler, CppExecutor]) -> None:
    s, executor = isolated
    x = np.arange(100.0)
    np.testing.assert_array_equal((await s.run("cpp/testplug.echo", x)).outputs, x)
    with pytest.raises(ExecutorCrashed, match="died with signal SIGSEGV while running cpp/testplug.segfault"):
        await s.run("cpp/testplug.segfault", x)
    for i in range(100):  # the host survived; every following task succeeds
        np.testing.assert_array_equal((await s.run("cpp/testplug.echo", x + i)).outputs, x + i)
    health = await executor.health()
    worker = health.details["workers"][0]
    assert worker["crashes"] == 1 and worker["starts"] == 2 and worker["state"] == "running"
    assert worker["last_exit"] == "signal SIGSEGV"
    assert health.details["metrics"]["testplug.segfault"]["crashes"] == 1
    assert health.details["metrics"]["testplug.echo"]["calls"] == 101


async def test_an_abort_is_a_crash_too_and_carries_the_worker_output(isolated: tuple[Scheduler, CppExecutor]) -> None:
    s, _ = isolated
    with pytest.raises(ExecutorCrashed, match="SIGABRT") as info:
        await s.run("cpp/testplug.abort")
    assert info.value.retryable
    assert (await s.run("cpp/sum", np.ones(4))).outputs == 4.0


async def test_a_task_past_its_deadline_kills_its_worker(isolated: tuple[Scheduler, CppExecutor]) -> None:
    s, executor = isolated
    await s.run("cpp/sum", np.ones(4))
    pid = (await executor.health()).details["workers"][0]["pid"]
    start = time.monotonic()
    with pytest.raises(TaskTimeout):
        await s.run("cpp/testplug.spin", params={"ms": 60_000}, timeout=0.5)
    assert time.monotonic() - start < 5
    for _ in range(100):  # the kill happens as the task is cancelled; the thread notices at once
        if (await executor.health()).details["workers"][0]["pid"] != pid:
            break
        await asyncio.sleep(0.02)
    assert (await s.run("cpp/sum", np.ones(4))).outputs == 4.0
    worker = (await executor.health()).details["workers"][0]
    assert worker["pid"] != pid and worker["starts"] == 2


async def test_a_quick_call_waits_on_the_loop_and_still_keeps_its_deadline(
        isolated: tuple[Scheduler, CppExecutor]) -> None:
    # spin with ms=0 comes back quickly, so the next calls of it wait for their reply in recv on
    # the event loop; a long one then must still end at its deadline, and a crash still be a crash
    s, executor = isolated
    for _ in range(3):
        await s.run("cpp/testplug.spin", params={"ms": 0})
    pool = executor._pool
    assert pool is not None and pool._round_trip["cpp/testplug.spin"] < pool.wait_below_s
    start = time.monotonic()
    with pytest.raises(TaskTimeout, match="passed its deadline"):
        await s.run("cpp/testplug.spin", params={"ms": 60_000}, timeout=0.3)
    assert time.monotonic() - start < 5
    assert (await s.run("cpp/testplug.spin", params={"ms": 0})).outputs is None
    assert pool._round_trip["cpp/testplug.spin"] < pool.wait_below_s
    with pytest.raises(ExecutorCrashed, match="SIGSEGV"):
        await s.run("cpp/testplug.spin", params={"ms": 0, "crash": 1})
    x = np.arange(10.0)
    np.testing.assert_array_equal((await s.run("cpp/testplug.echo", x)).outputs, x)
    worker = (await executor.health()).details["workers"][0]
    assert worker["starts"] == 3 and worker["crashes"] == 1


def test_the_synchronous_call_honours_its_timeout(testplug: Path) -> None:
    executor = CppExecutor({"isolation": "process", "workers": 1, "plugins": [str(testplug)], "builtin": False})
    try:
        with pytest.raises(TaskTimeout, match="killed"):
            executor.call("testplug.spin", None, {"ms": 60_000}, timeout=0.3)
        assert executor._pool is not None and executor._pool.states()[0]["last_exit"] == "killed: deadline passed"
        np.testing.assert_array_equal(executor.call("testplug.echo", np.ones(3)), np.ones(3))
    finally:
        asyncio.run(executor.aclose())


async def test_errors_cross_the_process_boundary_typed(isolated: tuple[Scheduler, CppExecutor]) -> None:
    s, _ = isolated
    with pytest.raises(InvalidRequest, match="must have dtype float32, float64, not uint8"):
        await s.run("cpp/gaussian_blur", np.zeros((4, 4), np.uint8))
    with pytest.raises(ExecutorError, match="the test plugin failed on purpose") as info:
        await s.run("cpp/testplug.fail")
    assert not isinstance(info.value, ExecutorCrashed)


async def test_two_workers_run_side_by_side(testplug: Path) -> None:
    executor = CppExecutor({"isolation": "process", "workers": 2, "plugins": [str(testplug)], "builtin": False})
    async with Scheduler(Registry([executor]), capacity=Resources(cpu=4, memory_mb=4096), config=Config()) as s:
        # start both workers: the second call finds the first worker busy for 0.2 s
        await asyncio.gather(*(s.run("cpp/testplug.spin", params={"ms": 200}) for _ in range(2)))
        before = [w["calls"] for w in executor._pool.states()]  # type: ignore[union-attr]
        await asyncio.gather(*(s.run("cpp/testplug.spin", params={"ms": 400}) for _ in range(2)))
        after = [w["calls"] for w in executor._pool.states()]  # type: ignore[union-attr]
    # the two concurrent calls went one to each worker (not one after the other on the same one)
    assert [b - a for a, b in zip(before, after, strict=True)] == [1, 1], (before, after)


async def test_a_thread_waiting_for_a_worker_is_not_starved_by_calls_from_the_loop(
    isolated: tuple[Scheduler, CppExecutor],
) -> None:
    s, executor = isolated
    x = np.ones(16, np.float32)
    await s.run("cpp/sum", x)  # the worker is up, and its round trips are short
    stop = time.monotonic() + 1.5

    finished = 0

    async def stream() -> None:  # calls from the loop, one after the other, for 1.5 s
        nonlocal finished
        while time.monotonic() < stop:
            await s.run("cpp/testplug.spin", params={"ms": 2})
            finished += 1

    def from_a_thread() -> int:
        time.sleep(0.1)  # the streams hold the worker by now
        assert float(executor.call("sum", x)) == 16
        return finished  # the loop's calls that had finished when the thread's call came back

    waited, *_ = await asyncio.gather(asyncio.to_thread(from_a_thread), stream(), stream())
    # it waits behind a call or two, not until the loop's calls stop coming: most of the loop's
    # calls come after it
    assert waited < finished / 2, (waited, finished)


async def test_the_first_call_starts_the_other_workers_in_the_background(testplug: Path) -> None:
    executor = CppExecutor({"isolation": "process", "workers": 3, "plugins": [str(testplug)], "builtin": False})
    try:
        np.testing.assert_array_equal(executor.call("testplug.echo", np.ones(4)), np.ones(4))  # starts them
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            states = executor._pool.states()  # type: ignore[union-attr]
            if len(states) == 3 and all(w["state"] == "running" for w in states):
                break
            await asyncio.sleep(0.05)
        assert [w["state"] for w in states] == ["running"] * 3, states
        assert sorted(w["index"] for w in states) == [0, 1, 2]
        assert sum(w["calls"] for w in states) == 1  # nobody had to call to start them
    finally:
        await executor.aclose()
    assert all(w["pid"] is None for w in executor._pool.states())  # type: ignore[union-attr]


async def test_quick_calls_of_a_burst_spread_over_the_workers(testplug: Path) -> None:
    # calls of 2 ms count as quick here (wait_below_us), so that the workers' time dominates
    executor = CppExecutor({"isolation": "process", "workers": 2, "plugins": [str(testplug)], "builtin": False,
                            "wait_below_us": 20_000})
    async with Scheduler(Registry([executor]), capacity=Resources(cpu=4, memory_mb=4096), config=Config()) as s:
        await asyncio.gather(*(s.run("cpp/testplug.spin", params={"ms": 200}) for _ in range(2)))  # both up
        await s.run("cpp/testplug.spin", params={"ms": 2})  # alone, and quick: it waited in recv
        before = [w["calls"] for w in executor._pool.states()]  # type: ignore[union-attr]
        await asyncio.gather(*(s.run("cpp/testplug.spin", params={"ms": 2}) for _ in range(20)))
        after = [w["calls"] for w in executor._pool.states()]  # type: ignore[union-attr]
    # Had each call blocked the loop until its reply, the next one would find the same worker
    # idle again, and one worker would serve the whole burst.
    served = [b - a for a, b in zip(before, after, strict=True)]
    assert sum(served) == 20 and min(served) >= 4, served


async def test_plugins_that_fail_to_load_in_the_worker_are_reported(testplug: Path) -> None:
    executor = CppExecutor({"isolation": "process", "workers": 1,
                            "plugins": [str(testplug), str(PLUGINS / "future.cpp")]})
    try:
        assert "testplug.echo" in {a.name for a in executor.algorithms()}
        problems = executor._ensure().problems
        assert len(problems) == 1 and isinstance(problems[0], PluginABIError) and problems[0].found == 99
        health = await executor.health()
        assert health.status is HealthStatus.DEGRADED and health.details["isolation"] == "process"
    finally:
        await executor.aclose()


async def test_cancelling_a_running_task_kills_its_worker(isolated: tuple[Scheduler, CppExecutor]) -> None:
    s, executor = isolated
    await s.run("cpp/sum", np.ones(4))
    pid = (await executor.health()).details["workers"][0]["pid"]
    handle = s.submit(Request("cpp/testplug.spin", params={"ms": 60_000}))
    await asyncio.sleep(0.3)
    assert handle.cancel()
    with pytest.raises(TaskCancelled):
        await handle.result()
    for _ in range(100):
        if not s._tasks and executor._pool is not None and executor._pool.states()[0]["pid"] != pid:
            break
        await asyncio.sleep(0.02)
    assert (await s.run("cpp/testplug.echo", np.arange(3.0))).outputs.tolist() == [0.0, 1.0, 2.0]
    assert (await executor.health()).details["workers"][0]["starts"] == 2


async def test_a_worker_killed_while_idle_is_replaced_without_failing_a_call(
        isolated: tuple[Scheduler, CppExecutor]) -> None:
    s, executor = isolated
    x = np.arange(50.0)
    for kill_before in ("scheduler", "sync call"):
        for _ in range(3):  # quick calls: the next one waits for its reply on the loop
            np.testing.assert_array_equal((await s.run("cpp/testplug.echo", x)).outputs, x)
        pid = (await executor.health()).details["workers"][0]["pid"]
        os.kill(pid, signal.SIGKILL)
        for _ in range(100):
            if (await executor.health()).details["workers"][0]["state"] != "running":
                break
            await asyncio.sleep(0.01)
        if kill_before == "scheduler":
            np.testing.assert_array_equal((await s.run("cpp/testplug.echo", x)).outputs, x)
        else:
            np.testing.assert_array_equal(executor.call("testplug.echo", x), x)
        worker = (await executor.health()).details["workers"][0]
        assert worker["pid"] != pid and worker["state"] == "running"
    worker = (await executor.health()).details["workers"][0]
    assert worker["starts"] == 3 and worker["crashes"] == 2 and worker["last_exit"] == "signal SIGKILL"
