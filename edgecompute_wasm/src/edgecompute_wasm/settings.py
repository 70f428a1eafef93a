"""Executor configuration (the ``[executors.wasm]`` table) and per-request limits.

Everything here is plain Python: no wasmtime import.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from edgecompute.errors import ConfigError, InvalidRequest

__all__ = ["Limits", "WasmSettings", "default_cache_dir"]

MiB = 1024 * 1024


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "edgecompute-wasm"


@attrs.frozen
class Limits:
    """The limits one request runs under."""

    timeout: float  # seconds of wall-clock time inside the sandbox
    memory_bytes: int  # cap on the guest's linear memory
    output_bytes: int  # cap on stdout + stderr together
    result_bytes: int  # cap on the encoded return value
    fuel: int | None  # instruction budget, None: unmetered


@attrs.frozen
class WasmSettings:
    timeout: float = 10.0
    memory_mb: float = 256.0
    output_bytes: int = 1 * MiB
    result_bytes: int = 16 * MiB
    fuel: int | None = None  # default fuel per request; setting it (or enable_fuel) turns metering on
    enable_fuel: bool = False
    pool_size: int = 4  # pre-started interpreters kept ready for the default sandbox shape
    prestart: bool = True
    preload: tuple[str, ...] = ()  # stdlib modules the pre-started interpreters import ahead
    cache_dir: Path = attrs.field(factory=default_cache_dir)
    mounts: Mapping[str, str] = attrs.field(factory=dict)  # guest path -> host dir, always read-only
    allow_request_mounts: bool = True
    wheelhouse: Path | None = None
    max_source_bytes: int = 1 * MiB
    max_wasm_stack: int = 1 * MiB
    epoch_tick: float = 0.005  # seconds between epoch ticks: the timeout's resolution

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any] | None) -> WasmSettings:
        config = dict(config or {})
        config.pop("enabled", None)
        config.pop("max_concurrency", None)
        known = {a.name for a in attrs.fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ConfigError(f"unknown [executors.wasm] settings: {', '.join(unknown)}; "
                              f"known: {', '.join(sorted(known))}")
        kwargs: dict[str, Any] = {}
        for key, value in config.items():
            kwargs[key] = _coerce_setting(key, value)
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"invalid [executors.wasm] settings: {exc}") from exc

    def __attrs_post_init__(self) -> None:
        _positive("timeout", self.timeout)
        _positive("memory_mb", self.memory_mb)
        for name in ("output_bytes", "result_bytes", "max_source_bytes", "max_wasm_stack"):
            _positive_int(name, getattr(self, name))
        if self.fuel is not None:
            _positive_int("fuel", self.fuel)
        if type(self.pool_size) is not int or self.pool_size < 0:
            raise ConfigError(f"pool_size must be an int >= 0, not {self.pool_size!r}")
        _positive("epoch_tick", self.epoch_tick)

    @property
    def fuel_enabled(self) -> bool:
        return self.enable_fuel or self.fuel is not None

    def limits(self, params: Mapping[str, Any], time_left: float | None) -> Limits:
        """The limits for a request: its ``params`` override the defaults, never the deadline."""
        timeout = float(_param(params, "timeout", self.timeout, _positive))
        if time_left is not None:
            timeout = min(timeout, max(time_left, 0.001))
        memory_mb = _param(params, "memory_mb", self.memory_mb, _positive)
        output = _param(params, "output_bytes", self.output_bytes, _positive_int)
        result = _param(params, "result_bytes", self.result_bytes, _positive_int)
        fuel = params.get("fuel", self.fuel)
        if fuel is not None:
            _positive_int("fuel", fuel, InvalidRequest)
            if not self.fuel_enabled:
                raise InvalidRequest("this wasm executor does not meter fuel; set enable_fuel = true (or a default "
                                     "fuel) in [executors.wasm]")
        return Limits(timeout, int(memory_mb * MiB), int(output), int(result), fuel)


def _coerce_setting(key: str, value: Any) -> Any:
    if key in ("cache_dir", "wheelhouse") and value is not None:
        return Path(os.path.expanduser(str(value)))
    if key == "preload":
        if isinstance(value, str) or not all(isinstance(v, str) and v.replace(".", "").isidentifier() for v in value):
            raise ConfigError(f"preload must be a list of module names, not {value!r}")
        return tuple(value)
    if key == "mounts":
        if not isinstance(value, Mapping):
            raise ConfigError(f"mounts must be a table of guest path = host directory, not {value!r}")
        return {str(k): str(v) for k, v in value.items()}
    return value


def _positive(name: str, value: Any, error: type[Exception] = ConfigError) -> None:
    if type(value) is bool or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
        raise error(f"{name} must be a finite number > 0, not {value!r}")


def _positive_int(name: str, value: Any, error: type[Exception] = ConfigError) -> None:
    if type(value) is bool or not isinstance(value, int) or value <= 0:
        raise error(f"{name} must be an int > 0, not {value!r}")


def _param(params: Mapping[str, Any], name: str, default: Any, check: Any) -> Any:
    value = params.get(name, default)
    check(name, value, InvalidRequest)
    return value
