"""The contract every executor meets, and the context a running task sees."""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from .models import Algorithm, Health, Request, Resources, Response

if TYPE_CHECKING:
    from .context import TaskContext

__all__ = ["BlockingCall", "BlockingExecutor", "Executor", "blocking_call"]

#: A blocking function that does all of ``execute``: ``call(request, ctx)`` returns the outputs
#: (or a full :class:`Response`).
BlockingCall = Callable[["Request", "TaskContext"], Any]


@runtime_checkable
class Executor(Protocol):
    """Something that runs algorithms. Executors are built once and shared by all tasks.

    Constructors must be cheap: load heavy libraries (torch, wasmtime, compilers) on first use, so
    that discovering and listing executors stays fast.
    """

    name: str
    version: str

    def algorithms(self) -> Sequence[Algorithm]:
        """The algorithms this executor offers (bare names, no ``executor/`` prefix)."""
        ...

    def requirements(self, request: Request) -> Resources:
        """What running ``request`` needs; the scheduler admits it only when this fits."""
        ...

    async def execute(self, request: Request, ctx: TaskContext) -> Response:
        """Run one request. Stream chunks with ``await ctx.emit(...)``; blocking work goes through
        ``await ctx.run_sync(fn, ...)`` so the event loop never stalls."""
        ...

    async def health(self) -> Health: ...

    async def aclose(self) -> None:
        """Release everything the executor holds. Called once, when its registry closes."""
        ...


class BlockingExecutor(abc.ABC):
    """Base class for executors whose work is plain blocking Python (or C called from Python).

    Subclasses implement :meth:`run`; it is called on one of the scheduler's worker threads, never
    on the event loop. ``requirements`` defaults to the algorithm's declared resources.
    """

    name: str = ""
    version: str = "0"

    @abc.abstractmethod
    def algorithms(self) -> Sequence[Algorithm]: ...

    @abc.abstractmethod
    def run(self, request: Request, ctx: TaskContext) -> Any:
        """Compute and return the outputs (or a full :class:`Response`)."""

    def requirements(self, request: Request) -> Resources:
        bare = request.algorithm.rpartition("/")[2]
        for algorithm in self.algorithms():
            if algorithm.name == bare:
                return algorithm.resources
        return Resources()

    async def execute(self, request: Request, ctx: TaskContext) -> Response:
        result = await ctx.run_sync(self.run, request, ctx)
        return result if isinstance(result, Response) else Response(result)

    def blocking(self, request: Request) -> BlockingCall | None:
        """``run``, unless a subclass overrides ``execute`` (see :func:`blocking_call`)."""
        return self.run if type(self).execute is BlockingExecutor.execute else None

    async def health(self) -> Health:
        return Health()

    async def aclose(self) -> None:
        return None




def blocking_call(executor: object, request: Request) -> BlockingCall | None:
    """The blocking function that ``executor.execute(request, ctx)`` amounts to, or None.

    An executor whose ``execute`` is, for some requests, nothing but ``await ctx.run_sync(call,
    request, ctx)`` (and wrapping the result in a :class:`Response`) may say so with an optional
    method ``blocking(request) -> call | None``. Whoever has no event loop at hand, but a thread
    that may block, then calls ``call(request, ctx)`` directly and saves the hop to a worker thread
    and back: a worker process (docs/placement.md) runs it on the thread that read the request.
    :class:`BlockingExecutor` and :class:`~edgecompute.FunctionExecutor` (for plain functions)
    have it; an executor without it is always run through ``execute``.
    """
    blocking = getattr(executor, "blocking", None)
    if blocking is None:
        return None
    call: BlockingCall | None = blocking(request)
    return call
