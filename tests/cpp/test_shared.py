"""Inputs made with ``CppExecutor.empty``: in ``process`` isolation they live in memory the worker
processes map, and cross to them without a copy."""

from __future__ import annotations

import gc
import itertools
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgecompute import Scheduler
from edgecompute.errors import ExecutorCrashed, InvalidRequest
from edgecompute_cpp import CppExecutor
from edgecompute_cpp._shared import ALIGN, SharedHeap

pytestmark = pytest.mark.anyio


async def arena_mb(executor: CppExecutor) -> float:
    return float((await executor.health()).details["workers"][0]["arena_mb"])


async def test_shared_inputs_reach_the_worker_without_a_copy(isolated: tuple[Scheduler, CppExecutor],
                                                             cpp: CppExecutor) -> None:
    s, executor = isolated
    image = executor.empty((2000, 4000), "float32")  # 32 MB: a copy would grow the 8 MB arena
    image[...] = np.random.default_rng(1).random(image.shape, dtype=np.float32)
    total = (await s.run("cpp/sum", image)).outputs
    assert total == pytest.approx(cpp.call("sum", image), rel=1e-6)
    assert await arena_mb(executor) == 8.0
    # the worker reads the memory as it is now, not a snapshot taken at the first call
    image[0, 0] += 1000.0
    assert (await s.run("cpp/sum", image)).outputs == pytest.approx(total + 1000.0, rel=1e-6)
    # a contiguous view is found in the segment too; a strided one is copied, and still right
    rows = image[100:110]
    np.testing.assert_array_equal((await s.run("cpp/testplug.echo", rows)).outputs, rows)
    strided = image[::7, ::3]
    np.testing.assert_array_equal((await s.run("cpp/testplug.echo", strided)).outputs, strided)
    assert await arena_mb(executor) == 8.0


async def test_shared_and_copied_inputs_mix_in_one_call(isolated: tuple[Scheduler, CppExecutor]) -> None:
    s, executor = isolated
    a = executor.empty((3, 4), np.float64)
    a[...] = np.arange(12.0).reshape(3, 4)
    b = np.arange(8.0).reshape(4, 2)
    product = (await s.run("cpp/matmul", {"a": a, "b": b})).outputs
    np.testing.assert_array_equal(product, a @ b)


async def test_a_restarted_worker_maps_the_segments_again(isolated: tuple[Scheduler, CppExecutor]) -> None:
    s, executor = isolated
    x = executor.empty(1000, "float64")
    x[...] = np.arange(1000.0)
    np.testing.assert_array_equal((await s.run("cpp/testplug.echo", x)).outputs, x)
    with pytest.raises(ExecutorCrashed):
        await s.run("cpp/testplug.segfault", x)
    np.testing.assert_array_equal((await s.run("cpp/testplug.echo", x)).outputs, x)
    assert (await executor.health()).details["workers"][0]["starts"] == 2


async def test_segments_given_back_are_unmapped_by_the_workers(isolated: tuple[Scheduler, CppExecutor]) -> None:
    s, executor = isolated
    small = executor.empty(16, "float32")
    small[...] = 1
    big = executor.empty(80 << 20, "uint8")  # larger than a segment: one of its own
    big[...] = 2
    assert (await s.run("cpp/sum", small)).outputs == 16
    assert (await s.run("cpp/sum", big)).outputs == 2 * (80 << 20)
    pool = executor._pool
    assert pool is not None and pool.heap is not None
    worker = pool._workers[0]
    assert len(pool.heap.segments) == 2 and len(worker.mapped) == 2
    del big
    gc.collect()
    assert len(pool.heap.segments) == 2  # freed by the next call that needs the heap
    assert (await s.run("cpp/sum", small)).outputs == 16
    assert len(pool.heap.segments) == 1 and worker.mapped == set(pool.heap.segments)


async def test_another_executors_array_is_copied_not_misread(isolated: tuple[Scheduler, CppExecutor],
                                                             testplug: Path) -> None:
    s, _ = isolated
    other = CppExecutor({"isolation": "process", "workers": 1, "plugins": [str(testplug)]})
    try:
        x = other.empty(500, "int32")
        x[...] = np.arange(500)
        np.testing.assert_array_equal((await s.run("cpp/testplug.echo", x)).outputs, x)
    finally:
        await other.aclose()


def test_empty_checks_its_arguments(testplug: Path) -> None:
    inprocess = CppExecutor(plugins=[str(testplug)])
    plain = inprocess.empty((2, 3), "int16")
    assert plain.shape == (2, 3) and plain.dtype == np.int16 and plain.base is None
    isolated = CppExecutor({"isolation": "process", "workers": 1, "plugins": [str(testplug)]})
    try:
        with pytest.raises(InvalidRequest, match="dtype float16 is not one the plugin ABI carries"):
            isolated.empty(4, "float16")
        with pytest.raises(InvalidRequest, match="negative dimension"):
            isolated.empty((2, -1), "float32")
        with pytest.raises(InvalidRequest, match="shape must be"):
            isolated.empty("many", "float32")
        assert isolated.empty(0, "float32").shape == (0,)
        assert isolated.empty((), "float64").shape == ()
    finally:
        isolated._pool.close()  # type: ignore[union-attr]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 300_000), st.booleans()), min_size=1, max_size=60))
def test_the_heap_never_hands_out_overlapping_blocks(steps: list[tuple[int, bool]]) -> None:
    heap = SharedHeap(segment_size=2 << 20)  # small: a run fills several
    live: list[tuple[np.ndarray, int]] = []
    try:
        for step, (size, free_one) in enumerate(steps):
            if free_one and live:
                live.pop(len(live) // 2)
            a = heap.empty(size, "uint8")
            a[...] = step % 251
            live.append((a, step % 251))
            spans = sorted((heap.locate(x) or (-1, -1)) + (x.nbytes,) for x, _ in live)
            assert all(seg >= 0 for seg, _, _ in spans)
            for (s1, o1, n1), (s2, o2, _) in itertools.pairwise(spans):
                assert s1 != s2 or o1 + n1 <= o2, "two live blocks overlap"
            assert all(x.ctypes.data % ALIGN == 0 for x, _ in live)
        for a, value in live:  # nobody wrote over anybody else
            assert (a == value).all()
        del a
        live.clear()
        gc.collect()
        heap.collect()
        # everything came back and coalesced: one segment, one free range covering it
        assert len(heap.segments) == 1
        (segment,) = heap.segments.values()
        assert segment.empty and segment._free == [(0, segment.size)]
    finally:
        heap.close()


def _used(executor: CppExecutor) -> int:
    pool = executor._pool
    assert pool is not None and pool.heap is not None
    pool.heap.collect()
    return sum(segment.used for segment in pool.heap.segments.values())


async def test_large_outputs_come_back_in_shared_memory_and_go_on_uncopied(
        isolated: tuple[Scheduler, CppExecutor], cpp: CppExecutor) -> None:
    s, executor = isolated
    image = executor.empty((1080, 1920), "float32")  # 8 MB in, 8 MB out
    image[...] = np.random.default_rng(2).random(image.shape, dtype=np.float32)
    await s.run("cpp/gaussian_blur", image, params={"sigma": 2})  # the first call learns the size
    blurred = (await s.run("cpp/gaussian_blur", image, params={"sigma": 2})).outputs
    np.testing.assert_array_equal(blurred, cpp.call("gaussian_blur", image, {"sigma": 2}))
    pool = executor._pool
    assert pool is not None and pool.heap is not None and pool.heap.locate(blurred) is not None
    # the output is the next call's input, and nothing was copied through the (8 MB) arena
    edges = (await s.run("cpp/sobel", blurred)).outputs
    np.testing.assert_allclose(edges, cpp.call("sobel", blurred), rtol=1e-6)
    assert await arena_mb(executor) == 8.0
    before = _used(executor)
    assert (await executor.health()).details["shared_memory"] == {
        "segments": 1, "mapped_mb": 64.0, "in_use_mb": round(before / 2**20, 3)}
    del blurred
    gc.collect()
    assert _used(executor) == before - image.nbytes  # the output's block went back


async def test_outputs_sharing_a_block_free_it_together(isolated: tuple[Scheduler, CppExecutor],
                                                         cpp: CppExecutor) -> None:
    s, executor = isolated
    image = np.random.default_rng(3).random((300, 400), dtype=np.float32)
    for _ in range(2):
        parts = (await s.run("cpp/sobel", image, params={"output": "all"})).outputs
    expected = cpp.call("sobel", image, {"output": "all"})
    for name in ("magnitude", "gx", "gy"):
        np.testing.assert_array_equal(parts[name], expected[name])
    used = _used(executor)
    assert used >= 3 * image.nbytes
    gx = parts["gx"]
    del parts
    gc.collect()
    assert _used(executor) == used  # gx still holds the block of all three
    np.testing.assert_array_equal(gx, expected["gx"])
    del gx
    gc.collect()
    assert _used(executor) < used


async def test_outputs_larger_than_the_reserved_block_come_back_copied(
        isolated: tuple[Scheduler, CppExecutor], cpp: CppExecutor) -> None:
    s, _ = isolated
    small = np.random.default_rng(4).random((200, 200), dtype=np.float32)
    for size in (300, 300, 900, 900):  # the third call's output outgrows the reserved block
        out = (await s.run("cpp/resize", small, params={"width": size, "height": size})).outputs
        np.testing.assert_array_equal(out, cpp.call("resize", small, {"width": size, "height": size}))


def test_a_block_freed_while_the_heap_holds_its_lock_does_not_deadlock() -> None:
    # the cyclic GC may run a finalizer anywhere, even in the heap's own locked code (when that
    # code allocates); the finalizer must not wait for the lock its own thread holds
    heap = SharedHeap(segment_size=2 << 20)
    holder = [heap.empty(1000, "uint8")]

    def drop_under_the_lock() -> None:
        with heap._lock:
            holder.clear()  # the last reference: the block's finalizer runs right here

    thread = threading.Thread(target=drop_under_the_lock, daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "freeing a block under the heap's lock deadlocked"
    heap.collect()
    (segment,) = heap.segments.values()
    assert segment.empty
    heap.close()
