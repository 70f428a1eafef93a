"""The ``demo`` executor: a tiny text executor that ships with the core, for examples and the docs.

It is registered through the core's own ``edgecompute`` entry point (pyproject.toml), so the
first example of docs/getting-started.md runs on a bare ``pip install edgecompute``. Disable it
with ``[executors.demo] enabled = false``. It doubles as the smallest complete executor to read
before writing one (docs/plugins.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .errors import InvalidRequest
from .hookspecs import hookimpl
from .models import Algorithm, Health, Request, Resources, Response

if TYPE_CHECKING:  # discovery imports this module: it stays as light as the registry itself
    from .context import TaskContext

__all__ = ["DemoExecutor", "register_executors"]

_NEEDS = Resources(cpu=0.1)
_PARAMS = {"upper": frozenset(), "word_count": frozenset(), "generate": frozenset({"max_tokens", "delay"})}


class DemoExecutor:
    """``demo/upper``, ``demo/word_count`` and ``demo/generate`` (streams one token per chunk)."""

    name = "demo"
    version = "1"

    def algorithms(self) -> Sequence[Algorithm]:
        return [
            Algorithm("upper", "Upper-case a string", _NEEDS),
            Algorithm("word_count", "Count the words of a string", _NEEDS),
            Algorithm("generate", "Stream tokens: a toy text generator (params: max_tokens, delay)", _NEEDS),
        ]

    def requirements(self, request: Request) -> Resources:
        return _NEEDS

    async def execute(self, request: Request, ctx: TaskContext) -> Response:
        name = ctx.algorithm.name
        text = request.inputs
        unknown = set(request.params) - _PARAMS[name]
        if unknown:
            raise InvalidRequest(f"demo/{name}: unknown param(s) {', '.join(sorted(map(str, unknown)))}; "
                                 f"valid: {', '.join(sorted(_PARAMS[name])) or 'none'}")
        if not isinstance(text, str):
            raise InvalidRequest(f"demo/{name} takes a string, not {type(text).__name__}")
        if name == "upper":
            return Response(text.upper())
        if name == "word_count":
            return Response(len(text.split()))
        return Response(await self._generate(text, request.params, ctx))

    @staticmethod
    async def _generate(prompt: str, params: Any, ctx: TaskContext) -> str:
        # deterministic, so the docs can show the output: the prompt's words again, in turn
        max_tokens = params.get("max_tokens", 8)
        delay = params.get("delay", 0.0)
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
            raise InvalidRequest(f"demo/generate: max_tokens must be an integer >= 0, not {max_tokens!r}")
        if not isinstance(delay, (int, float)) or isinstance(delay, bool) or delay < 0:
            raise InvalidRequest(f"demo/generate: delay must be a number of seconds >= 0, not {delay!r}")
        import anyio

        words = prompt.split() or ["..."]
        tokens = [words[index % len(words)] for index in range(max_tokens)]
        for index, token in enumerate(tokens, 1):
            if delay:
                await anyio.sleep(delay)  # a cancelled or timed-out task stops here
            await ctx.emit(token)
            ctx.progress(index, max_tokens)
        return " ".join(tokens)

    async def health(self) -> Health:
        return Health()

    async def aclose(self) -> None:
        return None


@hookimpl
def register_executors(register: Any) -> None:
    register(DemoExecutor)
