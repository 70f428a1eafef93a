"""The worker's request paths: blocking calls run on the thread that read them, several at once,
with a reader always free for cancels; coroutines run on the worker's event loop; the task's
context (id, deadline) crosses; bodies too large for one packet cross through shared memory."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

from edgecompute import Algorithm, Placement, Registry, Request, Resources, Scheduler, TaskContext
from edgecompute.errors import TaskCancelled

from .apps import Coroutines, Doubler, apps
from .conftest import our_segments, running

pytestmark = pytest.mark.anyio
CAPACITY = Resources(cpu=8, memory_mb=1 << 16)


@pytest.fixture
async def scheduler() -> AsyncIterator[Scheduler]:
    registry = Registry(placement=dict.fromkeys(("apps", "doubler", "coroutines"), Placement.process()))
    registry.register(apps)
    registry.register(Doubler)
    registry.register(Coroutines)
    async with Scheduler(registry, capacity=CAPACITY, retries=0) as scheduler:
        yield scheduler
    await registry.aclose()
    assert not our_segments()


async def test_blocking_calls_run_on_the_reading_thread_several_at_once(scheduler: Scheduler) -> None:
    where = (await scheduler.run("apps/context")).outputs["thread"]
    assert where.startswith("edgecompute-reader-")  # no hop to a pool thread
    assert (await scheduler.run("doubler/where")).outputs.startswith("edgecompute-reader-")
    assert (await scheduler.run("doubler/double", 21)).outputs == 42
    # six calls that each wait until all six are inside: they only return if none waits for another
    results = await asyncio.gather(*(scheduler.run("apps/meet", 6) for _ in range(6)))
    assert sorted(r.outputs for r in results) == list(range(6))


async def test_a_cancel_reaches_a_call_while_every_reader_is_busy(scheduler: Scheduler) -> None:
    handles = [scheduler.submit(Request("apps/sleep", 30.0)) for _ in range(4)]
    for handle in handles:
        await running(handle)
    await asyncio.sleep(0.2)
    for handle in handles:
        handle.cancel()
        with pytest.raises(TaskCancelled):
            await handle.result()
    ids = {handle.id for handle in handles}
    assert await seen_cancelled(scheduler, ids) == ids  # each sleep saw its cancel in the worker


async def seen_cancelled(scheduler: Scheduler, ids: set[str]) -> set[str]:
    """Which of ``ids`` the worker's tasks saw cancelled (waiting up to 5 s for all of them)."""
    for _ in range(100):
        seen = ids & set((await scheduler.run("apps/cancelled_ids")).outputs)
        if seen == ids:
            break
        await asyncio.sleep(0.05)
    return seen


async def test_coroutines_run_on_the_worker_loop_with_chunks_and_progress(scheduler: Scheduler) -> None:
    progress: list[float] = []
    scheduler.subscribe(lambda event: progress.append(event.progress) if event.kind == "progress" else None)
    handle = scheduler.submit(Request("apps/countdown", 4))
    assert [chunk async for chunk in handle.stream()] == [4, 3, 2, 1]
    outputs = (await handle.result()).outputs
    assert outputs["pid"] != os.getpid() and outputs["thread"] == "MainThread"
    assert progress == [0.25, 0.5, 0.75, 1.0]


async def test_a_coroutine_executor_runs_on_the_loop_that_reads_and_blocks_on_its_pool(
        scheduler: Scheduler) -> None:
    where = (await scheduler.run("coroutines/where")).outputs
    assert where["loop"] == "MainThread" and where["run_sync"].startswith("edgecompute-worker")
    results = await asyncio.gather(*(scheduler.run("coroutines/echo", i) for i in range(500)))
    assert [r.outputs for r in results] == list(range(500))


async def test_cancelling_a_coroutine_cancels_it_in_the_worker(scheduler: Scheduler) -> None:
    handle = scheduler.submit(Request("apps/wait_forever"))
    await running(handle)
    await asyncio.sleep(0.2)
    handle.cancel()
    with pytest.raises(TaskCancelled):
        await handle.result()
    assert await seen_cancelled(scheduler, {handle.id}) == {handle.id}


async def test_the_task_id_and_deadline_cross_to_the_worker(scheduler: Scheduler) -> None:
    handle = scheduler.submit(Request("apps/context", timeout=30))
    seen = (await handle.result()).outputs
    assert seen["task_id"] == handle.id and seen["algorithm"] == "context"
    assert 20 < seen["time_left"] <= 30
    assert seen["running"] == 1  # the calls the worker has in hand
    assert (await scheduler.run("apps/context")).outputs["time_left"] is None


async def test_bodies_larger_than_a_packet_cross_through_shared_memory(scheduler: Scheduler) -> None:
    numbers = list(range(200_000))  # a ~1 MB pickle of small objects: no buffer to take out of band
    assert (await scheduler.run("apps/echo", numbers)).outputs == numbers
    many = {f"a{i}": np.full(20_000, i, dtype=np.float32) for i in range(300)}  # 300 buffers, 80 kB each
    echoed = (await scheduler.run("apps/echo", many)).outputs
    assert echoed.keys() == many.keys() and all((echoed[k] == v).all() for k, v in many.items())
    text = "x" * 300_000
    assert (await scheduler.run("apps/echo", {"text": text, "bytes": text.encode()})).outputs == {
        "text": text, "bytes": text.encode()}


async def test_many_small_requests_in_flight_each_get_their_answer(scheduler: Scheduler) -> None:
    results = await asyncio.gather(*(scheduler.run("apps/echo", i) for i in range(2000)))
    assert [r.outputs for r in results] == list(range(2000))


def test_a_blocking_call_crosses_without_an_event_loop_and_fails_typed() -> None:
    """execute_blocking: large buffers both ways through the segments, the task's own error, and
    a deadline that kills the worker."""
    import time

    from edgecompute.placement import WorkerExecutor

    executor = WorkerExecutor("apps", Placement.process(), factory=apps)
    try:
        pid = executor.pid
        data = np.arange(1 << 18, dtype=np.float32)  # 1 MiB each way
        for _ in range(20):
            response = executor.execute_blocking(Request("apps/echo", data))
            assert response is not None
            np.testing.assert_array_equal(response.outputs, data)
        # each answer's segment went back to the worker (with the next request): it reused one
        with open(f"/proc/{pid}/maps") as maps:
            theirs = {line.split()[-2] for line in maps if "memfd:edgecompute-" in line and " rw" in line}
        assert len(theirs) == 1, theirs
        with pytest.raises(TypeError):  # the task's error, as it was raised there
            executor.execute_blocking(Request("apps/sleep", "not a number"))
        assert executor.pid == pid
        with pytest.raises(TimeoutError):
            executor.execute_blocking(Request("apps/hang"), time.monotonic() + 0.3)
        assert executor.pid is None and executor.supervisor.total_crashes == 0  # killed on purpose
        assert executor.execute_blocking(Request("apps/echo", 1)) is None  # no worker: execute() starts one
    finally:
        asyncio.run(executor.aclose())
    assert our_segments() == []


def test_a_worker_dying_in_a_blocking_call_is_a_counted_crash() -> None:
    from edgecompute.errors import ExecutorCrashed
    from edgecompute.placement import WorkerExecutor

    executor = WorkerExecutor("apps", Placement.process(), factory=apps)
    try:
        with pytest.raises(ExecutorCrashed, match=r"killed by signal 9 \(SIGKILL\)"):
            executor.execute_blocking(Request("apps/crash"))
        assert executor.pid is None and executor.supervisor.total_crashes == 1
    finally:
        asyncio.run(executor.aclose())


class _Deadline(TaskContext):
    """A task context with a deadline alone, as a host-side executor's own call has."""

    __slots__ = ("_deadline",)

    def __init__(self, deadline: float | None) -> None:
        super().__init__(Algorithm("any"), ())
        self._deadline = deadline

    @property
    def deadline(self) -> float | None:
        return self._deadline


def test_a_checked_payload_runs_as_sent_on_the_reading_thread_and_comes_back_as_it_is() -> None:
    """run_checked: the payload reaches the worker's executor's run_checked as it was sent (a 1 MiB
    array through the segments), with the deadline; the result and the task's own error come back;
    sequential calls keep the worker at its two reader threads."""
    from edgecompute.placement import WorkerExecutor

    executor = WorkerExecutor("doubler", Placement.process(), factory=Doubler)
    try:
        data = np.arange(1 << 18, dtype=np.float32)
        for _ in range(300):
            got = executor.run_checked_blocking(("blur", [(None, data)], b"{}"))
            assert got is not executor.NOT_SENT
            name, arrays, params = got["payload"]
            assert (name, params, arrays[0][0]) == ("blur", b"{}", None)
            np.testing.assert_array_equal(arrays[0][1], data)
            assert got["thread"].startswith("edgecompute-reader-") and got["time_left"] is None
            assert executor.execute_blocking(Request("doubler/double", 2)).outputs == 4  # type: ignore[union-attr]
        assert executor.run_checked_blocking(0)["readers"] == 2  # none started for calls that came one at a time
        with pytest.raises(ValueError, match="failed as asked"):
            executor.run_checked_blocking("fail")
        later = time.monotonic() + 60
        assert 0 < executor.run_checked_blocking(1, later)["time_left"] <= 60

        async def through_the_loop() -> Any:
            return await executor.run_checked(2, _Deadline(None), "a label")

        assert asyncio.run(through_the_loop())["payload"] == 2
    finally:
        asyncio.run(executor.aclose())
    assert our_segments() == []


def test_checked_payloads_on_coroutine_executors_and_executors_without_run_checked() -> None:
    """A coroutine executor's run_checked runs on a pool thread of the worker (its loop reads);
    an executor with no run_checked fails the call, typed, and serves on."""
    from edgecompute.errors import ExecutorError
    from edgecompute.placement import WorkerExecutor

    async def call(executor: WorkerExecutor, payload: Any) -> Any:
        return await executor.run_checked(payload, _Deadline(None))

    coroutines = WorkerExecutor("coroutines", Placement.process(), factory=Coroutines)
    plain = WorkerExecutor("apps", Placement.process(), factory=apps)
    try:
        got = asyncio.run(call(coroutines, [1, 2]))
        assert got["payload"] == [1, 2] and not got["thread"].startswith("edgecompute-reader-")
        assert got["thread"] != "MainThread"
        with pytest.raises(ExecutorError, match="has no run_checked"):
            plain.run_checked_blocking(1)
        assert plain.execute_blocking(Request("apps/echo", 5)).outputs == 5  # type: ignore[union-attr]
    finally:
        asyncio.run(coroutines.aclose())
        asyncio.run(plain.aclose())
