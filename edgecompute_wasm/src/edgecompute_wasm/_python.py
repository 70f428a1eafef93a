"""``wasm/python``: user Python source run by CPython 3.12 for WASI, one fresh sandbox a request.

Start-up (40-60 ms of CPython initialisation) is not paid per request. By default every sandbox is a
fresh instance of the snapshot of a booted interpreter (``_snapshot``): instantiated from a
copy-on-write memory image in well under a millisecond, it runs on the request's own worker thread
with its request already given, and a watchdog thread wakes one blocked past its deadline where no
epoch reaches it. Where the snapshot cannot serve a request (switched off, a memory cap below its
memory, more mounts than its slots), a pool of pre-started interpreters hides the boot while traffic
leaves it time to refill: each is a fresh store and instance that has initialised CPython, run the
bootstrap below, and blocked reading its request from fd 0. Either way the instance is thrown away
after its one request: two requests never share a store or a memory.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Sequence
from typing import Any, TypedDict

from edgecompute.errors import ExecutorError

from . import _codec, _stdlib
from ._sandbox import Engine, Sandbox
from ._snapshot import RUN_EXPORT, Snapshot
from .errors import (
    GuestError,
    SandboxCrashed,
    SandboxFuelExhausted,
    SandboxMemoryExceeded,
    SandboxOutputExceeded,
    SandboxStackOverflow,
    SandboxTimeout,
)
from .settings import Limits

log = logging.getLogger("edgecompute_wasm.python")

__all__ = ["BOOTSTRAP", "BOOT_MODULE", "UNSTICK_GRACE", "PythonResult", "PythonRunner"]

UNSTICK_GRACE = 2.0  # seconds a sandbox past its deadline (+2 s) is given to end once woken

# The guest's side: module ``_edgecompute_boot``, whose ``main(preload)`` runs in every interpreter.
# Only built-in modules at start-up (builtins, marshal, os, sys): every stdlib import costs
# milliseconds of a fresh interpreter. fd 0 is the host's channel. Compiling this text costs a fresh
# interpreter 5-7 ms, so it is compiled once per cache folder, by the trusted run that precompiles
# the stdlib, into ``/.stdlib/_edgecompute_boot.pyc``; a sandbox then starts with
# ``python -S -s -P -c "__import__('_edgecompute_boot').main(PRELOAD)"``. Without that folder it is
# sent as source: ``python -S -I -c "BOOTSTRAP\nmain(PRELOAD)"``.
BOOT_MODULE = "_edgecompute_boot"
BOOTSTRAP = r'''
import builtins, os, sys, marshal
def prepare(preload):
    sys.modules.pop("_edgecompute_boot", None)  # guest code finds no trace of it in sys.modules
    os.environ.clear()  # PYTHONPATH was for start-up only: guests see no environment
    package = sys.modules.get("encodings")
    if package is not None and list(package.__path__) == ["/.stdlib/encodings"]:
        # the precompiled stdlib (_stdlib.ENCODINGS) holds the common codecs only; the others come
        # from the runtime's own archive, on first use
        package.__path__.extend([folder + "/encodings" for folder in sys.path[1:]])
    for name in preload:
        __import__(name)
def main(preload):
    prepare(preload)
    serve()
def serve():
    pread, write, exit_ = os.pread, os.write, os._exit
    random = sys.modules.get("random")
    if random is not None:
        random.seed()  # a snapshot's generator state is the same in every restore: reseed from the host
    def take(n):
        parts = []
        while n > 0:
            chunk = pread(0, n, 0)
            if not chunk:
                exit_(0)
            parts.append(chunk)
            n -= len(chunk)
        return b"".join(parts)
    def send(data):
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        data = b"%012d" % len(data) + data
        while data:
            data = data[write(0, data):]
        exit_(0)
    def answer(value):
        try:
            data = marshal.dumps(value, 2)
        except BaseException as exc:
            data = marshal.dumps(("unserializable", type(exc).__name__, str(exc)[:1000], ""), 2)
        send(data)
    source, function, inputs, paths = marshal.loads(take(int(take(12))))
    sys.path[:0] = paths
    del take
    try:
        scope = {"__name__": "__main__", "__builtins__": builtins}
        # exec and map call from C: guest code runs in interpreter loops entered after the
        # request's deadline was armed (wasm code caches its epoch deadline on function entry).
        # exec(str), not compile(): compile() first sets up the ast module's ~120 classes, which
        # costs a fresh interpreter ~15 ms; exec compiles straight from the parser's tree.
        exec(source, scope)
        fn = scope.get(function)
        if not callable(fn):
            raise NameError(f"the source defines no function {function!r}")
        result = next(map(fn, (inputs,)))
    except BaseException as exc:
        try:
            kind, message = type(exc).__name__, str(exc)[:10000]
        except BaseException:
            kind, message = "BaseException", ""
        text = ""
        try:
            import linecache, traceback
            linecache.cache["<string>"] = (len(source), None, source.splitlines(True), "<string>")
            tb = exc.__traceback__
            text = "".join(traceback.format_exception(type(exc), exc, tb.tb_next if tb is not None else None))
            text = text.replace('File "<string>", line', 'File "<guest>", line')
        except BaseException:
            pass
        answer(("error", kind, message, text[-20000:]))
    try:
        data = marshal.dumps(("ok", result), 2)
    except BaseException as exc:
        answer(("unserializable", type(result).__name__, str(exc)[:1000], ""))
    send(data)
'''


class Captured(TypedDict):
    """What the guest printed, attached to the error raised for its request."""

    stdout: str
    stderr: str


class PythonResult:
    __slots__ = ("run", "startup", "stderr", "stdout", "value")

    def __init__(self, value: Any, stdout: str, stderr: str, startup: float, run: float) -> None:
        self.value = value
        self.stdout = stdout
        self.stderr = stderr
        self.startup = startup
        self.run = run


class _Pool:
    __slots__ = ("idle", "key", "primed", "size", "starting", "waiting")

    def __init__(self, key: tuple[Any, ...], size: int) -> None:
        self.key = key
        self.idle: collections.deque[Sandbox] = collections.deque()
        self.starting = 0
        self.size = size
        self.waiting = 0
        self.primed = False  # refilled only once its first request is done: that one must not compete


class _Watchdog:
    """One thread for every sandbox run on its caller's thread: one still running 2 s after its
    deadline is blocked where no epoch reaches it, and is woken (:meth:`Sandbox.unstick`)."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._heap: list[tuple[float, int]] = []
        self._live: dict[int, Sandbox] = {}
        self._count = 0
        self._closed = False
        self._thread: threading.Thread | None = None

    def watch(self, sandbox: Sandbox, at: float) -> int:
        import heapq

        with self._lock:
            self._count += 1
            token = self._count
            self._live[token] = sandbox
            heapq.heappush(self._heap, (at, token))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="edgecompute-wasm-watchdog", daemon=True)
                self._thread.start()
            elif self._heap[0][1] == token:
                self._lock.notify()
        return token

    def done(self, token: int) -> None:
        with self._lock:
            self._live.pop(token, None)
            if self._closed and not self._live:
                self._lock.notify()  # the last one after close(): the thread ends now, not at its deadline

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify()

    def join(self, timeout: float) -> bool:
        """After :meth:`close`: wait for the thread; True when it has ended (or never started)."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            return not thread.is_alive()
        return True

    def _loop(self) -> None:
        import heapq
        import time

        while True:
            with self._lock:
                while True:
                    while self._heap and self._heap[0][1] not in self._live:
                        heapq.heappop(self._heap)  # done in time
                    if self._closed and not self._live:
                        self._thread = None
                        return
                    now = time.monotonic()
                    if self._heap and self._heap[0][0] <= now:
                        _, token = heapq.heappop(self._heap)
                        sandbox = self._live.get(token)
                        break
                    self._lock.wait(self._heap[0][0] - now if self._heap else None)
            if sandbox is not None and not sandbox.ended.is_set():
                sandbox.kill_reason = sandbox.kill_reason or "timeout"
                sandbox.unstick(UNSTICK_GRACE)


class PythonRunner:
    """Runs ``wasm/python`` requests, keeping pools of pre-started interpreters.

    A pool is kept per sandbox shape (memory cap, mounts), since both are fixed when a store is
    made; at most ``MAX_SHAPES`` shapes are kept warm, the least recently used is let go.
    """

    MAX_SHAPES = 4

    def __init__(self, engine: Engine, module: Any, *, pool_size: int, prestart: bool,
                 preload: Sequence[str] = (), stdlib: str | None = None,
                 max_request_bytes: int = 16 * 2**20, snapshot: Snapshot | None = None) -> None:
        self.engine = engine
        self.max_request_bytes = max_request_bytes  # the encoded (source, function, inputs, paths)
        # the booting runtime: a module, or a function that loads it (with a snapshot, only a request
        # the snapshot cannot serve needs it, so a new process does not map it before then)
        self._module = module
        self._module_lock = threading.Lock()
        self.snapshot = snapshot
        self.stdlib = stdlib
        self.pool_size = pool_size
        self.prestart = prestart and pool_size > 0
        preload = tuple(preload)
        # -S: no site; -s: no user site; -P: no script folder on sys.path. Not -I/-E: PYTHONPATH puts
        # the precompiled stdlib (and the precompiled bootstrap) first; the environment is cleared
        # again before guest code runs.
        if stdlib:
            self.argv = ["python", "-S", "-s", "-P", "-c", f"__import__({BOOT_MODULE!r}).main({preload!r})"]
        else:
            self.argv = ["python", "-S", "-I", "-c", f"{BOOTSTRAP}main({preload!r})\n"]
        self.env = [("PYTHONPATH", _stdlib.GUEST_PATH)] if stdlib else []
        self.base_mounts = [(stdlib, _stdlib.GUEST_PATH)] if stdlib else []
        self._pools: collections.OrderedDict[tuple[Any, ...], _Pool] = collections.OrderedDict()
        self._lock = threading.Condition()
        self._closed = False
        self._refiller: threading.Thread | None = None
        self._watchdog = _Watchdog()
        self.cold_starts = 0
        self.warm_starts = 0
        self.snapshot_starts = 0
        self._inflight = 0  # requests between taking an interpreter and their answer

    @property
    def module(self) -> Any:
        """The booting runtime's compiled module, loaded on first use."""
        with self._module_lock:
            if callable(self._module):
                self._module = self._module()
            return self._module

    def _new(self, key: tuple[Any, ...]) -> Sandbox:
        memory_bytes, mounts = key
        return Sandbox(self.engine, self.module, argv=self.argv, mode="python",
                       mounts=[*self.base_mounts, *mounts], env=self.env,
                       memory_bytes=memory_bytes, output_bytes=65536, result_bytes=1).start()

    # -- the pool -------------------------------------------------------------------------------------

    def warm(self, memory_bytes: int, mounts: Sequence[tuple[str, str]] = ()) -> None:
        """Start filling the pool for this shape in the background (not needed where the snapshot serves)."""
        snapshot = self.snapshot
        if not self.prestart or (snapshot is not None and snapshot.fits(self._snapshot_mounts(mounts), memory_bytes)):
            return
        with self._lock:
            self._pool((memory_bytes, tuple(mounts))).primed = True
            self._lock.notify_all()

    def _primed(self, key: tuple[Any, ...]) -> None:
        with self._lock:
            pool = self._pools.get(key)
            if pool is not None and not pool.primed:
                pool.primed = True
                self._lock.notify_all()

    def _pool(self, key: tuple[Any, ...]) -> _Pool:
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = _Pool(key, self.pool_size)
            while len(self._pools) > self.MAX_SHAPES:
                _, old = self._pools.popitem(last=False)
                for sandbox in old.idle:
                    sandbox.quit()
                old.idle.clear()
        else:
            self._pools.move_to_end(key)
        if self._refiller is None and self.prestart:
            self._refiller = threading.Thread(target=self._refill, name="edgecompute-wasm-prestart", daemon=True)
            self._refiller.start()
        return pool

    def _acquire(self, key: tuple[Any, ...]) -> tuple[Sandbox, bool]:
        sandbox = None
        if self.prestart:
            with self._lock:
                pool = self._pool(key)
                while True:
                    while pool.idle:
                        candidate = pool.idle.popleft()
                        if not candidate.ended.is_set():
                            sandbox = candidate
                            break
                    # an interpreter already starting for nobody else comes sooner than a new one
                    if sandbox is not None or self._closed or pool.starting <= pool.waiting:
                        break
                    pool.waiting += 1
                    try:
                        self._lock.wait(1.0)
                    finally:
                        pool.waiting -= 1
                self._lock.notify_all()
        if sandbox is not None:
            self.warm_starts += 1
            return sandbox, True
        self.cold_starts += 1
        return self._new(key), False

    def _refill(self) -> None:
        while True:
            with self._lock:
                pool = None
                while not self._closed:
                    pool = next((p for p in reversed(self._pools.values())
                                 if p.primed and len(p.idle) + p.starting < p.size), None)
                    if pool is not None:
                        break
                    self._lock.wait()
                if self._closed:
                    return
                assert pool is not None
                # start-up is background work: give a running request its few milliseconds first
                if self._inflight:
                    self._lock.wait(0.05)
                    if self._stopping():
                        return
                    if len(pool.idle) + pool.starting >= pool.size:
                        continue
                pool.starting += 1
            sandbox = None
            try:
                sandbox = self._new(pool.key)
                sandbox.ready.wait()
            except Exception:
                log.exception("could not pre-start a wasm python sandbox")
            with self._lock:
                pool.starting -= 1
                if sandbox is None or sandbox.ended.is_set():
                    if sandbox is not None and sandbox.outcome is not None:
                        log.warning("a pre-started wasm python sandbox ended early: %s %s",
                                    sandbox.outcome.kind, sandbox.outcome.message)
                    self._lock.wait(1.0)  # do not spin on a failing start
                elif self._closed or self._pools.get(pool.key) is not pool:
                    sandbox.quit()
                else:
                    pool.idle.append(sandbox)
                    self._lock.notify_all()

    def _stopping(self) -> bool:
        return self._closed  # read again after a wait: close() may have run meanwhile

    def join(self, timeout: float) -> bool:
        """After :meth:`close`: wait for the pre-starting thread (it quits what it was starting) and
        the watchdog (it ends once every sandbox run on a caller's thread has); True when both have."""
        import time

        deadline = time.monotonic() + timeout
        refiller = self._refiller
        if refiller is not None:
            refiller.join(timeout)
        watchdog = self._watchdog.join(max(deadline - time.monotonic(), 0.0))
        return watchdog and (refiller is None or not refiller.is_alive())

    def close(self) -> None:
        self._watchdog.close()
        with self._lock:
            self._closed = True
            for pool in self._pools.values():
                for sandbox in pool.idle:
                    sandbox.quit()
                pool.idle.clear()
            self._pools.clear()
            self._lock.notify_all()

    def stats(self) -> dict[str, int]:
        with self._lock:
            idle = sum(len(p.idle) for p in self._pools.values())
        return {"idle": idle, "cold_starts": self.cold_starts, "warm_starts": self.warm_starts,
                "snapshot_starts": self.snapshot_starts}

    def _snapshot_mounts(self, mounts: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        return [*self.base_mounts, *mounts]

    # -- one request ----------------------------------------------------------------------------------

    def run(self, source: str, function: str, inputs: Any, limits: Limits,
            mounts: Sequence[tuple[str, str]] = (), paths: Sequence[str] = ()) -> PythonResult:
        import time

        snapshot = self.snapshot
        snapshot_mounts = self._snapshot_mounts(mounts)
        if snapshot is not None and not snapshot.fits(snapshot_mounts, limits.memory_bytes):
            # more mounts than slots, a guest path too long for one, or a memory cap below the
            # snapshot's own memory: boot one instead
            snapshot = None
        if snapshot is not None and self.stdlib:
            # a booted interpreter has the precompiled stdlib on its path from start-up (PYTHONPATH);
            # one from the snapshot gets it here
            paths = [_stdlib.GUEST_PATH, *paths]
        try:
            request = _codec.encode((source, function, inputs, list(paths)))
        except ValueError as exc:
            from edgecompute.errors import InvalidRequest

            raise InvalidRequest(f"wasm/python inputs must be plain data (None, bool, int, float, str, bytes, "
                                 f"list, tuple, dict, set): {exc}") from None
        if len(request) > self.max_request_bytes:
            from edgecompute.errors import InvalidRequest

            raise InvalidRequest(f"the encoded request (source and inputs) is {len(request)} bytes, above its "
                                 f"ceiling max_input_bytes = {self.max_request_bytes}")
        t0 = time.perf_counter()
        key = (limits.memory_bytes, tuple(mounts))
        with self._lock:
            self._inflight += 1
        try:
            if snapshot is not None:
                # a fresh instance of the pre-initialised runtime: sub-millisecond, so no pool, and
                # it runs on this (worker) thread, its request already there when it first reads
                self.snapshot_starts += 1
                sandbox = Sandbox(self.engine, snapshot.module, argv=["python"], mode="python",
                                  mounts=snapshot_mounts, memory_bytes=limits.memory_bytes, output_bytes=65536,
                                  result_bytes=1, export=RUN_EXPORT, slots=snapshot.prefixes(snapshot_mounts))
                return self._run_here(sandbox, request, limits, t0)
            sandbox, _warm = self._acquire(key)
            return self._run(sandbox, request, limits, t0)
        finally:
            with self._lock:
                self._inflight -= 1
                self._lock.notify_all()
            if self.prestart and snapshot is None:
                self._primed(key)

    def _run(self, sandbox: Sandbox, request: bytes, limits: Limits, t0: float) -> PythonResult:
        import time

        sandbox.ready.wait()
        t1 = time.perf_counter()
        if sandbox.ended.is_set():
            outcome = sandbox.outcome
            raise SandboxCrashed(f"the wasm python sandbox failed to start: {outcome.message if outcome else '?'}")
        sandbox.give(b"%012d" % len(request) + request, limits.timeout, limits.fuel,
                     output_bytes=limits.output_bytes, result_bytes=limits.result_bytes)
        finished = sandbox.answered.wait(limits.timeout + 2.0)
        t2 = time.perf_counter()
        return self._outcome(sandbox, limits, finished, t0, t1, t2)

    def _run_here(self, sandbox: Sandbox, request: bytes, limits: Limits, t0: float) -> PythonResult:
        import time

        sandbox.give(b"%012d" % len(request) + request, limits.timeout, limits.fuel,
                     output_bytes=limits.output_bytes, result_bytes=limits.result_bytes)
        # a guest blocked where no epoch reaches it (a FIFO's open in a mount) blocks this thread:
        # the watchdog wakes it 2 s after its deadline, as _run does for a sandbox thread
        token = self._watchdog.watch(sandbox, time.monotonic() + limits.timeout + 2.0)
        try:
            sandbox.run_here()
        finally:
            self._watchdog.done(token)
        t2 = time.perf_counter()
        if not sandbox.armed:
            outcome = sandbox.outcome
            raise SandboxCrashed(f"the wasm python sandbox failed to start: {outcome.message if outcome else '?'}")
        return self._outcome(sandbox, limits, True, t0, sandbox.t_wake or t2, t2)

    def _outcome(self, sandbox: Sandbox, limits: Limits, finished: bool, t0: float, t1: float,
                 t2: float) -> PythonResult:
        import time

        stdout = sandbox.stdout.decode("utf-8", "replace")
        stderr = sandbox.stderr.decode("utf-8", "replace")
        captured: Captured = {"stdout": stdout, "stderr": stderr}
        if not finished:
            sandbox.kill_reason = sandbox.kill_reason or "timeout"
            # the guest is blocked where no epoch reaches it (a FIFO's open in a mount): wake it,
            # so no thread keeps working on the request past this grace
            sandbox.unstick(UNSTICK_GRACE)
            raise SandboxTimeout(f"guest code ran past its {limits.timeout:g} s limit", limit=limits.timeout,
                                 **captured)
        reason = sandbox.kill_reason
        if reason == "answered":
            # the answer is decoded within the request's time too (t0: when this request started)
            value = _answer(sandbox, limits, captured, time.monotonic() + limits.timeout - (time.perf_counter() - t0))
            return PythonResult(value, stdout, stderr, t1 - t0, t2 - t1)
        sandbox.ended.wait(2.0)
        raise _failure(sandbox, limits, captured)


def _answer(sandbox: Sandbox, limits: Limits, captured: Captured, deadline: float | None = None) -> Any:
    try:
        answer = _codec.decode(memoryview(sandbox.answer)[12:12 + (sandbox.answer_len or 0)], deadline=deadline)
        kind = answer[0]
    except _codec.CodecTimeout:
        raise SandboxTimeout(f"guest code ran past its {limits.timeout:g} s limit (decoding its answer)",
                             limit=limits.timeout, **captured) from None
    except (_codec.CodecError, TypeError, IndexError, KeyError) as exc:
        raise SandboxCrashed(f"the guest sent an answer the host cannot read: {exc}", **captured) from None
    if kind == "ok" and len(answer) == 2:
        return answer[1]
    if kind in ("error", "unserializable") and len(answer) == 4 and all(isinstance(a, str) for a in answer[1:]):
        _, guest_type, message, tb = answer
        if kind == "unserializable":
            raise GuestError(f"the guest's return value cannot cross the sandbox ({guest_type}: {message}); return "
                             "plain data: None, bool, int, float, str, bytes, list, tuple, dict, set",
                             guest_type="TypeError", guest_message=message, **captured)
        if guest_type == "MemoryError":
            raise SandboxMemoryExceeded(f"guest code ran out of memory (cap {limits.memory_bytes // 2**20} MiB)",
                                        limit_bytes=limits.memory_bytes, **captured)
        raise GuestError(f"guest code raised {guest_type}: {message}\n{tb}".rstrip(), guest_type=guest_type,
                         guest_message=message, guest_traceback=tb, **captured)
    raise SandboxCrashed("the guest sent an answer of an unknown shape", **captured)


def _failure(sandbox: Sandbox, limits: Limits, captured: Captured) -> ExecutorError:
    import wasmtime

    reason = sandbox.kill_reason
    if reason == "output":
        return SandboxOutputExceeded(f"guest output passed its cap of {limits.output_bytes} bytes",
                                     limit_bytes=limits.output_bytes, **captured)
    if reason == "result":
        return SandboxOutputExceeded(f"the guest's return value passed its cap of {limits.result_bytes} bytes",
                                     limit_bytes=limits.result_bytes, **captured)
    if reason == "timeout":
        return SandboxTimeout(f"guest code ran past its {limits.timeout:g} s limit", limit=limits.timeout, **captured)
    return outcome_error(sandbox, limits, captured, wasmtime)


def outcome_error(sandbox: Sandbox, limits: Limits, captured: Captured, wasmtime: Any) -> ExecutorError:
    """The typed error for a sandbox that ended without a (good) answer."""
    outcome = sandbox.outcome
    if outcome is None:
        return SandboxCrashed("the sandbox did not end", **captured)
    if outcome.kind == "trap":
        code = outcome.trap_code
        if code == wasmtime.TrapCode.INTERRUPT:
            return SandboxTimeout(f"guest code ran past its {limits.timeout:g} s limit", limit=limits.timeout,
                                  **captured)
        if code == wasmtime.TrapCode.OUT_OF_FUEL:
            return SandboxFuelExhausted(f"guest code used up its fuel ({limits.fuel})", fuel=limits.fuel, **captured)
        if code == wasmtime.TrapCode.STACK_OVERFLOW:
            return SandboxStackOverflow("guest code exhausted the WebAssembly call stack", **captured)
        if sandbox.memory_size + 16 * 65536 >= limits.memory_bytes:
            return SandboxMemoryExceeded(f"guest code ran out of memory (cap {limits.memory_bytes // 2**20} MiB)",
                                         limit_bytes=limits.memory_bytes, **captured)
        what = code.name.lower().replace("_", " ") if code is not None else "trap"
        lines = [line.strip() for line in outcome.message.strip().splitlines() if line.strip()]
        detail = f" ({lines[-1]})" if lines and lines[-1] != what else ""
        return SandboxCrashed(f"the guest trapped: {what}{detail}", trap=outcome.message, **captured)
    if outcome.kind == "exit":
        return SandboxCrashed(f"the guest exited with code {outcome.exit_code} before answering",
                              exit_code=outcome.exit_code, **captured)
    if sandbox.memory_size + 16 * 65536 >= limits.memory_bytes or "memory" in outcome.message:
        return SandboxMemoryExceeded(f"the sandbox could not get memory (cap {limits.memory_bytes // 2**20} MiB): "
                                     f"{outcome.message}", limit_bytes=limits.memory_bytes, **captured)
    return SandboxCrashed(f"the sandbox failed: {outcome.message}", **captured)
