"""Rule 6 of docs/security.md: a process that used executors exits 0, and closing joins threads."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from edgecompute import FunctionExecutor, Registry, Request, Resources, Scheduler

pytestmark = pytest.mark.anyio


def _workers() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("edgecompute-worker")]


async def test_closing_a_scheduler_joins_its_worker_threads() -> None:
    app = FunctionExecutor("app")

    @app.algorithm(resources=Resources(cpu=1))
    def slow_square(x: int) -> int:
        threading.Event().wait(0.01)  # a blocking call: it runs on a worker thread
        return x * x

    before = set(_workers())
    async with Scheduler(Registry([app]), capacity=Resources(cpu=4)) as scheduler:
        handles = [scheduler.submit(Request("app/slow_square", i)) for i in range(8)]
        assert [(await h.result()).outputs for h in handles] == [i * i for i in range(8)]
        assert set(_workers()) - before, "the calls ran on the scheduler's worker threads"
    assert set(_workers()) - before == set(), "every worker thread is joined when close returns"


EXECUTOR = '''
import sys, threading
from edgecompute import Algorithm, Health, Resources, Response

class Spinning:
    """Starts a thread that runs until the executor is closed, as a batcher does."""
    name = "spin"
    version = "1"

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.stop.wait, daemon=True)
        self.thread.start()

    def algorithms(self):
        return [Algorithm("echo", "", Resources(cpu=1))]

    def requirements(self, request):
        return Resources(cpu=1)

    async def execute(self, request, ctx):
        return Response(request.inputs)

    async def health(self):
        return Health()

    async def aclose(self) -> None:
        import asyncio
        self.stop.set()
        # at exit, concurrent.futures takes no new work: closing must still be able to use threads
        await asyncio.to_thread(self.thread.join)
        print("closed", flush=True)
'''


@pytest.mark.parametrize("close", ["never", "runtime"])
def test_an_executor_left_open_is_closed_at_exit(tmp_path: Path, close: str) -> None:
    (tmp_path / "spinning.py").write_text(EXECUTOR)
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        from spinning import Spinning
        from edgecompute import Registry, Runtime
        registry = Registry([Spinning()])   # the application's registry: Runtime does not own it
        rt = Runtime(registry)
        rt.start()
        print(rt.run("spin/echo", 7).outputs, flush=True)
        if {close!r} == "runtime":
            rt.close()
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["7", "closed"], "the executor was closed once, after the work"
    assert "failed" not in done.stderr, done.stderr
