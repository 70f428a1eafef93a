"""Configuration that means what it says (issue 20, items 2, 3, 5 and 7)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import pytest

from edgecompute import Config, FunctionExecutor, Registry, Resources, Scheduler
from edgecompute.errors import ConfigError, InfeasibleRequest, InvalidRequest
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
    settings = pytest.importorskip("edgecompute.server.settings")
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
