"""The operator's settings of the cpp executor (the ``[executors.cpp]`` table, or keyword arguments).

Plain Python and attrs: no cffi, numpy or compiler is touched to read them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from edgecompute.errors import ConfigError

from ._limits import LIMITS, Limits

__all__ = ["ISOLATIONS", "CppSettings"]

ISOLATIONS = ("inprocess", "process")
#: keys of the table read by the core (registry, scheduler), not by the executor
_CORE_KEYS = frozenset({"enabled", "max_concurrency"})


def _isolation(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value not in ISOLATIONS:
        raise ConfigError(f"[executors.cpp] isolation must be one of {', '.join(ISOLATIONS)}, not {value!r}")


def _workers(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if type(value) is not int or value < 1:
        raise ConfigError(f"[executors.cpp] workers must be an integer >= 1, not {value!r}")


def _boolean(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"[executors.cpp] {attribute.name} must be true or false, not {value!r}")


def _microseconds(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(f"[executors.cpp] {attribute.name} must be a number >= 0, not {value!r}")


def _paths(value: object) -> tuple[str, ...]:
    if isinstance(value, (str, os.PathLike)) or not isinstance(value, Sequence) or not all(
            isinstance(p, (str, os.PathLike)) for p in value):
        raise ConfigError(f"[executors.cpp] plugins must be a list of paths, not {value!r}")
    return tuple(str(p) for p in value)


def _excluded(value: object) -> tuple[str, ...]:
    if isinstance(value, (str, os.PathLike)) or not isinstance(value, Sequence) or not all(
            isinstance(p, (str, os.PathLike)) for p in value):
        raise ConfigError(f"[executors.cpp] exclude must be a list of paths, not {value!r}")
    return tuple(str(p) for p in value)


def _flags(value: object) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(isinstance(f, str) for f in value):
        raise ConfigError(f"[executors.cpp] compile_flags must be a list of strings, not {value!r}")
    return tuple(value)


@attrs.frozen
class CppSettings:
    """Every setting of the cpp executor, checked (a bad one is a :class:`ConfigError` naming it).

    * ``isolation``: ``"inprocess"`` (plugins run in this process, through cffi, zero-copy) or
      ``"process"`` (in supervised worker processes of the placement layer: a crash fails only the
      tasks on that worker).
    * ``workers``: worker processes in ``process`` isolation.
    * ``plugins``: extra plugin libraries (``.so``) or C++ sources to load.
    * ``builtin``: load the bundled plugin.
    * ``inline_below_us``: in-process calls that took less than this last time (for inputs of the
      same size) run on the event loop instead of a worker thread; 0 disables.
    * ``block_below_us``: in ``process`` isolation, a task that is the only one running whose last
      round trip (same algorithm, inputs of the same size) took less than this waits for its
      answer blocking the event loop, as a short in-process call runs on it; 0 disables.
    * ``compile_flags``: extra compiler flags for plugins given as source.
    * ``exclude``: plugins not to load, however they are found (paths or sources as given, or
      ``builtin``); in ``process`` isolation the host adds those whose load crashed a worker.
    * ``limits``: what one request may ask (``max_input_bytes`` ... ``max_inputs``; docs/cpp.md).
    """

    isolation: str = attrs.field(default="inprocess", validator=_isolation)
    workers: int = attrs.field(default=2, validator=_workers)
    plugins: tuple[str, ...] = attrs.field(default=(), converter=_paths)
    builtin: bool = attrs.field(default=True, validator=_boolean)
    inline_below_us: float = attrs.field(default=100.0, validator=_microseconds)
    block_below_us: float = attrs.field(default=1000.0, validator=_microseconds)
    compile_flags: tuple[str, ...] = attrs.field(default=(), converter=_flags)
    exclude: tuple[str, ...] = attrs.field(default=(), converter=_excluded)
    limits: Limits = attrs.field(factory=lambda: Limits({}))

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None = None, **given: Any) -> CppSettings:
        """The settings of a ``[executors.cpp]`` table, with the keyword arguments that are not
        None taking precedence over it."""
        table = dict(config or {})
        known = {field.name for field in attrs.fields(cls)} - {"limits"}
        unknown = set(table) - known - set(LIMITS) - _CORE_KEYS
        if unknown:
            valid = ", ".join(sorted(known | set(LIMITS)))
            raise ConfigError(f"[executors.cpp]: unknown setting(s) {', '.join(sorted(unknown))}; valid: {valid}")
        values = {name: table[name] for name in known if name in table}
        values.update({name: value for name, value in given.items() if value is not None})
        return cls(**values, limits=Limits(table))

    def table(self) -> dict[str, Any]:
        """These settings as a ``[executors.cpp]`` table (what a worker process is built from)."""
        return {"isolation": self.isolation, "workers": self.workers, "plugins": list(self.plugins),
                "builtin": self.builtin, "inline_below_us": self.inline_below_us,
                "block_below_us": self.block_below_us,
                "compile_flags": list(self.compile_flags), "exclude": list(self.exclude), **self.limits.as_dict()}
