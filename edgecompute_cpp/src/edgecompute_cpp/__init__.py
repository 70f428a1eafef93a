"""edgecompute-cpp: the ``cpp`` executor (native C++ plugins through cffi).

Importing this package is cheap: cffi and numpy load when a plugin is first loaded or called.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: The plugin ABI version this host implements; plugins built for 1..ABI_VERSION load.
ABI_VERSION = 2
MIN_ABI_VERSION = 1

_LAZY = {
    "CppExecutor": "executor",
    "CppSettings": "settings",
    "build_plugin": "_build",
    "include_dir": "_build",
    "cache_dir": "_build",
    "CompileError": "errors",
    "NoCompiler": "errors",
    "BundledPluginDown": "errors",
    "PluginABIError": "errors",
    "PluginCallError": "errors",
}

__all__ = ["ABI_VERSION", "MIN_ABI_VERSION", "BundledPluginDown", "CompileError", "CppExecutor", "CppSettings",
           "NoCompiler", "PluginABIError", "PluginCallError", "build_plugin", "cache_dir", "include_dir"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'edgecompute_cpp' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
