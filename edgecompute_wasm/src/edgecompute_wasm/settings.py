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
    # Per-request limits: the default, and the ceiling a request's params may ask for (None: the default).
    # A request is untrusted: it may lower a limit, never raise it above the operator's ceiling.
    timeout: float = 10.0
    memory_mb: float = 256.0
    output_bytes: int = 1 * MiB
    # 4 MiB: the host decodes any answer this size in well under 0.5 s, and the decoded value's memory
    # (at most 8x, docs/wasm.md) stays inside what requirements() reserves
    result_bytes: int = 4 * MiB
    fuel: int | None = None  # default fuel per request; setting it (or enable_fuel) turns metering on
    max_timeout: float | None = None
    max_memory_mb: float | None = None
    max_output_bytes: int | None = None
    max_result_bytes: int | None = None
    max_fuel: int | None = None  # None: the default fuel (no ceiling when the default is unmetered)
    enable_fuel: bool = False
    pool_size: int = 4  # pre-started interpreters kept ready for the default sandbox shape
    prestart: bool = True
    # wasm/python sandboxes start from a snapshot of a booted interpreter (built once per cache folder);
    # false: every sandbox boots CPython (pre-started by the pool when traffic leaves it time)
    snapshot: bool = True
    preload: tuple[str, ...] = ()  # stdlib modules the pre-started interpreters import ahead
    cache_dir: Path = attrs.field(factory=default_cache_dir)
    mounts: Mapping[str, str] = attrs.field(factory=dict)  # guest path -> host dir, always read-only
    # Host paths named by requests (mounts, module files, wheel files) are refused unless the operator
    # names the folders they may lie under.
    allow_request_mounts: bool = False
    request_mount_roots: tuple[Path, ...] = ()
    module_roots: tuple[Path, ...] = ()  # folders params['path'] of wasm/module may name files under
    wheel_roots: tuple[Path, ...] = ()  # folders a request's wheel paths may lie under
    wheelhouse: Path | None = None
    max_source_bytes: int = 1 * MiB
    max_module_bytes: int = 16 * MiB  # wasm/module: module bytes, WAT text or the file at params['path']
    max_input_bytes: int = 16 * MiB  # wasm/python: the encoded request (source, inputs); wasm/module: stdin
    max_argv_bytes: int = 64 * 1024  # wasm/module: argv, every argument plus one byte
    max_table_elements: int = 1_000_000  # per table
    max_tables: int = 4
    max_mount_entries: int = 100_000  # files and folders a mount is checked for special files
    max_request_mounts: int = 16  # mounts one request may name
    max_requirements: int = 32  # wheels a request may name
    max_wheel_unpacked_bytes: int = 128 * MiB
    max_wheel_files: int = 20_000
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
        for name in ("output_bytes", "result_bytes", "max_source_bytes", "max_wasm_stack", "max_module_bytes",
                     "max_input_bytes", "max_argv_bytes", "max_table_elements", "max_tables", "max_mount_entries",
                     "max_request_mounts",
                     "max_requirements", "max_wheel_unpacked_bytes", "max_wheel_files"):
            _positive_int(name, getattr(self, name))
        if self.fuel is not None:
            _positive_int("fuel", self.fuel)
        for name, check in (("timeout", _positive), ("memory_mb", _positive), ("output_bytes", _positive_int),
                            ("result_bytes", _positive_int), ("fuel", _positive_int)):
            ceiling = getattr(self, "max_" + name)
            if ceiling is None:
                continue
            check("max_" + name, ceiling)
            default = getattr(self, name)
            if default is not None and ceiling < default:
                raise ConfigError(f"max_{name} ({ceiling}) is below the default {name} ({default})")
        if self.allow_request_mounts and not self.request_mount_roots:
            raise ConfigError("allow_request_mounts = true needs request_mount_roots: the folders request mounts "
                              "may lie under")
        if type(self.pool_size) is not int or self.pool_size < 0:
            raise ConfigError(f"pool_size must be an int >= 0, not {self.pool_size!r}")
        _positive("epoch_tick", self.epoch_tick)

    @property
    def fuel_enabled(self) -> bool:
        return self.enable_fuel or self.fuel is not None

    def ceiling(self, name: str) -> Any:
        """The most a request may ask for ``name`` (None: no ceiling)."""
        ceiling = getattr(self, "max_" + name)
        return getattr(self, name) if ceiling is None else ceiling

    def limits(self, params: Mapping[str, Any], time_left: float | None) -> Limits:
        """The limits for a request: its ``params`` may lower the defaults, up to the operator's ceilings,
        and never lift the deadline."""
        timeout = float(self._param(params, "timeout", _positive))
        if time_left is not None:
            timeout = min(timeout, max(time_left, 0.001))
        memory_mb = self._param(params, "memory_mb", _positive)
        output = self._param(params, "output_bytes", _positive_int)
        result = self._param(params, "result_bytes", _positive_int)
        fuel = params.get("fuel", self.fuel)
        if fuel is not None:
            if not self.fuel_enabled:
                raise InvalidRequest("this wasm executor does not meter fuel; set enable_fuel = true (or a default "
                                     "fuel) in [executors.wasm]")
            fuel = self._param(params, "fuel", _positive_int)
        return Limits(timeout, int(memory_mb * MiB), int(output), int(result), fuel)

    def _param(self, params: Mapping[str, Any], name: str, check: Any) -> Any:
        value = params.get(name, getattr(self, name))
        check(name, value, InvalidRequest)
        ceiling = self.ceiling(name)
        if ceiling is not None and value > ceiling:
            raise InvalidRequest(f"params[{name!r}] = {value!r} is above its ceiling max_{name} = {ceiling!r}; ask "
                                 f"for at most {ceiling!r} (the operator sets max_{name} in [executors.wasm])")
        return value


def _coerce_setting(key: str, value: Any) -> Any:
    if key in ("cache_dir", "wheelhouse") and value is not None:
        return Path(os.path.expanduser(str(value)))
    if key in ("request_mount_roots", "module_roots", "wheel_roots"):
        if isinstance(value, (str, os.PathLike)) or not all(isinstance(v, (str, os.PathLike)) for v in value):
            raise ConfigError(f"{key} must be a list of folders, not {value!r}")
        roots = []
        for entry in value:
            # a root is compared by its real path: the real paths of what requests name must stay under it
            real = os.path.realpath(os.path.expanduser(os.fspath(entry)))
            if not os.path.isdir(real):
                raise ConfigError(f"{key}: {entry!r} is not a folder")
            roots.append(Path(real))
        return tuple(roots)
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

