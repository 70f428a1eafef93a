"""The hooks an edgecompute plugin may implement.

A plugin is a module (or object) listed under the ``edgecompute`` entry-point group of an
installed distribution, with functions marked ``@edgecompute.hookimpl``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from .models import TaskEvent

__all__ = ["hookimpl", "hookspec"]

hookspec = pluggy.HookspecMarker("edgecompute")
hookimpl = pluggy.HookimplMarker("edgecompute")


@hookspec
def register_executors(register: Callable[..., None]) -> None:
    """Register executors: call ``register(factory)`` once per executor.

    ``factory`` is an executor class or a zero-argument callable that returns an executor; it is
    called on first use, so registering must not import heavy dependencies. Pass ``name=`` when
    the factory has no ``name`` attribute.
    """


@hookspec
def task_event(event: TaskEvent) -> None:
    """Observe every task event of every scheduler (for metrics and logs). Must be quick."""




@hookspec
def demo(runtime: Any, echo: Callable[[str], None]) -> None:
    """Show this plugin's executor at work in ``edgecompute demo``: run a few requests through
    ``runtime`` (an :class:`edgecompute.Runtime`) and describe them with ``echo``."""
