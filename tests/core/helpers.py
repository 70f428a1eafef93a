"""A controllable executor for scheduler tests: tasks that wait for the test to release them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from edgecompute import Algorithm, Health, Request, Resources, Response, TaskContext
from edgecompute.errors import ExecutorError


class Controlled:
    """Algorithms: ``gate`` waits until ``release(key)``; ``echo`` returns its inputs; ``fail``
    raises; ``sleep`` sleeps on the loop; ``block`` sleeps on a worker thread; ``stream`` emits."""

    name = "ctl"
    version = "1"

    def __init__(self) -> None:
        self.started: list[Any] = []
        self.finished: list[Any] = []
        self.running = 0
        self.max_running = 0
        self.gates: dict[Any, asyncio.Event] = {}
        self.calls = 0
        self.closed = False
        self.contexts: dict[Any, TaskContext] = {}  # the last context each (plain) input ran with

    def algorithms(self) -> Sequence[Algorithm]:
        return [
            Algorithm("gate", "wait for release", Resources(cpu=1)),
            Algorithm("echo", "return inputs", Resources(cpu=1)),
            Algorithm("fail", "raise", Resources(cpu=1)),
            Algorithm("sleep", "sleep on the loop", Resources(cpu=1)),
            Algorithm("block", "sleep on a thread", Resources(cpu=1)),
            Algorithm("stream", "emit chunks", Resources(cpu=1)),
            Algorithm("single", "not thread-safe", Resources(cpu=0.1), thread_safe=False),
        ]

    def requirements(self, request: Request) -> Resources:
        if request.resources is not None:
            return Resources()  # the test states this task's needs in the request: they are all it needs
        for algorithm in self.algorithms():
            if request.algorithm.endswith(algorithm.name):
                return algorithm.resources
        return Resources(cpu=1)

    def gate(self, key: Any) -> asyncio.Event:
        return self.gates.setdefault(key, asyncio.Event())

    def release(self, key: Any) -> None:
        self.gate(key).set()

    async def execute(self, request: Request, ctx: TaskContext) -> Response:
        self.calls += 1
        self.started.append(request.inputs)
        if isinstance(request.inputs, (str, int, float)):
            self.contexts[request.inputs] = ctx
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            name = ctx.algorithm.name
            if name in ("gate", "single"):
                await self.gate(request.inputs).wait()
            elif name == "fail":
                retryable = bool(request.params.get("retryable", False))
                succeed_after = request.params.get("succeed_after")
                if succeed_after is not None and self.calls > succeed_after:
                    return Response("recovered")
                raise ExecutorError(f"failure {self.calls}", retryable=retryable)
            elif name == "sleep":
                await asyncio.sleep(float(request.inputs))
            elif name == "block":
                await ctx.run_sync(time.sleep, float(request.inputs))
            elif name == "stream":
                for index in range(int(request.inputs)):
                    await ctx.emit(index)
                    ctx.progress(index + 1, int(request.inputs))
                    await asyncio.sleep(float(request.params.get("delay", 0)))
            self.finished.append(request.inputs)
            return Response(request.inputs)
        finally:
            self.running -= 1

    async def health(self) -> Health:
        return Health(details={"calls": self.calls})

    async def aclose(self) -> None:
        self.closed = True


async def settle(rounds: int = 5) -> None:
    """Let the loop run queued callbacks a few times."""
    for _ in range(rounds):
        await asyncio.sleep(0)
