"""edgecompute: run native, ML and sandboxed work through one scheduler, in your own process.

``import edgecompute`` stays light: everything but the errors is imported on first use (the value
classes bring attrs, the scheduler anyio, discovery pluggy), and no executor's heavy dependency
(torch, wasmtime, a compiler) is ever imported until that executor runs something.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import errors

if TYPE_CHECKING:
    from ._functions import FunctionExecutor
    from ._registry import Registry, Selection
    from ._runtime import MapIterator, Runtime
    from ._scheduler import Scheduler, SchedulerStats
    from ._task import TaskHandle
    from .config import Config
    from .context import TaskContext
    from .executor import BlockingExecutor, Executor
    from .hookspecs import hookimpl
    from .models import Algorithm, Health, HealthStatus, Request, Resources, Response, TaskEvent, TaskState
    from .placement import Placement

__version__ = "0.1.0"

_LAZY = {
    "Algorithm": "models",
    "Health": "models",
    "HealthStatus": "models",
    "Request": "models",
    "Resources": "models",
    "Response": "models",
    "TaskEvent": "models",
    "TaskState": "models",
    "BlockingExecutor": "executor",
    "Config": "config",
    "Executor": "executor",
    "FunctionExecutor": "_functions",
    "MapIterator": "_runtime",
    "Placement": "placement",
    "Registry": "_registry",
    "Runtime": "_runtime",
    "Scheduler": "_scheduler",
    "SchedulerStats": "_scheduler",
    "Selection": "_registry",
    "TaskContext": "context",
    "TaskHandle": "_task",
    "hookimpl": "hookspecs",
}

__all__ = [
    "Algorithm",
    "BlockingExecutor",
    "Config",
    "Executor",
    "FunctionExecutor",
    "Health",
    "HealthStatus",
    "MapIterator",
    "Placement",
    "Registry",
    "Request",
    "Resources",
    "Response",
    "Runtime",
    "Scheduler",
    "SchedulerStats",
    "Selection",
    "TaskContext",
    "TaskEvent",
    "TaskHandle",
    "TaskState",
    "errors",
    "hookimpl",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'edgecompute' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
