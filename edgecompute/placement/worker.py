"""The worker process: ``python -m edgecompute.placement.worker --fd N --prefix P``.

It builds the executor it is asked for from the entry points of ITS environment (or from a
factory the host sent), says hello with the executors, algorithms and versions it has, then runs
requests through a scheduler of its own, so ``ctx.run_sync``, streaming, progress and cancellation
behave as in process. Resources, priorities, deadlines and retries stay the host's business: the
worker admits everything it is sent at once and never retries.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pickle
import socket
import sys
import threading
from typing import Any

from ..config import Config
from ..context import TaskContext
from ..errors import EdgeComputeError, ExecutorError
from ..executor import Executor
from ..models import NO_RESOURCES, Health, HealthStatus, Request, Resources, Response
from ..registry import Registry
from ..scheduler import Scheduler, TaskHandle
from .protocol import VERSION, Arena, Attachments, ProtocolError, Unreadable, decode, encode, frame_length

__all__ = ["main"]

# the worker admits what the host already admitted; these bounds are never the limiting ones
_UNBOUNDED = Resources(cpu=1e9, memory_mb=1e15)


class _Context:
    """The task's context, with chunks and progress sent to the host as they come."""

    def __init__(self, inner: TaskContext, worker: _Worker) -> None:
        self._inner = inner
        self._worker = worker
        self.algorithm = inner.algorithm
        self.devices = inner.devices

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def emit(self, chunk: Any) -> None:
        self._worker.send("chunk", self._inner.task_id, chunk)

    def emit_nowait(self, chunk: Any) -> None:
        self._worker.call_soon_threadsafe(self._worker.send, "chunk", self._inner.task_id, chunk)

    def progress(self, done: float, total: float | None = None) -> None:
        fraction = done / total if total else done
        self._worker.call_soon_threadsafe(self._worker.send, "progress", self._inner.task_id, float(fraction))


class _Forwarding:
    """The executor, handed a :class:`_Context` instead of the worker scheduler's own."""

    def __init__(self, executor: Executor, worker: _Worker) -> None:
        self._executor = executor
        self._worker = worker
        self.name = executor.name
        self.version = executor.version
        self.algorithms = executor.algorithms
        self.requirements = executor.requirements
        self.health = executor.health
        self.aclose = executor.aclose

    async def execute(self, request: Request, ctx: TaskContext) -> Response:
        return await self._executor.execute(request, _Context(ctx, self._worker))  # type: ignore[arg-type]


def portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling as itself, else an ExecutorError that tells what it was."""
    try:
        copy = pickle.loads(pickle.dumps(exc))
        if type(copy) is type(exc):
            return exc
    except Exception:  # noqa: BLE001 - any pickling failure means: send a plain error instead
        pass
    return ExecutorError(f"{type(exc).__name__}: {exc}", retryable=bool(getattr(exc, "retryable", False)))


class _Worker:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, prefix: str) -> None:
        self.reader = reader
        self.writer = writer
        self.arena = Arena(prefix)
        self.attachments = Attachments()
        self.handles: dict[str, TaskHandle] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.scheduler: Scheduler | None = None
        self.registry: Registry | None = None
        self.name = ""
        self.loop = asyncio.get_running_loop()
        self.loop_thread = threading.get_ident()

    def call_soon_threadsafe(self, fn: Any, *args: Any) -> None:
        if threading.get_ident() == self.loop_thread:
            fn(*args)
        else:
            self.loop.call_soon_threadsafe(fn, *args)

    def send(self, kind: str, task: str, body: Any) -> None:
        frame, _ = encode(kind, task, body, self.arena)
        self.writer.write(frame)

    async def receive(self) -> tuple[str, str, Any, str | None]:
        header = await self.reader.readexactly(4)
        frame = await self.reader.readexactly(frame_length(header))
        return decode(frame, self.attachments, copy=False)

    async def setup(self) -> str:
        kind, _, body, _ = await self.receive()
        if kind != "setup" or not isinstance(body, dict):
            raise ProtocolError(f"expected a setup message, got {kind!r}")
        name = self.name = str(body["executor"])
        settings = {name: body.get("settings") or {}}
        factory = body.get("factory")
        if factory is not None:
            registry = Registry(settings=settings)
            registry.register(pickle.loads(factory), name=name)
        else:
            registry = Registry.discover(settings=settings)
        self.registry = registry
        executor = registry.get(name)
        self.send("hello", "", {
            "protocol": VERSION,
            "executor": name,
            "version": executor.version,
            "algorithms": list(registry.executors()[registry.names().index(name)].algorithms.values()),
            "executors": registry.names(),
            "pid": os.getpid(),
            "python": sys.executable,
        })
        # the worker's scheduler runs the executor behind a shim whose context sends chunks and
        # progress straight to the host: no stream reader per task
        self.scheduler = Scheduler(Registry([_Forwarding(executor, self)]), capacity=_UNBOUNDED, config=Config(),
                                   retries=0, max_queue=1 << 30, threads=max(4, os.cpu_count() or 1))
        await self.scheduler.start()
        return str(name)

    async def serve(self) -> None:
        while True:
            try:
                kind, task, body, segment = await self.receive()
            except (asyncio.IncompleteReadError, ConnectionError):
                return  # the host went away or closed us: stop
            if kind == "run":
                self.run(task, body, segment)
            elif kind == "cancel":
                handle = self.handles.get(task)
                if handle is not None:
                    handle.cancel()
            elif kind == "release":
                self.arena.give_back(body)
            elif kind == "health":
                self.spawn(self.health(task))
            elif kind == "close":
                return
            else:
                raise ProtocolError(f"unknown message kind {kind!r}")

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def run(self, task: str, request: Any, segment: str | None) -> None:
        assert self.scheduler is not None
        try:
            if isinstance(request, Unreadable):
                raise ExecutorError(f"the worker cannot read this request: {request.error}")
            algorithm, inputs, params, priority, metadata = request
            handle = self.scheduler.submit(Request(algorithm, inputs, params, priority, None, NO_RESOURCES,
                                                   metadata, retries=0, id=task))
        except EdgeComputeError as exc:
            self.send("error", task, portable(exc))
            self.release(segment)
            return
        self.handles[task] = handle
        handle.add_done_callback(lambda handle: self.finished(task, handle, segment))

    def finished(self, task: str, handle: TaskHandle, segment: str | None) -> None:
        self.handles.pop(task, None)
        error = handle.exception()
        frame = None
        try:
            if error is None:
                response = handle._response
                assert response is not None
                frame, _ = encode("done", task, (response.outputs, dict(response.timings)), self.arena)
        except Exception as exc:  # noqa: BLE001 - outputs that do not pickle fail the task, not us
            error = exc
        if error is not None:
            frame, _ = encode("error", task, portable(error), self.arena)
        # the outputs are copied into our own segment now, so the input's may go back, and before
        # the answer: the host's next request can then reuse it instead of mapping a new one
        self.release(segment)
        assert frame is not None
        self.writer.write(frame)

    def release(self, segment: str | None) -> None:
        if segment is not None:
            self.send("release", "", segment)

    async def health(self, task: str) -> None:
        assert self.registry is not None
        try:
            health = await self.registry.get(self.name).health()
        except Exception as exc:  # noqa: BLE001 - health must answer
            health = Health(HealthStatus.DOWN, f"{type(exc).__name__}: {exc}")
        self.send("health", task, health)

    async def close(self) -> None:
        if self.scheduler is not None:
            await self.scheduler.aclose(cancel=True, timeout=5)
        if self.registry is not None:
            await self.registry.aclose()
        self.attachments.close()
        self.arena.close()


async def _main(fd: int, prefix: str) -> int:
    sock = socket.socket(fileno=fd)
    reader, writer = await asyncio.open_connection(sock=sock)
    worker = _Worker(reader, writer, prefix)
    try:
        try:
            await worker.setup()
        except Exception as exc:  # noqa: BLE001 - tell the host why, then stop
            worker.send("fail", "", f"{type(exc).__name__}: {exc}")
            await writer.drain()
            return 1
        await worker.serve()
    finally:
        await worker.close()
        writer.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgecompute.placement.worker")
    parser.add_argument("--fd", type=int, required=True, help="the socket to the host, inherited")
    parser.add_argument("--prefix", required=True, help="names of this worker's shared-memory segments")
    args = parser.parse_args(argv)
    return asyncio.run(_main(args.fd, args.prefix))


if __name__ == "__main__":
    sys.exit(main())
