"""``process`` isolation: plugins in the placement layer's supervised worker processes. Crashes,
deadlines and cancellations fail only what ran on the worker concerned; a hostile plugin cannot
reach another task's outputs; a host killed outright takes its workers and leaves nothing behind."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from edgecompute import Config, HealthStatus, Registry, Request, Resources, Scheduler
from edgecompute.errors import ExecutorCrashed, ExecutorError, InvalidRequest, TaskCancelled, TaskTimeout
from edgecompute_cpp import CppExecutor

from .conftest import PLUGINS

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parents[2]


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(3000):  # a bounded wait for what the loop does in the background
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the condition never held")


async def started(*handles: object) -> None:
    """Until the tasks run: RUNNING, and their first step taken (which sends the call)."""
    await until(lambda: all(h.state.name == "RUNNING" for h in handles))  # type: ignore[attr-defined]
    for _ in range(3):
        await asyncio.sleep(0)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def test_results_match_inprocess_for_large_and_odd_arrays(isolated: tuple[Scheduler, CppExecutor],
                                                                cpp: CppExecutor) -> None:
    s, executor = isolated
    image = np.random.default_rng(5).random((1080, 1920), dtype=np.float32)  # 8 MB
    blurred = (await s.run("cpp/gaussian_blur", image, params={"sigma": 2})).outputs
    np.testing.assert_array_equal(blurred, cpp.call("gaussian_blur", image, {"sigma": 2}))
    small = image[:100, :100].copy()
    for _ in range(2):  # an output far larger than the input
        big = (await s.run("cpp/resize", small, params={"width": 1500, "height": 1500})).outputs
        np.testing.assert_array_equal(big, cpp.call("resize", small, {"width": 1500, "height": 1500}))
    assert big.flags.writeable  # the host's own copy, not a view of the worker's read-only memory
    parts = (await s.run("cpp/sobel", small, params={"output": "all"})).outputs
    assert set(parts) == {"magnitude", "gx", "gy"}
    product = (await s.run("cpp/matmul", {"a": np.eye(3), "b": np.arange(9.0).reshape(3, 3)})).outputs
    np.testing.assert_array_equal(product, np.arange(9.0).reshape(3, 3))
    assert (await s.run("cpp/sum", np.float64(2.5))).outputs == 2.5  # 0-d input
    health = await executor.health()
    assert health.details["isolation"] == "process" and health.details["crashes"] == 0
    assert [w["state"] for w in health.details["workers"]] == ["running"]


async def test_large_params_cross_too(isolated: tuple[Scheduler, CppExecutor]) -> None:
    # a message must fit one socket packet; 200 KB of JSON params does not
    s, executor = isolated
    for _ in range(2):
        await s.run("testplug.spin", None, params={"ms": 0, "padding": "x" * 200_000})
    assert (await executor.health()).details["restarts"] == 0


async def test_a_segfault_fails_only_its_task_and_the_worker_restarts(isolated: tuple[Scheduler, CppExecutor]) -> None:
    s, executor = isolated
    x = np.arange(100.0)
    np.testing.assert_array_equal((await s.run("cpp/testplug.echo", x)).outputs, x)
    with pytest.raises(ExecutorCrashed, match=r"killed by signal 11 \(SIGSEGV\)"):
        await s.run("cpp/testplug.segfault", x, retries=0)
    for i in range(100):  # the host survived; every following task succeeds
        np.testing.assert_array_equal((await s.run("cpp/testplug.echo", x + i)).outputs, x + i)
    health = await executor.health()
    assert health.details["crashes"] == 1 and health.details["restarts"] == 1
    assert health.status is HealthStatus.DEGRADED and "SIGSEGV" in health.message
    assert health.details["metrics"]["testplug.segfault"]["crashes"] == 1
    assert health.details["metrics"]["testplug.echo"]["calls"] == 101


async def test_an_abort_is_a_crash_too(isolated: tuple[Scheduler, CppExecutor]) -> None:
    s, _ = isolated
    with pytest.raises(ExecutorCrashed, match="SIGABRT") as info:
        await s.run("cpp/testplug.abort", retries=0)
    assert info.value.retryable
    assert (await s.run("cpp/sum", np.ones(4))).outputs == 4.0


async def test_a_task_past_its_deadline_kills_its_worker(isolated: tuple[Scheduler, CppExecutor]) -> None:
    s, executor = isolated
    await s.run("cpp/sum", np.ones(4))
    pid = (await executor.health()).details["pid"]
    with pytest.raises(TaskTimeout):
        await s.run("cpp/testplug.spin", params={"ms": 60_000}, timeout=0.5)
    await until(lambda: not alive(pid))
    assert (await s.run("cpp/sum", np.ones(4))).outputs == 4.0
    health = await executor.health()
    assert health.details["pid"] != pid and health.details["crashes"] == 0  # killed on purpose


async def test_a_lone_quick_task_waits_on_the_loop_and_still_honours_its_deadline(testplug: Path) -> None:
    """After a quick round trip, a task alone waits for its answer blocking the loop
    (block_below_us): its deadline still kills the worker and fails it with TaskTimeout."""
    # "quick" is 200 ms here, not the default 1 ms: a loaded machine (CI beside other jobs) must
    # not decide which way the tasks take
    executor = CppExecutor({"isolation": "process", "workers": 1, "plugins": [str(testplug)],
                            "block_below_us": 200_000})
    try:
        async with Scheduler(Registry([executor]), capacity=Resources(cpu=4, memory_mb=4096), config=Config()) as s:
            await _lone_quick_task_waits_on_the_loop(s, executor)
    finally:
        await executor.aclose()


async def _lone_quick_task_waits_on_the_loop(s: Scheduler, executor: CppExecutor) -> None:
    from edgecompute.placement import WorkerExecutor

    waited: list[bool] = []
    blocking = WorkerExecutor.run_checked_blocking

    def spy(self: WorkerExecutor, payload: object, deadline: float | None = None, label: str = "") -> object:
        waited.append(True)
        return blocking(self, payload, deadline, label)

    WorkerExecutor.run_checked_blocking = spy  # type: ignore[method-assign]
    try:
        await s.run("cpp/testplug.spin", params={"ms": 0})  # the first goes through the loop
        assert waited == []
        pid = (await executor.health()).details["pid"]
        for _ in range(50):  # a round trip under block_below_us
            await s.run("cpp/testplug.spin", params={"ms": 0})
            if waited:
                break
        assert waited == [True]
        with pytest.raises(TaskTimeout, match="killed"):
            await s.run("cpp/testplug.spin", params={"ms": 60_000}, timeout=0.5)
        assert waited == [True, True]
    finally:
        WorkerExecutor.run_checked_blocking = blocking  # type: ignore[method-assign]
    assert not alive(pid)
    assert (await s.run("cpp/testplug.echo", np.ones(3))).outputs.tolist() == [1.0, 1.0, 1.0]
    health = await executor.health()
    assert health.details["crashes"] == 0 and executor.metrics()["testplug.spin"]["timeouts"] == 1


async def test_cancelling_a_running_task_kills_its_worker(isolated: tuple[Scheduler, CppExecutor]) -> None:
    s, executor = isolated
    await s.run("cpp/sum", np.ones(4))
    pid = (await executor.health()).details["pid"]
    handle = s.submit(Request("cpp/testplug.spin", params={"ms": 60_000}))
    await started(handle)
    assert handle.cancel()
    with pytest.raises(TaskCancelled):
        await handle.result()
    await until(lambda: not alive(pid))
    assert (await s.run("cpp/testplug.echo", np.arange(3.0))).outputs.tolist() == [0.0, 1.0, 2.0]


def test_the_synchronous_call_honours_its_timeout(testplug: Path) -> None:
    executor = CppExecutor({"isolation": "process", "workers": 1, "plugins": [str(testplug)], "builtin": False})
    try:
        np.testing.assert_array_equal(executor.call("testplug.echo", np.ones(3)), np.ones(3))
        with pytest.raises(TaskTimeout, match="killed"):
            executor.call("testplug.spin", None, {"ms": 60_000}, timeout=0.3)
        np.testing.assert_array_equal(executor.call("testplug.echo", np.ones(3)), np.ones(3))
        assert executor.metrics()["testplug.spin"]["errors"] == 1
    finally:
        asyncio.run(executor.aclose())


async def test_errors_cross_the_process_boundary_typed(isolated: tuple[Scheduler, CppExecutor]) -> None:
    from edgecompute_cpp import PluginCallError

    s, _ = isolated
    with pytest.raises(InvalidRequest, match="must have dtype float32, float64, not uint8"):
        await s.run("cpp/gaussian_blur", np.zeros((4, 4), np.uint8))
    with pytest.raises(PluginCallError, match="the test plugin failed on purpose") as info:
        await s.run("cpp/testplug.fail")
    assert not isinstance(info.value, ExecutorCrashed) and isinstance(info.value, ExecutorError)


async def test_two_workers_run_side_by_side_and_a_crash_fails_only_its_own(testplug: Path) -> None:
    """Two calls at once go one to each worker: killing one worker fails exactly one of them."""
    executor = CppExecutor({"isolation": "process", "workers": 2, "plugins": [str(testplug)], "builtin": False})
    async with Scheduler(Registry([executor]), capacity=Resources(cpu=4, memory_mb=4096), config=Config(),
                         retries=0) as s:
        await s.run("cpp/testplug.echo", np.ones(2))
        await until(lambda: None not in executor.pids)  # the second one starts in the background
        spins = [s.submit(Request("cpp/testplug.spin", params={"ms": 3000})) for _ in range(2)]
        await started(*spins)
        first = executor.pids[0]
        assert first is not None
        os.kill(first, signal.SIGKILL)
        results = await asyncio.gather(*(h.result() for h in spins), return_exceptions=True)
        assert sorted(type(r).__name__ for r in results) == ["ExecutorCrashed", "Response"]
        # the worker that died is replaced; meanwhile and after, calls succeed
        for i in range(20):
            assert (await s.run("cpp/testplug.echo", np.full(3, float(i)))).outputs.tolist() == [i] * 3
        await until(lambda: None not in executor.pids and first not in executor.pids)
    await executor.aclose()


async def test_plugins_that_fail_to_load_in_the_worker_are_reported(testplug: Path) -> None:
    executor = CppExecutor({"isolation": "process", "workers": 1,
                            "plugins": [str(testplug), str(PLUGINS / "future.cpp")]})
    try:
        assert "testplug.echo" in {a.name for a in executor.algorithms()}
        health = await executor.health()
        assert health.status is HealthStatus.DEGRADED and health.details["isolation"] == "process"
        assert len(health.details["problems"]) == 1 and "ABI version 99" in health.details["problems"][0]
    finally:
        await executor.aclose()


async def test_a_plugin_writing_past_its_input_cannot_change_another_tasks_output(testplug: Path,
                                                                                   hostile: Path) -> None:
    """The issue's hostile plugin: it writes 1 MiB past the end of its input. Before, inputs made
    with ``empty()`` and large outputs shared one writable segment with the worker, so it rewrote
    an output the host still held, and its own task reported success. Now the worker's input is
    read-only (the write faults and kills that worker) and outputs are the host's own copies."""
    executor = CppExecutor({"isolation": "process", "workers": 1, "plugins": [str(testplug), str(hostile)]})
    async with Scheduler(Registry([executor]), capacity=Resources(cpu=4, memory_mb=4096), config=Config(),
                         retries=0) as s:
        data = np.arange(1 << 16, dtype=np.float32)  # 256 KiB: large enough to cross in shared memory
        attack = executor.empty(1 << 16, "uint8")
        attack[...] = 1
        first = (await s.run("cpp/testplug.echo", data)).outputs
        held = (await s.run("cpp/testplug.echo", data)).outputs  # an output the host holds
        try:
            await s.run("cpp/hostile.overrun", attack, params={"bytes": 1 << 20, "value": 0xAB})
        except ExecutorCrashed:
            pass  # the write hit read-only memory: only the hostile task's worker died
        np.testing.assert_array_equal(held, data)
        np.testing.assert_array_equal(first, data)
        np.testing.assert_array_equal((await s.run("cpp/testplug.echo", data)).outputs, data)
    await executor.aclose()


# A host that runs cpp in process isolation with two workers, one of them busy in a plugin call
# that never returns, says its workers' pids, and waits to be killed.
HOST = r"""
import asyncio, sys
import numpy as np
from edgecompute import Config, Registry, Request, Resources, Scheduler
from edgecompute_cpp import CppExecutor

async def main():
    executor = CppExecutor({"isolation": "process", "workers": 2, "plugins": [sys.argv[1]]})
    async with Scheduler(Registry([executor]), capacity=Resources(cpu=4, memory_mb=4096), config=Config()) as s:
        await s.run("cpp/testplug.echo", np.ones(1 << 16))
        while None in executor.pids:
            await asyncio.sleep(0.01)
        s.submit(Request("cpp/testplug.spin", params={"ms": 3_600_000}))
        await asyncio.gather(*(s.run("cpp/testplug.echo", np.ones(1 << 16)) for _ in range(4)))
        print(*executor.pids, flush=True)
        await asyncio.sleep(3600)

asyncio.run(main())
"""


def kill_host_mid_task(testplug: Path) -> tuple[list[int], list[str]]:
    """Run HOST, kill -9 it; its workers' pids, and what /dev/shm gained meanwhile."""
    before = set(os.listdir("/dev/shm"))
    host = subprocess.Popen([sys.executable, "-c", HOST, str(testplug)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert host.stdout is not None
        workers = [int(pid) for pid in host.stdout.readline().split()]
        assert len(workers) == 2 and all(map(alive, workers))
        os.kill(host.pid, signal.SIGKILL)
        host.wait(30)
        for _ in range(3000):  # a bounded wait: the workers notice at once, the kernel reaps them after
            if not any(map(alive, workers)):
                break
            time.sleep(0.01)
        return workers, sorted(set(os.listdir("/dev/shm")) - before)
    finally:
        host.kill()
        host.wait()


def test_kill_9_of_the_host_leaves_no_worker_and_nothing_in_dev_shm(testplug: Path) -> None:
    for _ in range(3):  # python benchmarks/cpp.py --host-kills 20 runs it 20 times
        workers, left = kill_host_mid_task(testplug)
        assert not any(map(alive, workers))
        assert left == []


def test_empty_checks_its_arguments(testplug: Path) -> None:
    for isolation in ("inprocess", "process"):
        executor = CppExecutor({"isolation": isolation, "workers": 1, "plugins": [str(testplug)]})
        plain = executor.empty((2, 3), "int16")
        assert plain.shape == (2, 3) and plain.dtype == np.int16 and plain.flags.writeable
        with pytest.raises(InvalidRequest, match="dtype float16 is not one the plugin ABI carries"):
            executor.empty(4, "float16")
        with pytest.raises(InvalidRequest, match="cpp.empty: negative dimensions"):
            executor.empty((2, -1), "float32")
        with pytest.raises(InvalidRequest, match="cpp.empty: "):
            executor.empty("many", "float32")  # type: ignore[arg-type]
        assert executor.empty(0, "float32").shape == (0,)
        assert executor.empty((), "float64").shape == ()
        assert executor.pids == []  # empty() starts no worker


def our_workers() -> list[int]:
    """Live worker processes this process started (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            command = Path(f"/proc/{entry}/cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if parent == os.getpid() and b"edgecompute.placement._worker" in command and alive(int(entry)):
            found.append(int(entry))
    return found


def test_synchronous_calls_with_two_workers_leave_none_after_closing(testplug: Path) -> None:
    # the first call starts the second worker in the background, on the loop of synchronous calls;
    # closing waits for that start and closes what it started
    before = set(our_workers())
    executor = CppExecutor({"isolation": "process", "workers": 2, "plugins": [str(testplug)], "builtin": False})
    np.testing.assert_array_equal(executor.call("testplug.echo", np.ones(3)), np.ones(3))
    assert len(set(our_workers()) - before) >= 1
    asyncio.run(executor.aclose())
    assert executor.pids == [] and set(our_workers()) <= before


async def test_a_plugin_that_crashes_while_loading_is_one_failed_plugin(testplug: Path, crashonload: Path) -> None:
    """Its load kills the worker that tries it; the executor lists it as failed (health, and the
    error a request for it gets) and the other plugins serve, in worker processes without it."""
    executor = CppExecutor({"isolation": "process", "workers": 1, "builtin": False,
                            "plugins": [str(testplug), str(crashonload)]})
    try:
        names = {a.name for a in executor.algorithms()}
        assert "testplug.echo" in names and not any(n.startswith("crashonload") for n in names)
        async with Scheduler(Registry([executor]), capacity=Resources(cpu=4, memory_mb=4096),
                             config=Config()) as s:
            x = np.arange(10, dtype=np.float32)
            for _ in range(3):
                np.testing.assert_array_equal((await s.run("cpp/testplug.echo", x)).outputs, x)
            health = await executor.health()
        assert health.status is HealthStatus.DEGRADED
        [problem] = [p for p in health.details["problems"] if "crashonload" in p]
        assert "crashed" in problem and "SIGABRT" in problem
        np.testing.assert_array_equal(executor.call("testplug.echo", x), x)  # without a scheduler too
        with pytest.raises(InvalidRequest, match=r"failed to load.*crashonload.*crashed"):
            executor.call("crashonload.anything", x)
        assert any(pid is not None for pid in executor.pids)  # a worker without it serves
    finally:
        await executor.aclose()


def test_three_workers_used_through_a_scheduler_then_called_then_closed_from_another_loop(testplug: Path) -> None:
    # the scheduler's loop starts the other workers in the background and stops before they are
    # up; a synchronous call follows, and the close runs on a third loop: it waits for those
    # starts and ends every worker, raising nothing
    before = set(our_workers())
    executor = CppExecutor({"isolation": "process", "workers": 3, "plugins": [str(testplug)], "builtin": False})

    async def through_a_scheduler() -> None:
        # not closed: its close would close the executor on this loop
        scheduler = Scheduler(Registry([executor]), capacity=Resources(cpu=4, memory_mb=1024))
        await scheduler.start()
        assert (await scheduler.run("cpp/testplug.echo", np.ones(3))).outputs.tolist() == [1.0, 1.0, 1.0]

    loop = asyncio.new_event_loop()  # stopped afterwards, not closed: what it began is still pending
    try:
        loop.run_until_complete(through_a_scheduler())
        np.testing.assert_array_equal(executor.call("testplug.echo", np.ones(3)), np.ones(3))
        assert set(our_workers()) - before
        asyncio.run(executor.aclose())
        assert executor.pids == [] and set(our_workers()) <= before
    finally:
        loop.close()


def test_the_worker_runs_what_the_host_checked_as_it_was_checked(cpp: CppExecutor, testplug: Path) -> None:
    """A worker's executor runs ``(algorithm, [(name, dtype, shape, buffer)], encoded params)`` as
    the host's check left them (run_checked: no second check); only a worker's executor does,
    never a host's."""
    from edgecompute import Algorithm, TaskContext

    class Context(TaskContext):
        __slots__ = ()

        @property
        def deadline(self) -> float | None:
            return None

    ctx = Context(Algorithm("sum"), ())
    data = np.arange(10, dtype=np.float32)
    assert cpp.run_checked(("sum", [(None, "<f4", (10,), data.tobytes())], b"{}"), ctx) == 45.0
    image = [(None, "<f4", (2, 5), bytearray(data.tobytes()))]
    blurred = cpp.run_checked(("gaussian_blur", image, b'{"sigma":1.5}'), ctx)
    np.testing.assert_array_equal(blurred, cpp.call("gaussian_blur", data.reshape(2, 5), {"sigma": 1.5}))
    host = CppExecutor({"isolation": "process", "workers": 1, "plugins": [str(testplug)]})
    try:
        assert host.call("sum", data) == 45.0
        assert host.call("sum", data[::2]) == 20.0  # not contiguous: checked into a contiguous copy first
        with pytest.raises(ExecutorError, match="not on its host"):
            host.run_checked(("sum", [(None, "<f4", (10,), data.tobytes())], b"{}"), ctx)
    finally:
        asyncio.run(host.aclose())
