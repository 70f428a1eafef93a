"""The same executor tests, run with the executor in process, in a worker process, in a worker
started by an explicitly named interpreter (the path a host uses for another environment), in a
sandboxed worker (bubblewrap), and in a Ray actor on a local cluster."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator

import numpy as np
import pytest

from edgecompute import Placement, Registry, Request, Resources, Scheduler
from edgecompute.errors import InvalidRequest, TaskCancelled, TaskTimeout

from .apps import apps
from .conftest import our_segments, running
from .sandboxing import cpp_sandbox, skip_without_namespaces

pytestmark = pytest.mark.anyio

PLACEMENTS = {
    "inprocess": Placement.inprocess(),
    "process": Placement.process(),
    "python": Placement.process(python=sys.executable),
}


@pytest.fixture(params=[*PLACEMENTS, "sandbox", "ray"], scope="module")
def placement(request: pytest.FixtureRequest) -> Placement:
    if request.param == "sandbox":
        skip_without_namespaces()
        return cpp_sandbox()
    if request.param == "ray":
        placement: Placement = request.getfixturevalue("ray_placement")
        return placement
    return PLACEMENTS[request.param]


@pytest.fixture
async def scheduler(placement: Placement) -> AsyncIterator[Scheduler]:
    names = ("text", "cpp", "apps")
    registry = Registry.discover(placement=dict.fromkeys(names, placement))
    registry.register(apps)
    async with Scheduler(registry, capacity=Resources(cpu=8, memory_mb=1 << 16), retries=0) as scheduler:
        yield scheduler
    await registry.aclose()
    assert not our_segments()


async def test_a_small_request_gives_the_same_answer(scheduler: Scheduler) -> None:
    response = await scheduler.run("text/upper", "hello")
    assert response.outputs == "HELLO"
    assert response.executor == "text"
    assert response.timings["total"] >= response.timings["run"] > 0


async def test_chunks_and_progress_stream_through(scheduler: Scheduler) -> None:
    progress: list[float] = []
    scheduler.subscribe(lambda event: progress.append(event.progress) if event.kind == "progress" else None)
    handle = scheduler.submit(Request("text/words", "one two three four"))
    chunks = [chunk async for chunk in handle.stream()]
    assert chunks == ["one", "two", "three", "four"]
    assert (await handle.result()).outputs == 4
    assert progress == [0.25, 0.5, 0.75, 1.0]


async def test_executor_errors_keep_their_type(scheduler: Scheduler) -> None:
    with pytest.raises(InvalidRequest, match="takes a string"):
        await scheduler.run("text/upper", 42)


async def test_retryable_errors_are_retried_by_the_host(scheduler: Scheduler) -> None:
    response = await scheduler.run("text/flaky", "x", params={"failures": 1}, retries=1)
    assert response.outputs == "ok after 2 calls"


async def test_numpy_arrays_cross_both_ways(scheduler: Scheduler) -> None:
    from scipy.ndimage import gaussian_filter

    image = np.random.default_rng(0).random((300, 400), dtype=np.float32)
    response = await scheduler.run("cpp/gaussian_blur", image, params={"sigma": 2.0})
    assert isinstance(response.outputs, np.ndarray) and response.outputs.shape == image.shape
    np.testing.assert_allclose(response.outputs, gaussian_filter(image, 2.0, mode="reflect"), atol=1e-5)
    big = np.arange(4 << 20, dtype=np.float32)  # 16 MB: through shared memory
    assert (await scheduler.run("apps/nbytes", big)).outputs == big.nbytes
    echoed = (await scheduler.run("apps/echo", {"array": big, "bytes": b"x" * 100_000, "n": 3})).outputs
    np.testing.assert_array_equal(echoed["array"], big)
    assert echoed["bytes"] == b"x" * 100_000 and echoed["n"] == 3


async def test_many_tasks_at_once_each_get_their_own_answer(scheduler: Scheduler) -> None:
    arrays = [np.full(50_000, i, dtype=np.int32) for i in range(20)]
    results = await asyncio.gather(*(scheduler.run("apps/echo", a) for a in arrays))
    for i, response in enumerate(results):
        assert response.outputs.shape == (50_000,) and (response.outputs == i).all()


async def test_cancelling_a_running_task_reaches_the_executor(scheduler: Scheduler) -> None:
    handle = scheduler.submit(Request("apps/sleep", 30.0))
    await running(handle)
    await asyncio.sleep(0.2)
    handle.cancel()
    with pytest.raises(TaskCancelled):
        await handle.result()
    assert (await scheduler.run("apps/sleep", 0.01)).outputs == "slept"  # the executor still serves


async def test_a_deadline_ends_the_task(scheduler: Scheduler) -> None:
    with pytest.raises(TaskTimeout):
        await scheduler.run("apps/sleep", 30.0, timeout=0.3)
    assert (await scheduler.run("text/upper", "after")).outputs == "AFTER"


async def test_health_answers(scheduler: Scheduler, placement: Placement) -> None:
    health = await scheduler.registry.get("text").health()
    assert health.ok
    if not placement.in_process:
        assert health.details["placement"] == placement.kind
        assert (await scheduler.run("apps/pid")).outputs != __import__("os").getpid()
