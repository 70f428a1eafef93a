"""Stopping work: Ctrl-C during a blocking Runtime call, and closing a lazy map from another thread."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from edgecompute import Config, FunctionExecutor, Registry, Resources, Runtime, TaskEvent
from edgecompute.errors import ExecutorError

# The child: a map of 20 slow tasks, two at a time. Each task writes "start i" when it starts and
# "end i" when it ends; the child marks what it does around the map.
_CHILD = textwrap.dedent("""
    import sys, time
    from edgecompute import Config, FunctionExecutor, Registry, Resources, Runtime

    marks, mode = sys.argv[1], sys.argv[2]

    def mark(text):
        with open(marks, "a") as f:
            f.write(text + "\\n")

    executor = FunctionExecutor("slow")

    @executor.algorithm(resources=Resources(cpu=1))
    def work(i: int) -> int:
        mark(f"start {i}")
        for _ in range(30):  # 3 s of blocking work that checks nothing
            time.sleep(0.1)
        mark(f"end {i}")
        return i

    try:
        with Runtime(Registry([executor]), config=Config(), capacity=Resources(cpu=2)) as rt:
            if mode == "caught":
                try:
                    rt.map("slow/work", range(20))
                except KeyboardInterrupt:
                    mark("interrupted")
            else:
                rt.map("slow/work", range(20))
    except KeyboardInterrupt:
        mark("interrupted")
    mark("left")
""")


def _interrupt_child(tmp_path: Path, mode: str) -> list[str]:
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    marks = tmp_path / "marks"
    marks.touch()
    child = subprocess.Popen([sys.executable, str(script), str(marks), mode])
    try:
        deadline = time.monotonic() + 30  # generous: only a hung child gets here
        while marks.read_text().count("start") < 2:
            assert child.poll() is None and time.monotonic() < deadline, marks.read_text()
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGINT)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    return marks.read_text().split("\n")[:-1]


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process")
@pytest.mark.parametrize("mode", ["caught", "propagated"])
def test_ctrl_c_during_map_cancels_it_and_the_process_exits(tmp_path: Path, mode: str) -> None:
    marks = _interrupt_child(tmp_path, mode)
    # the two running tasks started before the signal; none of the 18 queued ones ever starts
    assert sorted(m for m in marks if m.startswith("start")) == ["start 0", "start 1"], marks
    assert marks.index("interrupted") > max(marks.index("start 0"), marks.index("start 1"))
    if mode == "propagated":
        # leaving the with by the KeyboardInterrupt does not wait for the cancelled tasks'
        # blocking code: the child exits before either running task ends (each runs 3 s)
        assert marks[-2:] == ["interrupted", "left"], marks
        assert not [m for m in marks if m.startswith("end")], marks
    else:
        # the with left normally drains: it waits for the blocking code still on its threads
        # (at most close_timeout), and then nothing else ran
        assert marks[-1] == "left" and sorted(marks[-3:-1]) == ["end 0", "end 1"], marks


def _app() -> FunctionExecutor:
    executor = FunctionExecutor("app")

    @executor.algorithm(resources=Resources(cpu=1))
    async def nap(seconds: float) -> float:
        await asyncio.sleep(seconds)
        return seconds

    @executor.algorithm(resources=Resources(cpu=1))
    def square(x: int) -> int:
        if x < 0:
            raise ValueError("negative input")
        return x * x

    return executor


def _runtime() -> Runtime:
    return Runtime(Registry([_app()]), config=Config(), capacity=Resources(cpu=2))


def test_map_iter_yields_in_order_and_can_return_errors() -> None:
    with _runtime() as rt:
        assert list(rt.map_iter("app/square", range(10))) == [i * i for i in range(10)]
        results = list(rt.map_iter("app/square", [2, -1, 3], return_exceptions=True))
        assert results[0] == 4 and results[2] == 9 and isinstance(results[1], ExecutorError)
        with pytest.raises(ExecutorError, match="negative input"):
            list(rt.map_iter("app/square", [2, -1, 3]))


def test_map_iter_closed_from_another_thread_cancels_the_rest() -> None:
    events: list[TaskEvent] = []
    with _runtime() as rt:
        rt.subscribe(events.append)
        outputs = rt.map_iter("app/nap", [0.0] + [30.0] * 9)
        first = next(outputs)  # the first task is done; the next two run, seven wait

        def close_when_two_run() -> None:
            while rt.stats().running < 2:
                time.sleep(0.01)
            outputs.close()

        closer = threading.Thread(target=close_when_two_run)
        closer.start()
        rest = list(outputs)  # blocked on the second task until the other thread closes the map
        closer.join()
        stats = rt.stats()
    assert first == 0.0 and rest == []
    assert stats.finished == {**stats.finished, "succeeded": 1, "cancelled": 9}
    assert [e.kind for e in events].count("started") == 3  # no task started after close()


def test_as_completed_yields_in_the_order_tasks_end_and_waits_with_a_timeout() -> None:
    with _runtime() as rt:
        # two run at a time: item 0 naps 30 s in one slot while 1, 2 and 3 end one after another
        # in the other
        outputs = rt.as_completed("app/nap", [30.0, 0.0, 0.0, 0.0])
        first = [outputs.next(timeout=30) for _ in range(3)]
        with pytest.raises(TimeoutError):
            outputs.next(timeout=0.2)  # item 0 still naps; the map goes on
        assert rt.stats().running == 1
        outputs.close()
        assert list(outputs) == []
        stats = rt.stats()
    assert first == [(1, 0.0), (2, 0.0), (3, 0.0)]
    assert stats.finished == {**stats.finished, "succeeded": 3, "cancelled": 1}


def test_as_completed_gives_each_error_with_its_index() -> None:
    with _runtime() as rt:
        results = dict(rt.as_completed("app/square", [2, -1, 3], return_exceptions=True))
        assert results[0] == 4 and results[2] == 9 and isinstance(results[1], ExecutorError)
        with pytest.raises(ExecutorError, match="negative input"):
            list(rt.as_completed("app/square", [-1]))


def test_a_map_iters_wait_can_time_out_and_the_item_comes_later() -> None:
    with _runtime() as rt:
        outputs = rt.map_iter("app/nap", [0.3, 0.0])
        with pytest.raises(TimeoutError):
            outputs.next(timeout=0.01)  # the task naps 0.3 s: it cannot have ended
        assert list(outputs) == [0.3, 0.0]  # the item timed out on is not lost
