"""Rule 5 of docs/security.md for FunctionExecutor: a param the function does not take is the
request's mistake (InvalidRequest at submission), not a TypeError inside the call."""

from __future__ import annotations

from typing import Any

import pytest

from edgecompute import FunctionExecutor, Registry, Request, Resources, Scheduler, TaskContext
from edgecompute.config import Config
from edgecompute.errors import InvalidRequest

pytestmark = pytest.mark.anyio

app = FunctionExecutor("app")
calls: list[Any] = []


@app.algorithm(resources=Resources(cpu=1))
def blur(image: list[float], *, sigma: float = 1.0, mode: str = "reflect") -> list[float]:
    calls.append(sigma)
    return [v * sigma for v in image]


@app.algorithm(resources=Resources(cpu=1))
async def scale(values: list[float], factor: float, ctx: TaskContext) -> list[float]:
    return [v * factor for v in values]


@app.algorithm(resources=Resources(cpu=1))
def anything(inputs: Any, **params: Any) -> dict[str, Any]:
    return params


async def test_an_unknown_param_is_refused_at_submission_with_a_hint() -> None:
    calls.clear()
    async with Scheduler(Registry([app]), capacity=Resources(cpu=2), config=Config()) as scheduler:
        with pytest.raises(InvalidRequest, match=r"unknown param\(s\) sigam \(did you mean 'sigma'\?\); "
                                                 r"it takes: mode, sigma"):
            scheduler.submit(Request("app/blur", [1.0], params={"sigam": 5}))
        assert calls == [], "nothing ran with the default sigma"
        assert (await scheduler.run("app/blur", [1.0], params={"sigma": 5})).outputs == [5.0]


async def test_missing_required_params_and_ctx_from_a_request_are_refused() -> None:
    async with Scheduler(Registry([app]), capacity=Resources(cpu=2), config=Config()) as scheduler:
        with pytest.raises(InvalidRequest, match=r"missing required param\(s\) factor"):
            scheduler.submit(Request("app/scale", [1.0]))
        with pytest.raises(InvalidRequest, match=r"unknown param\(s\) ctx; it takes: factor"):
            scheduler.submit(Request("app/scale", [1.0], params={"factor": 2, "ctx": None}))
        assert (await scheduler.run("app/scale", [1.0], params={"factor": 2})).outputs == [2.0]
        # a function taking **params takes any name: it chose to
        assert (await scheduler.run("app/anything", None, params={"x": 1})).outputs == {"x": 1}
