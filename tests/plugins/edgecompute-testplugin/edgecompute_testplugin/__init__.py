"""A small third-party executor: text statistics, with streaming and a failure mode."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import edgecompute
from edgecompute import Algorithm, Health, Request, Resources, Response, TaskContext
from edgecompute.errors import ExecutorError, InvalidRequest

built = 0  # how many executors were built: discovery must not build any


class TextExecutor:
    name = "text"
    version = "1.2.3"

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        global built
        built += 1
        self.config = dict(config or {})
        self.calls = 0

    def algorithms(self) -> Sequence[Algorithm]:
        return [
            Algorithm("upper", "Upper-case a string", Resources(cpu=0.5)),
            Algorithm("words", "Stream the words of a string", Resources(cpu=0.5)),
            Algorithm("flaky", "Fail with a retryable error the first N calls", Resources(cpu=0.5)),
        ]

    def requirements(self, request: Request) -> Resources:
        return Resources(cpu=0.5)

    async def execute(self, request: Request, ctx: TaskContext) -> Response:
        self.calls += 1
        name = ctx.algorithm.name
        if not isinstance(request.inputs, str):
            raise InvalidRequest(f"text/{name} takes a string, not {type(request.inputs).__name__}")
        if name == "upper":
            return Response(request.inputs.upper())
        if name == "words":
            words = request.inputs.split()
            for index, word in enumerate(words, 1):
                await ctx.emit(word)
                ctx.progress(index, len(words))
            return Response(len(words))
        failures = int(request.params.get("failures", 1))
        if self.calls <= failures:
            raise ExecutorError(f"transient failure {self.calls}", retryable=True)
        return Response(f"ok after {self.calls} calls")

    async def health(self) -> Health:
        return Health(details={"calls": self.calls, "config": self.config})

    async def aclose(self) -> None:
        return None


@edgecompute.hookimpl
def register_executors(register: Any) -> None:
    register(TextExecutor)


events: list[tuple[str, str]] = []  # what the task_event hook saw, for the tests


@edgecompute.hookimpl
def task_event(event: edgecompute.TaskEvent) -> None:
    events.append((event.kind, event.algorithm))
