"""docs/configuration.md: the file, the environment overrides ("Environment") and errors that name
the key ("Errors"); test_config_semantics.py checks what each key means."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgecompute import Config, Resources
from edgecompute.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "edgecompute.toml"
    path.write_text(text)
    return path


def test_file_values(tmp_path: Path) -> None:
    path = write(tmp_path, """
max_queue = 50
timeout = 2.5
retries = 2
threads = 3
close = "cancel"
[capacity]
cpu = 4
memory_mb = 2048
gpus = 1
gpu_memory_mb = 8000
[executors.cpp]
max_concurrency = 2
isolation = "process"
""")
    config = Config.load(path, environ={})
    assert config.max_queue == 50
    assert config.timeout == 2.5
    assert config.retries == 2
    assert config.threads == 3
    assert config.close == "cancel"
    assert config.capacity == Resources(cpu=4, memory_mb=2048, gpus=1, gpu_memory_mb=8000)
    assert config.executors["cpp"] == {"max_concurrency": 2, "isolation": "process"}


def test_environment_overrides_file(tmp_path: Path) -> None:
    path = write(tmp_path, "max_queue = 50\n[capacity]\ncpu = 4\n")
    environ = {
        "EDGECOMPUTE_MAX_QUEUE": "7",
        "EDGECOMPUTE_CAPACITY__MEMORY_MB": "512",
        "EDGECOMPUTE_EXECUTORS__CPP__MAX_CONCURRENCY": "3",
        "EDGECOMPUTE_EXECUTORS__WASM__MODE": "fast",  # not TOML: taken as a string
        "EDGECOMPUTE_CPP_PLUGIN_PATH": "/opt/plugins",  # an executor's own variable: ignored here
    }
    config = Config.load(path, environ=environ)
    assert config.max_queue == 7
    assert config.capacity == Resources(cpu=4, memory_mb=512)
    assert config.executors["cpp"]["max_concurrency"] == 3
    assert config.executors["wasm"]["mode"] == "fast"


def test_config_file_named_by_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "retries = 4\n")
    assert Config.load(environ={"EDGECOMPUTE_CONFIG": str(path)}).retries == 4


def test_missing_default_file_is_fine_missing_named_file_is_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert Config.load(environ={}) == Config()
    with pytest.raises(ConfigError, match="does not exist"):
        Config.load(tmp_path / "nope.toml", environ={})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max_queue = 0", "max_queue must be a positive integer, not 0"),
        ("max_queue = 'lots'", "max_queue must be a positive integer"),
        ("timeout = -1", "timeout must be a number of seconds > 0"),
        ("close = 'later'", "close must be 'drain' or 'cancel'"),
        ("capacity = 4", "capacity must be a table"),
        ("[capacity]\ncpu = -2", "capacity: cpu must be a finite number >= 0"),
        ("[capacity]\ncores = 2", "capacity: .*cores"),
        ("max_queu = 3", "unknown key.*max_queu.*known keys"),
        ("[executors.cpp]\nmax_concurrency = 0", "executors.cpp.max_concurrency must be a positive integer"),
        ("[executors.cpp]\nenabled = 'no'", "executors.cpp.enabled must be true or false"),
        ("max_queue = ", "not valid TOML"),
    ],
)
def test_bad_values_name_the_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as info:
        Config.load(path, environ={})
    assert str(path) in str(info.value)


def test_bad_environment_value_names_the_source() -> None:
    with pytest.raises(ConfigError, match="environment: max_queue must be a positive integer"):
        Config.load(environ={"EDGECOMPUTE_MAX_QUEUE": "many"})
