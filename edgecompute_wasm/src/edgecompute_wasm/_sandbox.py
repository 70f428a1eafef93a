"""The wasmtime side: one engine, its epoch ticker, the linker, and sandbox instances.

Every request runs in a :class:`Sandbox` of its own: a fresh ``Store`` and instance, closed when it
ends, on a thread of its own or (a snapshot's sandbox) on the request's worker thread. WASI is
wasmtime's, with a few functions shadowed by host code here:

* ``fd_pread`` and ``fd_write`` on fd 0 are a private channel to the host (the request in, the
  answer out), so a pre-started interpreter can sit blocked on fd 0 until a request arrives. Only
  then are its limits armed (epoch deadline, fuel), from inside the host call, on the store's own
  thread. ``fd_pread`` on any other fd answers ENOTSUP (wasmtime's own cannot be called from a host
  function), so guests read files with ``read``, which stays wasmtime's.
* ``fd_write`` on fds 1 and 2 is captured into capped buffers; past the cap the guest is stopped.
  Other fds answer EBADF: no fd in here is writable (mounts are read-only, stdin is a file).
* ``poll_oneoff`` (sleeps) and ``clock_time_get`` are served here, so a guest that sleeps is still
  bound by its deadline (epochs only interrupt running wasm code, not a host call).

Host functions never raise (wasmtime-py keeps a raised exception in a process-global slot that
another thread could pick up): they return a WASI errno and, to stop the guest, set its epoch
deadline to now, so it traps at its next check.
"""

from __future__ import annotations

import ctypes
import math
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import wasmtime

from ._cache import engine_key
from ._caller import set_epoch_deadline, set_fuel

WASI = "wasi_snapshot_preview1"
ERRNO_SUCCESS = 0
ERRNO_BADF = 8
ERRNO_FAULT = 21
ERRNO_INVAL = 28
ERRNO_NOTSUP = 58

_IOVEC = struct.Struct("<II")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_SUB = struct.Struct("<QB7xIxxxxQQH")  # userdata, tag, clock id, timeout, precision, flags
_EVENT = struct.Struct("<QHB5xQH6x")  # userdata, error, type, nbytes, flags

_tls = threading.local()

STARTUP_SECONDS = 120.0  # deadline while an interpreter starts and waits for its request

__all__ = ["Engine", "Sandbox"]


class Engine:
    """One wasmtime engine with epoch interruption, optional fuel, and a ticker thread."""

    def __init__(self, *, fuel: bool, max_wasm_stack: int, tick: float, table_elements: int = 1_000_000,
                 tables: int = 4) -> None:
        config = wasmtime.Config()
        config.epoch_interruption = True
        config.consume_fuel = fuel
        config.max_wasm_stack = max_wasm_stack
        # No GC proposal: its heap and its reference types are more than the store limits below and
        # the host's export checks (_inspect) are made to bound. Shared memories (threads) stay off
        # too, as wasmtime's default: an atomic wait would block a sandbox thread past any deadline.
        config.wasm_gc = False
        config.shared_memory = False
        self.engine = wasmtime.Engine(config)
        self.fuel = fuel
        self.tick = tick
        self.table_elements = table_elements  # per table: each element takes 8-16 bytes of host memory
        self.tables = tables
        #: What in the engine's configuration changes compiled code (part of the cache key).
        self.key = engine_key(fuel=fuel, max_wasm_stack=max_wasm_stack)
        self.linker = wasmtime.Linker(self.engine)
        self.linker.define_wasi()
        self.linker.allow_shadowing = True
        i32, i64 = wasmtime.ValType.i32(), wasmtime.ValType.i64()
        io = wasmtime.FuncType([i32, i32, i32, i32], [i32])
        self.linker.define_func(WASI, "fd_pread", wasmtime.FuncType([i32, i32, i32, i64, i32], [i32]), _fd_pread,
                                access_caller=True)
        self.linker.define_func(WASI, "fd_write", io, _fd_write, access_caller=True)
        self.linker.define_func(WASI, "poll_oneoff", io, _poll_oneoff, access_caller=True)
        self.linker.define_func(WASI, "clock_time_get", wasmtime.FuncType([i32, i64, i32], [i32]), _clock_time_get,
                                access_caller=True)
        # plain WASI, nothing shadowed: only for trusted runs of our own code (stdlib precompiling)
        self.plain = wasmtime.Linker(self.engine)
        self.plain.define_wasi()
        self.live = 0  # sandboxes whose thread has not ended
        self._live_lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="edgecompute-wasm-epoch", daemon=True)
        self._ticker.start()

    def _tick(self) -> None:
        # after close() it keeps ticking while any sandbox still runs, so deadlines still fire
        engine, stop, tick = self.engine, self._stop, self.tick
        while not stop.wait(tick) or self.live:
            engine.increment_epoch()
            if stop.is_set():
                time.sleep(tick)

    def ticks(self, seconds: float) -> int:
        return max(1, math.ceil(seconds / self.tick)) + 1

    def close(self) -> None:
        self._stop.set()

    def join(self, timeout: float) -> None:
        """After :meth:`close`: wait until the ticker (and so every sandbox thread) has ended."""
        self._ticker.join(timeout)

    def ticking(self) -> bool:
        return self._ticker.is_alive()


class Outcome:
    """How a sandbox's run ended."""

    __slots__ = ("exit_code", "kind", "message", "trap_code")

    def __init__(self, kind: str, trap_code: Any = None, message: str = "", exit_code: int | None = None) -> None:
        self.kind = kind  # "exit", "trap", "error", "abandoned"
        self.trap_code = trap_code
        self.message = message
        self.exit_code = exit_code


class Sandbox:
    """One instance of one module in one fresh store, run on a thread of its own (:meth:`start`) or
    on the caller's (:meth:`run_here`: a snapshot's sandbox, its request given before it runs).

    ``python`` mode: the guest reads its request from fd 0 and writes a framed answer to fd 0; it
    may start (and block on fd 0) long before a request is handed to it with :meth:`give`.
    ``command`` mode: fd 0 reads ``stdin`` and writes to it fail; the limits are armed at once.
    ``call`` mode: an exported function is called with numeric arguments.
    """

    def __init__(self, engine: Engine, module: Any, *, argv: Sequence[str], mode: str,
                 mounts: Sequence[tuple[str, str]] = (), memory_bytes: int, output_bytes: int,
                 result_bytes: int = 0, export: str = "_start", args: Sequence[Any] = (),
                 env: Sequence[tuple[str, str]] = (), writable_mounts: Sequence[tuple[str, str]] = (),
                 slots: Sequence[tuple[int, bytes]] = ()) -> None:
        self.engine = engine
        self.module = module
        self.argv = list(argv)
        self.mode = mode
        self.mounts = list(mounts)
        self.writable_mounts = list(writable_mounts)  # only for trusted runs of our own code
        self.env = list(env)
        self.memory_bytes = memory_bytes
        self.output_bytes = output_bytes
        self.result_bytes = result_bytes
        self.export = export
        self.args = list(args)
        self.slots = list(slots)  # a snapshot's preopen prefix buffers: (address, guest path), written first
        self.started_at = time.monotonic()
        self.ready = threading.Event()  # python mode: blocked on fd 0, waiting for a request
        self.answered = threading.Event()  # a full answer came back, or the run ended
        self.ended = threading.Event()
        self._request = threading.Event()
        self.stdin = b""
        self._stdin_pos = 0
        self._armed = False
        self.timeout = 0.0
        self.fuel: int | None = None
        self.deadline: float | None = None  # monotonic, once armed
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.output_used = 0
        self.answer = bytearray()
        self.answer_len: int | None = None
        self.kill_reason: str | None = None
        self.outcome: Outcome | None = None
        self.result: Any = None
        self.t_wake = self.t_answer = 0.0
        self.memory_size = 0  # the guest's linear memory when it ended, in bytes
        self.stdin_path: str | None = None  # command mode: stdin comes from this file

    # -- host side ----------------------------------------------------------------------------------

    def start(self) -> Sandbox:
        """Run on a thread of its own (:meth:`run_here` runs on the caller's)."""
        threading.Thread(target=self._main, name="edgecompute-wasm-sandbox", daemon=True).start()
        return self

    @property
    def armed(self) -> bool:
        """Whether the guest took its request (its limits are armed): false for one that failed to start."""
        return self._armed

    def run_here(self) -> None:
        """Run on the calling thread instead of a thread of its own, until the guest ends (python
        mode: give the request first, so the guest does not wait for one)."""
        self._main()

    def give(self, stdin: bytes, timeout: float, fuel: int | None, *, output_bytes: int | None = None,
             result_bytes: int | None = None) -> None:
        """Hand the request over (python mode: wakes the guest blocked on fd 0)."""
        if output_bytes is not None:
            self.output_bytes = output_bytes
        if result_bytes is not None:
            self.result_bytes = result_bytes
        self.stdin = stdin
        self.timeout = timeout
        self.fuel = fuel
        self._request.set()

    def quit(self) -> None:
        """Let an idle pre-started guest end: it reads end-of-file on fd 0 and exits."""
        self.stdin = b""
        self.timeout = 1.0
        self.fuel = None
        self._request.set()

    # -- the sandbox thread -------------------------------------------------------------------------

    def _main(self) -> None:
        with self.engine._live_lock:
            self.engine.live += 1
        _tls.sandbox = self
        store = None
        instance = None
        engine = self.engine
        try:
            store = wasmtime.Store(engine.engine)
            # memory_size and table_elements bound each memory and each table: bounding their
            # numbers too bounds the whole store (one memory: memory_mb is the sandbox's total)
            store.set_limits(memory_size=self.memory_bytes, table_elements=engine.table_elements, instances=1,
                             tables=engine.tables, memories=1)
            if self.mode == "python":
                store.set_epoch_deadline(engine.ticks(STARTUP_SECONDS))
                if engine.fuel:
                    store.set_fuel(2**62)
            else:
                self._request.wait()
                store.set_epoch_deadline(engine.ticks(self.timeout))
                self.deadline = time.monotonic() + self.timeout
                if engine.fuel:
                    store.set_fuel(self.fuel if self.fuel is not None else 2**62)
                self._armed = True
            wasi = wasmtime.WasiConfig()
            wasi.argv = self.argv
            if self.stdin_path is not None:
                wasi.stdin_file = self.stdin_path
            if self.env:
                wasi.env = self.env
            for host, guest in self.mounts:
                wasi.preopen_dir(host, guest, False)
            for host, guest in self.writable_mounts:
                wasi.preopen_dir(host, guest, True)
            store.set_wasi(wasi)
            linker = engine.plain if self.writable_mounts else engine.linker
            instance = linker.instantiate(store, self.module)
            exports = instance.exports(store)
            if self.slots:
                slot_memory = exports["memory"]
                if not isinstance(slot_memory, wasmtime.Memory):
                    raise wasmtime.WasmtimeError("the snapshot exports no memory")
                for address, prefix in self.slots:
                    slot_memory.write(store, prefix, address)
            initialize = exports.get("_initialize")
            if self.mode == "call" and isinstance(initialize, wasmtime.Func):
                initialize(store)  # a WASI reactor sets itself up first
            func = exports[self.export]
            if not isinstance(func, wasmtime.Func):
                raise wasmtime.WasmtimeError(f"export {self.export!r} is not a function")
            self.result = func(store, *self.args)
            self.outcome = Outcome("exit", exit_code=0)
        except wasmtime.ExitTrap as exc:
            self.outcome = Outcome("exit", exit_code=exc.code)
        except wasmtime.Trap as exc:
            self.outcome = Outcome("trap", exc.trap_code, exc.message)
        except wasmtime.WasmtimeError as exc:
            self.outcome = Outcome("error", message=str(exc))
        except BaseException as exc:  # noqa: BLE001 - reported to the waiting request
            self.outcome = Outcome("error", message=f"{type(exc).__name__}: {exc}")
        finally:
            if store is not None:
                try:
                    if instance is not None:
                        memory = instance.exports(store).get("memory")
                        if isinstance(memory, wasmtime.Memory):
                            self.memory_size = memory.data_len(store)
                except Exception:  # noqa: BLE001 - only informative
                    pass
                store.close()
            _tls.sandbox = None
            with self.engine._live_lock:
                self.engine.live -= 1
            self.ended.set()
            self.ready.set()
            self.answered.set()

    # called from host functions, on the sandbox thread ----------------------------------------------

    def _arm(self, caller: Any) -> None:
        self._armed = True
        self.stdout.clear()  # what start-up printed is not the request's
        self.stderr.clear()
        self.output_used = 0
        set_epoch_deadline(caller, self.engine.ticks(self.timeout))
        self.deadline = time.monotonic() + self.timeout
        if self.engine.fuel:
            refused = set_fuel(caller, self.fuel if self.fuel is not None else 2**62)
            if refused is not None:  # a limit that could not be set ends the run, never is skipped
                self.kill(caller, f"the fuel limit could not be set: {refused}")

    def unstick(self, grace: float) -> bool:
        """After the deadline: wake a thread blocked in a host open() or read() of a FIFO under a
        mount (wasmtime's WASI blocks there, out of an epoch's reach), then wait ``grace`` seconds
        for it to end. True when the sandbox thread has ended."""
        if self.ended.wait(0):
            return True
        from ._paths import unstick_fifos

        folders = [host for host, _ in self.mounts]
        deadline = time.monotonic() + grace
        while not self.ended.is_set() and time.monotonic() < deadline:
            if folders:
                unstick_fifos(folders, 100_000)
            self.ended.wait(0.05)
        return self.ended.is_set()

    def kill(self, caller: Any, reason: str) -> None:
        if self.kill_reason is None:
            self.kill_reason = reason
        set_epoch_deadline(caller, 0)


# -- host functions ---------------------------------------------------------------------------------


def _memory(caller: Any) -> tuple[int, int] | None:
    memory = caller.get("memory")
    if not isinstance(memory, wasmtime.Memory):
        return None
    size = memory.data_len(caller)
    base = ctypes.addressof(memory.data_ptr(caller).contents) if size else 0
    return base, size


def _read(mem: tuple[int, int], offset: int, length: int) -> bytes | None:
    base, size = mem
    if offset < 0 or length < 0 or offset + length > size:
        return None
    return ctypes.string_at(base + offset, length)


def _write(mem: tuple[int, int], offset: int, data: bytes) -> bool:
    base, size = mem
    if offset < 0 or offset + len(data) > size:
        return False
    ctypes.memmove(base + offset, data, len(data))
    return True


def _iovecs(mem: tuple[int, int], iovs: int, count: int) -> list[tuple[int, int]] | None:
    if count < 0 or count > 1024:
        return None
    raw = _read(mem, iovs, 8 * count)
    if raw is None:
        return None
    return [_IOVEC.unpack_from(raw, 8 * i) for i in range(count)]


def _guard(fn: Callable[..., int]) -> Callable[..., int]:
    def wrapper(caller: Any, *args: int) -> int:
        try:
            return fn(caller, *args)
        except BaseException:  # noqa: BLE001 - a host function must never raise (see module doc)
            sandbox = getattr(_tls, "sandbox", None)
            if sandbox is not None:
                try:
                    sandbox.kill(caller, "host")
                except BaseException:  # noqa: BLE001
                    pass
            return ERRNO_FAULT

    wrapper.__name__ = fn.__name__
    return wrapper


@_guard
def _fd_pread(caller: Any, fd: int, iovs: int, iovs_len: int, offset: int, nread_ptr: int) -> int:
    sandbox: Sandbox | None = getattr(_tls, "sandbox", None)
    if sandbox is None or fd != 0 or sandbox.mode != "python":
        return ERRNO_NOTSUP
    if not sandbox._armed:
        sandbox.ready.set()
        sandbox._request.wait()
        sandbox.t_wake = time.perf_counter()
        sandbox._arm(caller)
    mem = _memory(caller)
    if mem is None:
        return ERRNO_FAULT
    vecs = _iovecs(mem, iovs, iovs_len)
    if vecs is None:
        return ERRNO_FAULT
    data, pos, total = sandbox.stdin, sandbox._stdin_pos, 0
    for buf, length in vecs:
        chunk = data[pos:pos + length]
        if not chunk:
            break
        if not _write(mem, buf, chunk):
            return ERRNO_FAULT
        pos += len(chunk)
        total += len(chunk)
    sandbox._stdin_pos = pos
    return ERRNO_SUCCESS if _write(mem, nread_ptr, _U32.pack(total)) else ERRNO_FAULT


@_guard
def _fd_write(caller: Any, fd: int, iovs: int, iovs_len: int, nwritten_ptr: int) -> int:
    sandbox: Sandbox | None = getattr(_tls, "sandbox", None)
    if sandbox is None:
        return ERRNO_BADF
    if fd > 2:
        return ERRNO_BADF
    mem = _memory(caller)
    if mem is None:
        return ERRNO_FAULT
    vecs = _iovecs(mem, iovs, iovs_len)
    if vecs is None:
        return ERRNO_FAULT
    # What the sink can still take, plus one byte to see that it overflows: iovecs may name the same
    # guest memory 1024 times over, so copying them all would make the host allocate 1024 times the
    # guest's memory cap.
    if fd == 0:
        if sandbox.mode != "python" or not sandbox._armed or sandbox.answered.is_set():
            return ERRNO_BADF
        room = 12 + sandbox.result_bytes - len(sandbox.answer) + 1
    elif sandbox.answered.is_set():
        room = 0
    else:
        room = sandbox.output_bytes - sandbox.output_used + 1
    parts, total, taken = [], 0, 0
    for buf, length in vecs:
        base, size = mem
        if buf < 0 or length < 0 or buf + length > size:
            return ERRNO_FAULT
        total += length
        want = min(length, max(room - taken, 0))
        if want:
            parts.append(ctypes.string_at(base + buf, want))
            taken += want
    data = b"".join(parts)
    if fd == 0:
        sandbox.answer += data
        if sandbox.answer_len is None and len(sandbox.answer) >= 12:
            try:
                sandbox.answer_len = int(sandbox.answer[:12])
            except ValueError:
                sandbox.answer_len = -1
        if sandbox.answer_len is not None:
            if sandbox.answer_len < 0 or sandbox.answer_len > sandbox.result_bytes:
                sandbox.kill(caller, "result")
                sandbox.answered.set()
            elif len(sandbox.answer) >= 12 + sandbox.answer_len:
                sandbox.t_answer = time.perf_counter()
                sandbox.kill(caller, "answered")
                sandbox.answered.set()
    elif sandbox.answered.is_set():
        pass  # the request is over; what the guest prints now goes nowhere
    else:
        room = sandbox.output_bytes - sandbox.output_used
        target = sandbox.stdout if fd == 1 else sandbox.stderr
        target += data[:max(room, 0)]
        sandbox.output_used += total
        if total > room:
            sandbox.kill(caller, "output")
    return ERRNO_SUCCESS if _write(mem, nwritten_ptr, _U32.pack(total & 0xFFFFFFFF)) else ERRNO_FAULT


@_guard
def _clock_time_get(caller: Any, clock_id: int, precision: int, time_ptr: int) -> int:
    if clock_id == 0:
        now = time.time_ns()
    elif clock_id in (1, 2, 3):
        now = time.monotonic_ns()
    else:
        return ERRNO_INVAL
    mem = _memory(caller)
    if mem is None:
        return ERRNO_FAULT
    return ERRNO_SUCCESS if _write(mem, time_ptr, _U64.pack(now)) else ERRNO_FAULT


@_guard
def _poll_oneoff(caller: Any, subs: int, events: int, nsubs: int, nevents_ptr: int) -> int:
    """Clock subscriptions only (there is nothing else to wait for here): sleep, bounded by the
    deadline; a guest still asleep at its deadline is stopped."""
    sandbox: Sandbox | None = getattr(_tls, "sandbox", None)
    mem = _memory(caller)
    if sandbox is None or mem is None:
        return ERRNO_FAULT
    if nsubs <= 0 or nsubs > 64:
        return ERRNO_INVAL
    raw = _read(mem, subs, 48 * nsubs)
    if raw is None:
        return ERRNO_FAULT
    now_mono, now_real = time.monotonic_ns(), time.time_ns()
    waits = []
    for i in range(nsubs):
        userdata, tag, clock_id, timeout, _precision, flags = _SUB.unpack_from(raw, 48 * i)
        if tag != 0:
            return ERRNO_NOTSUP  # fd readiness: no sockets or pipes exist in here
        if flags & 1:  # absolute time on that clock
            now = now_real if clock_id == 0 else now_mono
            wait_ns = max(0, timeout - now)
        else:
            wait_ns = timeout
        waits.append((wait_ns, userdata))
    wait_ns, userdata = min(waits)
    seconds = wait_ns / 1e9
    if sandbox.deadline is not None:
        left = sandbox.deadline - time.monotonic()
        if seconds >= left:
            if left > 0:
                time.sleep(left)
            sandbox.kill(caller, "timeout")
            seconds = 0.0
    if seconds > 0:
        time.sleep(seconds)
    event = _EVENT.pack(userdata, 0, 0, 0, 0)
    if not _write(mem, events, event) or not _write(mem, nevents_ptr, _U32.pack(1)):
        return ERRNO_FAULT
    return ERRNO_SUCCESS
