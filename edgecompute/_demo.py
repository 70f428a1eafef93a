"""``edgecompute demo``: the scheduler at work, then each installed executor's own demo."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable

from ._functions import FunctionExecutor
from ._registry import Registry
from ._runtime import Runtime
from .config import Config
from .context import TaskContext
from .errors import InfeasibleRequest, TaskTimeout, UnknownAlgorithm
from .models import Resources

__all__ = ["run"]


def _tour_executor() -> FunctionExecutor:
    tour = FunctionExecutor("tour", version="1")

    @tour.algorithm(resources=Resources(cpu=1))
    def word_count(text: str) -> dict[str, int]:
        """Count words (blocking code, run on a worker thread)."""
        counts: dict[str, int] = {}
        for word in text.lower().split():
            counts[word] = counts.get(word, 0) + 1
        return counts

    @tour.algorithm(resources=Resources(cpu=1))
    async def countdown(start: int, *, ctx: TaskContext, delay: float = 0.05) -> str:
        """Stream a countdown, one chunk at a time."""
        for value in range(start, 0, -1):
            await ctx.emit(value)
            await asyncio.sleep(delay)
        return "liftoff"

    @tour.algorithm(resources=Resources(cpu=1))
    async def sleep(seconds: float) -> float:
        """Sleep, to show deadlines and priorities."""
        await asyncio.sleep(seconds)
        return seconds

    return tour


def run(config: Config, echo: Callable[[str], None]) -> None:
    registry = Registry.discover(settings=config.executors)
    tour = _tour_executor()
    registry.register(tour)
    installed = [name for name in registry.names() if name != "tour"]
    echo("edgecompute demo")
    echo("================")
    echo(f"installed executors: {', '.join(installed) or 'none (pip install edgecompute-cpp, ...)'}")
    for problem in registry.problems:
        echo(f"  (a plugin failed to load: {problem})")

    # one core, so that the queue and the priorities are visible
    with Runtime(registry, config=config, capacity=Resources(cpu=1, memory_mb=1024)) as rt:
        echo("\n1. a blocking function on a worker thread")
        response = rt.run("tour/word_count", "the quick brown fox jumps over the lazy dog the end")
        echo(f"   outputs: {response.outputs}")
        queued, ran = response.timings["queued"] * 1e6, response.timings["run"] * 1e6
        echo(f"   timings: queued {queued:.0f} us, run {ran:.0f} us")

        echo("\n2. priorities on a one-core pool: the blocker runs, then high before low")
        order: list[str] = []
        futures = [rt.submit("tour/sleep", 0.2, metadata={"name": "blocker"})]
        futures += [rt.submit("tour/sleep", 0.01, priority=p) for p in (0, 0, 5, 10)]
        for future, name in zip(futures, ["blocker", "low-1", "low-2", "mid", "high"], strict=True):
            future.add_done_callback(functools.partial(lambda name, _: order.append(name), name))
        for future in futures:
            future.result()
        echo(f"   finished in this order: {', '.join(order)}")

        echo("\n3. streaming chunks as they are produced")
        chunks = list(rt.stream("tour/countdown", 5))
        echo(f"   chunks: {chunks}")

        echo("\n4. deadlines, impossible requests and typos fail at once with typed errors")
        start = time.perf_counter()
        try:
            rt.run("tour/sleep", 5.0, timeout=0.1)
        except TaskTimeout as exc:
            echo(f"   TaskTimeout after {time.perf_counter() - start:.2f} s: {exc}")
        try:
            rt.run("tour/sleep", 0.0, resources=Resources(cpu=64))
        except InfeasibleRequest as exc:
            echo(f"   InfeasibleRequest: {exc}")
        try:
            rt.run("tour/word_cnt", "x")
        except UnknownAlgorithm as exc:
            echo(f"   UnknownAlgorithm: {str(exc)[:100]}...")

        echo("\n5. map over many inputs with a progress bar")
        texts = [f"request number {i} of the demo" for i in range(200)]
        counts = rt.map("tour/word_count", texts, progress=True)
        echo(f"   {len(counts)} results, first: {counts[0]}")
        stats = rt.stats()
        echo(f"   scheduler: {stats.submitted} submitted, finished {stats.finished}")

        plugins = registry.plugin_manager
        if plugins is not None and plugins.hook.demo.get_hookimpls():
            echo("\n6. installed executors show themselves")
            plugins.hook.demo(runtime=rt, echo=echo)
        elif not installed:
            echo("\nInstall executors to see them here: pip install edgecompute-cpp edgecompute-ml edgecompute-wasm")
