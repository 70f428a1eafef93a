"""An executor with several workers used from one event loop, then from another (or from
synchronous code), and closed from a third: the close waits for the starts the first loop began
and leaves no worker process behind."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from edgecompute import Request
from edgecompute.placement import Placement, WorkerExecutor

from .apps import apps
from .conftest import alive, descendants


async def _until(condition: Callable[[], bool]) -> None:
    for _ in range(3000):  # a bounded wait for what the loop does in the background
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the condition never held")


def _on_a_loop_left_open(work: Callable[[], Coroutine[Any, Any, None]]) -> asyncio.AbstractEventLoop:
    """Run ``work`` on a new event loop and leave that loop stopped, not closed, with whatever it
    began still pending (as a scheduler's loop that stopped between calls leaves it)."""
    loop = asyncio.new_event_loop()
    loop.run_until_complete(work())
    return loop


def _workers() -> set[int]:
    return {pid for pid, state in descendants() if state != "Z"}


@pytest.mark.parametrize("then", ["sync", "another loop"])
def test_starts_begun_on_one_loop_are_waited_for_by_a_close_on_another(then: str) -> None:
    before = _workers()
    executor = WorkerExecutor("apps", Placement.process(), factory=apps, workers=3)

    async def first() -> None:
        # a health check picks the first worker and starts the two others in the background;
        # the loop stops before they are up
        assert (await executor.health()).details["pid"] is not None

    loop_a = _on_a_loop_left_open(first)
    try:
        if then == "sync":
            response = executor.execute_blocking(Request("apps/echo", 5))
            assert response is not None and response.outputs == 5
        else:
            async def second() -> None:
                assert (await executor.health()).details["pid"] is not None

            asyncio.run(second())
        started = _workers() - before
        assert started  # the first worker at least
        asyncio.run(executor.aclose())  # a third loop
        # the background starts of the first loop were waited for: every worker they made is gone
        assert not [pid for pid in _workers() - before if alive(pid)]
        assert executor.pids == [None, None, None]
    finally:
        loop_a.close()


def test_a_restart_begun_on_one_loop_is_waited_for_by_a_close_on_another() -> None:
    before = _workers()
    executor = WorkerExecutor("apps", Placement.process(), factory=apps, workers=2)

    async def first() -> None:
        await executor.health()
        await _until(lambda: None not in executor.pids)
        executor.kill_worker(1)
        # counted once reaped, and the replacement begins in the same step
        await _until(lambda: executor.supervisor.total_crashes == 1)

    loop_a = _on_a_loop_left_open(first)
    try:
        asyncio.run(executor.aclose())
        assert not [pid for pid in _workers() - before if alive(pid)]
        assert executor.pids == [None, None]
    finally:
        loop_a.close()


def test_a_closed_executor_starts_nothing_more() -> None:
    before = _workers()
    executor = WorkerExecutor("apps", Placement.process(), factory=apps, workers=2)
    asyncio.run(executor.aclose())

    async def after() -> None:
        health = await executor.health()
        assert health.status.name == "DOWN"

    asyncio.run(after())
    assert not [pid for pid in _workers() - before if alive(pid)]
