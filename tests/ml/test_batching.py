"""The batcher on its own: what joins a batch, what waits for the next, closing, failures."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from edgecompute_ml._runtime.batching import Batcher

pytestmark = pytest.mark.anyio


class Gate:
    """A batch function that records its batches and holds the first until released, so that
    submissions made meanwhile pile up in the queue."""

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []
        self.release = threading.Event()
        self.entered = threading.Event()

    def __call__(self, items: list[Any]) -> list[Any]:
        self.batches.append(list(items))
        self.entered.set()
        self.release.wait(10)
        if "boom" in items:
            raise ValueError("boom in the batch")
        return [f"{item}!" for item in items]


async def _within(future: asyncio.Future[Any]) -> Any:
    return await asyncio.wait_for(future, 10)


async def _started(batcher: Batcher, gate: Gate) -> asyncio.Future[Any]:
    first = batcher.submit(["a"])
    assert await asyncio.to_thread(gate.entered.wait, 10)
    return first


async def test_waiting_requests_join_one_batch_up_to_max_batch_and_the_rest_waits_its_turn() -> None:
    gate = Gate()
    batcher = Batcher(gate, max_batch=4, max_delay=0.0)
    first = await _started(batcher, gate)
    # queued while the first batch runs: 2 + 1 items fit in 4; the next 2 would not, so they lead
    # the batch after, with what follows them
    futures = [batcher.submit(["b", "c"]), batcher.submit(["d"]), batcher.submit(["e", "f"]), batcher.submit(["g"])]
    gate.release.set()
    assert await _within(first) == ["a!"]
    assert [await _within(f) for f in futures] == [["b!", "c!"], ["d!"], ["e!", "f!"], ["g!"]]
    assert gate.batches == [["a"], ["b", "c", "d"], ["e", "f", "g"]]
    assert batcher.batch_sizes == {1: 1, 3: 2}
    assert batcher.close(wait=True, timeout=10)


async def test_close_runs_everything_submitted_before_it_and_refuses_what_comes_after() -> None:
    gate = Gate()
    batcher = Batcher(gate, max_batch=2)
    first = await _started(batcher, gate)
    queued = [batcher.submit([x]) for x in "bcd"]
    assert not batcher.close()  # the thread is still in the first batch
    with pytest.raises(RuntimeError, match="is closed"):
        batcher.submit(["late"])
    gate.release.set()
    assert [await _within(f) for f in (first, *queued)] == [["a!"], ["b!"], ["c!"], ["d!"]]
    assert batcher.close(wait=True, timeout=10)
    assert [item for batch in gate.batches for item in batch] == ["a", "b", "c", "d"]


async def test_a_failing_batch_fails_each_of_its_requests_and_the_thread_goes_on() -> None:
    gate = Gate()
    batcher = Batcher(gate, max_batch=8)
    first = await _started(batcher, gate)
    failing = [batcher.submit(["x"]), batcher.submit(["boom"])]
    gate.release.set()
    assert await _within(first) == ["a!"]
    for future in failing:
        with pytest.raises(ValueError, match="boom in the batch"):
            await _within(future)
    assert await _within(batcher.submit(["after"])) == ["after!"]
    assert batcher.close(wait=True, timeout=10)


async def test_a_request_cancelled_while_queued_is_not_run() -> None:
    gate = Gate()
    batcher = Batcher(gate, max_batch=8)
    first = await _started(batcher, gate)
    dropped, kept = batcher.submit(["dropped"]), batcher.submit(["kept"])
    dropped.cancel()
    gate.release.set()
    assert await _within(first) == ["a!"]
    assert await _within(kept) == ["kept!"]
    assert ["dropped"] not in gate.batches and all("dropped" not in batch for batch in gate.batches)
    assert batcher.close(wait=True, timeout=10)


async def test_a_lone_client_never_waits_for_company() -> None:
    # max_delay of a minute: a batcher whose last batch held one request must not wait at all
    batcher = Batcher(lambda items: [len(items)] * len(items), max_batch=16, max_delay=60.0)
    for _ in range(3):
        assert await _within(batcher.submit(["x"])) == [1]
    assert batcher.batch_sizes == {1: 3}
    assert batcher.close(wait=True, timeout=10)
