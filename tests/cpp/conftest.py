"""Fixtures for the edgecompute-cpp tests: the bundled plugin and the test plugins, compiled once."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgecompute_cpp import CppExecutor, build_plugin

PLUGINS = Path(__file__).parent / "plugins"


@pytest.fixture(scope="session")
def testplug() -> Path:
    """The crashing/spinning/counting test plugin, compiled into the cache."""
    return build_plugin(PLUGINS / "testplug.cpp")


@pytest.fixture(scope="session")
def oldabi() -> Path:
    return build_plugin(PLUGINS / "oldabi.cpp", flags=["-DEC_ABI_TARGET=1"])


@pytest.fixture(scope="session")
def cpp() -> CppExecutor:
    """An in-process executor with the bundled plugin, loaded once for the session."""
    executor = CppExecutor(builtin=True, plugins=[])
    executor.algorithms()
    return executor
