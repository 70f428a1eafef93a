"""Helpers for the placement tests: the process table and the shared-memory folder."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgecompute import Placement

ROOT = Path(__file__).resolve().parents[2]
os.chdir(ROOT)  # workers started by these tests import tests.placement.apps from here


def descendants(pid: int | None = None) -> list[tuple[int, str]]:
    """(pid, state) of every live or zombie process below ``pid`` (default: this one), from /proc."""
    parents: dict[int, list[tuple[int, str]]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        parents.setdefault(int(fields[1]), []).append((int(entry), fields[0]))
    found: list[tuple[int, str]] = []
    todo = [pid or os.getpid()]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child[0])
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def our_segments(pid: int | None = None) -> list[str]:
    """Names in /dev/shm that the workers of process ``pid`` (default: this one) could leave: none,
    ever, since the protocol's segments are memfds (the check guards against a return of names)."""
    prefix = f"ec-{pid or os.getpid()}-"
    return [name for name in os.listdir("/dev/shm") if name.startswith(prefix)]


async def running(handle: object) -> None:
    """Wait (up to 30 s) until a task handle is RUNNING."""
    from edgecompute import TaskState

    for _ in range(6000):
        if handle.state is TaskState.RUNNING:  # type: ignore[attr-defined]
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"{handle!r} did not start")


@pytest.fixture(scope="session")
def ray_placement() -> Iterator[Placement]:
    """A local Ray cluster for the whole session (2 CPUs, files in a folder of ours), stopped after."""
    from edgecompute.placement import ray as ray_placement

    folder = tempfile.mkdtemp(prefix="ecray")  # short: Ray puts Unix sockets in it
    placement = Placement.ray(num_cpus=2, temp_dir=folder, actor={"cpu": 0.1})
    ray_placement.connect(placement)
    yield placement
    ray_placement.shutdown()
    shutil.rmtree(folder, ignore_errors=True)
