"""Closing, at interpreter exit, what an application left running.

Two things go wrong at exit when an application forgets to close:
- a ``Runtime``'s event-loop thread is gone by the time the interpreter collects its portal, and
  collecting it then waits for that thread for ever (the process hangs);
- a daemon thread still inside native code (torch, wasmtime, a cffi call) when the interpreter
  finalises is frozen mid-call, and C++ code under it can then abort the whole process
  ("terminate called without an active exception", exit 134).
So runtimes still running at exit are closed first (their schedulers drain or cancel), then every
registry that still has built executors is closed (each executor joins its threads).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import logging
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor  # now: its module cannot be imported during shutdown
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from ._registry import Registry
    from ._runtime import Runtime

__all__ = ["close_at_exit", "closed"]

log = logging.getLogger("edgecompute")

T = TypeVar("T")

_lock = threading.Lock()
# a started Runtime owns a running thread: like a thread, it stays alive until it is closed
_runtimes: set[Runtime] = set()
_registries: weakref.WeakSet[Registry] = weakref.WeakSet()


def close_at_exit(owner: Runtime | Registry) -> None:
    """Close ``owner`` at interpreter exit if it is still open then.

    Registering again moves the hook to the front: atexit runs hooks last-in first-out, and ours
    must run before those of libraries imported after the first executor was built (torch's).
    """
    from ._registry import Registry

    with _lock:
        if isinstance(owner, Registry):
            _registries.add(owner)
        else:
            _runtimes.add(owner)
        atexit.unregister(_close_all)
        atexit.register(_close_all)


def closed(owner: Runtime | Registry) -> None:
    from ._registry import Registry

    with _lock:
        if isinstance(owner, Registry):
            _registries.discard(owner)
        else:
            _runtimes.discard(owner)


def _close_all() -> None:
    with _lock:
        runtimes, registries = list(_runtimes), list(_registries)
    for runtime in runtimes:
        try:
            runtime.close()
        except BaseException as exc:  # noqa: BLE001 - exiting: report it and close the rest
            log.warning("closing a Runtime at exit failed: %s: %s", type(exc).__name__, exc)
    for registry in registries:
        try:
            asyncio.run(_close(registry))
        except BaseException as exc:  # noqa: BLE001
            log.warning("closing executors at exit failed: %s: %s", type(exc).__name__, exc)


async def _close(registry: Registry) -> None:
    # by now concurrent.futures refuses new work ("cannot schedule new futures after interpreter
    # shutdown"), and executors close with asyncio.to_thread: give them a thread per call instead
    asyncio.get_running_loop().set_default_executor(_ThreadPerCall())
    await registry.aclose()


class _ThreadPerCall(ThreadPoolExecutor):  # asyncio takes nothing else as a default executor
    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def call() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as exc:  # noqa: BLE001 - handed to the awaiting caller
                    future.set_exception(exc)

        threading.Thread(target=call, name="edgecompute-exit", daemon=True).start()
        return future
