"""The typed API: request options a type checker checks, awaitable handles, lookups and events
(docs/scheduler.md, "Observing")."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path

import pytest
from mypy import api as mypy_api

from edgecompute import Config, FunctionExecutor, Registry, Request, Resources, Runtime, Scheduler, TaskEvent
from edgecompute.errors import InvalidRequest, TaskCancelled

pytestmark = pytest.mark.anyio

_SCRIPT = textwrap.dedent("""
    from edgecompute import Runtime, Scheduler
    from edgecompute.client import AsyncClient, Client

    def main(rt: Runtime) -> None:
        rt.run("demo/upper", "hi", {option}=5)
        rt.submit("demo/upper", "hi", timeout={timeout})
        list(rt.stream("demo/upper", "hi", priority=1))
        rt.map("demo/upper", ["a"], retries=2)

    async def amain(scheduler: Scheduler) -> None:
        await scheduler.run("demo/upper", "hi", priority=1, timeout=2.5)

    def remote(c: Client) -> None:
        c.run("demo/upper", "hi", {option}=5)
        c.map("demo/upper", ["a"], retries=2, timeout={timeout})

    async def aremote(c: AsyncClient) -> None:
        await c.submit("demo/upper", "hi", {option}=5)
""")


def _mypy(tmp_path: Path, option: str, timeout: str) -> tuple[str, int]:
    script = tmp_path / "user_script.py"
    script.write_text(_SCRIPT.format(option=option, timeout=timeout))
    out, err, status = mypy_api.run(["--strict", "--no-incremental", "--cache-dir", str(tmp_path / "cache"),
                                     str(script)])
    return out + err, status


def test_mypy_flags_a_misspelt_option_and_a_badly_typed_one(tmp_path: Path) -> None:
    out, status = _mypy(tmp_path, "priorty", '"soon"')
    assert status == 1, out
    assert 'Argument "priorty" to "run" of "Runtime"' in out
    assert 'Argument "timeout" to "submit" of "Runtime" has incompatible type "str"' in out
    # the remote clients take the same typed options
    assert 'Unexpected keyword argument "priorty" for "run" of "Client"' in out
    assert 'Unexpected keyword argument "priorty" for "submit" of "AsyncClient"' in out
    assert 'Argument "timeout" to "map" of "Client" has incompatible type "str"' in out


def test_mypy_passes_the_correct_script(tmp_path: Path) -> None:
    out, status = _mypy(tmp_path, "priority", "2.5")
    assert status == 0, out


def _app() -> FunctionExecutor:
    executor = FunctionExecutor("app")

    @executor.algorithm(resources=Resources(cpu=1))
    async def nap(seconds: float) -> float:
        await asyncio.sleep(seconds)
        return seconds

    @executor.algorithm(resources=Resources(cpu=1))
    def scale(x: int, *, factor: int) -> int:
        return x * factor

    return executor


def _scheduler() -> Scheduler:
    return Scheduler(Registry([_app()]), config=Config(), capacity=Resources(cpu=1))


async def test_a_handle_is_awaitable_and_its_result_takes_a_timeout() -> None:
    async with _scheduler() as scheduler:
        handle = scheduler.submit(Request("app/nap", 0.0))
        assert (await handle).outputs == 0.0
        slow = scheduler.submit(Request("app/nap", 30.0))
        with pytest.raises(TimeoutError, match="did not end within 0.01 s; it is still running"):
            await slow.result(timeout=0.01)
        assert not slow.done()  # the timeout ends the wait, not the task
        slow.cancel()
        with pytest.raises(TaskCancelled):
            await slow


async def test_tasks_lists_live_handles_and_task_finds_one_by_id() -> None:
    async with _scheduler() as scheduler:
        running = scheduler.submit(Request("app/nap", 30.0, id="first"))
        queued = scheduler.submit(Request("app/nap", 30.0, id="second"))
        assert scheduler.tasks() == [running, queued]
        assert scheduler.task("second") is queued
        queued.cancel()
        assert scheduler.tasks() == [running]
        assert scheduler.task("second") is None and scheduler.task("nope") is None
        running.cancel()
        assert scheduler.tasks() == []


async def test_a_second_stream_reader_is_an_invalid_request() -> None:
    async with _scheduler() as scheduler:
        handle = scheduler.submit(Request("app/nap", 30.0))
        first = handle.stream()
        reader = asyncio.ensure_future(first.__anext__())
        await asyncio.sleep(0)
        with pytest.raises(InvalidRequest, match="already being streamed by another reader.*one reader"):
            await handle.stream().__anext__()
        handle.cancel()
        with pytest.raises(TaskCancelled):
            await reader


async def test_a_missing_keyword_of_a_function_is_an_invalid_request() -> None:
    async with _scheduler() as scheduler:
        with pytest.raises(InvalidRequest, match="factor"):
            await scheduler.run("app/scale", 2)
        assert (await scheduler.run("app/scale", 2, params={"factor": 3})).outputs == 6


def test_runtime_lists_looks_up_cancels_and_subscribes() -> None:
    events: list[TaskEvent] = []
    with Runtime(Registry([_app()]), config=Config(), capacity=Resources(cpu=1)) as rt:
        unsubscribe = rt.subscribe(events.append)
        future = rt.submit("app/nap", 30.0, id="long")
        while rt.task("long") is None:
            pass  # the submission reaches the loop thread
        assert [handle.id for handle in rt.tasks()] == ["long"]
        assert rt.cancel("long") and not rt.cancel("long")
        with pytest.raises(TaskCancelled):
            future.result(timeout=30)
        unsubscribe()
        rt.run("app/nap", 0.0)
    assert [(e.kind, e.task_id) for e in events] == [("submitted", "long"), ("started", "long"),
                                                     ("cancelled", "long")]
