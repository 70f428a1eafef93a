"""Rules 1 and 2 of docs/security.md at the scheduler: a request can neither reserve less than its
executor needs nor ask for a deadline past the operator's ceiling."""

from __future__ import annotations

import asyncio

import pytest

from edgecompute import Config, FunctionExecutor, Registry, Request, Resources, Scheduler
from edgecompute.errors import ConfigError, InvalidRequest

from ..core.helpers import Controlled, settle

pytestmark = pytest.mark.anyio


async def test_a_request_cannot_reserve_less_than_its_executor_needs() -> None:
    app = FunctionExecutor("app")
    gates = [asyncio.Event() for _ in range(4)]
    running = []

    @app.algorithm(resources=Resources(cpu=1))
    async def gate(key: int) -> int:
        running.append(key)
        await gates[key].wait()
        return key

    async with Scheduler(Registry([app]), capacity=Resources(cpu=2), config=Config()) as scheduler:
        handles = [scheduler.submit(Request("app/gate", key, resources=Resources(cpu=0))) for key in range(4)]
        await settle()
        # two fit on two cores whatever the request said; before, all four ran at once on nothing reserved
        assert len(running) == 2
        assert scheduler.stats().in_use == Resources(cpu=2)
        for event in gates:
            event.set()
        assert [(await h.result()).outputs for h in handles] == [0, 1, 2, 3]


async def test_a_request_may_reserve_more_than_its_executor_needs() -> None:
    ctl = Controlled()
    async with Scheduler(Registry([ctl]), capacity=Resources(cpu=4, memory_mb=100), config=Config()) as scheduler:
        handle = scheduler.submit(Request("ctl/gate", "big", resources=Resources(cpu=3, memory_mb=50)))
        await settle()
        assert scheduler.stats().in_use == Resources(cpu=3, memory_mb=50)
        ctl.release("big")
        await handle.result()


async def test_a_timeout_above_the_operator_ceiling_is_refused() -> None:
    ctl = Controlled()
    config = Config(max_timeout=5.0)
    async with Scheduler(Registry([ctl]), capacity=Resources(cpu=2), config=config) as scheduler:
        with pytest.raises(InvalidRequest, match=r"timeout 3600 s is above the ceiling max_timeout = 5 s"):
            scheduler.submit(Request("ctl/echo", 1, timeout=3600))
        assert (await scheduler.submit(Request("ctl/echo", 1, timeout=5)).result()).outputs == 1


async def test_a_request_without_timeout_gets_the_ceiling_as_its_deadline() -> None:
    ctl = Controlled()
    async with Scheduler(Registry([ctl]), capacity=Resources(cpu=2), config=Config(max_timeout=0.05)) as scheduler:
        handle = scheduler.submit(Request("ctl/gate", "never-released"))
        with pytest.raises(Exception, match="deadline|timed out|timeout") as info:
            await handle.result()
        assert type(info.value).__name__ == "TaskTimeout"


def test_a_default_timeout_above_the_ceiling_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="max_timeout"):
        Scheduler(Registry([Controlled()]), config=Config(timeout=10.0, max_timeout=5.0))
    assert Config.from_mapping({"max_timeout": 60}).max_timeout == 60.0
    with pytest.raises(ConfigError, match="max_timeout"):
        Config.from_mapping({"max_timeout": -1})
