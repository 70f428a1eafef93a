"""Configuration: ``edgecompute.toml`` plus ``EDGECOMPUTE_*`` environment overrides.

File (all keys optional)::

    max_queue = 10000          # queued tasks before submit() raises QueueFull
    timeout = 30               # default deadline per request, seconds (queue + run)
    max_timeout = 300          # ceiling on a request's own timeout (a longer one is InvalidRequest)
    retries = 0                # default retries for errors marked retryable
    retry_backoff = 0.1        # first retry delay, doubled each time up to retry_backoff_max
    aging = 10.0               # seconds of waiting worth one priority level
    threads = 8                # worker threads for blocking executor code
    close = "drain"            # on exit: "drain" (finish queued work) or "cancel"

    [capacity]                 # default: this machine's cores and memory, no GPUs; keys left
    cpu = 8                    # out keep that default
    memory_mb = 16000
    gpus = 1
    gpu_memory_mb = 24000      # per device

    [executors.cpp]            # per executor: max_concurrency, enabled, and the executor's own keys
    max_concurrency = 4

    [server]                   # edgecompute serve (pip install "edgecompute[server]"); docs/server.md
    port = 8000

Environment: ``EDGECOMPUTE_CONFIG`` names the file (else ``./edgecompute.toml`` if present), and
``EDGECOMPUTE_<KEY>`` overrides a key, ``__`` separating tables: ``EDGECOMPUTE_MAX_QUEUE=500``,
``EDGECOMPUTE_CAPACITY__CPU=4``, ``EDGECOMPUTE_EXECUTORS__CPP__MAX_CONCURRENCY=2``. Values are
read as TOML values (``4``, ``2.5``, ``true``, ``"text"``); anything else is taken as a string.
Other ``EDGECOMPUTE_*`` variables (not naming a key above) are left to executors; one that looks
like a misspelt key gets a ``UserWarning`` naming the close match.
"""

from __future__ import annotations

import difflib
import math
import os
import tomllib
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs

from .errors import ConfigError
from .models import Resources
from .resources import capacity_with

__all__ = ["Config"]

ENV_PREFIX = "EDGECOMPUTE_"
DEFAULT_FILE = "edgecompute.toml"

_CLOSE_MODES = ("drain", "cancel")


def _check(condition: bool, source: str, key: str, expected: str, value: Any) -> None:
    if not condition:
        raise ConfigError(f"{source}: {key} must be {expected}, not {value!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _did_you_mean(key: str, known: Any) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# The [server] table's keys and their types, checked here so that a bad value fails at load,
# naming the file. edgecompute.server._settings checks the ranges when the server starts; it cannot
# be imported here (the edgecompute.server package loads the web framework, an optional extra).
# tests/core/test_config_semantics.py keeps the two key lists equal.
_SERVER_TYPES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "host": ("a host name or address", lambda v: isinstance(v, str) and bool(v)),
    "port": ("an integer from 0 to 65535", lambda v: _is_int(v) and 0 <= v <= 65535),
    "grpc_port": ("an integer from 0 to 65535", lambda v: _is_int(v) and 0 <= v <= 65535),
    "grpc_host": ("a host name or address", lambda v: isinstance(v, str) and bool(v)),
    **dict.fromkeys(
        ("max_body_bytes", "keep_finished", "keep_finished_bytes", "max_output_bytes", "max_depth",
         "max_header_bytes", "max_headers", "max_url_bytes", "body_min_rate", "max_connections",
         "anonymous_max_in_flight"),
        ("an integer", _is_int)),
    **dict.fromkeys(
        ("max_wait", "header_timeout", "body_timeout", "keep_alive_timeout", "anonymous_rate",
         "anonymous_burst"),
        ("a number", _is_number)),
    **dict.fromkeys(("access_log", "public_metrics", "allow_anonymous"),
                    ("true or false", lambda v: isinstance(v, bool))),
    "keys": ("an array of tables ([[server.keys]])",
             lambda v: isinstance(v, list) and all(isinstance(k, Mapping) for k in v)),
    "anonymous_scopes": ("a list of 'executor/algorithm' patterns",
                         lambda v: isinstance(v, list) and all(isinstance(p, str) for p in v)),
}


def _check_server(server: Mapping[str, Any], source: str) -> None:
    for key, value in server.items():
        if key not in _SERVER_TYPES:
            raise ConfigError(f"{source}: unknown server key {key!r}{_did_you_mean(key, _SERVER_TYPES)}; "
                              f"known: {', '.join(sorted(_SERVER_TYPES))}")
        expected, ok = _SERVER_TYPES[key]
        _check(ok(value), source, f"server.{key}", expected, value)


@attrs.frozen
class Config:
    capacity: Resources | None = None
    max_queue: int = 10_000
    timeout: float | None = None
    max_timeout: float | None = None
    retries: int = 0
    retry_backoff: float = 0.1
    retry_backoff_max: float = 10.0
    aging: float = 10.0
    threads: int | None = None
    close: str = "drain"
    close_timeout: float = 30.0
    executors: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict)
    #: The HTTP gateway's settings (``edgecompute serve``), checked by ``edgecompute.server._settings``.
    server: Mapping[str, Any] = attrs.field(factory=dict)

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None, *,
             environ: Mapping[str, str] | None = None) -> Config:
        """Read the file (``path``, ``$EDGECOMPUTE_CONFIG`` or ``./edgecompute.toml``), then apply
        environment overrides. A missing explicitly named file is an error; a missing default
        file is not."""
        environ = os.environ if environ is None else environ
        data: dict[str, Any] = {}
        source = "defaults"
        named = path if path is not None else environ.get(ENV_PREFIX + "CONFIG")
        file = Path(named) if named else Path(DEFAULT_FILE)
        if named or file.is_file():
            try:
                data = tomllib.loads(file.read_text(encoding="utf-8"))
            except FileNotFoundError:
                raise ConfigError(f"configuration file {str(file)!r} does not exist") from None
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{file}: not valid TOML: {exc}") from exc
            source = str(file)
        config = cls.from_mapping(data, source=source)
        overrides = _environment_overrides(environ)
        if overrides:
            merged = _merge(data, overrides)
            config = cls.from_mapping(merged, source=f"{source} + environment")
        return config

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, source: str = "config") -> Config:
        """Build and validate a Config from parsed TOML (or any nested mapping)."""
        fields = {field.name for field in attrs.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ConfigError(
                f"{source}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(fields))}"
            )
        values: dict[str, Any] = {}
        if "capacity" in data:
            capacity = data["capacity"]
            _check(isinstance(capacity, Mapping), source, "capacity", "a table", capacity)
            try:
                # the fields given replace the machine's; the others keep it (gpus = 1 alone must
                # not zero the cores and memory)
                values["capacity"] = capacity_with(capacity)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{source}: capacity: {exc}") from exc
        for key in ("max_queue", "retries", "threads"):
            if key in data:
                value = data[key]
                least = 0 if key == "retries" else 1
                _check(isinstance(value, int) and not isinstance(value, bool) and value >= least,
                       source, key, "an integer >= 0" if least == 0 else "a positive integer", value)
                values[key] = value
        if "aging" in data:
            value = data["aging"]
            # 0 would divide by zero and inf would make waiting worth nothing: both silently
            # switched priorities off
            _check(_is_number(value) and 0 < value < math.inf, source, "aging",
                   "a finite number of seconds > 0 (seconds of waiting worth one priority level)", value)
            values["aging"] = float(value)
        for key in ("retry_backoff", "retry_backoff_max", "close_timeout"):
            if key in data:
                value = data[key]
                _check(_is_number(value) and value >= 0, source, key, "a number >= 0", value)
                values[key] = float(value)
        for key in ("timeout", "max_timeout"):
            if key in data:
                value = data[key]
                _check(_is_number(value) and value > 0, source, key, "a number of seconds > 0", value)
                values[key] = float(value)
        if "close" in data:
            value = data["close"]
            _check(value in _CLOSE_MODES, source, "close", " or ".join(map(repr, _CLOSE_MODES)), value)
            values["close"] = value
        if "executors" in data:
            executors = data["executors"]
            _check(isinstance(executors, Mapping), source, "executors", "a table of tables", executors)
            for name, settings in executors.items():
                key = f"executors.{name}"
                _check(isinstance(settings, Mapping), source, key, "a table", settings)
                limit = settings.get("max_concurrency")
                _check(limit is None or (isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1),
                       source, f"{key}.max_concurrency", "a positive integer", limit)
                enabled = settings.get("enabled", True)
                _check(isinstance(enabled, bool), source, f"{key}.enabled", "true or false", enabled)
                from .placement import Placement  # light: attrs and the errors

                Placement.from_settings(settings, where=f"{source}: {key}")
            values["executors"] = {name: dict(settings) for name, settings in executors.items()}
        if "server" in data:
            server = data["server"]
            _check(isinstance(server, Mapping), source, "server", "a table", server)
            _check_server(server, source)
            values["server"] = dict(server)
        return cls(**values)

    def executor_settings(self, name: str) -> Mapping[str, Any]:
        return self.executors.get(name, {})


_FIELDS = frozenset(field.name for field in attrs.fields(Config))


def _parse_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _environment_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
            continue
        path = name[len(ENV_PREFIX):].lower().split("__")
        if path[0] not in _FIELDS:
            _warn_if_misspelt(name, path)  # else e.g. EDGECOMPUTE_CPP_PLUGIN_PATH: an executor's own
            continue
        if not all(path):
            raise ConfigError(f"environment variable {name}: empty key part")
        node = overrides
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"environment variable {name}: {part} is not a table")
        node[path[-1]] = _parse_value(raw)
    return overrides


#: variables of our own and of the bundled executors that name no configuration key
_OTHER_VARIABLES = frozenset({"config", "url", "api_key"})
_EXECUTOR_PREFIXES = ("cpp_", "ml_", "wasm_")
_TABLES = ("capacity", "executors", "server")


def _warn_if_misspelt(name: str, path: list[str]) -> None:
    """Warn about a variable that looks like a misspelt configuration key; it is otherwise ignored.

    Executors read variables of their own (``EDGECOMPUTE_CPP_PLUGIN_PATH``), so only a name close
    to a key, or one with ``__`` (only configuration keys have tables), is taken to be a mistake.
    """
    first = path[0]
    if first in _OTHER_VARIABLES or first.startswith(_EXECUTOR_PREFIXES):
        return
    suggestion = None
    table = next((t for t in _TABLES if first.startswith(t + "_") and len(first) > len(t) + 1), None)
    if table is not None and len(path) == 1:  # EDGECOMPUTE_CAPACITY_CPU: one underscore short
        suggestion = f"{ENV_PREFIX}{table.upper()}__{first[len(table) + 1:].upper()}"
    else:
        close = difflib.get_close_matches(first, sorted(_FIELDS), n=1, cutoff=0.8)
        if close:
            suggestion = ENV_PREFIX + "__".join([close[0], *path[1:]]).upper()
        elif len(path) == 1:
            return  # not close to any key: an executor's variable, or another program's
    hint = f"; did you mean {suggestion}?" if suggestion else ""
    warnings.warn(f"environment variable {name} names no configuration key and is ignored{hint} "
                  f"(keys: {', '.join(sorted(_FIELDS))})", UserWarning, stacklevel=4)


def _merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged
