"""The cpp executor in process: plugin sources, the scheduler path, zero-copy outputs, the GIL,
cancellation, errors, metrics and health."""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import sys
import threading
from pathlib import Path

import attrs
import numpy as np
import pytest

from edgecompute import Config, HealthStatus, Registry, Request, Resources, Scheduler
from edgecompute.errors import ConfigError, ExecutorError, InvalidRequest, PluginError, TaskTimeout
from edgecompute_cpp import CppExecutor, build_plugin
from edgecompute_cpp._native import COPY_BELOW, _Memory

from .conftest import PLUGINS

pytestmark = pytest.mark.anyio


def scheduler(executor: CppExecutor, cpu: float = 4) -> Scheduler:
    return Scheduler(Registry([executor]), capacity=Resources(cpu=cpu, memory_mb=4096), config=Config())


# -- where plugins come from ----------------------------------------------------------------------

def test_plugin_path_environment_variable(testplug: Path, oldabi: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    directory = tmp_path / "plugins"
    directory.mkdir()
    (directory / "oldabi.so").symlink_to(oldabi)
    (directory / "README.txt").write_text("not a plugin")
    monkeypatch.setenv("EDGECOMPUTE_CPP_PLUGIN_PATH", os.pathsep.join([str(testplug), str(directory)]))
    executor = CppExecutor(builtin=False)
    names = {a.name for a in executor.algorithms()}
    assert {"testplug.echo", "testplug.segfault", "oldabi.double"} <= names
    plugins = {p.name: p for p in executor._ensure().plugins.values()}
    assert plugins["testplug"].source == "EDGECOMPUTE_CPP_PLUGIN_PATH"


def test_plugin_path_may_hold_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGECOMPUTE_CPP_PLUGIN_PATH", str(PLUGINS / "testplug.cpp"))
    executor = CppExecutor(builtin=False)
    assert "testplug.spin" in {a.name for a in executor.algorithms()}


def test_entry_points_of_installed_distributions(testplug: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # a real (if minimal) installed distribution: dist-info with entry points, and its module
    site = tmp_path / "site"
    dist = site / "cppplugins_demo-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: cppplugins-demo\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[edgecompute_cpp.plugins]\n"
        "testplug = cppplugins_demo:LIBRARY\n"
        "oldabi = cppplugins_demo:old_source\n"
        "broken = cppplugins_demo:missing_attribute\n"
    )
    (site / "cppplugins_demo.py").write_text(
        f"LIBRARY = {str(testplug)!r}\n"
        f"def old_source():\n    return {str(PLUGINS / 'oldabi.cpp')!r}\n"
    )
    monkeypatch.syspath_prepend(str(site))
    executor = CppExecutor({"compile_flags": ["-DEC_ABI_TARGET=1"]}, builtin=False)
    names = {a.name for a in executor.algorithms()}
    assert {"testplug.echo", "oldabi.double"} <= names
    loaded = executor._ensure()
    assert loaded.plugins["testplug"].source == "entry point testplug (cppplugins-demo)"
    assert any("entry point broken" in str(p) for p in loaded.problems)


def test_duplicate_plugin_names_keep_the_first(testplug: Path) -> None:
    executor = CppExecutor(builtin=False, plugins=[str(testplug), str(testplug)])
    assert len([a for a in executor.algorithms() if a.name == "testplug.echo"]) == 1
    assert any("already loaded" in str(p) for p in executor._ensure().problems)


def test_config_is_validated_cheaply() -> None:
    with pytest.raises(ConfigError, match="isolation must be one of inprocess, process"):
        CppExecutor({"isolation": "thread"})
    with pytest.raises(ConfigError, match="unknown setting.*isolaton"):
        CppExecutor({"isolaton": "process"})
    with pytest.raises(ConfigError, match="workers must be an integer >= 1"):
        CppExecutor({"workers": 0})
    with pytest.raises(ConfigError, match="plugins must be a list of paths"):
        CppExecutor({"plugins": "/x.so"})
    with pytest.raises(ConfigError, match="inline_below_us must be a number >= 0"):
        CppExecutor({"inline_below_us": -1})
    with pytest.raises(ConfigError, match="inline_below_us must be a number >= 0"):
        CppExecutor(inline_below_us=True)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="compile_flags must be a list of strings"):
        CppExecutor({"compile_flags": "-O3"})
    with pytest.raises(ConfigError, match="block_below_us must be a number >= 0"):
        CppExecutor({"block_below_us": -1})
    with pytest.raises(ConfigError, match="exclude must be a list of paths"):
        CppExecutor({"exclude": "/x.so"})
    with pytest.raises(ConfigError, match="builtin must be true or false"):
        CppExecutor({"builtin": 1})
    with pytest.raises(ConfigError, match="unknown setting.*wait_below_us"):  # gone with the old worker pool
        CppExecutor({"isolation": "process", "wait_below_us": 0})
    settings = CppExecutor({"isolation": "process", "max_inputs": 4}, workers=3).settings
    assert (settings.isolation, settings.workers, settings.limits.max_inputs) == ("process", 3, 4)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        settings.workers = 1  # type: ignore[misc]


def test_discovery_registers_cpp_and_passes_its_settings() -> None:
    registry = Registry.discover(settings={"cpp": {"isolation": "process", "workers": 3}})
    assert "cpp" in registry.names()
    executor = registry.get("cpp")
    assert isinstance(executor, CppExecutor)
    assert executor.isolation == "process" and executor.workers == 3
    assert registry.select("cpp/gaussian_blur").algorithm.description.startswith("Separable gaussian blur")
    asyncio.run(registry.aclose())


# -- calls through the scheduler -------------------------------------------------------------------

async def test_scheduler_runs_bundled_and_plugin_algorithms(cpp: CppExecutor, testplug: Path) -> None:
    executor = CppExecutor(plugins=[str(testplug)])
    image = np.random.default_rng(0).random((64, 80), dtype=np.float32)
    async with scheduler(executor) as s:
        blurred = await s.run("cpp/gaussian_blur", {"image": image}, params={"sigma": np.float32(1.5)})
        echoed = await s.run("cpp/testplug.echo", image)
        live = await s.run("testplug.live")
    np.testing.assert_allclose(blurred.outputs, cpp.call("gaussian_blur", image, {"sigma": 1.5}))
    assert blurred.executor == "cpp" and blurred.timings["run"] > 0
    np.testing.assert_array_equal(echoed.outputs, image)
    assert live.outputs.dtype == np.int64
    assert executor.requirements(Request("cpp/testplug.echo")) == Resources(cpu=0.5, memory_mb=1)
    algorithms = {a.name: a for a in executor.algorithms()}
    assert algorithms["testplug.live"].thread_safe is False
    assert algorithms["gaussian_blur"].thread_safe is True


async def test_large_outputs_are_numpy_arrays_over_plugin_memory_released_on_gc(
    testplug: Path, tmp_path: Path
) -> None:
    # A private copy of the library: dlopen shares one instance (and so one live counter) per
    # path, and outputs other tests still hold would be freed at unrelated moments.
    private = tmp_path / "testplug-private.so"
    shutil.copyfile(testplug, private)
    executor = CppExecutor(builtin=False, plugins=[str(private)])
    before = int(executor.call("testplug.live"))
    large = np.arange(float(COPY_BELOW // 8 + 1))  # one element past the copying threshold
    arrays = [executor.call("testplug.echo", large) for _ in range(5)]
    assert isinstance(arrays[0].base, _Memory)  # no copy: the array is a view of the plugin's block
    assert arrays[0].flags.writeable and arrays[0].flags.c_contiguous
    assert int(executor.call("testplug.live")) == before + 5
    view = arrays[0][10:20]  # a view keeps the block alive too
    del arrays
    gc.collect()
    assert int(executor.call("testplug.live")) == before + 1
    np.testing.assert_array_equal(view, np.arange(10.0, 20.0))
    del view
    gc.collect()
    assert int(executor.call("testplug.live")) == before


def test_small_outputs_are_copied_and_the_plugin_memory_released_at_once(testplug: Path, tmp_path: Path) -> None:
    private = tmp_path / "testplug-private.so"
    shutil.copyfile(testplug, private)
    executor = CppExecutor(builtin=False, plugins=[str(private)])
    before = int(executor.call("testplug.live"))
    for size in (0, 1, 1000, COPY_BELOW // 8):
        source = np.arange(float(size)).reshape(-1, 1) if size else np.zeros((0, 3))
        echoed = executor.call("testplug.echo", source)
        assert type(echoed.base) is not _Memory and echoed.flags.owndata and echoed.flags.writeable
        np.testing.assert_array_equal(echoed, source)
        assert echoed.shape == source.shape and echoed.dtype == source.dtype
        assert int(executor.call("testplug.live")) == before  # released before call() returned


def test_large_output_blocks_are_reused_across_calls_and_threads() -> None:
    # glibc hands a thread's freed multi-megabyte block back to the system, so every call would
    # fault in its output's pages again (~1,000 faults per 4 MB image); ec::output keeps the blocks.
    import resource

    executor = CppExecutor({"isolation": "inprocess"})
    image = np.random.default_rng(0).random((1024, 1024), dtype=np.float32)  # 4 MiB in and out
    expected = executor.call("gaussian_blur", image, {"sigma": 1.5})[::37, ::41].copy()
    wrong = []

    def blurs(n: int) -> None:
        for _ in range(n):
            # a sample: comparing whole images would fault in numpy's own temporaries
            if not np.array_equal(executor.call("gaussian_blur", image, {"sigma": 1.5})[::37, ::41], expected):
                wrong.append(n)

    for _ in range(2):  # warm up: each thread's first blocks are new
        threads = [threading.Thread(target=blurs, args=(2,)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    threads = [threading.Thread(target=blurs, args=(10,)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # 20 outputs of 1,024 pages each; what is left is Python's and the test's own
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults < 500
    assert not wrong  # a reused block holds the new call's output, nothing of the last one



def test_the_gil_is_released_while_cpp_runs(testplug: Path) -> None:
    executor = CppExecutor(builtin=False, plugins=[str(testplug)])
    executor.algorithms()
    done = threading.Event()

    def spin() -> None:
        executor.call("testplug.spin", None, {"ms": 300})
        done.set()

    thread = threading.Thread(target=spin)
    thread.start()
    ticks = 0
    while not done.is_set():
        ticks += 1  # pure Python: only runs while the C++ call has let go of the GIL
    thread.join()
    assert ticks > 10_000


async def test_plugin_errors_are_typed(testplug: Path) -> None:
    executor = CppExecutor(builtin=False, plugins=[str(testplug)])
    async with scheduler(executor) as s:
        with pytest.raises(ExecutorError,
                           match=r"testplug.fail failed \(internal error\): the test plugin failed on purpose"):
            await s.run("cpp/testplug.fail")
        with pytest.raises(InvalidRequest, match="echo needs an input"):
            await s.run("cpp/testplug.echo")
        with pytest.raises(InvalidRequest, match="bad params JSON|must be a number"):
            await s.run("cpp/testplug.spin", params={"ms": "long"})
    metrics = executor.metrics()
    assert metrics["testplug.fail"]["errors"] == 1 and metrics["testplug.echo"]["errors"] == 1


async def test_a_timed_out_task_sets_the_cancel_flag_and_the_plugin_stops(testplug: Path) -> None:
    executor = CppExecutor(builtin=False, plugins=[str(testplug)])
    async with scheduler(executor) as s:
        with pytest.raises(TaskTimeout):
            await s.run("cpp/testplug.spin", params={"ms": 20_000}, timeout=0.3)
        for _ in range(100):  # at most 5 s of polling: the spin stops long before its 20 s, or this fails
            if executor.metrics().get("testplug.spin", {}).get("errors"):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the plugin did not notice its cancellation")
    assert executor.metrics()["testplug.spin"]["errors"] == 1


async def test_cheap_calls_run_inline_after_the_first() -> None:
    executor = CppExecutor(inline_below_us=1e6)  # everything counts as cheap here
    x = np.ones(16, np.float32)
    async with scheduler(executor) as s:
        submitted = []
        pool_submit = s._threads.submit

        def counting_submit(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
            submitted.append(fn)
            return pool_submit(fn, *args, **kwargs)

        s._threads.submit = counting_submit  # type: ignore[method-assign]
        assert (await s.run("cpp/sum", x)).outputs == 16.0
        assert len(submitted) == 1  # the first call of a size went to a worker thread
        for _ in range(20):
            assert (await s.run("cpp/sum", x)).outputs == 16.0
        assert len(submitted) == 1  # the next ones ran on the loop: no thread hop
        await s.run("cpp/sum", np.ones(100_000, np.float32))  # a new size goes to a thread first
        assert len(submitted) == 2
    assert executor.metrics()["sum"]["calls"] == 22


async def test_metrics_and_health(testplug: Path) -> None:
    executor = CppExecutor(plugins=[str(testplug), str(PLUGINS / "future.cpp")])
    async with scheduler(executor) as s:
        for _ in range(3):
            await s.run("cpp/sobel", np.ones((8, 8)))
        health = await executor.health()
    assert health.status is HealthStatus.DEGRADED  # future.cpp was refused
    names = [p["name"] for p in health.details["plugins"]]
    assert names == ["builtin", "testplug"]
    assert any("ABI version 99" in p for p in health.details["problems"])
    sobel = health.details["metrics"]["sobel"]
    assert sobel["calls"] == 3 and sobel["errors"] == 0 and 0 < sobel["mean_s"] <= sobel["max_s"]
    healthy = CppExecutor()
    assert (await healthy.health()).status is HealthStatus.OK
    nothing = CppExecutor(builtin=False)
    assert (await nothing.health()).status is HealthStatus.DOWN


def test_cli_lists_plugins(testplug: Path) -> None:
    import subprocess

    env = {**os.environ, "EDGECOMPUTE_CPP_PLUGIN_PATH": str(testplug)}
    done = subprocess.run([sys.executable, "-m", "edgecompute_cpp.cli", "list"], capture_output=True, text=True,
                          env=env, check=True)
    assert '"name": "testplug"' in done.stdout and '"gaussian_blur"' in done.stdout
    bad = subprocess.run([sys.executable, "-m", "edgecompute_cpp.cli", "build", str(PLUGINS / "broken.cpp")],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "undeclared_identifier_here" in bad.stderr


def test_build_plugin_result_loads(tmp_path: Path) -> None:
    library = build_plugin(PLUGINS / "testplug.cpp", cache=tmp_path)
    executor = CppExecutor(builtin=False, plugins=[library])
    assert "testplug.abort" in {a.name for a in executor.algorithms()}
    missing = CppExecutor(builtin=False, plugins=[tmp_path / "nope.so"])
    assert missing.algorithms() == []
    problems = missing._ensure().problems
    assert len(problems) == 1 and isinstance(problems[0], PluginError) and "does not exist" in str(problems[0])


def test_the_demo_hook_runs_through_a_runtime() -> None:
    from edgecompute import Runtime
    from edgecompute_cpp import plugin

    lines: list[str] = []
    with Runtime(Registry([CppExecutor()]), config=Config(), capacity=Resources(cpu=1, memory_mb=1024)) as rt:
        plugin.demo(runtime=rt, echo=lines.append)
    assert any("cpp/gaussian_blur" in line for line in lines)
    assert lines[-1].endswith("peak at bin 100")


def test_blocking_call_runs_in_process_calls_on_the_callers_thread() -> None:
    # what a placement worker uses to run a call on the thread that read it (no hop to a pool)
    from edgecompute.executor import blocking_call

    executor = CppExecutor()
    image = np.random.default_rng(3).random((32, 48), dtype=np.float32)
    request = Request("cpp/gaussian_blur", image, params={"sigma": 1.5})
    call = blocking_call(executor, request)
    assert call is not None

    class Ctx:
        algorithm = next(a for a in executor.algorithms() if a.name == "gaussian_blur")

    response = call(request, Ctx())  # type: ignore[arg-type]
    np.testing.assert_array_equal(response.outputs, executor.call("gaussian_blur", image, {"sigma": 1.5}))
    assert executor.metrics()["gaussian_blur"]["calls"] == 2
    assert blocking_call(CppExecutor(isolation="process"), request) is None  # it has workers of its own


def test_excluded_plugins_are_not_loaded_however_found(testplug: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGECOMPUTE_CPP_PLUGIN_PATH", str(testplug))  # found twice: config and path
    executor = CppExecutor({"exclude": [str(testplug), "builtin"], "plugins": [str(testplug)]})
    names = {a.name for a in executor.algorithms()}
    assert not any(name.startswith("testplug.") for name in names) and "gaussian_blur" not in names
    assert "testplug.echo" in {a.name for a in CppExecutor({"builtin": False}).algorithms()}
