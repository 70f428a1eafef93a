"""The executor's contract: configuration, health, requirements, closing."""

from __future__ import annotations

import asyncio
import time

import pytest

from edgecompute import Request
from edgecompute.errors import ConfigError, PluginError
from edgecompute.models import HealthStatus
from edgecompute_wasm.executor import WasmExecutor
from edgecompute_wasm.settings import WasmSettings


def test_configuration_is_checked_by_name() -> None:
    with pytest.raises(ConfigError, match="unknown"):
        WasmExecutor({"timeuot": 3})
    with pytest.raises(ConfigError, match="memory_mb"):
        WasmExecutor({"memory_mb": 0})
    with pytest.raises(ConfigError, match="preload"):
        WasmExecutor({"preload": "json"})
    with pytest.raises(ConfigError, match="not a folder"):
        WasmExecutor({"mounts": {"/data": "/no/such/folder"}})
    settings = WasmSettings.from_mapping({"timeout": 2, "fuel": 10, "enabled": True})
    assert settings.fuel_enabled and settings.timeout == 2


def test_a_bad_configuration_is_a_plugin_error_at_build(monkeypatch) -> None:
    from edgecompute import Registry

    registry = Registry.discover(settings={"wasm": {"bogus": 1}})
    with pytest.raises(PluginError, match="bogus"):
        registry.get("wasm")


def test_requirements_follow_the_memory_cap() -> None:
    executor = WasmExecutor({"memory_mb": 100})
    answer = 9 * 4  # the answer's copy and decoded value: 9 x the 4 MiB result_bytes
    assert executor.requirements(Request("wasm/python")).memory_mb == 164 + answer
    assert executor.requirements(Request("wasm/python", params={"memory_mb": 20})).memory_mb == 84 + answer
    assert executor.requirements(Request("wasm/python", params={"result_bytes": 2**20})).memory_mb == 164 + 9
    assert executor.requirements(Request("wasm/python")).cpu == 1


def test_health_and_close(cache_dir) -> None:
    executor = WasmExecutor({"cache_dir": str(cache_dir), "pool_size": 1})
    assert asyncio.run(executor.health()).details == {"loaded": False}
    executor.warm()
    details = asyncio.run(executor.health()).details
    assert details["loaded"] and details["cache"]["hits"] >= 1
    asyncio.run(executor.aclose())
    assert asyncio.run(executor.health()).status is HealthStatus.DOWN


def test_closing_does_not_leave_a_runaway_guest_running(cache_dir) -> None:
    from .conftest import run

    executor = WasmExecutor({"cache_dir": str(cache_dir), "pool_size": 0, "prestart": False})
    runtime = executor.runtime()

    async def go() -> None:
        from edgecompute import Registry, Resources, Scheduler
        from edgecompute.config import Config

        async with Scheduler(Registry([executor]), capacity=Resources(cpu=2, memory_mb=10**6), config=Config()) as s:
            handle = s.submit(Request("wasm/python", params={"source": "def main(x):\n    while True:\n        pass",
                                                            "timeout": 1.0}))
            await asyncio.sleep(0.3)
            await executor.aclose()  # the executor goes while its guest spins
            with pytest.raises(Exception):  # noqa: B017 - the request fails one way or another
                await handle.result()

    asyncio.run(go())
    deadline = time.monotonic() + 10
    while runtime.engine.live and time.monotonic() < deadline:
        time.sleep(0.05)
    assert runtime.engine.live == 0
    del run
