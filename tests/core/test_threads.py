"""The scheduler's worker-thread pool: every call runs once, results come back in order of
completion, a sequential caller stays on one thread, and close() runs what was queued."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import weakref

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgecompute._threads import ThreadPool

pytestmark = pytest.mark.anyio


async def test_sequential_calls_stay_on_the_thread_that_went_idle_last() -> None:
    # torch's OpenMP team and the CPU caches belong to a thread: rotating through the pool
    # would make every call pay for a cold one
    pool = ThreadPool(4)
    try:
        names = {await pool.run(lambda: threading.current_thread().name) for _ in range(50)}
        assert len(names) == 1
    finally:
        pool.close()


async def test_concurrent_calls_use_every_thread_and_errors_reach_their_caller() -> None:
    pool = ThreadPool(3)
    barrier = threading.Barrier(3, timeout=10)

    def meet() -> str:
        barrier.wait()  # returns only when three calls run at the same time
        return threading.current_thread().name

    def fail() -> None:
        raise KeyError("boom")

    try:
        names = await asyncio.gather(*(pool.run(meet) for _ in range(3)))
        assert len(set(names)) == 3
        with pytest.raises(KeyError, match="boom"):
            await pool.run(fail)
    finally:
        pool.close()


@settings(max_examples=25, deadline=None)
@given(size=st.integers(1, 4), delays=st.lists(st.integers(0, 3), min_size=1, max_size=30))
def test_every_call_runs_exactly_once_and_close_waits_for_queued_ones(size: int, delays: list[int]) -> None:
    ran: list[int] = []
    lock = threading.Lock()

    def work(i: int, delay: int) -> int:
        time.sleep(delay / 1000)
        with lock:
            ran.append(i)
        return i * 2

    async def main() -> list[int]:
        pool = ThreadPool(size)
        futures = [pool.submit(work, i, d) for i, d in enumerate(delays)]
        results = await asyncio.gather(*futures)
        late = pool.submit(work, len(delays), 0)  # queued, then close() must still run it
        pool.close(wait=True)
        await asyncio.sleep(0)
        assert sorted(ran) == list(range(len(delays) + 1))
        assert all(not t.is_alive() for t in pool._threads)
        await late
        return results

    assert asyncio.run(main()) == [i * 2 for i in range(len(delays))]


class _Payload:
    pass


async def test_a_parked_thread_keeps_nothing_of_its_last_call() -> None:
    # a request's arrays must be freed when its task ends, not when the thread runs its next call
    pool = ThreadPool(1)
    try:
        payload = _Payload()
        gone = weakref.ref(payload)
        await pool.run(len, [payload])
        del payload
        gc.collect()
        assert gone() is None
    finally:
        pool.close()
