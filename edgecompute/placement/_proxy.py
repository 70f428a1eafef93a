"""The host's side of a worker: an ``Executor`` that forwards every call to a worker process.

The scheduler sees an ordinary executor, so priorities, deadlines, retries, cancellation,
streaming and backpressure work unchanged. The worker is started when the executor is built (its
``hello`` lists the algorithms), and again after a crash under the :class:`Supervisor`'s policy.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import itertools
import logging
import os
import pickle
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, ExecutorCrashed, ExecutorError, PluginError, SandboxViolation
from ..models import Algorithm, Health, HealthStatus, Request, Resources, Response
from . import PLACEMENT_KEYS, Placement
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
    unpack,
)
from ._protocol import send as send_packet
from ._supervisor import Supervisor

if TYPE_CHECKING:
    from ..context import TaskContext
    from ._sandbox import Sandbox

__all__ = ["WorkerExecutor"]

log = logging.getLogger("edgecompute.placement")
_ids = itertools.count(1)


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


class _NotSent:
    """What :meth:`WorkerExecutor.run_checked_blocking` returns when it sent nothing (a result
    of ``run_checked`` may be None)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NOT_SENT"


_NOT_SENT = _NotSent()


class _Call:
    __slots__ = ("ctx", "future")

    def __init__(self, future: asyncio.Future[Any], ctx: TaskContext | None) -> None:
        self.future = future
        self.ctx = ctx


def _socket_pair(name: str) -> tuple[socket.socket, socket.socket]:
    try:
        pair = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    except (AttributeError, OSError) as exc:
        raise PluginError(f"placement of {name!r}", f"a worker process needs Unix SOCK_SEQPACKET sockets "
                                                    f"(Linux): {exc}") from exc
    for end in pair:
        with contextlib.suppress(OSError):  # room for many packets in flight (the kernel may cap it)
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    return pair


def _remove_leftovers(sandbox: Sandbox | None) -> None:
    if sandbox is not None:
        sandbox.cleanup()


class _Connection:
    """One worker process and the socket to it.

    On the event loop the socket is read by a callback of the loop's own selector (``add_reader``):
    an answer resolves its task's future in the loop's next step, with no reader task or thread in
    between. Sends go straight to the socket and are queued only when it is full.
    """

    def __init__(self, name: str, placement: Placement, setup: Mapping[str, Any]) -> None:
        self.name = name
        tag = f"ec-{os.getpid()}-{next(_ids)}"
        python = placement.python or sys.executable
        self.sandbox: Sandbox | None = None
        if placement.kind == "sandbox":
            from ._sandbox import Sandbox  # light, but only a sandboxed executor needs it

            self.sandbox = Sandbox(name, placement, python, tag)
        try:
            parent, child = _socket_pair(name)
        except BaseException:
            self._cleanup_sandbox()
            raise
        # The worker's lifeline: it reads the other end, and our end closes when this process
        # ends in any way (kill -9 too), which the worker takes as its cue to exit at once, busy
        # or not. Not inheritable: no other child may hold it open.
        lifeline, self.lifeline = os.pipe()
        argv = [python, "-m", "edgecompute.placement._worker", "--fd", str(child.fileno()),
                "--lifeline", str(lifeline)]
        if self.sandbox is None and threading.current_thread() is threading.main_thread():
            # the kernel's parent-death signal follows the THREAD that started the worker: only
            # the main thread lives as long as this process
            argv += ["--parent", str(os.getpid())]
        try:
            self.process = subprocess.Popen(
                argv if self.sandbox is None else self.sandbox.command(argv),
                pass_fds=(child.fileno(), lifeline), stdin=subprocess.DEVNULL, start_new_session=True,
            )
        except (OSError, PluginError) as exc:
            parent.close()
            os.close(self.lifeline)
            self._cleanup_sandbox()
            if isinstance(exc, PluginError):
                raise
            raise PluginError(f"placement of {name!r}", f"cannot start {python!r}: {exc}") from exc
        finally:
            child.close()
            os.close(lifeline)
        # a host that exits without closing us still removes the sandbox's cgroups: finalizers
        # run at interpreter exit (shared memory needs nothing: it has no name)
        self._leftovers = weakref.finalize(self, _remove_leftovers, self.sandbox)
        self.sock = parent
        self.arena = Arena()
        # a sandboxed worker is not trusted with the host's memory: nothing larger than its cap
        self.attachments = Attachments(None if self.sandbox is None else placement.sandbox_memory_mb << 20)
        self.calls: dict[int, _Call] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.buffer = bytearray(MAX_MESSAGE)
        self.view = memoryview(self.buffer)
        self.pending: collections.deque[tuple[bytes, int | None]] = collections.deque()  # no room for these yet
        self.drained: asyncio.Future[None] | None = None
        self.on_end: Callable[[], None] | None = None
        self.reading = False
        self._poller: select.poll | None = None
        #: a segment of the worker's that a blocking exchange copied out and has not handed back yet
        self.owed: int | None = None
        self.closing = False
        self.killed_on_purpose = False
        self.dead = False
        try:
            self.hello = self._handshake(setup, placement.start_timeout)
        except BaseException:
            self.kill()
            self.reap()
            raise
        if self.sandbox is not None:
            log.info("worker %s of %r started in a sandbox (memory cap: %s; cpu cap: %s; network: %s)", self.pid,
                     name, self.sandbox.memory_cap, self.sandbox.cpu_cap,
                     "the host's" if placement.sandbox_network else "none")

    @property
    def pid(self) -> int:
        return self.process.pid

    def exit_reason(self) -> str:
        code = self.process.returncode
        if self.sandbox is not None and code is not None and 128 < code < 128 + 65:
            return _exit_reason(128 - code)  # bwrap exits with 128 + N when its child dies of signal N
        return _exit_reason(code)

    # -- blocking start -------------------------------------------------------------------------

    def _handshake(self, setup: Mapping[str, Any], timeout: float) -> dict[str, Any]:
        frame = encode("setup", "", dict(setup))
        self.sock.settimeout(timeout)
        try:
            self.sock.sendall(frame)
            data = self.sock.recv(1 << 22)  # one packet: protocol 1's frame, which every version reads
            if not data:
                raise EOFError("the worker closed the connection")
            if len(data) < 4 or frame_length(data[:4]) != len(data) - 4:
                raise ProtocolError(f"a packet of {len(data)} bytes is no hello")
            kind, _, body = decode(data[4:])
        except (OSError, EOFError, ProtocolError) as exc:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(1)
            raise PluginError(f"placement of {self.name!r}",
                              f"worker {self.pid} did not start ({type(exc).__name__}: {exc}; "
                              f"it {_exit_reason(self.process.poll())})") from exc
        if kind == "fail":
            raise PluginError(f"placement of {self.name!r}", f"worker could not build it: {body}")
        if kind != "hello" or not isinstance(body, dict):
            raise PluginError(f"placement of {self.name!r}", f"worker said {kind!r} instead of hello")
        if body.get("protocol") != VERSION:
            raise PluginError(f"placement of {self.name!r}", f"worker speaks protocol {body.get('protocol')!r}, "
                                                            f"this host {VERSION}; install the same edgecompute")
        return body

    # -- on the event loop ----------------------------------------------------------------------

    def attach(self, on_end: Callable[[], None]) -> None:
        """Read the socket from the running event loop; ``on_end`` is called there at its EOF."""
        loop = asyncio.get_running_loop()
        self.sock.setblocking(False)
        self.on_end = on_end
        loop.add_reader(self.sock.fileno(), self._readable)
        self.reading = True
        self.loop = loop  # last: a connection with a loop is ready to use

    def detach(self) -> None:
        """Stop reading and writing from the loop (before the socket closes)."""
        loop = self.loop
        if loop is not None and not loop.is_closed():
            loop.remove_reader(self.sock.fileno())
            loop.remove_writer(self.sock.fileno())
        self.reading = False

    def send(self, kind: str, task: int, body: Any) -> None:
        # a segment of the worker's that we copied out and still owe it goes back in this packet
        owed, self.owed = self.owed, None
        try:
            packet = pack(kind, task, body, self.arena, release=owed)
        except BaseException:
            self.owed = owed
            raise
        if self.loop is None:  # not attached yet: the socket still blocks (with the start timeout)
            send_packet(self.sock, *packet)
            return
        if self.pending:
            self.pending.append(packet)
            return
        try:
            send_packet(self.sock, *packet)
        except BlockingIOError:
            self.pending.append(packet)
            self.loop.add_writer(self.sock.fileno(), self._writable)
        except OSError as exc:
            raise ExecutorCrashed(f"worker {self.pid} of {self.name!r} is gone ({exc})") from exc

    def _writable(self) -> None:
        pending = self.pending
        while pending:
            try:
                send_packet(self.sock, *pending[0])
            except BlockingIOError:
                return
            except OSError:
                pending.clear()  # the worker is gone; its EOF fails the calls
                break
            pending.popleft()
        assert self.loop is not None
        self.loop.remove_writer(self.sock.fileno())
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    def _readable(self) -> None:
        # one packet per call: the selector is level-triggered and calls again while more wait,
        # and a second recv only to hear EAGAIN would cost a system call per answer. A `release`
        # is the exception: the worker sends it just before its answer, which is read at once
        # instead of after another turn of the loop.
        while True:
            try:
                size, fds = receive(self.sock, self.buffer)
            except BlockingIOError:
                return
            except OSError:
                size, fds = 0, []
            if not 0 < size < MAX_MESSAGE:  # EOF: the worker is gone (or sent more than a packet may hold)
                break
            try:
                # copied out at once: the worker's segment goes back before any caller sees the
                # outputs, so nothing the worker does later can change them
                kind, task, body, segment = unpack(self.view[:size], self.attachments, copy=True, fds=fds,
                                                   arena=self.arena)
            except ProtocolError:
                log.warning("worker %s of %r broke the protocol; dropping it", self.pid, self.name)
                break
            if segment is not None:  # decoded with copy=True: it is free again
                if self.owed is None:
                    self.owed = segment  # handed back with our next packet (a wake-up of the worker less)
                else:
                    with contextlib.suppress(ExecutorCrashed):
                        self.send("release", 0, segment)  # hands the older one back too
            self._dispatch(kind, task, body)
            if kind != "release" or not self.reading:
                return
        self.detach()
        self.dead = True
        if self.on_end is not None:
            self.on_end()

    def _dispatch(self, kind: str, task: int, body: Any) -> None:
        if kind == "release":
            self.arena.give_back(body)
            return
        call = self.calls.get(task)
        if call is None:
            return  # a task we stopped waiting for (cancelled): drop what it still sends
        if kind == "chunk":
            if call.ctx is not None:
                call.ctx.emit_nowait(body)
        elif kind == "progress":
            if call.ctx is not None and isinstance(body, float):
                call.ctx.progress(body)
        elif kind in ("done", "error", "health"):
            del self.calls[task]
            if call.future.done():
                return
            if isinstance(body, Unreadable):
                call.future.set_exception(ExecutorError(
                    f"the host cannot read what worker {self.pid} sent: {type(body.error).__name__}: {body.error}"))
            elif kind == "error":
                call.future.set_exception(body if isinstance(body, BaseException) else ExecutorError(str(body)))
            else:
                call.future.set_result(body)

    def start(self, kind: str, body: Any, ctx: TaskContext | None) -> tuple[int, asyncio.Future[Any]]:
        """Send a request; its answer resolves the future. The caller pops ``calls[task]`` when done."""
        assert self.loop is not None
        task = next(_ids)
        future: asyncio.Future[Any] = self.loop.create_future()
        self.calls[task] = _Call(future, ctx)
        try:
            self.send(kind, task, body)
        except BaseException:
            del self.calls[task]
            raise
        return task, future

    async def call(self, kind: str, body: Any, ctx: TaskContext | None) -> Any:
        task, future = self.start(kind, body, ctx)
        try:
            return await future
        finally:
            self.calls.pop(task, None)

    def exchange(self, kind: str, body: Any, deadline: float | None) -> Any:
        """One ``run`` (or ``call``) answered on this thread, blocking, with no event loop: for a synchronous
        caller, while no running loop reads this connection. Returns the answer's body; raises
        the task's error, ``TimeoutError`` past ``deadline`` (the worker is left to the caller),
        ``EOFError`` when the worker is gone, ``BlockingIOError`` when the request could not be
        sent at once (nothing was sent)."""
        task = next(_ids)
        sock = self.sock
        if self.loop is None and sock.gettimeout() is not None:
            sock.settimeout(None)  # not read by a loop: block in recv itself, one system call
        owed, self.owed = self.owed, None
        try:
            send_packet(sock, *pack(kind, task, body, self.arena, release=owed))
        except BlockingIOError:
            self.owed = owed  # nothing was sent
            raise
        # a socket a loop reads is non-blocking: wait in poll, then read without blocking
        poller = None if deadline is None and self.loop is None else self.poller()
        while True:
            if poller is not None:
                wait = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000) + 1)
                if not poller.poll(wait) and deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError
            try:
                size, fds = receive(sock, self.buffer, 0 if poller is None else socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                size, fds = 0, []
            if not 0 < size < MAX_MESSAGE:
                raise EOFError
            try:
                kind, got, answer, segment = unpack(self.view[:size], self.attachments, copy=True, fds=fds,
                                                    arena=self.arena)
            except ProtocolError as exc:
                log.warning("worker %s of %r broke the protocol; dropping it", self.pid, self.name)
                raise EOFError from exc
            if segment is not None:
                # copied out: the worker may reuse it. Handed back with our next packet, not in
                # one of its own: a packet less, and a wake-up of the worker less, per call
                if self.owed is None:
                    self.owed = segment
                else:  # send() hands an older one back first
                    try:
                        self.send("release", 0, segment)
                    except ExecutorCrashed:
                        pass
            if kind == "release":
                self.arena.give_back(answer)
            elif got == task and kind in ("done", "error"):
                if isinstance(answer, Unreadable):
                    raise ExecutorError(f"the host cannot read what worker {self.pid} sent: "
                                        f"{type(answer.error).__name__}: {answer.error}")
                if kind == "error":
                    raise answer if isinstance(answer, BaseException) else ExecutorError(str(answer))
                return answer

    def poller(self) -> select.poll:
        """A poll object for this socket's input, made once."""
        poller = self._poller
        if poller is None:
            poller = self._poller = select.poll()
            poller.register(self.sock.fileno(), select.POLLIN)
        return poller

    def fail_calls(self, error_text: str, error: type[ExecutorError] = ExecutorCrashed) -> None:
        calls, self.calls = self.calls, {}
        for call in calls.values():
            # a call of a loop that was closed meanwhile has no one waiting, and its loop refuses it
            if not call.future.done() and not call.future.get_loop().is_closed():
                call.future.set_exception(error(error_text))

    # -- ending ---------------------------------------------------------------------------------

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)  # its own session: children go with it
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()

    def reap(self) -> None:
        """Wait for the worker (no zombie), kill what it left in its group, free every segment.
        Blocking, and from any thread: :meth:`detach` first when the connection was attached."""
        self.process.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            self.sock.close()
        lifeline, self.lifeline = self.lifeline, -1
        if lifeline >= 0:
            os.close(lifeline)
        self.attachments.close()
        self.arena.close()
        self._leftovers()

    def _cleanup_sandbox(self) -> None:
        if self.sandbox is not None:
            self.sandbox.cleanup()

    async def close(self, grace: float = 5.0) -> None:
        """Ask the worker to exit (killing it past ``grace``) and reap it, from any event loop."""
        self.closing = True
        if self.loop is not None and self.loop is not asyncio.get_running_loop():
            # attached to a loop that does not run here: no callback of it may touch the socket
            # again, and what it still had queued belongs to calls nobody waits for any more
            self.detach()
            self.loop = None
            self.pending.clear()
            self.drained = None
            self.sock.setblocking(False)
        asked = False
        if not self.dead:
            with contextlib.suppress(Exception):
                self.send("close", 0, None)
                if self.pending:
                    assert self.loop is not None
                    self.drained = self.loop.create_future()
                    await asyncio.wait_for(asyncio.shield(self.drained), grace)
                asked = True
        if not asked:
            self.kill()  # it cannot hear the close: waiting for it would only cost the grace
        try:
            await asyncio.to_thread(self.process.wait, grace)
        except subprocess.TimeoutExpired:
            self.kill()
        self.detach()
        self.reap()
        self.fail_calls(f"worker of {self.name!r} was closed")


class _Slot:
    """One of the executor's worker processes: its connection (None until started, and after it
    ended), and the start in progress."""

    __slots__ = ("connection", "started", "starting")

    def __init__(self, connection: _Connection | None) -> None:
        self.connection = connection
        #: the start in progress: a thread's future, which any event loop (or none) can wait for
        self.starting: concurrent.futures.Future[None] | None = None
        self.started = connection is not None


class WorkerExecutor:
    """An executor that lives in worker processes (see :class:`~edgecompute.placement.Placement`).

    With ``workers`` > 1 it keeps that many, each a separate process under the one
    :class:`Supervisor`: a call goes to the live worker with the fewest calls in hand, and a
    worker that dies is replaced in the background while the others go on serving. With
    ``kill_on_cancel`` a task cancelled while it runs kills its worker (for native code that
    cannot notice a cancellation), as a task past its deadline always does.
    """

    def __init__(self, name: str, placement: Placement, settings: Mapping[str, Any] | None = None,
                 factory: Any = None, *, workers: int = 1, kill_on_cancel: bool = False) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ConfigError(f"placement of {name!r}: workers must be an integer >= 1, not {workers!r}")
        self.name = name
        self.placement = placement
        self._setup = {
            "executor": name,
            "settings": {k: v for k, v in (settings or {}).items() if k not in PLACEMENT_KEYS},
            "factory": by_reference(factory),
        }
        self.supervisor = Supervisor(placement)
        self._kill_on_cancel = kill_on_cancel
        first = _Connection(name, placement, self._setup)
        self._slots = [_Slot(first), *(_Slot(None) for _ in range(workers - 1))]
        self._burials: set[asyncio.Future[None]] = set()
        # Starts and reaps run in threads of their own, not in tasks of the loop that asked for
        # them: that loop may stop before they end, and the close may run on another loop (or a
        # synchronous caller's), which must still wait for every one of them.
        self._lock = threading.RLock()  # slots, supervisor counts and _threads, shared with those threads
        self._stopping = threading.Event()  # set by the close: a start waiting out the backoff gives up
        self._threads: set[concurrent.futures.Future[Any]] = set()
        # Threads that live as long as the executor, not one per start: a worker's parent-death
        # signal (a sandbox's --die-with-parent) follows the thread that started it.
        self._pool = concurrent.futures.ThreadPoolExecutor(workers + 2, thread_name_prefix=f"edgecompute-{name}")
        hello = first.hello
        self.version: str = str(hello["version"])
        self._algorithms: list[Algorithm] = list(hello["algorithms"])
        self._resources = {a.name: a.resources for a in self._algorithms}
        #: What the (first) worker reported: its executors, pid and interpreter.
        self.report: dict[str, Any] = hello
        self._closed = False

    #: What :meth:`run_checked_blocking` returns when it sent nothing.
    NOT_SENT: Any = _NOT_SENT

    def __repr__(self) -> str:
        python = self.placement.python or "this interpreter"
        where = "a sandboxed worker" if self.placement.kind == "sandbox" else "a worker process"
        return f"<WorkerExecutor {self.name!r} in {where} of {python}>"

    @property
    def pid(self) -> int | None:
        """The pid of the first live worker, or None while there is none."""
        return next((pid for pid in self.pids if pid is not None), None)

    @property
    def pids(self) -> list[int | None]:
        """Each worker's pid, None where none is alive now."""
        return [None if slot.connection is None or slot.connection.dead else slot.connection.pid
                for slot in self._slots]

    def algorithms(self) -> Sequence[Algorithm]:
        return self._algorithms

    def requirements(self, request: Request) -> Resources:
        # the worker's own requirements() would cost a round trip per task; the declared
        # resources are what most executors return anyway, and Request.resources overrides them
        return self._resources.get(request.algorithm.rpartition("/")[2], Resources(cpu=1.0))

    def _pick(self) -> _Connection | None:
        """The live worker on this loop with the fewest calls in hand (None when there is none);
        starts the missing ones in the background."""
        loop = asyncio.get_running_loop()
        best = None
        missing = False
        for slot in self._slots:
            connection = slot.connection
            if connection is None or connection.dead or connection.loop is not loop:
                missing = missing or slot.starting is None
                continue
            if best is None or len(connection.calls) < len(best.calls):
                best = connection
        if missing and best is not None:
            self._fill()
        return best

    def _fill(self) -> None:
        """Start every worker that is missing, each in a thread of its own: nobody waits for them."""
        if self._closed or self.supervisor.open:
            return
        loop = asyncio.get_running_loop()
        for slot in self._slots:
            connection = slot.connection
            if slot.starting is not None or (connection is not None and connection.loop is loop):
                continue  # starting, serving here, or dead here with its burial on the way
            if connection is not None:
                if connection.loop is None:
                    if not connection.dead:
                        self._attach(connection)
                        continue
                elif connection.loop.is_running():
                    continue  # another thread's loop serves with it
                else:
                    self._retire(slot, connection)
            with contextlib.suppress(ExecutorCrashed):  # closed or circuit open meanwhile
                self._begin(slot)

    def _retire(self, slot: _Slot, connection: _Connection) -> None:
        """Drop a worker attached to a loop that no longer runs (its calls ended with that loop);
        it is reaped in a thread that the close waits for."""
        slot.connection = None
        connection.closing = True
        connection.killed_on_purpose = True
        connection.dead = True
        connection.detach()
        connection.kill()
        self._in_thread(connection.reap)

    def _adopt(self, connection: _Connection) -> None:
        """On the loop that asked for a worker: read it from here on (its crash is noticed at once),
        unless something else took it meanwhile."""
        if (not self._closed and connection.loop is None and not connection.dead
                and any(slot.connection is connection for slot in self._slots)):
            self._attach(connection)

    def _in_thread(self, work: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        """Run ``work`` in a thread of the executor's; :meth:`aclose` waits for it from whatever loop."""
        done: concurrent.futures.Future[Any] = concurrent.futures.Future()
        done.set_running_or_notify_cancel()  # no cancel(): the work runs to its end once begun
        with self._lock:
            self._threads.add(done)

        def run() -> None:
            try:
                result = work()
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits for it
                done.set_exception(exc)
            else:
                done.set_result(result)
            finally:
                with self._lock:
                    self._threads.discard(done)

        self._pool.submit(run)
        return done

    def _begin(self, slot: _Slot) -> concurrent.futures.Future[None]:
        """The slot's start in progress, or a new one under the supervisor's policy."""
        with self._lock:
            if slot.starting is not None:
                return slot.starting
            if self._closed:
                raise ExecutorCrashed(f"executor {self.name!r} is closed", retryable=False)
            if self.supervisor.open:
                raise ExecutorCrashed(f"executor {self.name!r}: {self.supervisor.describe()}", retryable=False)
            delay = self.supervisor.delay() if slot.started else 0.0
            try:
                loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            slot.starting = starting = self._in_thread(lambda: self._start(slot, delay, loop))
            return starting

    def _start(self, slot: _Slot, delay: float, loop: asyncio.AbstractEventLoop | None) -> None:
        """Start the slot's worker after ``delay`` seconds (in a thread), to be read by ``loop``
        (the one that asked for it) from its next step; nothing when the executor closes meanwhile."""
        try:
            if self._stopping.wait(delay):
                return
            try:
                started = _Connection(self.name, self.placement, self._setup)
            except PluginError as exc:
                with self._lock:
                    self.supervisor.crashed(str(exc))
                log.warning("a worker of %r could not start: %s", self.name, exc)
                raise ExecutorCrashed(f"executor {self.name!r} could not restart: {exc}") from exc
            connection: _Connection | None = started
            with self._lock:
                if not self._closed:  # else the close has taken the slots: this one is ours to end
                    slot.connection, connection = connection, None
                    if slot.started:
                        self.supervisor.restarts += 1
                    slot.started = True
                    if loop is not None:
                        with contextlib.suppress(RuntimeError):  # that loop is closed: the next user attaches it
                            loop.call_soon_threadsafe(self._adopt, started)
            if connection is not None:
                connection.killed_on_purpose = True
                connection.kill()
                connection.reap()
        finally:
            with self._lock:
                slot.starting = None

    async def execute(self, request: Request, ctx: TaskContext) -> Response:
        outputs, timings = await self._call("run", _body(request, ctx.deadline), ctx, request.id)
        return Response(outputs) if timings is None else Response(outputs, timings=timings)

    async def run_checked(self, payload: Any, ctx: TaskContext, label: str = "") -> Any:
        """What the worker's executor's ``run_checked(payload, ctx)`` returns, for a host-side
        executor that has already checked the request itself: ``payload`` (plain values that
        pickle, such as the checked arrays and encoded params) goes to the worker as it is, the
        worker builds no :class:`Request` and its executor checks nothing again, and the result
        comes back as it is, copied out on arrival. ``label`` names the task in logs. Deadline,
        cancellation and crashes as in :meth:`execute`."""
        return await self._call("call", (payload, ctx.deadline), ctx, label)

    async def _call(self, kind: str, body: Any, ctx: TaskContext, label: str) -> Any:
        connection = self._pick()
        if connection is None:
            connection = await self._ready()
        task, future = connection.start(kind, body, ctx)
        try:
            return await future
        except asyncio.CancelledError:
            late = ctx.deadline is not None and time.monotonic() >= ctx.deadline
            if late or (self._kill_on_cancel and not connection.dead and task in connection.calls):
                # past its deadline the task may be stuck where nothing can interrupt it (C code,
                # a GPU kernel): kill the worker; its other tasks fail with ExecutorCrashed
                log.warning("task %s of %r was %s: killing worker %s", label, self.name,
                            "past its deadline" if late else "cancelled", connection.pid)
                connection.killed_on_purpose = True
                connection.kill()
                connection.dead = True  # the next task must not be sent to it before its EOF arrives
            elif not connection.dead and connection.calls.pop(task, None) is not None:
                with contextlib.suppress(Exception):
                    connection.send("cancel", task, None)
            raise
        finally:
            connection.calls.pop(task, None)

    def execute_blocking(self, request: Request, deadline: float | None = None) -> Response | None:
        """Run ``request`` from synchronous code on this thread, blocking until the answer, with
        no event loop and no thread hop: one packet out, one back (for scripts and benchmarks,
        one caller at a time). From a coroutine it blocks the running loop, which only pays for a
        call known to be short while the loop has nothing else to do. None when no worker is idle
        outside another running event loop: run it through :meth:`execute` then. Past
        ``deadline`` the worker is killed and ``TimeoutError`` raised; a worker that dies fails
        the call with ``ExecutorCrashed``."""
        answer = self._call_blocking("run", _body(request, deadline), deadline, request.id)
        if answer is _NOT_SENT:
            return None
        outputs, timings = answer
        return Response(outputs) if timings is None else Response(outputs, timings=timings)

    def run_checked_blocking(self, payload: Any, deadline: float | None = None, label: str = "") -> Any:
        """:meth:`run_checked` as :meth:`execute_blocking` runs a request: on this thread, with
        no event loop; :attr:`NOT_SENT` when no worker is idle outside another running event
        loop (run it through :meth:`run_checked` then)."""
        return self._call_blocking("call", (payload, deadline), deadline, label)

    def _call_blocking(self, kind: str, body: Any, deadline: float | None, label: str) -> Any:
        for slot in self._slots:
            connection = slot.connection
            # idle: no answer of another call can arrive while this one reads the socket
            if connection is None or connection.dead or connection.calls or connection.pending:
                continue
            loop = connection.loop  # and no other running loop reads it
            if loop is None or not loop.is_running() or loop is _running_loop():
                break
        else:
            return _NOT_SENT
        try:
            return connection.exchange(kind, body, deadline)
        except BlockingIOError:
            return _NOT_SENT  # nothing was sent
        except TimeoutError:
            log.warning("task %s of %r was past its deadline: killing worker %s", label, self.name, connection.pid)
            connection.killed_on_purpose = True
            self._bury_now(connection)
            raise
        except (EOFError, OSError) as exc:
            reason, error = self._bury_now(connection)
            raise error(reason) from exc

    def _bury_now(self, connection: _Connection) -> tuple[str, type[ExecutorError]]:
        """:meth:`_bury` for a synchronous caller: the worker is reaped on this thread and
        replaced on the next call's demand."""
        for slot in self._slots:
            if slot.connection is connection:
                slot.connection = None
        connection.closing = True
        connection.dead = True
        connection.kill()
        connection.detach()
        connection.reap()
        return self._count_death(connection)

    def _count_death(self, connection: _Connection) -> tuple[str, type[ExecutorError]]:
        """Why the reaped worker ended, and the error its tasks fail with; a crash is counted."""
        reason = f"worker {connection.pid} of {self.name!r} {connection.exit_reason()}"
        error: type[ExecutorError] = ExecutorCrashed
        sandbox = connection.sandbox
        if sandbox is not None and sandbox.memory_killed():
            # the task that grew past the cap would only do it again: not retryable
            reason = (f"worker {connection.pid} of {self.name!r} was killed by its sandbox's memory cap "
                      f"({sandbox.memory_cap}); a new worker takes the next task")
            error = SandboxViolation
        if not connection.killed_on_purpose:
            self.supervisor.crashed(reason)
            log.warning("%s; %s", reason, self.supervisor.describe())
        return reason, error

    async def _ready(self) -> _Connection:
        """A live worker on this loop, starting one (and waiting for it) when there is none."""
        while True:
            if self._closed:
                raise ExecutorCrashed(f"executor {self.name!r} is closed", retryable=False)
            loop = asyncio.get_running_loop()
            for slot in self._slots:
                connection = slot.connection
                if connection is None:
                    continue
                if not connection.dead:
                    if connection.loop is None:
                        self._attach(connection)
                    if connection.loop is loop:
                        if len(self._slots) > 1:
                            self._fill()  # the others start in the background, nobody waits for them
                        return connection
                    # alive, on another (finished) event loop: start afresh
                    slot.connection = None
                    connection.killed_on_purpose = True
                    connection.detach()
                    connection.kill()
                    connection.reap()
                else:
                    await self._bury(connection)
            await self._ensure(self._slots[0])

    def _attach(self, connection: _Connection) -> None:
        def ended() -> None:
            burial = asyncio.ensure_future(self._bury(connection))
            self._burials.add(burial)
            burial.add_done_callback(self._burials.discard)

        connection.attach(ended)

    async def _bury(self, connection: _Connection) -> None:
        """The worker's connection ended: fail its tasks, reap it, count the crash; with other
        workers serving, start its replacement at once in the background."""
        slot = next((slot for slot in self._slots if slot.connection is connection), None)
        if slot is None or connection.closing:
            return
        slot.connection = None
        connection.closing = True
        connection.kill()  # it may have closed the socket and hang; make sure it is gone
        connection.detach()
        await asyncio.wrap_future(self._in_thread(connection.reap))
        reason, error = self._count_death(connection)
        connection.fail_calls(reason, error)
        if len(self._slots) > 1:
            self._fill()

    async def _ensure(self, slot: _Slot) -> None:
        """Start the slot's worker (or wait for the start in progress), under the supervisor's policy."""
        await asyncio.wrap_future(self._begin(slot))

    async def health(self) -> Health:
        supervisor = self.supervisor
        details: dict[str, Any] = {"placement": self.placement.kind, "python": self.report.get("python"),
                                   "crashes": supervisor.total_crashes, "restarts": supervisor.restarts}
        details["workers"] = [{"pid": pid, "state": "stopped" if pid is None else "running"} for pid in self.pids]
        sandbox = next((slot.connection.sandbox for slot in self._slots if slot.connection is not None), None)
        if sandbox is not None:
            details["sandbox"] = sandbox.describe()
        if supervisor.open:
            return Health(HealthStatus.DOWN, supervisor.describe(), details)
        try:
            connection = self._pick() or await self._ready()
            details["pid"] = connection.pid
            inner = await asyncio.wait_for(connection.call("health", None, None), 10)
        except Exception as exc:  # noqa: BLE001 - health must answer
            return Health(HealthStatus.DOWN, f"{type(exc).__name__}: {exc}", details)
        if not isinstance(inner, Health):
            return Health(HealthStatus.DEGRADED, f"worker answered {inner!r}", details)
        status = inner.status
        message = inner.message
        if supervisor.total_crashes and status is HealthStatus.OK:
            status, message = HealthStatus.DEGRADED, f"restarted after: {supervisor.last_error}"
        return Health(status, message, {**inner.details, **details})

    async def aclose(self) -> None:
        """End every worker and every start or reap in progress, whichever event loops began them
        (or none): nothing of this executor runs after it."""
        with self._lock:
            self._closed = True
        self._stopping.set()  # a start waiting out the backoff ends at once
        while True:
            with self._lock:
                threads = list(self._threads)
            if not threads:
                break
            # a start or reap may have begun another reap: wait until none is left
            await asyncio.gather(*(asyncio.wrap_future(thread) for thread in threads), return_exceptions=True)
        with self._lock:
            connections = [slot.connection for slot in self._slots if slot.connection is not None]
            for slot in self._slots:
                slot.connection = None
        await asyncio.gather(*(connection.close() for connection in connections))
        self._pool.shutdown(wait=False)  # idle now: every worker its threads started has ended

    def kill_worker(self, index: int = 0) -> None:
        """Kill worker ``index`` now, as a crash would (for tests and operators)."""
        connection = self._slots[index].connection
        if connection is not None:
            connection.kill()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _body(request: Request, deadline: float | None) -> tuple[Any, ...]:
    """A ``run`` message's body: plain values, not the Request: its read-only mappings do not
    pickle, and the worker's edgecompute may be another release whose Request has other fields."""
    params, metadata = request.params, request.metadata
    return (request.algorithm, request.inputs, dict(params) if params else None, request.priority,
            dict(metadata) if metadata else None, request.id, deadline)


def by_reference(factory: Any) -> bytes | None:
    """The factory pickled by reference (a class or function the worker can import), else None:
    the worker then finds the executor through its own entry points."""
    if factory is None:
        return None
    try:
        data = pickle.dumps(factory)
    except Exception:  # noqa: BLE001 - an instance or a local function: use the entry points
        return None
    return data if len(data) < 1 << 20 else None
