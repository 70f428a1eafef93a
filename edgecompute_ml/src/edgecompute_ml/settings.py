"""The operator's settings of the ml executor (the ``[executors.ml]`` table), checked once.

Everything here is plain Python: no torch import. A bad value is a ``ConfigError`` naming the key
and what it must be; the request limits (``max_texts``, ``max_image_pixels``...) are the
:class:`~edgecompute_ml._runtime.limits.Limits` this table also holds.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from edgecompute.errors import ConfigError

from ._runtime.device import DTYPES
from ._runtime.limits import LIMIT_KEYS, Limits
from ._runtime.plan import ModelSource

__all__ = ["MLSettings"]

# the core's keys for every executor (docs/configuration.md), not the ml executor's own
_CORE_KEYS = frozenset({"enabled", "max_concurrency"})


def _fail(key: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(f"executors.ml: {key} must be {expected}, not {value!r}")


def _lower(value: Any) -> str:
    return str(value).lower()


def _table(value: Any) -> Any:
    return {} if value is None else value


def _device(_: Any, attribute: attrs.Attribute[str], value: str) -> None:
    index = value[len("cuda:"):] if value.startswith("cuda:") else None
    if value not in ("auto", "cpu", "cuda", "mps") and not (index is not None and index.isdigit()):
        raise _fail(attribute.name, "auto, cpu, cuda, cuda:N or mps", value)


def _dtype(_: Any, attribute: attrs.Attribute[str], value: str) -> None:
    if value.lower() not in DTYPES:
        raise _fail(attribute.name, "one of float32, float16, bfloat16, auto", value)


def _whole(least: int, *, optional: bool = False) -> Any:
    def check(_: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if optional and value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise _fail(attribute.name, f"an integer >= {least}", value)

    return check


def _number(*, positive: bool, optional: bool = False) -> Any:
    def check(_: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if optional and value is None:
            return
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                or value < 0 or (positive and value == 0)):
            raise _fail(attribute.name, "a finite number > 0" if positive else "a finite number >= 0", value)

    return check


def _flag(_: Any, attribute: attrs.Attribute[bool], value: Any) -> None:
    if not isinstance(value, bool):
        raise _fail(attribute.name, "true or false", value)


def _folder(value: Any) -> Path | None:
    if value is None or isinstance(value, Path):
        return value
    if not isinstance(value, (str, os.PathLike)):
        raise _fail("compile_cache_dir", "a path", value)
    return Path(os.path.expanduser(os.fspath(value)))


def _names(_: Any, attribute: attrs.Attribute[Mapping[str, str]], value: Any) -> None:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, str) and v
                                                 for k, v in value.items()):
        raise _fail(attribute.name, "a table of task = model name", value)


def _models(value: Any) -> tuple[ModelSource, ...]:
    if value is None:
        return ()
    if isinstance(value, tuple) and all(isinstance(v, ModelSource) for v in value):
        return value
    if not isinstance(value, Mapping):
        raise _fail("models", "a table of name = path (or {path, dtype})", value)
    return tuple(ModelSource.parse(str(name), entry) for name, entry in value.items())


@attrs.frozen
class MLSettings:
    """``device`` (auto/cpu/cuda/cuda:N/mps), ``dtype`` (auto or a float type), ``threads`` (torch's
    intra-op threads; unset: torch's choice), ``memory_budget_mb`` (the model cache; unset: half
    the machine's memory), ``max_batch``/``max_delay_ms``/``batching`` (dynamic batching of
    embeddings and image classification), ``models`` (name -> path or {path, dtype}),
    ``default_models`` (task -> model name), ``demo_models`` (register the demo packages' models),
    ``compile`` (capture decoders' decode step with torch.compile), ``compile_cache_dir`` (where
    compiled steps are kept; unset: the default cache) and the request :attr:`limits`."""

    device: str = attrs.field(default="auto", converter=_lower, validator=_device)
    dtype: str = attrs.field(default="auto", converter=str, validator=_dtype)
    threads: int | None = attrs.field(default=None, validator=_whole(1, optional=True))
    memory_budget_mb: float | None = attrs.field(default=None, validator=_number(positive=True, optional=True))
    max_batch: int = attrs.field(default=16, validator=_whole(1))
    max_delay_ms: float = attrs.field(default=2.0, validator=_number(positive=False))
    batching: bool = attrs.field(default=True, validator=_flag)
    demo_models: bool = attrs.field(default=True, validator=_flag)
    default_models: Mapping[str, str] = attrs.field(factory=dict, converter=_table, validator=_names)
    models: tuple[ModelSource, ...] = attrs.field(default=(), converter=_models)
    compile: bool = attrs.field(default=False, validator=_flag)
    compile_cache_dir: Path | None = attrs.field(default=None, converter=_folder)
    limits: Limits = attrs.field(factory=Limits)

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any] | None) -> MLSettings:
        """Read the ``[executors.ml]`` table: unknown keys are refused, naming the valid ones."""
        config = dict(config or {})
        own = {a.name for a in attrs.fields(cls)} - {"limits"}
        unknown = set(config) - own - LIMIT_KEYS - _CORE_KEYS
        if unknown:
            raise ConfigError(f"executors.ml: unknown key(s) {', '.join(sorted(unknown))}; "
                              f"valid: {', '.join(sorted(own | LIMIT_KEYS))}")
        values = {key: value for key, value in config.items() if key in own}
        return cls(**values, limits=Limits.from_config(config))

    def budget_mb(self) -> float:
        """``memory_budget_mb``, or half of the machine's memory when unset."""
        if self.memory_budget_mb is not None:
            return float(self.memory_budget_mb)
        try:
            return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**20 / 2
        except (AttributeError, ValueError, OSError):
            return 4096.0
