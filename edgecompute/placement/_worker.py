"""The worker process: ``python -m edgecompute.placement._worker --fd N --lifeline L [--parent PID]``.

It builds the executor it is asked for from the entry points of ITS environment (or from a
factory the host sent), says hello with the executors, algorithms and versions it has, then runs
requests. Resources, priorities, deadlines and retries stay the host's business: the worker runs
everything it is sent at once and never retries.

Every thread hop costs a wake-up, and on a small VM a wake-up across CPUs costs 40-70 us, so the
request path has as few as the executor allows:

- **blocking executors** (a :class:`~edgecompute.BlockingExecutor`, a
  :class:`~edgecompute.FunctionExecutor`'s plain functions; see :func:`~edgecompute.executor.blocking_call`):
  several reader threads block in ``recv`` on the socket; the kernel wakes one per message, and that
  thread runs the call and sends the answer. Host to worker and back: two wake-ups, as many as an
  in-process request's hop to a worker thread and back. One reader always stays free to take a
  ``cancel`` or another request (a new one is started when the last free one takes a call).
- **other executors** (coroutines): the event loop on the main thread reads the socket itself
  (``add_reader``) and runs ``execute`` as a task; ``ctx.run_sync`` hops to a thread pool and back,
  as in process.

A ``call`` (:meth:`WorkerExecutor.run_checked`) is a request that the host's own copy of the
executor has already checked: its payload goes to the executor's ``run_checked(payload, ctx)``
as it came, with no :class:`~edgecompute.Request` built and nothing checked again, on the same
threads as a blocking call (a pool thread for an executor of coroutines).

Chunks, progress and answers are sent straight from whichever thread has them: a packet of the
socket is never split, so concurrent sends need no lock.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import os
import pickle
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from .._registry import Registry
from .._threads import ThreadPool
from ..context import TaskContext
from ..errors import ExecutorError
from ..executor import Executor, blocking_call
from ..models import Algorithm, Health, HealthStatus, Request, Response
from ._protocol import (
    MAX_MESSAGE,
    VERSION,
    Arena,
    Attachments,
    ProtocolError,
    Unreadable,
    decode,
    encode,
    frame_length,
    pack,
    receive,
    send,
    unpack,
)

__all__ = ["main"]

#: What a Request holds when given no params or metadata: passing it spares their check.
_EMPTY = Request("_/_").params
_READERS = 2  # reader threads at the start: one may run a call while the other takes a cancel
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_ORPHANED = 70  # our exit status when the host went away first


class _Context(TaskContext):
    """What a task sees in the worker: chunks and progress go straight to the host."""

    __slots__ = ("_deadline", "_id", "_task", "_worker", "asyncio_task", "cancelled", "segment")
    cancelled: bool  # a settable slot where TaskContext has a read-only property

    def __init__(self, worker: _Worker, task: int, request_id: str, algorithm: Algorithm,
                 deadline: float | None) -> None:
        # TaskContext's two fields set here, without the call to its __init__: one a request
        self.algorithm = algorithm
        self.devices = ()
        #: what blocking code polls; set when the host cancels the call
        self.cancelled = False
        self._worker = worker
        self._task = task
        self._id = request_id
        self._deadline = deadline
        #: The asyncio task running a coroutine executor's ``execute`` (None for a blocking call).
        self.asyncio_task: asyncio.Task[None] | None = None
        #: The segment holding the request's buffers, until it is handed back.
        self.segment: int | None = None

    @property
    def task_id(self) -> str:
        return self._id

    @property
    def deadline(self) -> float | None:
        return self._deadline  # the host's deadline: time.monotonic() is one clock for the machine

    def time_left(self) -> float | None:
        deadline = self._deadline
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    @property
    def running(self) -> int:
        return len(self._worker.contexts)  # the calls this worker process has in hand

    async def emit(self, chunk: Any) -> None:
        self._worker.send("chunk", self._task, chunk)

    def emit_nowait(self, chunk: Any) -> None:
        self._worker.send("chunk", self._task, chunk)

    def progress(self, done: float, total: float | None = None) -> None:
        fraction = done / total if total else done
        self._worker.send("progress", self._task, float(fraction))

    def run_sync(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        # a thread runs to its end even when the task is cancelled meanwhile; nothing here waits
        # for it: the host's scheduler keeps the task's resources until the worker answers or dies
        return self._worker.pool.submit(fn, *args)


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
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.arena = Arena()
        self.attachments = Attachments()
        self.contexts: dict[int, _Context] = {}
        # two reader threads may take a task's run and its cancel at once: a cancel that finds
        # no context yet is kept here, and both sides look under one lock
        self.early_cancels: set[int] = set()
        self.cancel_lock = threading.Lock()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.registry: Registry | None = None
        self.executor: Executor | None = None
        self.algorithms: dict[str, Algorithm] = {}
        self.name = ""
        self.loop = asyncio.get_running_loop()
        self.loop_thread = threading.get_ident()
        self.stopped: asyncio.Future[None] = self.loop.create_future()
        self.pool = ThreadPool(max(4, os.cpu_count() or 1), name="edgecompute-worker")
        self.threaded = False
        #: the executor's run_checked (see WorkerExecutor.run_checked), or None
        self.checked: Callable[[Any, TaskContext], Any] | None = None
        #: what a ``call``'s context names as its algorithm: the payload, not the layer, says which
        self.unnamed = Algorithm("_")
        self.idle: list[None] = []  # one item per reader blocked in recv; list ops are atomic
        self.readers: list[threading.Thread] = []
        self.reading_on_loop = False
        self.buffer = bytearray(0)
        self.view = memoryview(self.buffer)

    # -- sending ----------------------------------------------------------------------------------

    def send(self, kind: str, task: int, body: Any) -> None:
        self.answer(pack(kind, task, body, self.arena))

    def release(self, segment: int | None) -> None:
        if segment is not None:
            self.send("release", 0, segment)

    # -- the handshake (protocol 1 frames, blocking) ------------------------------------------------

    def setup(self) -> None:
        data = self.sock.recv(1 << 22)
        if len(data) < 4 or frame_length(data[:4]) != len(data) - 4:
            raise ProtocolError("expected a setup message")
        kind, _, body = decode(data[4:])
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
        executor = self.executor = registry.get(name)
        algorithms = list(registry.executors()[registry.names().index(name)].algorithms.values())
        self.algorithms = {a.name: a for a in algorithms}
        self.threaded = callable(getattr(executor, "blocking", None))
        checked = getattr(executor, "run_checked", None)
        self.checked = checked if callable(checked) else None
        self.unnamed = Algorithm(name)
        self.hello({
            "protocol": VERSION,
            "executor": name,
            "version": executor.version,
            "algorithms": algorithms,
            "executors": registry.names(),
            "pid": os.getpid(),
            "python": sys.executable,
        })

    def hello(self, body: Any, kind: str = "hello") -> None:
        self.sock.sendall(encode(kind, "", body))

    # -- receiving --------------------------------------------------------------------------------

    def start(self) -> None:
        if self.threaded:
            for _ in range(_READERS):
                self.add_reader()
        else:
            # the socket stays blocking for the sends (from pool threads too); the loop's reads
            # pass MSG_DONTWAIT instead
            self.buffer = bytearray(MAX_MESSAGE)
            self.view = memoryview(self.buffer)
            self.loop.add_reader(self.sock.fileno(), self.readable)
            self.reading_on_loop = True

    def add_reader(self) -> None:
        thread = threading.Thread(target=self.read, name=f"edgecompute-reader-{len(self.readers)}", daemon=True)
        self.readers.append(thread)
        thread.start()

    def read(self) -> None:
        """A reader thread: block in recv, handle the message (maybe running it), again."""
        buffer = bytearray(MAX_MESSAGE)
        view = memoryview(buffer)
        sock = self.sock
        idle = self.idle
        idle.append(None)
        while True:
            try:
                size, fds = receive(sock, buffer)
            except OSError:
                size, fds = 0, []
            finally:
                idle.pop()
            if size == 0 or size >= MAX_MESSAGE:  # the host went away (or broke the protocol)
                with contextlib.suppress(RuntimeError):  # the loop has closed: we are stopping
                    self.loop.call_soon_threadsafe(self.stop)
                return
            if not self.handle(view[:size], fds, on_loop=False):
                idle.append(None)

    def readable(self) -> None:
        """The loop's reader: one packet per call (the selector calls again while more wait)."""
        try:
            size, fds = receive(self.sock, self.buffer, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            size, fds = 0, []
        if size == 0 or size >= MAX_MESSAGE:
            self.reading_on_loop = False
            self.loop.remove_reader(self.sock.fileno())
            self.stop()
            return
        self.handle(self.view[:size], fds, on_loop=True)

    def handle(self, frame: memoryview, fds: list[int], *, on_loop: bool) -> bool:
        """Act on one message; True when a call ran on this (reader) thread, which then counted
        itself idle again before it sent the answer (see :meth:`answer_and_finish`)."""
        try:
            # inputs stay where the host put them, in its segment mapped read-only here
            kind, task, body, segment = unpack(frame, self.attachments, copy=False, fds=fds, arena=self.arena)
        except ProtocolError:
            self.on_loop(self.stop, on_loop)
            return False
        if kind == "call":
            return self.call(task, body, segment, on_loop)
        if kind == "run":
            return self.run(task, body, segment, on_loop)
        elif kind == "cancel":
            with self.cancel_lock:
                ctx = self.contexts.get(task)
                if ctx is None:
                    if len(self.early_cancels) > 10_000:  # cancels of tasks that had already ended
                        self.early_cancels.clear()
                    self.early_cancels.add(task)
                    return False
                ctx.cancelled = True  # what blocking code polls
            if ctx.asyncio_task is not None:
                self.on_loop(self.cancel_task, on_loop, ctx)
        elif kind == "release":
            self.arena.give_back(body)
        elif kind == "health":
            self.on_loop(self.spawn, on_loop, self.health(task))
        elif kind == "close":
            self.on_loop(self.stop, on_loop)
        return False

    def cancel_task(self, ctx: _Context) -> None:
        task = ctx.asyncio_task
        assert task is not None
        task.cancel()
        # a task cancelled before its first step never runs its finally: clean up for it
        task.add_done_callback(lambda _: self.release(self.finish(ctx)))

    def on_loop(self, fn: Callable[..., Any], on_loop: bool, *args: Any) -> None:
        if on_loop:
            fn(*args)
        else:
            with contextlib.suppress(RuntimeError):  # the loop has closed: we are stopping
                self.loop.call_soon_threadsafe(fn, *args)

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def stop(self) -> None:
        if not self.stopped.done():
            self.stopped.set_result(None)

    # -- running ----------------------------------------------------------------------------------

    def run(self, task: int, body: Any, segment: int | None, on_loop: bool) -> bool:
        executor = self.executor
        assert executor is not None
        try:
            if isinstance(body, Unreadable):
                raise ExecutorError(f"the worker cannot read this request: {body.error}")
            algorithm, inputs, params, priority, metadata, request_id, deadline = body
            request = Request(algorithm, inputs, params or _EMPTY, priority, None, None, metadata or _EMPTY,
                              retries=0, id=request_id)
            bare = algorithm.rpartition("/")[2]
            found = self.algorithms.get(bare)
            call = blocking_call(executor, request) if self.threaded else None
        except Exception as exc:  # noqa: BLE001 - a request we cannot even start fails, we go on
            self.answer(pack("error", task, portable(exc), self.arena, release=segment))
            return False
        ctx = _Context(self, task, request.id, found or Algorithm(bare), deadline)
        ctx.segment = segment
        self.track(ctx)
        if call is not None and not on_loop:
            if not self.idle:
                self.add_reader()  # the last free reader takes this call: someone must read meanwhile
            self.run_blocking(call, request, ctx)
            return True
        if on_loop:
            self.start_async(request, ctx)
        else:
            self.on_loop(self.start_async, False, request, ctx)
        return False

    def call(self, task: int, body: Any, segment: int | None, on_loop: bool) -> bool:
        """A request the host's executor has checked: its payload goes to our executor's
        ``run_checked`` as it came (no Request, no second check), and the result goes back as it is."""
        checked = self.checked
        try:
            if isinstance(body, Unreadable):
                raise ExecutorError(f"the worker cannot read this request: {body.error}")
            if checked is None:
                raise ExecutorError(f"executor {self.name!r} has no run_checked: send it requests")
            payload, deadline = body
        except Exception as exc:  # noqa: BLE001 - a request we cannot even start fails, we go on
            self.answer(pack("error", task, portable(exc), self.arena, release=segment))
            return False
        ctx = _Context(self, task, "", self.unnamed, deadline)
        ctx.segment = segment
        self.track(ctx)
        if on_loop:  # a coroutine executor: the loop reads, a pool thread runs the blocking call
            self.start_coroutine(self.run_checked_async(checked, payload, ctx), ctx)
            return False
        if not self.idle:
            self.add_reader()  # the last free reader takes this call: someone must read meanwhile
        try:
            kind, result = "done", checked(payload, ctx)
        except BaseException as exc:  # noqa: BLE001 - the task's failure, not ours
            kind, result = "error", portable(exc)
        self.answer_and_finish(ctx, kind, result, reader=True)
        return True

    async def run_checked_async(self, checked: Callable[[Any, TaskContext], Any], payload: Any,
                                ctx: _Context) -> None:
        try:
            answer: tuple[str, Any] = ("done", await self.pool.submit(checked, payload, ctx))
        except asyncio.CancelledError:
            self.release(self.finish(ctx))  # the host stopped waiting: it wants no answer
            return
        except BaseException as exc:  # noqa: BLE001 - the task's failure, not ours
            answer = ("error", portable(exc))
        self.answer_and_finish(ctx, *answer)

    def start_coroutine(self, coro: Any, ctx: _Context) -> None:
        if ctx.cancelled:  # cancelled before it started
            coro.close()
            self.release(self.finish(ctx))
            return
        # no done callback (it would cost the loop a step per task): the coroutine finishes itself
        ctx.asyncio_task = self.loop.create_task(coro)
        self.tasks.add(ctx.asyncio_task)

    def track(self, ctx: _Context) -> None:
        """Hold the task's context until it ends; a cancel that came first (read by another
        reader thread) marks it at once."""
        task = ctx._task
        with self.cancel_lock:
            self.contexts[task] = ctx
            if self.early_cancels and task in self.early_cancels:
                self.early_cancels.discard(task)
                ctx.cancelled = True

    def start_async(self, request: Request, ctx: _Context) -> None:
        self.start_coroutine(self.run_async(request, ctx), ctx)

    def run_blocking(self, call: Callable[[Request, TaskContext], Any], request: Request, ctx: _Context) -> None:
        try:
            outputs = call(request, ctx)
            response = outputs if isinstance(outputs, Response) else Response(outputs)
            answer: tuple[str, Any] = ("done", (response.outputs, dict(response.timings) or None))
        except BaseException as exc:  # noqa: BLE001 - the task's failure, not ours
            answer = ("error", portable(exc))
        self.answer_and_finish(ctx, *answer, reader=True)

    async def run_async(self, request: Request, ctx: _Context) -> None:
        executor = self.executor
        assert executor is not None
        try:
            response = await executor.execute(request, ctx)
            if not isinstance(response, Response):
                raise ExecutorError(f"{request.algorithm} returned {type(response).__name__}, not a Response")
            answer: tuple[str, Any] = ("done", (response.outputs, dict(response.timings) or None))
        except asyncio.CancelledError:
            self.release(self.finish(ctx))  # the host stopped waiting: it wants no answer
            return
        except BaseException as exc:  # noqa: BLE001 - the task's failure, not ours
            answer = ("error", portable(exc))
        self.answer_and_finish(ctx, *answer)

    def answer_and_finish(self, ctx: _Context, kind: str, body: Any, *, reader: bool = False) -> None:
        """Send the task's answer, handing its input segment back in the same packet: the outputs
        are copied into our own segment first (they may view the input), and the host then wakes
        once for both.

        A ``reader`` thread that ran the call counts itself idle before it sends: the host's next
        request may arrive before it is back in ``recv``, and the reader that takes it must not
        find nobody idle and start yet another reader (they piled up, a dozen after a few thousand
        calls, and each call then ran on the thread that had slept longest, its caches cold)."""
        segment = self.finish(ctx)
        try:
            packet = pack(kind, ctx._task, body, self.arena, release=segment)
        except BaseException as exc:  # noqa: BLE001 - outputs that do not pickle fail the task, not us
            packet = pack("error", ctx._task, portable(exc), self.arena, release=segment)
        if reader:
            self.idle.append(None)
        self.answer(packet)

    def finish(self, ctx: _Context) -> int | None:
        """The task has ended (may be called twice): forget it; its input segment, to hand back
        (None once taken)."""
        self.contexts.pop(ctx._task, None)
        if ctx.asyncio_task is not None:
            self.tasks.discard(ctx.asyncio_task)
        segment, ctx.segment = ctx.segment, None
        return segment

    def answer(self, packet: tuple[bytes, int | None]) -> None:
        try:
            send(self.sock, *packet)
        except OSError:
            pass  # the host is gone; its EOF (or our lifeline) ends us

    def wait_calls(self, end: float) -> None:
        while self.contexts and time.monotonic() < end:
            time.sleep(0.01)

    async def health(self, task: int) -> None:
        assert self.executor is not None
        try:
            health = await self.executor.health()
        except Exception as exc:  # noqa: BLE001 - health must answer
            health = Health(HealthStatus.DOWN, f"{type(exc).__name__}: {exc}")
        self.send("health", task, health)

    # -- ending -----------------------------------------------------------------------------------

    async def close(self, grace: float = 5.0) -> None:
        """Cancel what runs, give it ``grace`` seconds to end, release everything."""
        if self.reading_on_loop:
            self.reading_on_loop = False
            self.loop.remove_reader(self.sock.fileno())
        for ctx in list(self.contexts.values()):
            ctx.cancelled = True
            if ctx.asyncio_task is not None:
                ctx.asyncio_task.cancel()
        end = time.monotonic() + grace
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=grace)
        if self.contexts:  # blocking calls still running on reader threads
            await asyncio.to_thread(self.wait_calls, end)
        self.pool.close(wait=False)
        if self.registry is not None:
            await self.registry.aclose()
        self.attachments.close()
        self.arena.close()


async def _main(fd: int) -> int:
    sock = socket.socket(fileno=fd)
    sock.set_inheritable(False)  # children the executor starts must not hold the host's socket open
    worker = _Worker(sock)
    try:
        try:
            worker.setup()
        except Exception as exc:  # noqa: BLE001 - tell the host why, then stop
            worker.hello(f"{type(exc).__name__}: {exc}", kind="fail")
            return 1
        # what the start built (modules, the executor, its plugins) lives as long as we do: out of
        # the cyclic GC's scans, whose full collections would otherwise walk it every few
        # thousand requests
        gc.freeze()
        worker.start()
        await worker.stopped
    finally:
        await worker.close()
    return 0


def _die_with(parent: int | None, lifeline: int) -> None:
    """Exit at once, whatever runs, when the host is gone, however it ended.

    Two ways, as either alone has a gap: the kernel's parent-death signal (it follows the host's
    thread that started us, and is not set across a sandbox's pid namespace), and a thread that
    reads our end of a pipe whose other end only the host holds: the kernel closes it when the
    host ends, kill -9 included, and the read returns. The signal is set before the check that
    the host is still our parent, so a host that died in between is caught by the check.
    """
    if parent is not None and sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(_ORPHANED)
    os.set_inheritable(lifeline, False)

    def watch() -> None:
        while True:
            try:
                if not os.read(lifeline, 1):
                    break
            except InterruptedError:
                continue
            except OSError:
                break
        os._exit(_ORPHANED)  # no cleanup to do: the shared memory has no name, the host reaps nothing

    threading.Thread(target=watch, name="edgecompute-lifeline", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgecompute.placement._worker")
    parser.add_argument("--fd", type=int, required=True, help="the socket to the host, inherited")
    parser.add_argument("--lifeline", type=int, required=True,
                        help="a pipe only the host writes to: its end means the host is gone")
    parser.add_argument("--parent", type=int, help="the host's pid, when the parent-death signal may be set")
    args = parser.parse_args(argv)
    _die_with(args.parent, args.lifeline)
    return asyncio.run(_main(args.fd))


if __name__ == "__main__":
    sys.exit(main())
