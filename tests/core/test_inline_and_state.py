"""The public API the gateway uses: Scheduler.state, submit(inline=True) and run_inline (docs/design.md,
"Module layout": the gateway uses the scheduler through its public names only)."""

from __future__ import annotations

import asyncio

import pytest

from edgecompute import Config, FunctionExecutor, Registry, Request, Resources, Scheduler
from edgecompute.errors import InvalidRequest

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _registry() -> Registry:
    executor = FunctionExecutor("app")

    @executor.algorithm(resources=Resources(cpu=1))
    async def echo(x: int) -> int:
        await asyncio.sleep(0)
        return x

    @executor.algorithm(resources=Resources(cpu=1))
    async def hold(seconds: float) -> float:
        await asyncio.sleep(seconds)
        return seconds

    return Registry([executor])


async def test_the_state_follows_the_schedulers_life() -> None:
    scheduler = Scheduler(_registry(), config=Config(), capacity=Resources(cpu=1))
    assert scheduler.state == "new"
    async with scheduler:
        assert scheduler.state == "running"
    assert scheduler.state == "closed"


async def test_an_inline_task_runs_in_the_callers_task() -> None:
    async with Scheduler(_registry(), config=Config(), capacity=Resources(cpu=1)) as scheduler:
        handle = scheduler.submit(Request("app/echo", 7), inline=True)
        assert handle.inline and not handle.done()
        assert scheduler.stats().running == 1  # it holds its reservation until run here
        await scheduler.run_inline(handle)
        assert handle.done() and not handle.inline
        assert handle.response is not None and handle.response.outputs == 7
        await scheduler.run_inline(handle)  # nothing to do any more


async def test_an_inline_task_runs_only_in_the_task_that_submitted_it() -> None:
    async with Scheduler(_registry(), config=Config(), capacity=Resources(cpu=1)) as scheduler:
        handle = scheduler.submit(Request("app/echo", 5), inline=True)
        with pytest.raises(InvalidRequest, match="asyncio task that submitted it"):
            await asyncio.create_task(scheduler.run_inline(handle))
        assert handle.inline and not handle.done()  # still waiting for its own task
        await scheduler.run_inline(handle)
        assert handle.response is not None and handle.response.outputs == 5


async def test_an_inline_submit_that_cannot_start_queues_as_usual() -> None:
    async with Scheduler(_registry(), config=Config(), capacity=Resources(cpu=1)) as scheduler:
        busy = scheduler.submit(Request("app/hold", 0.2))
        handle = scheduler.submit(Request("app/echo", 3), inline=True)
        assert not handle.inline and handle.state.value == "queued"
        await scheduler.run_inline(handle)  # not an inline task: returns at once
        assert (await handle).outputs == 3 and (await busy).outputs == 0.2
