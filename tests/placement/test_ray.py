"""Ray placement: resources in Ray's terms, infeasible requests refused at once, Ray's files in a
folder of ours, crashes of the actor, and ray imported only when used."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from edgecompute import Placement, Registry, Request, Resources, Scheduler
from edgecompute.errors import ExecutorCrashed, InfeasibleRequest, PluginError
from edgecompute.placement.ray import ray_options

from .apps import apps

pytestmark = pytest.mark.anyio


def test_resources_map_to_rays_names() -> None:
    assert ray_options(Resources(cpu=2, memory_mb=512, gpus=1), {"accelerator_x": 1}) == {
        "num_cpus": 2, "num_gpus": 1, "memory": 512 * 2**20, "resources": {"accelerator_x": 1}}
    assert ray_options(Resources(cpu=0.5, gpu_memory_mb=100)) == {"num_cpus": 0.5, "num_gpus": 1}


def test_ray_is_imported_only_when_a_ray_placed_executor_is_built() -> None:
    code = ("import sys\nfrom edgecompute import Placement, Registry\n"
            "r = Registry.discover(placement={'text': Placement.ray()})\n"
            "assert r.placement('text').kind == 'ray' and 'text' in r.names()\n"
            "print('ray' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "False"


def test_a_wasm_trap_after_ray_starts_does_not_end_the_host() -> None:
    # Ray's driver installs crash handlers for SIGILL/SIGSEGV; wasmtime reports a guest's trap
    # through those signals, so with Ray's handlers in front the host process died (SIGILL)
    pytest.importorskip("wasmtime")
    folder = tempfile.mkdtemp(prefix="ecray")  # short: Ray puts Unix sockets in it
    code = (
        "import wasmtime\n"
        "from edgecompute import Placement\n"
        "from edgecompute.placement.ray import connect, shutdown\n"
        "def trap():\n"
        "    engine = wasmtime.Engine(); store = wasmtime.Store(engine)\n"
        "    module = wasmtime.Module(engine, '(module (func (export \"f\") unreachable))')\n"
        "    try:\n"
        "        wasmtime.Instance(store, module, []).exports(store)['f'](store)\n"
        "    except wasmtime.Trap:\n"
        "        print('trapped', flush=True)\n"
        "trap()\n"
        f"connect(Placement.ray(num_cpus=1, temp_dir={folder!r}))\n"
        "trap()\n"
        "shutdown()\n"
    )
    try:
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["trapped", "trapped"]


def test_ray_keeps_its_files_in_our_folder(ray_placement: Placement) -> None:
    import ray

    folder = Path(ray_placement.ray_temp_dir or "")
    assert any(entry.name.startswith("session_") for entry in folder.iterdir())
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    assert folder in session.parents
    assert not str(session).startswith(os.path.expanduser("~"))


async def test_a_request_the_cluster_can_never_hold_fails_at_once(ray_placement: Placement) -> None:
    registry = Registry(placement={"apps": ray_placement})
    registry.register(apps)
    async with Scheduler(registry, capacity=Resources(cpu=64, memory_mb=1 << 20)) as scheduler:
        with pytest.raises(InfeasibleRequest, match=r"CPU=32 \(cluster has 2\)"):
            await asyncio.wait_for(scheduler.run("apps/echo", 1, resources=Resources(cpu=32)), 10)
        assert (await scheduler.run("apps/echo", 1, resources=Resources(cpu=1))).outputs == 1
    await registry.aclose()


def test_an_actor_the_cluster_can_never_place_is_refused_at_once(ray_placement: Placement) -> None:
    placement = Placement.ray(temp_dir=ray_placement.ray_temp_dir, actor={"cpu": 0.1},
                              custom_resources={"tpu_pod": 4})
    registry = Registry(placement={"apps": placement})
    registry.register(apps)
    with pytest.raises(PluginError) as caught:
        registry.get("apps")
    assert isinstance(caught.value.__cause__, InfeasibleRequest)
    assert "tpu_pod=4 (cluster has 0)" in str(caught.value)


async def test_kill_9_of_the_actor_fails_its_task_and_the_next_ones_succeed(ray_placement: Placement) -> None:
    registry = Registry(placement={"apps": ray_placement})
    registry.register(apps)
    async with Scheduler(registry, capacity=Resources(cpu=8, memory_mb=1 << 16), retries=0) as scheduler:
        actor = (await scheduler.run("apps/pid")).outputs
        handle = scheduler.submit(Request("apps/sleep", 30.0))
        await asyncio.sleep(0.5)
        os.kill(actor, signal.SIGKILL)
        with pytest.raises(ExecutorCrashed, match="died"):
            await handle.result()
        results = await asyncio.gather(*(scheduler.run("apps/echo", i) for i in range(100)))
        assert [r.outputs for r in results] == list(range(100))
        assert (await scheduler.run("apps/pid")).outputs != actor
    await registry.aclose()
