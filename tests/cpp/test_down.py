"""An executor whose bundled plugin cannot load (here: compiled from source, with no compiler)
says so, and why, to a request for a bundled algorithm; a plugin given as source with no compiler
fails with NoCompiler; the instruction-set level of a wheel's library is chosen safely."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pytest

from edgecompute import Config, Registry, Resources, Scheduler
from edgecompute.errors import ConfigError, PluginError, UnknownAlgorithm
from edgecompute.models import HealthStatus
from edgecompute_cpp import BundledPluginDown, CppExecutor, NoCompiler, _build, _isa, build_plugin
from edgecompute_cpp._checks import BUNDLED

PLUGINS = Path(__file__).parent / "plugins"

pytestmark = pytest.mark.anyio


@pytest.fixture
def no_compiler(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No compiler on PATH, none in $CXX, an empty cache, and the bundled plugin compiled from
    source (``native``) even where a wheel's prebuilt libraries are installed."""
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("EDGECOMPUTE_CPP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(_isa.ISA_ENV, _isa.NATIVE)


def test_the_host_lists_exactly_the_bundled_plugins_algorithms(cpp: CppExecutor) -> None:
    # what a down executor lists must be what the plugin would offer
    assert sorted(BUNDLED) == sorted(a.name for a in cpp.algorithms())


async def test_a_request_to_a_down_executor_says_it_is_down_and_why(no_compiler: None) -> None:
    executor = CppExecutor()
    health = await executor.health()
    assert health.status is HealthStatus.DOWN
    assert "bundled plugin failed to load" in health.message and "no C++ compiler" in health.message
    assert sorted(a.name for a in executor.algorithms()) == sorted(BUNDLED)
    async with Scheduler(Registry([executor]), capacity=Resources(cpu=2, memory_mb=1024), config=Config()) as s:
        for name in ("cpp/sum", "sum"):
            with pytest.raises(BundledPluginDown) as caught:
                await s.run(name, np.ones(3))
            assert not isinstance(caught.value, UnknownAlgorithm) and isinstance(caught.value, PluginError)
            message = str(caught.value)
            assert message.startswith("cpp/sum cannot run: executor 'cpp' is down")
            assert "no C++ compiler was found" in message and "install the edgecompute-cpp wheel" in message
        with pytest.raises(UnknownAlgorithm):  # a name it never had is still unknown
            await s.run("cpp/no_such_thing", np.ones(3))
    with pytest.raises(BundledPluginDown, match="cpp/gaussian_blur cannot run"):
        executor.call("gaussian_blur", np.ones((4, 4), np.float32), {"sigma": 1.0})


async def test_other_plugins_still_run_while_the_bundled_one_is_down(testplug: Path, no_compiler: None) -> None:
    executor = CppExecutor(plugins=[str(testplug)])
    health = await executor.health()
    assert health.status is HealthStatus.DEGRADED and "no C++ compiler" in health.details["builtin_down"]
    async with Scheduler(Registry([executor]), capacity=Resources(cpu=2, memory_mb=1024), config=Config()) as s:
        x = np.arange(5.0)
        np.testing.assert_array_equal((await s.run("cpp/testplug.echo", x)).outputs, x)
        with pytest.raises(BundledPluginDown, match="is down"):
            await s.run("cpp/matmul", {"a": np.ones((2, 2)), "b": np.ones((2, 2))})


def test_a_plugin_given_as_source_needs_a_compiler(no_compiler: None) -> None:
    source = PLUGINS / "testplug.cpp"
    with pytest.raises(NoCompiler, match=re.escape("failed: it is C++ source, and building it needs a C++ compiler")) \
            as caught:
        build_plugin(source)
    assert str(source) in str(caught.value) and "give the plugin as a compiled .so" in str(caught.value)
    problems = CppExecutor(plugins=[str(source)], builtin=False)._ensure().problems
    assert [type(p) for p in problems] == [NoCompiler]


def _libraries(directory: Path, names: list[str]) -> Path:
    directory.mkdir()
    for name in names:
        (directory / f"builtin-{name}.so").write_bytes(b"")
    return directory


def test_the_highest_level_this_cpu_runs_is_chosen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(_isa.ISA_ENV, raising=False)
    every = [level.name for level in _isa.levels()]
    runnable = [level.name for level in _isa.supported_levels()]
    assert runnable[0] == every[0] and runnable == every[:len(runnable)]  # levels are cumulative
    directory = _libraries(tmp_path / "all", every)
    found = _isa.best_level(directory)
    assert found is not None and found[0].name == runnable[-1] and found[1] == directory / f"builtin-{runnable[-1]}.so"
    assert _isa.best_level(tmp_path / "none") is None  # a source install: compiled on first use
    only_baseline = _libraries(tmp_path / "baseline", every[:1])
    assert _isa.best_level(only_baseline) == (_isa.levels()[0], only_baseline / f"builtin-{every[0]}.so")


def test_a_level_named_by_the_operator_must_be_one_this_cpu_runs(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    every = [level.name for level in _isa.levels()]
    directory = _libraries(tmp_path / "all", every)
    monkeypatch.setenv(_isa.ISA_ENV, every[0])
    found = _isa.best_level(directory)
    assert found is not None and found[0].name == every[0]
    monkeypatch.setenv(_isa.ISA_ENV, "x86-64-v9")
    with pytest.raises(ValueError, match="holds the bundled plugin for"):
        _isa.best_level(directory)
    monkeypatch.setenv(_isa.ISA_ENV, _isa.NATIVE)
    assert _isa.best_level(directory) is None
    monkeypatch.setattr(_isa, "_cpu_features", lambda: frozenset())  # a CPU with the baseline only
    if len(every) > 1:
        monkeypatch.setenv(_isa.ISA_ENV, every[-1])
        with pytest.raises(ValueError, match="this CPU lacks its instructions"):
            _isa.best_level(directory)
    monkeypatch.delenv(_isa.ISA_ENV)
    assert _isa.best_level(directory) == (_isa.levels()[0], directory / f"builtin-{every[0]}.so")


def test_a_level_named_in_a_source_install_is_a_config_error(monkeypatch: pytest.MonkeyPatch,
                                                             tmp_path: Path) -> None:
    monkeypatch.setenv(_isa.ISA_ENV, "x86-64-v3")
    with pytest.raises(ValueError, match="holds no prebuilt bundled plugin"):
        _isa.best_level(tmp_path / "none")
    monkeypatch.setattr(_build, "PREBUILT_DIR", tmp_path / "none")  # a source install, whatever this one is
    with pytest.raises(ConfigError, match="holds no prebuilt bundled plugin"):
        _build.build_builtin()
    executor = CppExecutor()
    problems = executor._ensure().problems
    assert len(problems) == 1 and "holds no prebuilt bundled plugin" in str(problems[0])
    with pytest.raises(BundledPluginDown, match="holds no prebuilt bundled plugin"):
        executor.call("sum", np.ones(2))


def test_the_errors_cross_a_placement_workers_pipe_whole() -> None:
    bundled = NoCompiler("the bundled plugin", bundled=True)
    for error in (NoCompiler("scale.cpp"), bundled, BundledPluginDown("cpp/sum", bundled)):
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and str(copy) == str(error) and copy.reason == error.reason
