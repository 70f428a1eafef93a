"""edgecompute-wasm: the ``wasm`` executor, running untrusted Python and WebAssembly in wasmtime.

Importing this package is light: its names load on first access, and wasmtime and the
CPython-for-WASI runtime on the executor's first request, never at import or registration time.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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
    from .executor import WasmExecutor
    from .settings import WasmSettings

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
    "WasmSettings",
    "WheelRefused",
    "__version__",
]

# public name -> the module defining it, imported on first access
_LAZY = {"WasmExecutor": ".executor", "WasmSettings": ".settings",
         **{name: ".errors" for name in __all__ if name not in ("WasmExecutor", "WasmSettings", "__version__")}}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'edgecompute_wasm' has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)
