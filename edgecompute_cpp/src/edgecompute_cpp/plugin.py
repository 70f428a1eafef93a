"""The edgecompute plugin module: registers executor ``cpp`` and its demo. Imports nothing heavy."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import edgecompute

from .executor import CppExecutor


@edgecompute.hookimpl
def register_executors(register: Callable[..., Any]) -> None:
    register(CppExecutor)


@edgecompute.hookimpl
def demo(runtime: Any, echo: Callable[[str], None]) -> None:
    from .demo import run

    run(runtime, echo)
