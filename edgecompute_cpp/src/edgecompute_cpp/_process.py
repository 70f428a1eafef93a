"""``process`` isolation, host side: a pool of worker processes, arrays through shared memory.

Each worker owns an arena: a file in ``/dev/shm`` mapped by the host and the worker and unlinked
once both have mapped it (so nothing is left behind, even after a crash). The host copies inputs
into it, the worker runs the plugin on views of them and copies the outputs in after the inputs,
and the host copies them out. Inputs that the caller made in shared memory (``_shared``,
:meth:`CppExecutor.empty`) are not copied: the worker maps their segment. Large outputs go to a
shared block that the host reserved, and come back as arrays over it. Messages are small
pickled tuples, one per ``SOCK_SEQPACKET`` packet (see ``_worker``): a call costs one ``send``
and one ``recv`` on each side. A worker that dies (segfault, abort, kill) fails only the call it
was running; the next call starts a fresh worker. A call past its deadline kills its worker.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import pickle
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from edgecompute.errors import (
    ExecutorCrashed,
    ExecutorError,
    InvalidRequest,
    PluginError,
    TaskCancelled,
    TaskTimeout,
)

from . import ABI_VERSION, MIN_ABI_VERSION
from ._shared import Reservation, SharedHeap
from ._worker import MAX_MESSAGE, align, new_arena_file
from .errors import PluginABIError, PluginCallError

__all__ = ["Ticket", "Worker", "WorkerPool"]

_START_TIMEOUT = 60.0
_MIN_ARENA = 8 << 20


def _new_arena(size: int) -> tuple[str, mmap.mmap]:
    try:
        path = new_arena_file(size)
    except OSError as exc:
        raise ExecutorError(f"cannot start a cpp worker: {exc}") from exc
    return path, _map(path)


def _map(path: str) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR)
    try:
        return mmap.mmap(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


#: Inputs up to this size are copied into the arena on the event loop (~0.3 ms here); larger ones
#: on a worker thread, so that the loop never stalls for long.
_LOOP_COPY_MAX = 4 << 20
#: Params larger than this travel in the arena, not in the message (which must fit one packet).
_INLINE_PARAMS = 16 << 10
#: A call whose round trip is shorter than this waits in recv even while other tasks run: the
#: selector would cost the loop about as much as the call takes (~100 us on the development VM),
#: and the loop, not the workers, is what limits a burst of such calls.
_TINY_ROUND_TRIP = 150e-6
#: Outputs expected to total at least this come back in a shared block, as arrays over it; smaller
#: ones are copied out of the arena (cheaper than a block whose release waits for the arrays).
_SHARED_OUTPUTS_MIN = 64 << 10


def _signal_name(returncode: int | None) -> str:
    if returncode is None:
        return "unknown status"
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit status {returncode}"


def _settle(future: asyncio.Future[bool], value: bool) -> None:
    if not future.done():
        future.set_result(value)


class WorkerGone(ExecutorCrashed):
    """The worker had died (killed while idle) before a call reached it: nothing ran, so the pool
    hands the call to a fresh worker. Found when sending fails, which spares each call a check."""


class Ticket:
    """One call in flight; the event loop cancels it by killing the worker running it."""

    __slots__ = ("_lock", "cancelled", "worker")

    def __init__(self) -> None:
        self.cancelled = False
        self.worker: Worker | None = None
        self._lock = threading.Lock()

    def cancel(self) -> None:
        # under the lock: the worker cannot be handed to another call while we kill it
        with self._lock:
            self.cancelled = True
            worker = self.worker
            if worker is not None:
                worker.kill()

    def assign(self, worker: Worker | None) -> None:
        with self._lock:
            self.worker = worker


class Worker:
    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None
        self.map: mmap.mmap | None = None
        self.size = 0
        self.calls = 0
        self.starts = 0
        self.crashes = 0
        self.last_exit: str | None = None
        self._stderr: Any = None
        #: shared segments this process has mapped, as of the heap's generation
        self.mapped: set[int] = set()
        self.generation = 0

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def state(self) -> dict[str, Any]:
        return {"index": self.index, "pid": self.pid if self.alive else None,
                "state": "running" if self.alive else "stopped", "calls": self.calls, "starts": self.starts,
                "crashes": self.crashes, "last_exit": self.last_exit, "arena_mb": round(self.size / 2**20, 1)}

    def start(self, arena_size: int) -> None:
        self.stop()
        path, arena = _new_arena(max(arena_size, _MIN_ARENA))
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the worker
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edgecompute_cpp._worker", str(child.fileno()), path],
                pass_fds=[child.fileno()], stdin=subprocess.DEVNULL, stdout=self._stderr, stderr=self._stderr,
            )
        except OSError as exc:
            os.unlink(path)
            raise ExecutorCrashed(f"cannot start a cpp worker process: {exc}") from exc
        finally:
            child.close()
        self.sock = parent
        self.map, self.size = arena, arena.size()
        self.mapped = set()
        self.starts += 1
        try:
            if not select.select([parent], [], [], _START_TIMEOUT)[0]:
                raise ExecutorCrashed(f"cpp worker {self.index} did not start within {_START_TIMEOUT:g} s")
            self._recv()
        except (EOFError, OSError) as exc:
            raise self.crashed("while starting") from exc
        finally:
            os.unlink(path)  # both processes have it mapped (or the worker is gone)

    def ensure_arena(self, needed: int) -> None:
        if needed <= self.size:
            return
        size = max(align(needed * 2), self.size * 2)
        path, arena = _new_arena(size)
        try:
            self.request(("arena", path), None)
        finally:
            os.unlink(path)
        self.adopt(arena)

    def adopt(self, arena: mmap.mmap) -> None:
        old, self.map, self.size = self.map, arena, arena.size()
        if old is not None:
            try:
                old.close()
            except BufferError:
                pass  # a view is still alive; the mapping goes with it

    def share(self, heap: SharedHeap, needed: list[int]) -> None:
        """Make the worker map the segments ``needed`` and unmap those the heap gave back."""
        sock = self.sock
        assert sock is not None
        heap.collect()  # segments emptied since the last call are given back, and forgotten below
        try:
            if self.generation != heap.generation:
                gone = [ident for ident in self.mapped if ident not in heap.segments]
                if gone:
                    sock.send(pickle.dumps(("forget", gone), pickle.HIGHEST_PROTOCOL))
                    self.mapped.difference_update(gone)
                self.generation = heap.generation
            new = [heap.segments[ident] for ident in dict.fromkeys(needed) if ident not in self.mapped]
            if new:
                sock.send(pickle.dumps(("segments", [(s.id, s.size) for s in new]), pickle.HIGHEST_PROTOCOL))
                socket.send_fds(sock, [b"fds"], [s.fd for s in new])
                self.mapped.update(s.id for s in new)
        except OSError as exc:
            raise self.gone() from exc

    def _recv(self) -> Any:
        sock = self.sock
        assert sock is not None
        packet = sock.recv(MAX_MESSAGE)
        if not packet:
            raise EOFError
        return pickle.loads(packet)

    def request(self, message: tuple[Any, ...], deadline: float | None, what: str = "") -> Any:
        sock = self.sock
        assert sock is not None
        try:
            sock.send(pickle.dumps(message, pickle.HIGHEST_PROTOCOL))
        except OSError as exc:
            raise self.gone() from exc
        try:
            expired = False
            if deadline is not None:
                left = deadline - time.monotonic()
                expired = left <= 0 or not select.select([sock], [], [], left)[0]
            if not expired:
                return self._recv()
        except (EOFError, OSError) as exc:
            raise self.crashed(what) from exc
        pid = self.pid
        self.stop()
        self.last_exit = "killed: deadline passed"
        # TaskTimeout is an OSError (via TimeoutError): raised outside the handler above on purpose
        raise TaskTimeout(f"cpp worker {self.index} (pid {pid}) was killed: {what} passed its deadline")

    async def arequest(self, message: tuple[Any, ...], deadline: float | None, what: str = "") -> Any:
        """:meth:`request` from the event loop: waits for the reply as the loop waits for any
        socket. A worker that dies or passes the deadline is handled on a thread (it may take a
        moment to reap)."""
        sock = self.sock
        assert sock is not None
        loop = asyncio.get_running_loop()
        try:
            sock.send(pickle.dumps(message, pickle.HIGHEST_PROTOCOL))
        except OSError as exc:
            raise await asyncio.to_thread(self.gone) from exc
        ready: asyncio.Future[bool] = loop.create_future()
        fd = sock.fileno()
        loop.add_reader(fd, _settle, ready, True)
        timer = None
        if deadline is not None:
            timer = loop.call_later(max(0.0, deadline - time.monotonic()), _settle, ready, False)
        try:
            answered = await ready
        finally:
            loop.remove_reader(fd)
            if timer is not None:
                timer.cancel()
        if answered:
            try:
                return self._recv()
            except (EOFError, OSError) as exc:
                raise await asyncio.to_thread(self.crashed, what) from exc
        pid = self.pid
        await asyncio.to_thread(self.stop)
        self.last_exit = "killed: deadline passed"
        raise TaskTimeout(f"cpp worker {self.index} (pid {pid}) was killed: {what} passed its deadline")

    def crashed(self, what: str) -> ExecutorCrashed:
        proc = self.proc
        status = None
        if proc is not None:
            try:
                status = proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                status = proc.wait()
        self.crashes += 1
        self.last_exit = _signal_name(status)
        tail = ""
        if self._stderr is not None:
            try:
                self._stderr.seek(0, os.SEEK_END)
                end = self._stderr.tell()
                self._stderr.seek(max(0, end - 2000))
                tail = self._stderr.read().decode("utf-8", "replace").strip()
            except OSError:
                pass
        pid = proc.pid if proc is not None else "?"
        message = f"cpp worker {self.index} (pid {pid}) died with {self.last_exit}" + (f" while {what}" if what else "")
        if tail:
            message += f"; its last output:\n{tail}"
        self.stop()
        return ExecutorCrashed(message)

    def gone(self) -> WorkerGone:
        return WorkerGone(str(self.crashed("idle")))

    def kill(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                proc.kill()
            except OSError:
                pass

    def stop(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.proc is not None:
            self.kill()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            self.proc = None
        if self.map is not None:
            try:
                self.map.close()
            except BufferError:
                pass  # a view is still alive; the mapping goes with it
            self.map = None
            self.size = 0
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None


class WorkerPool:
    def __init__(self, size: int, wait_below_us: float = 0.0) -> None:
        self.size = size
        #: calls from the event loop whose last round trip took less than this block the loop
        #: until their reply instead of waiting through its selector (see acall)
        self.wait_below_s = wait_below_us / 1e6
        self._round_trip: dict[str, float] = {}
        self._workers: list[Worker] = []
        self._idle: list[Worker] = []
        self._cond = threading.Condition()
        self._waiting = 0  # threads waiting in _checkout
        self._starting = 0  # workers being started in the background (see _start_the_others)
        self._others_started = False
        self._closed = False
        self._output_hint: dict[str, int] = {}
        #: the arrays of :meth:`empty`, made on first use
        self.heap: SharedHeap | None = None

    def empty(self, shape: Any, dtype: Any) -> np.ndarray:
        return self._heap().empty(shape, dtype)

    def shared_memory(self) -> dict[str, float]:
        """The shared segments' size and the part of it that arrays (inputs, outputs) hold."""
        heap = self.heap
        return {"segments": 0, "mapped_mb": 0.0, "in_use_mb": 0.0} if heap is None else heap.usage()

    def _heap(self) -> SharedHeap:
        heap = self.heap
        if heap is None:
            with self._cond:
                if self.heap is None:
                    self.heap = SharedHeap()
                heap = self.heap
        return heap

    def states(self) -> list[dict[str, Any]]:
        return [w.state() for w in self._workers]

    def _checkout(self) -> Worker:
        with self._cond:
            while True:
                if self._closed:
                    raise ExecutorCrashed("the cpp executor is closed", retryable=False)
                if self._idle:
                    return self._idle.pop()
                if len(self._workers) + self._starting < self.size:
                    worker = Worker(len(self._workers) + self._starting)
                    self._workers.append(worker)
                    return worker
                self._waiting += 1
                try:
                    self._cond.wait()
                finally:
                    self._waiting -= 1

    def _try_checkout(self) -> Worker | None:
        """An idle worker that is running, or None (never waits, never starts one)."""
        with self._cond:
            if self._closed:
                raise ExecutorCrashed("the cpp executor is closed", retryable=False)
            # a thread waiting for a worker goes first: the loop's calls would otherwise take
            # every worker that comes back, and starve it for as long as they keep coming
            if self._idle and self._idle[-1].sock is not None and not self._waiting:
                return self._idle.pop()
            return None

    def _checkin(self, worker: Worker) -> None:
        with self._cond:
            self._idle.append(worker)
            self._cond.notify()

    def _start(self, worker: Worker) -> None:
        """Start a checked-out worker; the first start also starts the pool's other workers."""
        worker.start(_MIN_ARENA)
        if not self._others_started:
            self._others_started = True
            if self.size > 1:
                threading.Thread(target=self._start_the_others, name="edgecompute-cpp-workers", daemon=True).start()

    def _is_closed(self) -> bool:
        return self._closed

    def _start_the_others(self) -> None:
        """Start the workers not made yet, one after the other, off the calls' path: the calls
        of a first burst would otherwise each wait for a worker to start (~0.1-0.3 s)."""
        while True:
            with self._cond:
                if self._closed or len(self._workers) + self._starting >= self.size:
                    return
                worker = Worker(len(self._workers) + self._starting)
                self._starting += 1
            try:
                worker.start(_MIN_ARENA)
            except Exception:  # noqa: BLE001 - nobody to tell here: the call that takes it
                worker.stop()  # starts it again, and reports why it cannot start
            with self._cond:
                self._starting -= 1
                if not self._is_closed():  # (a call: mypy keeps the narrowing above)
                    self._workers.append(worker)
                    self._idle.insert(0, worker)  # under the idle ones: those are warm
                    self._cond.notify()
                    continue
            worker.stop()  # the pool closed while it started
            return

    def describe(self, path: str, label: str) -> dict[str, Any]:
        worker = self._checkout()
        try:
            if not worker.alive:
                self._start(worker)
            try:
                reply = worker.request(("describe", path), time.monotonic() + _START_TIMEOUT, f"loading {label}")
            except (ExecutorCrashed, TaskTimeout) as exc:
                raise PluginError(label, f"loading it crashed its worker process: {exc}") from exc
        finally:
            self._checkin(worker)
        if reply[0] == "ok":
            return reply[1]  # type: ignore[no-any-return]
        if reply[1] == "PluginABIError":
            raise PluginABIError(label, int(reply[3]), (MIN_ABI_VERSION, ABI_VERSION))
        raise PluginError(label, reply[2])

    def call(self, ticket: Ticket | None, path: str, qualified: str, algorithm: str, params: bytes,
             inputs: Sequence[tuple[bytes | None, np.ndarray]], deadline: float | None) -> list[tuple[str, np.ndarray]]:
        """Run one call on a worker, blocking this thread (starting or growing the worker as needed).
        ``ticket`` lets another thread cancel it; None when nobody can."""
        if ticket is None:
            ticket = Ticket()
        worker = self._checkout()
        try:
            ticket.assign(worker)
            if ticket.cancelled:
                raise TaskCancelled(f"{qualified} was cancelled")
            for attempt in (1, 2):
                if worker.sock is None:
                    self._start(worker)
                try:
                    prepared = self._prepare(worker, path, qualified, algorithm, params, inputs, grow=True)
                    assert prepared is not None
                    reply = worker.request(prepared[0], deadline, f"running {qualified}")
                except WorkerGone:
                    if attempt == 2:
                        raise
                    continue  # it died while idle; the call never reached it: a fresh one runs it
                return self._finish(worker, qualified, reply, prepared[1])
            raise AssertionError("unreachable")
        except ExecutorCrashed as exc:
            if ticket.cancelled:
                raise TaskCancelled(f"{qualified} was cancelled; its worker was killed") from exc
            raise
        finally:
            ticket.assign(None)
            self._checkin(worker)

    async def acall(self, path: str, qualified: str, algorithm: str, params: bytes,
                    inputs: Sequence[tuple[bytes | None, np.ndarray]],
                    deadline: float | None, *, alone: bool = True) -> list[tuple[str, np.ndarray]] | None:
        """The same call from the event loop, with no thread hop: the loop copies the inputs in,
        sends the message and waits for the reply.

        A call whose last round trip took less than ``wait_below_s`` waits in ``recv``, blocking
        the loop as a short in-process call does: registering the socket with the loop, one loop
        iteration and unregistering cost more than such a call (~100 us on the development VM).
        Only when it is ``alone`` (no other task running) or tiny though: with others, the loop
        would stall them, and the calls of a burst would run one at a time instead of on every
        worker.
        Others wait as the loop waits for any socket, and can be cancelled meanwhile.

        Answers None, having done nothing, when this cannot be quick: no idle worker running,
        inputs too large to copy on the loop, or an arena to grow. The caller then takes the
        thread path (:meth:`call`). A cancelled call kills its worker, as there.
        """
        size = 0
        for _, array in inputs:
            size += array.nbytes
        if size > _LOOP_COPY_MAX:
            return None
        worker = self._try_checkout()
        if worker is None:
            return None
        try:
            what = f"running {qualified}"
            start = time.perf_counter()
            try:
                prepared = self._prepare(worker, path, qualified, algorithm, params, inputs, grow=False)
                if prepared is None:
                    return None
                round_trip = self._round_trip.get(qualified, 1.0)
                if round_trip < self.wait_below_s and (alone or round_trip < _TINY_ROUND_TRIP):
                    reply = worker.request(prepared[0], deadline, what)
                else:
                    reply = await worker.arequest(prepared[0], deadline, what)
            except WorkerGone:
                return None  # it died while idle; the thread path starts a fresh one
            self._round_trip[qualified] = time.perf_counter() - start
            return self._finish(worker, qualified, reply, prepared[1])
        except asyncio.CancelledError:
            worker.stop()  # it may be running our call still: the next call starts a fresh one
            worker.last_exit = "killed: its task was cancelled"
            raise
        finally:
            self._checkin(worker)

    def _prepare(self, worker: Worker, path: str, qualified: str, algorithm: str, params: bytes,
                 inputs: Sequence[tuple[bytes | None, np.ndarray]], *,
                 grow: bool) -> tuple[tuple[Any, ...], Reservation | None] | None:
        """Copy the inputs (and large params) into the worker's arena: the message that runs the
        call, and the block reserved for its outputs if they are expected to be large."""
        specs: list[tuple[Any, ...]] = []
        offset = 0
        heap = self.heap
        shared: list[int] = []
        for name, array in inputs:
            where = heap.locate(array) if heap is not None and array.base is not None else None
            if where is None:
                specs.append((name, array.dtype.str, array.shape, offset, None))
                offset = align(offset + array.nbytes)
            else:
                specs.append((name, array.dtype.str, array.shape, where[1], where[0]))
                shared.append(where[0])
        sent_params: bytes | tuple[int, int] = params
        if len(params) > _INLINE_PARAMS:
            sent_params, offset = (offset, len(params)), align(offset + len(params))
        hint = self._output_hint.get(qualified, 0)
        shared_outputs = hint >= _SHARED_OUTPUTS_MIN
        # room for the outputs too, unless they go to a shared block (the worker grows the arena
        # itself for outputs that fit neither)
        needed = offset + (1 << 16 if shared_outputs else max(hint, 1 << 16))
        if needed > worker.size:
            if not grow:
                return None
            worker.ensure_arena(needed)
        reservation = None
        out_block = None
        if shared_outputs:
            heap = self._heap()
            reservation = heap.reserve(hint)
            out_block = (reservation.segment.id, reservation.offset, reservation.size)
            shared.append(reservation.segment.id)
        if heap is not None:
            worker.share(heap, shared)
        arena = worker.map
        assert arena is not None
        for (_, array), spec in zip(inputs, specs, strict=True):
            if array.nbytes and spec[4] is None:
                arena[spec[3]:spec[3] + array.nbytes] = array.data.cast("B") if array.ndim else array.tobytes()
        if type(sent_params) is tuple:
            arena[sent_params[0]:sent_params[0] + len(params)] = params
        worker.calls += 1
        return ("call", path, algorithm, sent_params, specs, offset, out_block), reservation

    def _finish(self, worker: Worker, qualified: str, reply: Any,
                reservation: Reservation | None) -> list[tuple[str, np.ndarray]]:
        """The outputs of a reply: arrays over the reserved block, or copied out of the arena."""
        if reply[0] != "ok":
            kind, message = reply[1], reply[2]
            if kind == "invalid":
                raise InvalidRequest(message)
            raise PluginCallError(message, 3)
        if reply[2] is not None:  # the outputs did not fit: the worker made a larger arena
            try:
                worker.adopt(_map(reply[2]))
            finally:
                os.unlink(reply[2])
        arena = worker.map
        assert arena is not None
        outputs = []
        total = 0
        for name, dtype, shape, start, in_block in reply[1]:
            if in_block:
                assert reservation is not None
                array = SharedHeap.view(reservation, start, shape, dtype)
            else:
                array = np.ndarray(shape, dtype, arena, start).copy()
            total += align(array.nbytes)
            outputs.append((name, array))
        self._output_hint[qualified] = total  # as the worker lays them out
        return outputs

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for worker in self._workers:
            worker.stop()
        if self.heap is not None:
            self.heap.close()
