"""An executor made of plain Python functions, for application code and quick experiments.

::

    app = FunctionExecutor("app")

    @app.algorithm(resources=Resources(cpu=1))
    def tokenize(text: str, *, lower: bool = False) -> list[str]:
        return (text.lower() if lower else text).split()

    async with Scheduler(Registry([app])) as s:
        await s.run("app/tokenize", "Hello World", params={"lower": True})

A function is called as ``fn(inputs, **params)`` (plus ``ctx=`` when it takes a ``ctx``
parameter). Plain functions run on the scheduler's worker threads; ``async def`` functions run on
the event loop.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar, overload

import attrs

from .context import TaskContext
from .errors import InvalidRequest
from .models import DEFAULT_RESOURCES, Algorithm, Health, Request, Resources, Response

__all__ = ["FunctionExecutor"]

F = TypeVar("F", bound=Callable[..., Any])


@attrs.frozen
class _Function:
    fn: Callable[..., Any]
    algorithm: Algorithm
    is_async: bool
    wants_ctx: bool
    params: frozenset[str] | None  # the keyword params the function takes; None: any (**kwargs)
    required: frozenset[str]  # keyword-only params without a default

    def check(self, params: Mapping[str, Any]) -> None:
        """Unknown or missing params are the request's fault: ``InvalidRequest``, never a TypeError
        from inside the call (docs/security.md, rule 5)."""
        if self.params is not None:
            unknown = set(params) - self.params
            if unknown:
                import difflib

                name = sorted(unknown)[0]
                close = difflib.get_close_matches(name, self.params, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                known = ", ".join(sorted(self.params)) or "none"
                raise InvalidRequest(f"{self.algorithm.name}: unknown param(s) {', '.join(sorted(unknown))}{hint}; "
                                     f"it takes: {known}")
        missing = self.required - set(params)
        if missing:
            raise InvalidRequest(f"{self.algorithm.name}: missing required param(s) {', '.join(sorted(missing))}")

    def call(self, request: Request, ctx: TaskContext) -> Any:
        """The plain function's call, as ``execute`` makes it on a worker thread."""
        params = request.params
        if params or self.required:
            self.check(params)
        if self.wants_ctx:
            return self.fn(request.inputs, **{**params, "ctx": ctx})
        return self.fn(request.inputs, **params) if params else self.fn(request.inputs)


class FunctionExecutor:
    """An executor whose algorithms are Python functions registered with :meth:`algorithm`."""

    def __init__(self, name: str = "functions", version: str = "1") -> None:
        if not name or "/" in name:
            raise ValueError(f"executor name must be non-empty and contain no '/', not {name!r}")
        self.name = name
        self.version = version
        self._functions: dict[str, _Function] = {}

    @overload
    def algorithm(self, fn: F, /) -> F: ...

    @overload
    def algorithm(self, fn: None = None, /, *, name: str | None = None, description: str | None = None,
                  resources: Resources = DEFAULT_RESOURCES, thread_safe: bool = True) -> Callable[[F], F]: ...

    def algorithm(self, fn: F | None = None, /, *, name: str | None = None, description: str | None = None,
                  resources: Resources = DEFAULT_RESOURCES, thread_safe: bool = True) -> F | Callable[[F], F]:
        """Register ``fn`` as an algorithm (usable bare or as ``@executor.algorithm(...)``)."""

        def add(fn: F) -> F:
            self.add(fn, name=name, description=description, resources=resources, thread_safe=thread_safe)
            return fn

        return add(fn) if fn is not None else add

    def add(self, fn: Callable[..., Any], *, name: str | None = None, description: str | None = None,
            resources: Resources = DEFAULT_RESOURCES, thread_safe: bool = True) -> Algorithm:
        algorithm_name = name or fn.__name__
        if algorithm_name in self._functions:
            raise ValueError(f"{self.name}/{algorithm_name} is already registered")
        doc = (inspect.getdoc(fn) or "").strip().splitlines()
        algorithm = Algorithm(algorithm_name, description if description is not None else (doc[0] if doc else ""),
                              resources, thread_safe)
        parameters = list(inspect.signature(fn).parameters.values())
        keywords = [p for p in parameters[1:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                    and p.name != "ctx"]
        takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters)
        self._functions[algorithm_name] = _Function(
            fn, algorithm, inspect.iscoroutinefunction(fn), any(p.name == "ctx" for p in parameters),
            None if takes_any else frozenset(p.name for p in keywords),
            frozenset(p.name for p in keywords if p.default is p.empty),
        )
        return algorithm

    def algorithms(self) -> Sequence[Algorithm]:
        return [function.algorithm for function in self._functions.values()]

    def requirements(self, request: Request) -> Resources:
        function = self._lookup(request)
        if request.params or function.required:
            function.check(request.params)  # refused at submission, before anything is reserved
        return function.algorithm.resources

    async def execute(self, request: Request, ctx: TaskContext) -> Response:
        function = self._functions.get(ctx.algorithm.name) or self._lookup(request)
        params = request.params
        if params or function.required:
            function.check(params)
        if function.wants_ctx:
            params = {**params, "ctx": ctx}
        if function.is_async:
            outputs = await function.fn(request.inputs, **params)
        elif params:
            outputs = await ctx.run_sync(lambda: function.fn(request.inputs, **params))
        else:
            outputs = await ctx.run_sync(function.fn, request.inputs)
        return outputs if isinstance(outputs, Response) else Response(outputs)

    def blocking(self, request: Request) -> Callable[[Request, TaskContext], Any] | None:
        """The call that runs a plain function's request on any thread, without an event loop;
        None for ``async def`` functions (see :func:`edgecompute.executor.blocking_call`)."""
        function = self._functions.get(request.algorithm.rpartition("/")[2])
        return None if function is None or function.is_async else function.call

    def _lookup(self, request: Request) -> _Function:
        bare = request.algorithm.rpartition("/")[2]
        function = self._functions.get(bare)
        if function is None:
            raise InvalidRequest(f"{self.name} has no algorithm {bare!r}; it has: {', '.join(sorted(self._functions))}")
        return function

    async def health(self) -> Health:
        return Health(details={"algorithms": len(self._functions)})

    async def aclose(self) -> None:
        return None
