"""Runtime, the blocking face: docs/getting-started.md ("Run something": run, submit, map, stream
from plain code) and docs/scheduler.md ("Backpressure and closing", "Observing" from a Runtime)."""

from __future__ import annotations

import asyncio
import contextvars
import sys
import threading
import time
from typing import Any

import pytest

from edgecompute import Config, FunctionExecutor, Registry, Request, Resources, Runtime, TaskContext
from edgecompute.errors import (
    ConfigError,
    ExecutorError,
    InvalidRequest,
    SchedulerClosed,
    TaskCancelled,
    UnknownAlgorithm,
)


def app() -> FunctionExecutor:
    executor = FunctionExecutor("app")

    @executor.algorithm(resources=Resources(cpu=1))
    def square(x: int) -> int:
        if x < 0:
            raise ValueError("negative input")
        return x * x

    @executor.algorithm(resources=Resources(cpu=1))
    async def count(n: int, *, ctx: TaskContext) -> int:
        for i in range(n):
            await ctx.emit(i)
        return n

    @executor.algorithm(resources=Resources(cpu=1))
    async def nap(seconds: float) -> float:
        await asyncio.sleep(seconds)
        return seconds

    return executor


def runtime(**options: object) -> Runtime:
    return Runtime(Registry([app()]), config=Config(), capacity=Resources(cpu=2), **options)  # type: ignore[arg-type]


def test_run_submit_stream_and_map() -> None:
    with runtime() as rt:
        assert rt.run("app/square", 7).outputs == 49
        assert rt.run(Request("square", 3)).outputs == 9
        future = rt.submit("app/square", 4)
        assert future.result(timeout=5).outputs == 16
        assert list(rt.stream("app/count", 4)) == [0, 1, 2, 3]
        assert rt.map("app/square", range(50)) == [i * i for i in range(50)]
        stats = rt.stats()
        assert stats.finished["succeeded"] == 54
        assert rt.registry.names() == ["app"]
        assert rt.health()["app"].ok


@pytest.mark.parametrize("loop", ["asyncio", "uvloop", "auto"])
def test_each_loop_runs_the_same_calls(loop: str) -> None:
    import uvloop

    with runtime(loop=loop) as rt:
        running = rt.portal.call(asyncio.get_running_loop)
        assert isinstance(running, uvloop.Loop) is (loop != "asyncio")
        assert rt.run("app/square", 7).outputs == 49
        assert rt.submit("app/square", 4).result(timeout=5).outputs == 16
        assert list(rt.stream("app/count", 3)) == [0, 1, 2]
        assert rt.map("app/square", range(20)) == [i * i for i in range(20)]
        with pytest.raises(ExecutorError, match="negative input"):
            rt.run("app/square", -1)
        future = rt.submit("app/nap", 30)
        assert future.cancel()
        assert rt.stats().finished["succeeded"] == 23


def test_a_loop_that_is_not_there_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="loop='trio'"):
        runtime(loop="trio")
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if not installed: import raises
    with pytest.raises(ConfigError, match="pip install uvloop"):
        runtime(loop="uvloop")
    with runtime(loop="auto") as rt:  # falls back to asyncio's own loop
        assert type(rt.portal.call(asyncio.get_running_loop)).__module__.startswith("asyncio")
        assert rt.run("app/square", 5).outputs == 25


def test_errors_cross_to_the_caller_typed() -> None:
    with runtime() as rt:
        with pytest.raises(ExecutorError, match="ValueError: negative input"):
            rt.run("app/square", -1)
        with pytest.raises(UnknownAlgorithm):
            rt.run("app/cube", 2)
        with pytest.raises(InvalidRequest, match="unknown option.*priorty .did you mean priority"):
            rt.run("app/square", 2, priorty=1)  # type: ignore[arg-type]
        results = rt.map("app/square", [2, -1, 3], return_exceptions=True)
        assert results[0] == 4 and results[2] == 9
        assert isinstance(results[1], ExecutorError)
        with pytest.raises(ExecutorError):
            rt.map("app/square", [2, -1, 3])


def test_future_cancel_cancels_the_task() -> None:
    with runtime() as rt:
        future = rt.submit("app/nap", 5.0)
        time.sleep(0.1)
        assert future.cancel()
        deadline = time.monotonic() + 5
        while rt.stats().finished["cancelled"] != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert rt.stats().finished["cancelled"] == 1
        assert rt.stats().running == 0


def test_map_progress_bar(capsys: pytest.CaptureFixture[str]) -> None:
    with runtime() as rt:
        assert rt.map("app/square", range(20), progress=True) == [i * i for i in range(20)]
    assert "20/20" in capsys.readouterr().err


def test_works_from_a_thread_that_runs_an_event_loop() -> None:
    # a Jupyter cell: synchronous code on a thread whose event loop is running
    async def cell() -> int:
        with runtime() as rt:
            return rt.run("app/square", 12).outputs

    assert asyncio.run(cell()) == 144


def test_use_after_close_is_a_clear_error() -> None:
    rt = runtime()
    with rt:
        pass
    with pytest.raises(SchedulerClosed, match="not running"):
        rt.run("app/square", 1)


def test_closing_cancels_unfinished_work_when_configured() -> None:
    rt = Runtime(Registry([app()]), config=Config(close="cancel"), capacity=Resources(cpu=1))
    with rt:
        future = rt.submit("app/nap", 10.0)
        time.sleep(0.05)
    with pytest.raises(TaskCancelled):
        future.result(timeout=5)


def test_run_runs_its_task_in_its_own_call_and_waits_for_room_when_the_queue_is_full() -> None:
    # run() starts a task that can start at once in the coroutine that submitted it (no task of
    # its own: handle.inline), submit() in a task of its own; with the queue at its bound, run()
    # waits for room instead of raising QueueFull
    rt = Runtime(Registry([app()]), config=Config(), capacity=Resources(cpu=1), max_queue=1)
    with rt:
        results: list[int] = []
        runner = threading.Thread(target=lambda: results.append(rt.run("app/nap", 0.3).outputs))
        runner.start()
        deadline = time.monotonic() + 5
        while not rt.tasks() and time.monotonic() < deadline:
            time.sleep(0.005)
        assert [handle.inline for handle in rt.tasks()] == [True]
        queued = rt.submit("app/nap", 0.01)  # fills the queue (the running task holds the core)
        assert rt.stats().queued == 1
        assert rt.run("app/square", 5).outputs == 25  # waited for room, then for its turn
        runner.join(5)
        assert results == [0.3]
        assert queued.result(timeout=5).outputs == 0.01
        assert not [handle.inline for handle in rt.tasks()]


_caller_value: contextvars.ContextVar[str] = contextvars.ContextVar("caller_value", default="unset")


def test_tasks_see_the_callers_context_variables() -> None:
    executor = FunctionExecutor("ctx")

    @executor.algorithm(resources=Resources(cpu=1))
    async def read(_: int) -> str:
        return _caller_value.get()

    with Runtime(Registry([executor]), config=Config(), capacity=Resources(cpu=1)) as rt:
        assert rt.run("ctx/read", 0).outputs == "unset"
        token = _caller_value.set("caller")
        try:
            assert rt.run("ctx/read", 0).outputs == "caller"
            assert rt.submit("ctx/read", 0).result(timeout=5).outputs == "caller"
        finally:
            _caller_value.reset(token)
        assert rt.run("ctx/read", 0).outputs == "unset"


def test_run_racing_close_from_another_thread_returns_or_raises_closed() -> None:
    # a run() whose hand-off to the loop lands as the loop stops must not wait forever: every call
    # either returns its response or raises SchedulerClosed, whichever side of the close it fell on
    # (a tiny switch interval makes the threads interleave within those few lines)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        _race_run_and_close(300)
    finally:
        sys.setswitchinterval(interval)


def _race_run_and_close(rounds: int) -> None:
    for round_ in range(rounds):
        rt = runtime()
        rt.start()
        outcomes: list[object] = []
        first = threading.Event()

        def caller(rt: Runtime = rt, outcomes: list[object] = outcomes, first: threading.Event = first) -> None:
            i = 0
            while True:
                try:
                    outcomes.append(rt.run("app/square", i).outputs)
                except SchedulerClosed as exc:
                    outcomes.append(exc)
                    return
                except BaseException as exc:  # noqa: BLE001 - anything else is the failure to report
                    outcomes.append(exc)
                    return
                finally:
                    first.set()
                i += 1

        thread = threading.Thread(target=caller, daemon=True)
        thread.start()
        assert first.wait(5)
        time.sleep((round_ % 7) * 0.0003)  # a close at varying points of the caller's calls
        rt.close()
        deadline = time.monotonic() + 10
        while thread.is_alive() and time.monotonic() < deadline:
            thread.join(0.05)
        assert not thread.is_alive(), f"round {round_}: run() still waiting after close() returned"
        assert isinstance(outcomes[-1], SchedulerClosed), outcomes[-1]
        assert all(out == i * i for i, out in enumerate(outcomes[:-1]))


class _LateLoop:
    """A Runtime's loop whose hand-offs land while it shuts down: after its tasks were cancelled,
    between two of the shutdown's runs of the loop (``asyncio.Runner.close``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._shutting = threading.Event()
        self._handed = threading.Event()
        real = loop.shutdown_default_executor

        def shutdown(*args: Any, **kwargs: Any) -> Any:  # on the loop's thread, the loop stopped
            self._shutting.set()
            self._handed.wait(5)
            return real(*args, **kwargs)

        loop.shutdown_default_executor = shutdown  # type: ignore[method-assign]

    def call_soon_threadsafe(self, *args: Any) -> Any:
        assert self._shutting.wait(5)
        try:
            return self._loop.call_soon_threadsafe(*args)
        finally:
            self._handed.set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loop, name)


def test_run_handed_to_a_loop_that_stops_before_running_it_raises_closed() -> None:
    # the narrow window of a run() racing close(), held open: the call reaches the loop after the
    # scheduler closed, as the loop shuts down, so nothing on the loop may ever answer it
    for _ in range(5):
        rt = runtime()
        rt.start()
        assert rt._loop is not None
        rt._loop = _LateLoop(rt._loop)  # type: ignore[assignment]
        outcome: list[BaseException | None] = []

        def caller(rt: Runtime = rt, outcome: list[BaseException | None] = outcome) -> None:
            try:
                rt.run("app/square", 3)
                outcome.append(None)
            except BaseException as exc:  # noqa: BLE001 - checked below
                outcome.append(exc)

        thread = threading.Thread(target=caller, daemon=True)
        thread.start()
        rt.close()
        deadline = time.monotonic() + 10
        while thread.is_alive() and time.monotonic() < deadline:
            thread.join(0.05)
        assert not thread.is_alive(), "run() still waiting after close() returned"
        assert isinstance(outcome[0], SchedulerClosed), outcome
