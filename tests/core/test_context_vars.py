"""docs/scheduler.md, "Context variables": a task's code runs in a copy of the context it was
submitted from, whether it started at once or waited in the queue, on the loop or on a worker
thread; what one task's code sets is seen by no other task.

A queued task used to start in the context of whatever ended before it (the end of another task
admits it), so it saw that task's values: a request id of another client in its log lines, and
anything another tenant's code had set.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time

import pytest

from edgecompute import FunctionExecutor, Registry, Request, Resources, Scheduler, TaskHandle

pytestmark = pytest.mark.anyio

_tenant: contextvars.ContextVar[str] = contextvars.ContextVar("tenant", default="none")


def _scheduler(executor: FunctionExecutor, cpu: float = 1) -> Scheduler:
    return Scheduler(Registry([executor]), capacity=Resources(cpu=cpu, memory_mb=1024))


async def _submit_as(scheduler: Scheduler, tenant: str | None, name: str, i: int) -> TaskHandle:
    # a task of its own, so that what it sets stays in its context (as a server's request would)
    async def submit() -> TaskHandle:
        if tenant is not None:
            _tenant.set(tenant)
        return scheduler.submit(Request(name, i))

    return await asyncio.create_task(submit())


async def test_queued_tasks_see_their_submitters_values_and_nothing_another_task_set() -> None:
    executor = FunctionExecutor("ctx")
    gate = asyncio.Event()

    @executor.algorithm(resources=Resources(cpu=1))
    async def note(i: int) -> str:
        seen = _tenant.get()
        _tenant.set(f"set by task {i}")  # code that sets a variable and never resets it
        await gate.wait()
        return seen

    async with _scheduler(executor) as scheduler:
        handles = [await _submit_as(scheduler, f"tenant {i}", "ctx/note", i) for i in range(6)]
        assert [h.state.value for h in handles[1:]] == ["queued"] * 5  # one core: the rest wait
        gate.set()
        outputs = [(await h).outputs for h in handles]
    assert outputs == [f"tenant {i}" for i in range(6)]


async def test_a_burst_from_an_empty_context_shares_nothing_between_tasks() -> None:
    # the submitters set nothing: each task still starts with nothing set by another task's code
    executor = FunctionExecutor("ctx")

    @executor.algorithm(resources=Resources(cpu=0.5))
    async def note(i: int) -> str:
        seen = _tenant.get()
        _tenant.set(f"set by task {i}")
        await asyncio.sleep(0)
        return seen

    async with _scheduler(executor, cpu=2) as scheduler:
        handles = [scheduler.submit(Request("ctx/note", i)) for i in range(200)]
        outputs = [(await h).outputs for h in handles]
    assert outputs == ["none"] * 200


async def test_blocking_code_sees_its_submitters_values_on_worker_threads() -> None:
    executor = FunctionExecutor("ctx")
    threads: set[int] = set()

    @executor.algorithm(resources=Resources(cpu=1))
    def note(i: int) -> str:
        threads.add(threading.get_ident())
        seen = _tenant.get()
        _tenant.set(f"set by call {i}")  # on a pool thread that runs the next call too
        time.sleep(0.001)
        return seen

    async with _scheduler(executor) as scheduler:
        handles = [await _submit_as(scheduler, f"tenant {i}" if i % 2 else None, "ctx/note", i) for i in range(8)]
        outputs = [(await h).outputs for h in handles]
    assert outputs == [f"tenant {i}" if i % 2 else "none" for i in range(8)]
    assert threads  # the calls ran on worker threads, not on the loop
