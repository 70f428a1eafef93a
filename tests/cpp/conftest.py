"""Fixtures for the edgecompute-cpp tests: the bundled plugin and the test plugins, compiled once."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edgecompute import Config, Registry, Resources, Scheduler
from edgecompute_cpp import CppExecutor, build_plugin

PLUGINS = Path(__file__).parent / "plugins"


@pytest.fixture(scope="session")
def testplug() -> Path:
    """The crashing/spinning/counting test plugin, compiled into the cache."""
    return build_plugin(PLUGINS / "testplug.cpp")


@pytest.fixture(scope="session")
def hostile() -> Path:
    """A plugin that writes past the end of its input."""
    return build_plugin(PLUGINS / "hostile.cpp")


@pytest.fixture(scope="session")
def oldabi() -> Path:
    return build_plugin(PLUGINS / "oldabi.cpp", flags=["-DEC_ABI_TARGET=1"])


@pytest.fixture(scope="session")
def cpp() -> CppExecutor:
    """An in-process executor with the bundled plugin, loaded once for the session."""
    executor = CppExecutor(builtin=True, plugins=[])
    executor.algorithms()
    return executor


@pytest.fixture
async def isolated(testplug: Path) -> AsyncIterator[tuple[Scheduler, CppExecutor]]:
    """A scheduler over a ``process`` executor with one worker and the test plugin."""
    executor = CppExecutor({"isolation": "process", "workers": 1, "plugins": [str(testplug)]})
    async with Scheduler(Registry([executor]), capacity=Resources(cpu=4, memory_mb=4096), config=Config()) as s:
        yield s, executor
    await executor.aclose()  # its worker processes end with the test


@pytest.fixture(scope="session")
def crashonload() -> Path:
    """A plugin whose ec_info() aborts: it crashes whatever process loads it."""
    return build_plugin(PLUGINS / "crashonload.cpp")
