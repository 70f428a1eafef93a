"""Discovery of executors from separately installed distributions.

CI installs tests/plugins/edgecompute-testplugin and tests/plugins/edgecompute-brokenplugin with
pip, exactly as a user installs a third-party executor; nothing here registers them by hand.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from edgecompute import Registry, Runtime
from edgecompute.config import Config
from edgecompute.errors import ExecutorError, InvalidRequest, PluginError

edgecompute_testplugin = pytest.importorskip(
    "edgecompute_testplugin", reason="pip install tests/plugins/edgecompute-testplugin (CI does)"
)


def test_discovery_finds_the_installed_executor_without_building_it() -> None:
    before = edgecompute_testplugin.built
    registry = Registry.discover()
    assert "text" in registry.names()
    entry = {e.name: e for e in registry.executors()}["text"]
    assert entry.source == "testplugin"
    assert not entry.built
    assert edgecompute_testplugin.built == before
    assert registry.select("text/upper").algorithm.description == "Upper-case a string"
    assert edgecompute_testplugin.built == before + 1


def test_broken_plugins_are_reported_and_discovery_goes_on() -> None:
    registry = Registry.discover()
    problems = "\n".join(str(p) for p in registry.problems)
    assert "broken_import (edgecompute-brokenplugin)" in problems
    assert "No module named 'edgecompute_dependency_that_does_not_exist'" in problems
    assert "broken_hook" in problems and "this plugin's registration is broken" in problems
    with pytest.raises(PluginError, match="executor 'broken' failed to build: OSError: libbroken.so"):
        registry.get("broken")
    assert registry.select("text/upper")  # the good plugin still works


def test_the_discovered_executor_runs_requests_streams_and_retries() -> None:
    config = Config(retries=2, retry_backoff=0.001, executors={"text": {"greeting": "hi"}})
    with Runtime(config=config) as rt:
        assert rt.run("text/upper", "abc").outputs == "ABC"
        assert list(rt.stream("text/words", "one two three")) == ["one", "two", "three"]
        assert rt.run("text/flaky", "x", params={"failures": 2}).outputs == "ok after 3 calls"
        with pytest.raises(ExecutorError, match="transient failure"):
            rt.run("text/flaky", "x", params={"failures": 10}, retries=0)
        health = rt.health()
        assert health["text"].details["config"] == {"greeting": "hi"}
        assert health["broken"].status.value == "down"


def test_task_event_hook_of_an_installed_plugin_sees_every_event() -> None:
    edgecompute_testplugin.events.clear()
    with Runtime(config=Config()) as rt:
        rt.run("text/upper", "abc")
    assert edgecompute_testplugin.events == [
        ("submitted", "text/upper"), ("started", "text/upper"), ("succeeded", "text/upper")
    ]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    # a bare environment, but coverage's own variable, so that `make test` measures the CLI too
    measured = {name: value for name, value in os.environ.items() if name.startswith("COVERAGE_")}
    # the timeout only guards against a hang: `demo` runs every installed executor's demo, and the
    # ml one loads an LLM (51 s of a 2-core VM under load)
    return subprocess.run([sys.executable, "-m", "edgecompute", *args], capture_output=True, text=True,
                          timeout=600, env={"PATH": "/usr/bin:/bin", "HOME": "/tmp", **measured})


def test_cli_lists_executors_and_problems() -> None:
    result = run_cli("executors", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    text = next(row for row in report["executors"] if row["name"] == "text")
    assert text["version"] == "1.2.3"
    assert "text/upper" in [a["name"] for a in text["algorithms"]]
    assert text["health"]["status"] == "ok"
    assert any("broken_hook" in problem for problem in report["problems"])

    table = run_cli("executors")
    assert "text 1.2.3" in table.stdout and "text/words" in table.stdout


def test_cli_run(tmp_path) -> None:  # type: ignore[no-untyped-def]
    result = run_cli("run", "text/upper", "--input", '"shout"')
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["outputs"] == "SHOUT"
    inputs = tmp_path / "in.json"
    inputs.write_text('"one two"')
    result = run_cli("run", "text/words", "--input", f"@{inputs}")
    assert result.stdout.splitlines()[:2] == ["one", "two"]  # the streamed chunks come first
    assert json.loads(result.stdout.split("\n", 2)[2])["outputs"] == 2
    result = run_cli("run", "text/uper", "--input", '"x"')
    assert result.returncode == 1
    assert "UnknownAlgorithm" in result.stderr and "did you mean 'text/upper'" in result.stderr
    result = run_cli("run", "text/upper", "--input", "{not json")
    assert result.returncode == 2 and "not valid JSON" in result.stderr


def test_cli_demo_runs_the_tour() -> None:
    result = run_cli("demo")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "installed executors: " in out and "text" in out
    assert "finished in this order: blocker, high, mid, low-1, low-2" in out
    assert "chunks: [5, 4, 3, 2, 1]" in out
    assert "TaskTimeout after 0.1" in out
    assert "InfeasibleRequest" in out and "UnknownAlgorithm" in out
    assert "200 results" in out


def test_the_core_registers_its_demo_executor_through_its_own_entry_point() -> None:
    # the first example of docs/getting-started.md needs no test plugin: "demo" ships with the core
    registry = Registry.discover()
    assert {e.name: e.source for e in registry.executors()}["demo"] == "demo"
    with Runtime(registry) as rt:
        assert rt.run("demo/upper", "hello").outputs == "HELLO"
        assert rt.map("demo/word_count", ["a", "b c"]) == [1, 2]
        assert list(rt.stream("demo/generate", "one two", params={"max_tokens": 3})) == ["one", "two", "one"]
        with pytest.raises(InvalidRequest, match="max_tokens must be an integer"):
            rt.run("demo/generate", "x", params={"max_tokens": "many"})
        with pytest.raises(InvalidRequest, match="unknown param.*max_token; valid: delay, max_tokens"):
            rt.run("demo/generate", "x", params={"max_token": 3})
        with pytest.raises(InvalidRequest, match="demo/upper: unknown param.*shout; valid: none"):
            rt.run("demo/upper", "x", params={"shout": True})
    assert "demo" not in Registry.discover(settings={"demo": {"enabled": False}}).names()


def test_cli_run_prints_each_chunk_as_it_comes_then_the_outputs() -> None:
    result = run_cli("run", "demo/generate", "--input", '"once upon"', "--param", "max_tokens=3")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:3] == ["once", "upon", "once"]
    assert json.loads("\n".join(lines[3:]))["outputs"] == "once upon once"
    quiet = run_cli("run", "demo/generate", "--input", '"once upon"', "--param", "max_tokens=3", "--no-stream")
    assert quiet.returncode == 0, quiet.stderr
    assert json.loads(quiet.stdout)["outputs"] == "once upon once"


def test_cli_run_takes_retries_and_its_own_config_option(tmp_path: Path) -> None:
    failing = run_cli("run", "text/flaky", "--input", '"x"', "--param", "failures=1", "--retries", "0")
    assert failing.returncode == 1 and "transient failure" in failing.stderr
    retried = run_cli("run", "text/flaky", "--input", '"x"', "--param", "failures=1", "--retries", "1")
    assert retried.returncode == 0, retried.stderr
    config = tmp_path / "edgecompute.toml"
    config.write_text("[executors.demo]\nenabled = false\n")
    disabled = run_cli("run", "demo/upper", "--input", '"x"', "--config", str(config))
    assert disabled.returncode == 1 and "UnknownAlgorithm" in disabled.stderr


def test_registering_a_half_executor_names_what_it_lacks() -> None:
    class Half:
        name = "half"
        version = "1"

        def algorithms(self) -> list[Any]:
            return []

    with pytest.raises(TypeError, match=r"it lacks requirements, execute, health, aclose of the Executor protocol"):
        Registry().register(Half())
    registry = Registry()
    registry.register(lambda: Half(), name="half")
    with pytest.raises(PluginError, match=r"which is not an Executor \(it lacks requirements, execute, health"):
        registry.get("half")
