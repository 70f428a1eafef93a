"""A small executor for the placement tests, importable by a worker (pickled by reference)."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from edgecompute import FunctionExecutor, Resources, TaskContext

apps = FunctionExecutor("apps")


@apps.algorithm(resources=Resources(cpu=0.1))
def echo(inputs: Any) -> Any:
    return inputs


@apps.algorithm(resources=Resources(cpu=0.1))
def pid(inputs: Any) -> int:
    return os.getpid()


@apps.algorithm(resources=Resources(cpu=0.1))
def nbytes(inputs: Any) -> int:
    return int(inputs.nbytes) if hasattr(inputs, "nbytes") else len(inputs)


@apps.algorithm(resources=Resources(cpu=0.1))
def sleep(inputs: float, ctx: TaskContext) -> str:
    """Sleep ``inputs`` seconds, noticing cancellation every 10 ms."""
    end = time.monotonic() + inputs
    while time.monotonic() < end:
        if ctx.cancelled:
            return "cancelled"
        time.sleep(0.01)
    return "slept"


@apps.algorithm(resources=Resources(cpu=0.1))
def hang(inputs: Any) -> None:
    """Block without ever looking at cancellation, as stuck native code would."""
    time.sleep(3600)


@apps.algorithm(resources=Resources(cpu=0.1))
def crash(inputs: Any) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


@apps.algorithm(resources=Resources(cpu=0.1))
def spawn_child(inputs: Any) -> int:
    """Start a long-lived grandchild (it must not outlive the worker)."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    return child.pid
