"""Hostile requests measured by ``benchmarks/security.py``: one module per executor.

Each module (``wasm.py``, ``cpp.py``, ``ml.py``, ...) defines ``cases(tmp: Path) -> list[Case]``.
``tmp`` is a fresh folder the case may fill (a FIFO, a symlink, a secret file) before it runs.
The runner runs every case in a fresh process: it builds the executor from ``config``, runs the
``normal`` request once (its peak RSS is the baseline), then the ``attack`` request, and records
the error class, the seconds until the host was safe again and the peak RSS above the baseline.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edgecompute.models import Request

__all__ = ["Case"]


@dataclass
class Case:
    name: str  # short, unique: "wasm: request mount of /etc"
    executor: str  # entry-point name of the executor under attack: "wasm", "cpp", "ml"
    attack: Callable[[], Request]  # builds the hostile request (called in the child process)
    normal: Callable[[], Request]  # a normal request to the same executor: the RSS baseline
    expect: str | None  # the error class name the attack must end in; None: it must succeed
    config: dict[str, Any] = field(default_factory=dict)  # operator config: the [executors.NAME] table
    # optional: given the attack's response outputs (or None on error), return a problem string or None
    check: Callable[[Any], str | None] | None = None
    memory_limit_mb: float = 256.0  # the configured memory limit this case is held to (+64 MB bar)
    deadline: float = 5.0  # the request deadline the runner gives the attack (time-to-safe bar: +1 s)
