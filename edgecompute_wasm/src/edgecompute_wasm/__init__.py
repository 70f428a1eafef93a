"""edgecompute-wasm: the ``wasm`` executor, running untrusted Python and WebAssembly in wasmtime.

Importing this package is light: wasmtime and the CPython-for-WASI runtime are loaded on the
executor's first request, never at import or registration time.
"""

from __future__ import annotations

from typing import Any

from .errors import (
    GuestError,
    SandboxCrashed,
    SandboxFuelExhausted,
    SandboxMemoryExceeded,
    SandboxOutputExceeded,
    SandboxStackOverflow,
    SandboxTimeout,
    WheelRefused,
)

__version__ = "0.1.0"

__all__ = [
    "GuestError",
    "SandboxCrashed",
    "SandboxFuelExhausted",
    "SandboxMemoryExceeded",
    "SandboxOutputExceeded",
    "SandboxStackOverflow",
    "SandboxTimeout",
    "WasmExecutor",
    "WheelRefused",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name == "WasmExecutor":
        from .executor import WasmExecutor

        return WasmExecutor
    raise AttributeError(f"module 'edgecompute_wasm' has no attribute {name!r}")
