"""A small executor for the placement tests, importable by a worker (pickled by reference)."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from typing import Any

from edgecompute import (
    Algorithm,
    BlockingExecutor,
    FunctionExecutor,
    Health,
    Request,
    Resources,
    Response,
    TaskContext,
)

apps = FunctionExecutor("apps")
_cancelled: list[str] = []  # tasks that saw their cancellation in this process


@apps.algorithm(resources=Resources(cpu=0.1))
def echo(inputs: Any) -> Any:
    return inputs


@apps.algorithm(resources=Resources(cpu=0.1))
def pid(inputs: Any) -> int:
    return os.getpid()


@apps.algorithm(resources=Resources(cpu=0.1))
def nbytes(inputs: Any) -> int:
    return int(inputs.nbytes) if hasattr(inputs, "nbytes") else len(inputs)


@apps.algorithm(resources=Resources(cpu=0.1))
def sleep(inputs: float, ctx: TaskContext) -> str:
    """Sleep ``inputs`` seconds, noticing cancellation every 10 ms."""
    end = time.monotonic() + inputs
    while time.monotonic() < end:
        if ctx.cancelled:
            _cancelled.append(ctx.task_id)
            return "cancelled"
        time.sleep(0.01)
    return "slept"


@apps.algorithm(resources=Resources(cpu=0.1))
def hang(inputs: Any) -> None:
    """Block without ever looking at cancellation, as stuck native code would."""
    time.sleep(3600)


@apps.algorithm(resources=Resources(cpu=0.1))
def crash(inputs: Any) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


@apps.algorithm(resources=Resources(cpu=0.1))
def spawn_child(inputs: Any) -> int:
    """Start a long-lived grandchild (it must not outlive the worker)."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    return child.pid


_barriers: dict[int, threading.Barrier] = {}
_barriers_lock = threading.Lock()


@apps.algorithm(resources=Resources(cpu=0.1))
def meet(inputs: int) -> int:
    """Wait until ``inputs`` calls are inside at once (fails after 20 s): proves they run together."""
    with _barriers_lock:
        barrier = _barriers.setdefault(inputs, threading.Barrier(inputs))
    return barrier.wait(timeout=20)


@apps.algorithm(resources=Resources(cpu=0.1))
def context(inputs: Any, ctx: TaskContext) -> dict[str, Any]:
    """What the task's context says, seen from where the executor runs."""
    return {"task_id": ctx.task_id, "time_left": ctx.time_left(), "algorithm": ctx.algorithm.name,
            "thread": threading.current_thread().name, "running": ctx.running}


@apps.algorithm(resources=Resources(cpu=0.1))
async def countdown(inputs: int, ctx: TaskContext) -> dict[str, Any]:
    """An ``async def`` algorithm: streams inputs..1 with progress, on the event loop."""
    for index in range(inputs, 0, -1):
        await ctx.emit(index)
        ctx.progress(inputs - index + 1, inputs)
        await asyncio.sleep(0)
    return {"pid": os.getpid(), "thread": threading.current_thread().name}


@apps.algorithm(resources=Resources(cpu=0.1))
async def wait_forever(inputs: Any, ctx: TaskContext) -> None:
    """Sleep on the event loop until cancelled, and note the cancellation."""
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        _cancelled.append(ctx.task_id)
        raise


@apps.algorithm(resources=Resources(cpu=0.1))
def cancelled_ids(inputs: Any) -> list[str]:
    """The tasks that saw their cancellation (``sleep``, ``wait_forever``) in this process."""
    return list(_cancelled)


class Doubler(BlockingExecutor):
    """A BlockingExecutor: its requests run as one blocking call."""

    name = "doubler"

    def algorithms(self) -> list[Algorithm]:
        return [Algorithm("double", resources=Resources(cpu=0.1)), Algorithm("where", resources=Resources(cpu=0.1))]

    def run(self, request: Request, ctx: TaskContext) -> Any:
        if ctx.algorithm.name == "where":
            return threading.current_thread().name
        return request.inputs * 2

    def run_checked(self, payload: Any, ctx: TaskContext) -> Any:
        """What a host-side executor's already checked payload becomes here (WorkerExecutor.run_checked)."""
        if payload == "fail":
            raise ValueError("failed as asked")
        readers = sum(thread.name.startswith("edgecompute-reader-") for thread in threading.enumerate())
        return {"payload": payload, "thread": threading.current_thread().name, "time_left": ctx.time_left(),
                "readers": readers}


@apps.algorithm(resources=Resources(cpu=0.1))
async def aecho(inputs: Any) -> Any:
    """``echo`` as an ``async def``: in process it runs on the event loop, without a thread hop."""
    return inputs


class Coroutines:
    """An executor of coroutines only (no ``blocking`` hook): a worker's event loop reads and runs it."""

    name = "coroutines"
    version = "1"

    def algorithms(self) -> list[Algorithm]:
        return [Algorithm("echo", resources=Resources(cpu=0.1)), Algorithm("where", resources=Resources(cpu=0.1))]

    def requirements(self, request: Request) -> Resources:
        return Resources(cpu=0.1)

    async def execute(self, request: Request, ctx: TaskContext) -> Response:
        if ctx.algorithm.name == "where":
            pool = await ctx.run_sync(lambda: threading.current_thread().name)
            return Response({"loop": threading.current_thread().name, "run_sync": pool})
        return Response(request.inputs)

    def run_checked(self, payload: Any, ctx: TaskContext) -> Any:
        return {"payload": payload, "thread": threading.current_thread().name}

    async def health(self) -> Health:
        return Health()

    async def aclose(self) -> None:
        return None
