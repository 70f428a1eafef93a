"""How long a worker lives: it dies with its host however the host ends (kill -9 included) and
leaves nothing in /dev/shm; with several workers, a crashed one is replaced while the others serve."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from edgecompute import Registry, Resources, Scheduler
from edgecompute.errors import ConfigError
from edgecompute.placement import Placement, WorkerExecutor

from .apps import apps
from .conftest import ROOT, alive, our_segments

pytestmark = pytest.mark.anyio

# A host that starts a worker (from its main thread, or from another one: the parent-death signal
# follows the thread), gives it a task that never ends, says both pids, and waits to be killed.
HOST = r"""
import asyncio, sys, threading
from edgecompute import Registry, Request, Resources, Scheduler
from edgecompute.placement import Placement, WorkerExecutor
from tests.placement.apps import apps

built = []
def build():
    built.append(WorkerExecutor("apps", Placement.process(), factory=apps))
if sys.argv[1] == "thread":
    thread = threading.Thread(target=build)
    thread.start()
    thread.join()
else:
    build()

async def main():
    async with Scheduler(Registry([built[0]]), capacity=Resources(cpu=2, memory_mb=1024)) as scheduler:
        scheduler.submit(Request("apps/hang"))
        print(built[0].pid, (await scheduler.run("apps/pid")).outputs, flush=True)
        await asyncio.sleep(3600)

asyncio.run(main())
"""


def kill_host_mid_task(started_from: str) -> tuple[int, list[str]]:
    """Run HOST, kill -9 it while its worker is busy; the worker's pid and what /dev/shm gained."""
    before = set(os.listdir("/dev/shm"))
    host = subprocess.Popen([sys.executable, "-c", HOST, started_from], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert host.stdout is not None
        worker, answered = map(int, host.stdout.readline().split())
        assert worker == answered and alive(worker)
        os.kill(host.pid, signal.SIGKILL)
        host.wait(30)
        for _ in range(3000):  # a bounded wait: the worker notices at once, the kernel reaps it soon after
            if not alive(worker):
                break
            time.sleep(0.01)
        return worker, sorted(set(os.listdir("/dev/shm")) - before) + our_segments(host.pid)
    finally:
        host.kill()
        host.wait()


@pytest.mark.parametrize("started_from", ["main", "thread"])
def test_kill_9_of_the_host_takes_its_busy_worker_and_leaves_no_shared_memory(started_from: str) -> None:
    for _ in range(3):  # python benchmarks/placement.py --host-kills 20 runs it 20 times
        worker, left = kill_host_mid_task(started_from)
        assert not alive(worker)
        assert left == []


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(3000):  # a bounded wait for what the loop does in the background
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the condition never held")


def test_workers_must_be_a_positive_integer() -> None:
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="workers must be an integer >= 1"):
            WorkerExecutor("apps", Placement.process(), factory=apps, workers=bad)  # type: ignore[arg-type]


async def test_a_crashed_worker_is_replaced_while_the_other_serves() -> None:
    # a second crash makes the supervisor wait restart_backoff (an hour) before the next start:
    # every task meanwhile is served by the live worker, none waits for the replacement
    executor = WorkerExecutor("apps", Placement.process(restart_backoff=3600.0, restart_backoff_max=3600.0),
                              factory=apps, workers=2)
    async with Scheduler(Registry([executor]), capacity=Resources(cpu=8, memory_mb=1024), retries=0) as scheduler:
        await scheduler.run("apps/pid")
        for _ in range(200):  # the second worker starts in the background after the first call
            if None not in executor.pids:
                break
            await asyncio.gather(*(scheduler.run("apps/pid") for _ in range(4)))
            await asyncio.sleep(0.05)
        first, second = executor.pids
        assert first is not None and second is not None and first != second
        served = {(await scheduler.run("apps/pid")).outputs for _ in range(20)}
        assert served <= {first, second}
        for crash in range(2):
            victim = executor.pids[0]
            assert victim is not None
            executor.kill_worker(0)
            await until(lambda victim=victim: executor.pids[0] != victim)  # its EOF reaches the loop
            if crash == 0:  # the first restart is immediate
                await until(lambda: executor.pids[0] is not None)
        assert executor.pids[0] is None  # waiting out the backoff
        results = await asyncio.gather(*(scheduler.run("apps/pid") for _ in range(20)))
        assert {r.outputs for r in results} == {second}
        assert executor.pids[0] is None and executor.supervisor.total_crashes == 2
        health = await executor.health()
        assert [w["state"] for w in health.details["workers"]] == ["stopped", "running"]
    await executor.aclose()
    assert executor.pids == [None, None]
