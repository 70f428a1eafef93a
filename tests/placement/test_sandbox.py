"""The ``sandbox`` placement against a hostile C++ plugin (tests/placement/plugins/hostile.cpp): what
it may read, dial, allocate and see, and what happens to the host and the other executors when it
passes its memory cap. The conformance suite (test_conformance.py) runs the ordinary executors in a
sandbox too."""

from __future__ import annotations

import asyncio
import functools
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgecompute import Placement, Registry, Resources, Scheduler
from edgecompute.errors import ConfigError, ExecutorCrashed, ExecutorError, SandboxViolation

from .apps import apps
from .conftest import our_segments
from .sandboxing import cpp_sandbox, skip_without_namespaces

HOSTILE = Path(__file__).parent / "plugins" / "hostile.cpp"


@pytest.fixture(scope="module")
def hostile() -> str:
    from edgecompute_cpp import build_plugin

    return str(build_plugin(HOSTILE))  # into the cache, which the sandbox sees read-only


@pytest.fixture(scope="module")
def hostile_size(hostile: str) -> int:
    return os.path.getsize(hostile)


async def _scheduler(hostile: str, placement: Placement) -> AsyncIterator[Scheduler]:
    from edgecompute_cpp import CppExecutor

    skip_without_namespaces()
    before = set(our_segments())
    registry = Registry(placement={"cpp": placement, "apps": Placement.process()})
    # a factory rather than [executors.cpp] settings: it crosses to the worker pickled by reference
    registry.register(functools.partial(CppExecutor, {"plugins": [hostile]}), name="cpp")
    registry.register(apps)
    async with Scheduler(registry, capacity=Resources(cpu=8, memory_mb=1 << 16), retries=0) as scheduler:
        yield scheduler
    await registry.aclose()
    assert set(our_segments()) <= before  # the worker's shared memory has no name to leave


@pytest.fixture
async def sandboxed(hostile: str) -> AsyncIterator[Scheduler]:
    async for scheduler in _scheduler(hostile, cpp_sandbox(memory_mb=256)):
        yield scheduler


async def _outputs(scheduler: Scheduler, algorithm: str, **params: Any) -> Any:
    return (await scheduler.run(f"cpp/hostile.{algorithm}", params=params)).outputs


@pytest.mark.anyio
async def test_files_outside_its_roots_are_not_there(sandboxed: Scheduler, hostile: str, hostile_size: int,
                                                     tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("the host's secret")
    paths = ("/etc/passwd", "/etc/hostname", str(secret), f"/proc/{os.getpid()}/environ")
    assert all(map(os.path.isfile, paths))  # the host has them ...
    for path in paths:
        with pytest.raises(ExecutorError, match="No such file or directory|Permission denied"):
            await _outputs(sandboxed, "read", path=path)  # ... the sandbox does not
    # what it may read, it reads: its own library, in a read-only root
    assert await _outputs(sandboxed, "read", path=hostile) == hostile_size


@pytest.mark.anyio
async def test_a_loopback_listener_of_the_host_cannot_be_reached(sandboxed: Scheduler, hostile: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setblocking(False)
        port = listener.getsockname()[1]
        with pytest.raises(ExecutorError, match="connect: Connection refused|Network is unreachable"):
            await _outputs(sandboxed, "connect", port=port)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing came in
        # the same plugin with the network the operator allowed does reach it
        async for networked in _scheduler(hostile, cpp_sandbox(memory_mb=256, network=True)):
            assert await _outputs(networked, "connect", port=port) == 1
        listener.setblocking(True)
        listener.accept()[0].close()


@pytest.mark.anyio
async def test_it_sees_only_itself_and_the_sandbox_init(sandboxed: Scheduler) -> None:
    seen = await _outputs(sandboxed, "procs")
    names = bytes(seen["names"]).decode().split()
    assert sorted(seen["pids"].tolist()) == [1, 2]
    # the worker is this interpreter (python, or python3 when started through a script's shebang)
    assert sorted(names) == sorted(["bwrap", Path(sys.executable).name])
    executor: Any = sandboxed.registry.get("cpp")
    assert executor.report["pid"] == 2  # the worker, as it saw itself when it said hello
    assert executor.pid != 2  # on the host it has another pid: the namespace's are its own


@pytest.mark.anyio
async def test_a_leak_past_the_memory_cap_fails_its_task_and_the_worker_is_replaced(sandboxed: Scheduler) -> None:
    assert await _outputs(sandboxed, "leak", mb=16) == 16  # below the cap it just grows
    executor: Any = sandboxed.registry.get("cpp")
    first = executor.pid
    cap = (await executor.health()).details["sandbox"]["memory_cap"]
    other = asyncio.ensure_future(sandboxed.run("apps/sleep", 0.5))  # another executor, meanwhile
    if cap.startswith("cgroup"):
        # the kernel's OOM killer ends the worker: its task fails, typed, and a new worker serves
        with pytest.raises(SandboxViolation, match="memory cap .*256 MB") as caught:
            await _outputs(sandboxed, "leak", mb=1024)
        assert not caught.value.retryable and not isinstance(caught.value, ExecutorCrashed)
        assert await _outputs(sandboxed, "leak", mb=16) == 16  # a new worker, holding only this call's
        assert executor.pid not in (None, first)
        health = await executor.health()
        assert health.details["restarts"] == 1 and "memory cap" in health.message
    else:
        # RLIMIT_AS (no writable memory cgroup): the allocation itself fails, the worker lives on
        assert cap.startswith("RLIMIT_AS")
        with pytest.raises(ExecutorError, match="out of memory"):
            await _outputs(sandboxed, "leak", mb=1024)
        assert await _outputs(sandboxed, "leak", mb=16) == 32 and executor.pid == first
    assert cap.endswith("256 MB")
    assert (await other).outputs == "slept"


def test_the_knobs_come_from_an_executors_table() -> None:
    placement = Placement.from_settings({"placement": "sandbox", "sandbox_roots": ["/srv/models"],
                                         "sandbox_memory_mb": 512, "sandbox_cpus": 1.5,
                                         "sandbox_env": {"OMP_NUM_THREADS": "1"}, "sandbox_network": True})
    assert placement is not None
    assert (placement.kind, placement.sandbox_roots, placement.sandbox_memory_mb) == ("sandbox", ("/srv/models",), 512)
    assert placement.sandbox_cpus == 1.5 and placement.sandbox_network
    assert placement.sandbox_env["OMP_NUM_THREADS"] == "1"
    for bad, says in (({"sandbox_roots": "/srv"}, "list of absolute paths"),
                      ({"sandbox_roots": ["models"]}, "absolute path"),
                      ({"sandbox_writable": ["/"]}, "other than /"),
                      ({"sandbox_memory_mb": 0}, ">= 16"),
                      ({"sandbox_cpus": -1}, "> 0"),
                      ({"sandbox_network": "yes"}, "true or false"),
                      ({"sandbox_env": {"A": 1}}, "table of strings")):
        with pytest.raises(ConfigError, match=says):
            Placement.from_settings({"placement": "sandbox", **bad})
    with pytest.raises(ConfigError, match="need.* placement 'sandbox'"):
        Placement.from_settings({"placement": "process", "sandbox_memory_mb": 512})


@given(st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=3))
def test_only_absolute_paths_are_bound(paths: list[str]) -> None:
    good = all(p.startswith("/") and "\0" not in p and p.rstrip("/") not in ("", "/proc", "/dev", "/tmp")
               for p in paths)
    try:
        placement = Placement.sandbox(roots=paths)
    except ConfigError:
        assert not good
    else:
        assert good and placement.sandbox_roots == tuple(paths)


def test_a_host_that_exits_without_closing_leaves_no_folder_nor_cgroup() -> None:
    skip_without_namespaces()
    script = ("import os\n"
              "from edgecompute import Placement, Registry\n"
              "registry = Registry.discover(settings={}, placement={'demo': Placement.sandbox()})\n"
              "registry.get('demo')\n"
              "print(os.getpid(), registry.get('demo').pid)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    host, worker = map(int, done.stdout.split())
    assert worker != host
    assert not our_segments(host)
    groups = [line.split(":", 2)[2].strip() for line in Path("/proc/self/cgroup").read_text().splitlines()
              if ":memory:" in line]
    if groups:
        folder = Path("/sys/fs/cgroup/memory") / groups[0].lstrip("/")
        assert not list(folder.glob(f"edgecompute-ec-{host}-*"))


@pytest.fixture
async def throttled(hostile: str) -> AsyncIterator[Scheduler]:
    async for scheduler in _scheduler(hostile, cpp_sandbox(cpus=0.05)):
        yield scheduler


def _cpu_group() -> Path | None:
    """This process's cgroup v1 cpu folder, where a sandbox of ours makes its group."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, names, path = line.split(":", 2)
        if "cpu" in names.split(","):
            return Path("/sys/fs/cgroup/cpu") / path.lstrip("/")
    return None


@pytest.mark.anyio
async def test_the_cpu_cap_throttles_the_worker(throttled: Scheduler) -> None:
    import numpy as np

    executor: Any = throttled.registry.get("cpp")
    cap = (await executor.health()).details["sandbox"]["cpu_cap"]
    if not cap.startswith("cgroup"):
        assert cap.startswith("none")  # no writable cpu controller: health says so
        return
    assert cap == "cgroup v1 cpu quota, 0.05 CPU"
    folder = _cpu_group()
    assert folder is not None
    (group,) = folder.glob(f"edgecompute-ec-{os.getpid()}-*")
    assert int((group / "cpu.cfs_quota_us").read_text()) == 5000
    image = np.random.default_rng(0).random((1500, 1500), dtype=np.float32)
    for _ in range(4):  # ~10 ms of CPU each: past 5 ms per 100 ms period, the kernel throttles
        await throttled.run("cpp/gaussian_blur", image, params={"sigma": 3.0})
    stat = dict(line.split() for line in (group / "cpu.stat").read_text().splitlines())
    assert int(stat["nr_throttled"]) > 0
