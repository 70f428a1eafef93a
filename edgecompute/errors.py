"""One exception hierarchy for everything edgecompute raises.

Every error a user can see derives from :class:`EdgeComputeError`, so an application can catch
the whole family with one ``except``. Messages name the problem and, where it helps, the
candidates (known algorithms, valid values).
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "AmbiguousAlgorithm",
    "ConfigError",
    "EdgeComputeError",
    "ExecutorCrashed",
    "ExecutorError",
    "InfeasibleRequest",
    "InvalidRequest",
    "PluginError",
    "QueueFull",
    "SandboxViolation",
    "SchedulerClosed",
    "TaskCancelled",
    "TaskTimeout",
    "UnknownAlgorithm",
    "UnknownExecutor",
]


def _listing(names: Iterable[str], limit: int = 20) -> str:
    items = sorted(names)
    if not items:
        return "none"
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown}, ... ({len(items)} in all)"


class EdgeComputeError(Exception):
    """Base class of every error raised by edgecompute and its executors.

    ``retryable`` tells the scheduler whether a retry may succeed (see ``Request.retries``).
    """

    retryable: bool = False


class ConfigError(EdgeComputeError, ValueError):
    """A configuration value (file, environment or argument) is invalid."""


class PluginError(EdgeComputeError):
    """An executor plugin failed to load or to build its executor."""

    def __init__(self, plugin: str, reason: str) -> None:
        super().__init__(f"plugin {plugin!r} failed: {reason}")
        self.plugin = plugin
        self.reason = reason


class UnknownExecutor(EdgeComputeError, LookupError):
    """No executor is registered under this name."""

    def __init__(self, name: str, known: Iterable[str] = ()) -> None:
        self.name = name
        self.known = sorted(known)
        super().__init__(f"no executor named {name!r}; known executors: {_listing(self.known)}")


class UnknownAlgorithm(EdgeComputeError, LookupError):
    """No registered executor offers this algorithm."""

    def __init__(self, algorithm: str, known: Iterable[str] = ()) -> None:
        self.algorithm = algorithm
        self.known = sorted(known)
        import difflib  # only on this error path: it costs more to import than all of this module

        close = difflib.get_close_matches(algorithm, self.known, n=3, cutoff=0.6)
        hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
        super().__init__(
            f"no executor found for algorithm {algorithm!r}{hint}; known algorithms: {_listing(self.known)}"
        )


class AmbiguousAlgorithm(EdgeComputeError, LookupError):
    """A bare algorithm name is offered by more than one executor."""

    def __init__(self, algorithm: str, candidates: Iterable[str]) -> None:
        self.algorithm = algorithm
        self.candidates = sorted(candidates)
        super().__init__(
            f"algorithm {algorithm!r} is offered by several executors; "
            f"use one of: {_listing(self.candidates)}"
        )


class InvalidRequest(EdgeComputeError, ValueError):
    """The request is malformed: bad field values, or inputs the algorithm cannot accept."""


class InfeasibleRequest(EdgeComputeError):
    """The request needs more resources than the scheduler's capacity can ever provide."""


class QueueFull(EdgeComputeError):
    """The scheduler's queue is at its bound and the caller asked not to wait."""

    retryable = True


class SchedulerClosed(EdgeComputeError, RuntimeError):
    """The scheduler is closing or closed and takes no new tasks."""


class TaskTimeout(EdgeComputeError):
    """The task passed its deadline (time in the queue plus time running)."""


class TaskCancelled(EdgeComputeError):
    """The task was cancelled before it finished."""


class ExecutorError(EdgeComputeError):
    """The executor failed while running the task.

    Executors raise it (or a subclass) with ``retryable=True`` for transient failures.
    """

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class ExecutorCrashed(ExecutorError):
    """The process or worker running the task died (a segfault, an abort, a kill)."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message, retryable=retryable)


class SandboxViolation(ExecutorError):
    """Sandboxed code broke a limit or tried something the sandbox forbids."""
