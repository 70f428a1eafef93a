"""Fuel: an instruction budget per request, on an executor configured to meter it."""

from __future__ import annotations

import asyncio

import pytest

from edgecompute.errors import InvalidRequest
from edgecompute_wasm.errors import SandboxFuelExhausted
from edgecompute_wasm.executor import WasmExecutor

from .conftest import run


@pytest.fixture(scope="module")
def metered(cache_dir):
    executor = WasmExecutor({"cache_dir": str(cache_dir), "enable_fuel": True, "pool_size": 1, "memory_mb": 128})
    yield executor
    asyncio.run(executor.aclose())


def test_fuel_stops_a_busy_module(metered) -> None:
    loop = '(module (func (export "spin") (loop br 0)))'
    with pytest.raises(SandboxFuelExhausted):
        run(metered, "wasm/module", wasm=loop, function="spin", fuel=100_000)
    add = '(module (func (export "add") (param i32 i32) (result i32) local.get 0 local.get 1 i32.add))'
    assert run(metered, "wasm/module", wasm=add, function="add", args=[1, 2], fuel=1000).outputs == 3


def test_fuel_is_armed_per_python_request(metered) -> None:
    # interpreter start-up is not charged to the request (a cold one still pays its first compile)
    assert run(metered, inputs=2, source="def main(x):\n    return x + 1", fuel=200_000_000).outputs == 3
    with pytest.raises(SandboxFuelExhausted):
        run(metered, source="def main(x):\n    while True:\n        pass", fuel=200_000_000)


def test_fuel_needs_a_metering_executor(wasm) -> None:
    with pytest.raises(InvalidRequest, match="enable_fuel"):
        run(wasm, source="def main(x): return 1", fuel=1000)
