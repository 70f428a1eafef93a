"""The edgecompute plugin: registers the ``ml`` executor (without importing torch)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from edgecompute.hookspecs import hookimpl

__all__ = ["demo", "register_executors"]


@hookimpl
def register_executors(register: Callable[..., None]) -> None:
    from .executor import MLExecutor

    register(MLExecutor)


@hookimpl
def demo(runtime: Any, echo: Callable[[str], None]) -> None:
    from .demo import show

    show(runtime, echo)

