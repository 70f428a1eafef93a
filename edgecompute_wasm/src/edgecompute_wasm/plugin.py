"""The ``edgecompute`` entry point of this distribution: registers executor ``wasm``.

Registering imports neither wasmtime nor the runtime; they load on the first request.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from edgecompute.hookspecs import hookimpl

__all__ = ["demo", "register_executors"]


@hookimpl
def register_executors(register: Callable[..., Any]) -> None:
    from .executor import WasmExecutor

    register(WasmExecutor)


@hookimpl
def demo(runtime: Any, echo: Callable[[str], None]) -> None:
    """``edgecompute demo``: untrusted code in the wasm sandbox (demo.py)."""
    from .demo import show

    show(runtime, echo)
