"""Configuration that means what it says (issue 20, items 2, 3, 5 and 7): docs/configuration.md, key by key."""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from edgecompute import (
    Algorithm,
    Config,
    FunctionExecutor,
    Health,
    HealthStatus,
    Registry,
    Request,
    Resources,
    Response,
    Scheduler,
    TaskContext,
)
from edgecompute.errors import ConfigError, InfeasibleRequest, InvalidRequest, PluginError, UnknownAlgorithm
from edgecompute.resources import machine_capacity


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "edgecompute.toml"
    path.write_text(text)
    return path


# -- 3: partial capacities keep the machine's value for the fields not given --------------------


def test_capacity_table_with_only_gpus_keeps_the_machines_cores_and_memory(tmp_path: Path) -> None:
    machine = machine_capacity()
    config = Config.load(write(tmp_path, "[capacity]\ngpus = 1\ngpu_memory_mb = 8000\n"), environ={})
    assert config.capacity == Resources(cpu=machine.cpu, memory_mb=machine.memory_mb, gpus=1, gpu_memory_mb=8000)


def test_capacity_from_the_environment_alone_keeps_the_machines_memory() -> None:
    config = Config.load(environ={"EDGECOMPUTE_CAPACITY__CPU": "4"})
    assert config.capacity == Resources(cpu=4, memory_mb=machine_capacity().memory_mb)


# -- 5: aging must be a finite number of seconds > 0 ----------------------------------------------


@pytest.mark.parametrize("value", ["0", "inf", "-1", "nan"])
def test_aging_that_would_switch_priorities_off_is_refused(tmp_path: Path, value: str) -> None:
    path = write(tmp_path, f"aging = {value}\n")
    with pytest.raises(ConfigError, match=r"aging must be a finite number of seconds > 0") as info:
        Config.load(path, environ={})
    assert str(path) in str(info.value)


def test_aging_from_the_environment_is_checked_too() -> None:
    with pytest.raises(ConfigError, match=r"environment: aging must be a finite number"):
        Config.load(environ={"EDGECOMPUTE_AGING": "inf"})
    assert Config.load(environ={"EDGECOMPUTE_AGING": "0.5"}).aging == 0.5


# -- 7: validation names the key, the valid keys and the close match ------------------------------


def test_misspelt_capacity_key_lists_the_valid_keys_and_the_close_match(tmp_path: Path) -> None:
    path = write(tmp_path, "[capacity]\ncpus = 4\n")
    with pytest.raises(ConfigError) as info:
        Config.load(path, environ={})
    message = str(info.value)
    assert str(path) in message
    assert "'cpus' (did you mean 'cpu'?)" in message
    assert "valid keys: cpu, memory_mb, gpus, gpu_memory_mb" in message


@pytest.mark.parametrize("value", ["1.5", "true", "'one'"])
def test_fractional_gpus_are_refused(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match=r"capacity: gpus must be a whole number of devices"):
        Config.load(write(tmp_path, f"[capacity]\ngpus = {value}\n"), environ={})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('port = "eighty"', r"server.port must be an integer from 0 to 65535, not 'eighty'"),
        ("port = 70000", r"server.port must be an integer from 0 to 65535"),
        ("host = 8000", r"server.host must be a host name or address"),
        ("access_log = 'yes'", r"server.access_log must be true or false"),
        ("max_wait = 'long'", r"server.max_wait must be a number"),
        ("prot = 8000", r"unknown server key 'prot' \(did you mean 'port'\?\)"),
    ],
)
def test_server_table_types_are_checked_at_load(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, f"[server]\n{text}\n")
    with pytest.raises(ConfigError, match=message) as info:
        Config.load(path, environ={})
    assert str(path) in str(info.value)


def test_server_keys_known_at_load_are_the_servers_keys() -> None:
    # the light check in config.py must accept every key the server does, and no other
    settings = pytest.importorskip("edgecompute.server._settings")
    from edgecompute.config import _SERVER_TYPES

    assert set(_SERVER_TYPES) == settings._KNOWN


def test_a_valid_server_table_still_loads(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nhost = "0.0.0.0"\nport = 9000\nmax_wait = 5\n'
                           '[[server.keys]]\nname = "app"\nhash = "sha256:00"\n')
    assert Config.load(path, environ={}).server["port"] == 9000


@pytest.mark.parametrize(
    ("variable", "suggestion"),
    [
        ("EDGECOMPUTE_MAX_QUEU", "did you mean EDGECOMPUTE_MAX_QUEUE?"),
        ("EDGECOMPUTE_CAPACITY_CPU", "did you mean EDGECOMPUTE_CAPACITY__CPU?"),
        ("EDGECOMPUTE_CAPACTY__CPU", "did you mean EDGECOMPUTE_CAPACITY__CPU?"),
        ("EDGECOMPUTE_TIMEOT", "did you mean EDGECOMPUTE_TIMEOUT?"),
    ],
)
def test_misspelt_environment_variable_warns_with_the_close_match(variable: str, suggestion: str) -> None:
    with pytest.warns(UserWarning, match=variable) as record:
        config = Config.load(environ={variable: "4"})
    assert suggestion in str(record[0].message)
    assert config == Config.load(environ={})  # and it is still ignored


@pytest.mark.parametrize(
    "variable",
    ["EDGECOMPUTE_CPP_PLUGIN_PATH", "EDGECOMPUTE_CPP_CACHE", "EDGECOMPUTE_ML_DEVICE", "EDGECOMPUTE_ML_CACHE",
     "EDGECOMPUTE_WASM_TEST_CACHE", "EDGECOMPUTE_URL", "EDGECOMPUTE_API_KEY", "EDGECOMPUTE_MINE_TOKEN"],
)
def test_executors_own_variables_do_not_warn(variable: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Config.load(environ={variable: "x"})


def test_infinite_aging_is_not_a_number_of_seconds() -> None:
    # from_mapping (the Python path) refuses the same values as the file
    with pytest.raises(ConfigError, match="aging"):
        Config.from_mapping({"aging": math.inf})


# -- 3: the Scheduler's capacity argument ------------------------------------------------------


def memory_app() -> FunctionExecutor:
    executor = FunctionExecutor("app")

    @executor.algorithm(resources=Resources(cpu=1, memory_mb=64))
    def double(x: int) -> int:
        return 2 * x

    return executor


@pytest.mark.anyio
async def test_capacity_mapping_keeps_the_machines_memory_so_memory_tasks_run() -> None:
    async with Scheduler(Registry([memory_app()]), config=Config(), capacity={"cpu": 4}) as scheduler:
        assert scheduler.capacity == Resources(cpu=4, memory_mb=machine_capacity().memory_mb)
        assert (await scheduler.run("app/double", 21)).outputs == 42


@pytest.mark.anyio
async def test_capacity_resources_is_exact_as_documented() -> None:
    async with Scheduler(Registry([memory_app()]), config=Config(), capacity=Resources(cpu=4)) as scheduler:
        assert scheduler.capacity == Resources(cpu=4)
        with pytest.raises(InfeasibleRequest):
            await scheduler.run("app/double", 21)


def test_capacity_mapping_applies_over_the_configurations_capacity(tmp_path: Path) -> None:
    config = Config.load(write(tmp_path, "[capacity]\ngpus = 2\ngpu_memory_mb = 1000\n"), environ={})
    scheduler = Scheduler(Registry([]), config=config, capacity={"cpu": 3})
    assert scheduler.capacity == Resources(cpu=3, memory_mb=machine_capacity().memory_mb, gpus=2,
                                           gpu_memory_mb=1000)


@pytest.mark.parametrize(
    ("capacity", "message"),
    [({"cpus": 4}, r"'cpus' \(did you mean 'cpu'\?\).*valid keys"), ({"gpus": 1.5}, "gpus must be a whole number"),
     (4, "capacity must be a Resources or a mapping")],
)
def test_bad_capacity_argument_is_an_invalid_request(capacity: Any, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        Scheduler(Registry([]), config=Config(), capacity=capacity)


# -- 2: Registry.discover() honours the configuration -----------------------------------------------


class Mine:
    """An executor whose constructor takes no settings."""

    name = "mine"
    version = "1"

    def algorithms(self) -> list[Algorithm]:
        return [Algorithm("echo")]

    def requirements(self, request: Request) -> Resources:
        return Resources(cpu=1)

    async def execute(self, request: Request, ctx: TaskContext) -> Response:
        return Response(request.inputs)

    async def health(self) -> Health:
        return Health(HealthStatus.OK)

    async def aclose(self) -> None:
        pass


class Configured(Mine):
    name = "configured"

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        self.config = dict(config or {})


def test_settings_reach_the_constructor_and_core_keys_do_not_count_as_unknown() -> None:
    registry = Registry([Configured, Mine], settings={
        "configured": {"colour": "blue", "max_concurrency": 2},
        "mine": {"max_concurrency": 1, "enabled": True},
    })
    built = registry.get("configured")
    assert isinstance(built, Configured)
    assert built.config == {"colour": "blue", "max_concurrency": 2}
    assert registry.get("mine").name == "mine"


def test_unknown_key_for_an_executor_without_settings_is_reported() -> None:
    registry = Registry([Mine], settings={"mine": {"colour": "blue"}})
    with pytest.raises(PluginError, match=r"\[executors.mine\]: unknown key\(s\) colour") as info:
        registry.get("mine")
    assert isinstance(info.value.__cause__, ConfigError)


@pytest.fixture
def in_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory whose ./edgecompute.toml is the configuration, as a user's project."""
    monkeypatch.chdir(tmp_path)
    for name in [n for n in os.environ if n.startswith("EDGECOMPUTE_")]:
        monkeypatch.delenv(name)
    return tmp_path


def test_discover_without_settings_honours_enabled_false(in_project: Path) -> None:
    pytest.importorskip("edgecompute_testplugin", reason="pip install tests/plugins/edgecompute-testplugin")
    assert "text" in Registry.discover().names()
    write(in_project, "[executors.text]\nenabled = false\n")
    registry = Registry.discover()
    assert "text" not in registry.names()
    with pytest.raises(UnknownAlgorithm):
        registry.select("text/upper")
    assert "text" in Registry.discover(settings={}).names()  # {}: no settings, explicitly


def test_discover_without_settings_passes_the_table_to_the_constructor(in_project: Path) -> None:
    pytest.importorskip("edgecompute_testplugin", reason="pip install tests/plugins/edgecompute-testplugin")
    write(in_project, '[executors.text]\ngreeting = "hi"\n')
    executor = Registry.discover().get("text")
    assert executor.config == {"greeting": "hi"}  # type: ignore[attr-defined]


def test_discover_reports_a_bad_configuration_file(in_project: Path) -> None:
    write(in_project, "[executors.text]\nenabled = 'no'\n")
    with pytest.raises(ConfigError, match=r"executors.text.enabled must be true or false"):
        Registry.discover()


def test_discover_warns_about_settings_for_no_installed_executor(
    in_project: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write(in_project, "[executors.nothing_named_so]\nmax_concurrency = 1\n")
    with caplog.at_level(logging.WARNING, logger="edgecompute.registry"):
        Registry.discover()
    assert "[executors.nothing_named_so] but no executor 'nothing_named_so' is installed" in caplog.text
