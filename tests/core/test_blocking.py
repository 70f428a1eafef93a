"""``blocking_call``: the one blocking function an executor's ``execute`` amounts to, when it is one.
Calling it directly gives what ``execute`` gives through the scheduler."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from edgecompute import (
    Algorithm,
    BlockingExecutor,
    FunctionExecutor,
    Registry,
    Request,
    Response,
    Scheduler,
    TaskContext,
)
from edgecompute.executor import blocking_call

pytestmark = pytest.mark.anyio

app = FunctionExecutor("app")


@app.algorithm
def scale(inputs: float, *, factor: float = 2.0) -> float:
    return inputs * factor


@app.algorithm
def named(inputs: Any, ctx: TaskContext) -> str:
    return f"{ctx.algorithm.name}:{inputs}"


@app.algorithm
async def later(inputs: Any) -> Any:
    return inputs


class Squares(BlockingExecutor):
    name = "squares"

    def algorithms(self) -> Sequence[Algorithm]:
        return [Algorithm("square")]

    def run(self, request: Request, ctx: TaskContext) -> Any:
        return Response(request.inputs ** 2, timings={"mine": 1.0})


class Custom(Squares):
    name = "custom"

    async def execute(self, request: Request, ctx: TaskContext) -> Response:
        return Response("not the blocking run")


class Ctx(TaskContext):
    """A context without a scheduler, as a caller that has no loop makes one."""

    def __init__(self, name: str) -> None:
        self.algorithm = Algorithm(name)
        self.devices = ()
        self._cancelled = False


async def test_the_blocking_call_gives_what_execute_gives() -> None:
    registry = Registry([app, Squares])
    async with Scheduler(registry) as scheduler:
        for algorithm, inputs, params in [("app/scale", 3.0, {}), ("app/scale", 3.0, {"factor": 5.0}),
                                          ("app/named", "x", {}), ("squares/square", 7, {})]:
            request = Request(algorithm, inputs, params)
            call = blocking_call(registry.get(algorithm.split("/")[0]), request)
            assert call is not None
            direct = call(request, Ctx(algorithm.split("/")[1]))
            direct = direct.outputs if isinstance(direct, Response) else direct
            assert direct == (await scheduler.run(algorithm, inputs, params=params)).outputs


def test_coroutines_and_overridden_execute_have_none() -> None:
    assert blocking_call(app, Request("app/later")) is None  # async def: it needs the loop
    assert blocking_call(app, Request("app/missing")) is None  # execute reports it
    assert blocking_call(Custom(), Request("custom/square", 2)) is None  # execute is no longer run()
    assert blocking_call(object(), Request("x/y")) is None  # no hook: always through execute
