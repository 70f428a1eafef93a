"""The ``[server]`` table of ``edgecompute.toml``::

    [server]
    host = "127.0.0.1"
    port = 8000
    max_body_bytes = 67108864      # 64 MiB; larger bodies get 413
    max_wait = 60.0                # longest ?wait= a request may ask for, seconds
    keep_finished = 10000          # finished tasks kept for GET, per server (oldest dropped first)
    keep_finished_bytes = 268435456  # 256 MiB: the kept results' outputs, in all (oldest evicted: 410)
    max_output_bytes = 67108864    # 64 MiB: one task's outputs; more is refused (an InvalidRequest error)
    max_depth = 64                 # arrays/objects a JSON or frame document may nest, in and out (<= 256)
    max_header_bytes = 65536       # request line + headers; more gets 431 and the connection closes
    max_headers = 100              # header fields per request (431)
    max_url_bytes = 8192           # request target, path + query (414)
    header_timeout = 10.0          # seconds from a request's first byte to the end of its headers (408)
    body_timeout = 30.0            # seconds for a body, plus one per body_min_rate bytes received (408)
    body_min_rate = 16384          # bytes per second a slow body must keep up after body_timeout
    keep_alive_timeout = 5.0       # an idle connection (no request in progress) is closed after this
    max_connections = 1000         # open connections; more are answered 503 and closed
    access_log = true              # one JSON line per request (logger edgecompute.access)
    public_metrics = true          # /metrics without a key (else it needs the "metrics" scope)
    grpc_port = 50051              # also serve gRPC on this port (docs/grpc.md); absent: no gRPC
    grpc_host = "127.0.0.1"        # the gRPC listener's address (default: host)

    [[server.keys]]                # API keys, stored hashed: edgecompute keys new
    name = "app"
    hash = "sha256:9f2c..."
    scopes = ["cpp/*", "text/upper"]   # executor/algorithm patterns (fnmatch); "*" is everything
    rate = 100.0                   # requests per second (token bucket), 0 = unlimited
    burst = 200                    # bucket size
    max_in_flight = 64             # unfinished tasks at a time

Without any key the server refuses to start unless ``allow_anonymous = true``: then requests
without a key act as an ``anonymous`` key with the scopes of ``anonymous_scopes``; each anonymous
task is readable only through the capability its submit answer returns (docs/server.md). A
configured key may not be named ``anonymous``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from ..config import Config
from ..errors import ConfigError
from ..wire import MAX_DEPTH, MAX_DEPTH_CEILING
from ._auth import ApiKey

__all__ = ["ANONYMOUS", "ServerSettings"]

_KNOWN = {"host", "port", "max_body_bytes", "max_wait", "keep_finished", "access_log", "public_metrics", "keys",
          "allow_anonymous", "anonymous_scopes", "anonymous_rate", "anonymous_burst", "anonymous_max_in_flight",
          "keep_finished_bytes", "max_output_bytes", "max_depth", "max_header_bytes", "max_headers",
          "max_url_bytes", "header_timeout", "body_timeout", "body_min_rate", "keep_alive_timeout",
          "max_connections", "grpc_port", "grpc_host"}
#: (name, integer, least, most): the numeric settings and their bounds
_NUMBERS: tuple[tuple[str, bool, float, float], ...] = (
    ("max_body_bytes", True, 1, 2**40), ("keep_finished", True, 1, 10**8), ("max_wait", False, 0, 86400.0),
    ("keep_finished_bytes", True, 1, 2**40), ("max_output_bytes", True, 1, 2**40),
    ("max_depth", True, 1, MAX_DEPTH_CEILING), ("max_header_bytes", True, 1024, 1 << 20),
    ("max_headers", True, 8, 1000), ("max_url_bytes", True, 256, 1 << 20),
    ("header_timeout", False, 0.1, 3600.0), ("body_timeout", False, 0.1, 3600.0),
    ("body_min_rate", True, 1, 2**40), ("keep_alive_timeout", False, 0.1, 3600.0),
    ("max_connections", True, 1, 1_000_000),
)
#: the name requests without a key act under; no configured key may take it
ANONYMOUS = "anonymous"
_KEY_FIELDS = {"name", "hash", "scopes", "rate", "burst", "max_in_flight"}


def _number(source: str, key: str, value: Any, *, integer: bool = False, least: float = 0,
            most: float = float("inf")) -> Any:
    ok = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool) and least <= value <= most
    if not ok:
        bound = f">= {least:g}" if most == float("inf") else f"from {least:g} to {most:g}"
        raise ConfigError(f"{source}: server.{key} must be {'an integer' if integer else 'a number'} {bound}, "
                          f"not {value!r}")
    return value


def _scopes(source: str, key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
        raise ConfigError(f"{source}: {key} must be a list of 'executor/algorithm' patterns, not {value!r}")
    return tuple(value)


@attrs.frozen
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 64 * 1024 * 1024
    max_wait: float = 60.0
    keep_finished: int = 10_000
    keep_finished_bytes: int = 256 * 1024 * 1024
    max_output_bytes: int = 64 * 1024 * 1024
    max_depth: int = MAX_DEPTH
    max_header_bytes: int = 64 * 1024
    max_headers: int = 100
    max_url_bytes: int = 8192
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    body_min_rate: int = 16 * 1024
    keep_alive_timeout: float = 5.0
    max_connections: int = 1000
    access_log: bool = True
    public_metrics: bool = True
    keys: tuple[ApiKey, ...] = ()
    allow_anonymous: bool = False
    anonymous: ApiKey | None = None
    grpc_port: int | None = None  # None: no gRPC listener
    grpc_host: str | None = None  # None: the same as host

    @classmethod
    def from_config(cls, config: Config, *, source: str = "config") -> ServerSettings:
        return cls.from_mapping(config.server, source=source)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, source: str = "config") -> ServerSettings:
        unknown = sorted(set(data) - _KNOWN)
        if unknown:
            raise ConfigError(f"{source}: unknown server key(s) {', '.join(unknown)}; "
                              f"known: {', '.join(sorted(_KNOWN))}")
        values: dict[str, Any] = {}
        if "host" in data:
            if not isinstance(data["host"], str) or not data["host"]:
                raise ConfigError(f"{source}: server.host must be a host name or address, not {data['host']!r}")
            values["host"] = data["host"]
        if "port" in data:
            values["port"] = _number(source, "port", data["port"], integer=True)
        if "grpc_port" in data:
            values["grpc_port"] = _number(source, "grpc_port", data["grpc_port"], integer=True, most=65535)
        if "grpc_host" in data:
            if not isinstance(data["grpc_host"], str) or not data["grpc_host"]:
                raise ConfigError(f"{source}: server.grpc_host must be a host name or address, "
                                  f"not {data['grpc_host']!r}")
            values["grpc_host"] = data["grpc_host"]
        for key, integer, least, most in _NUMBERS:
            if key in data:
                values[key] = _number(source, key, data[key], integer=integer, least=least, most=most)
        defaults = attrs.fields(cls)
        output = values.get("max_output_bytes", defaults.max_output_bytes.default)
        budget = values.get("keep_finished_bytes", defaults.keep_finished_bytes.default)
        if output > budget:
            # a result the server may keep must fit the budget, or it would evict itself at once
            raise ConfigError(f"{source}: server.max_output_bytes ({output}) must not exceed "
                              f"server.keep_finished_bytes ({budget})")
        for key in ("access_log", "public_metrics", "allow_anonymous"):
            if key in data:
                if not isinstance(data[key], bool):
                    raise ConfigError(f"{source}: server.{key} must be true or false, not {data[key]!r}")
                values[key] = data[key]
        keys = []
        raw_keys = data.get("keys", [])
        if not isinstance(raw_keys, list):
            raise ConfigError(f"{source}: server.keys must be an array of tables ([[server.keys]])")
        for index, raw in enumerate(raw_keys):
            where = f"server.keys[{index}]"
            if not isinstance(raw, Mapping):
                raise ConfigError(f"{source}: {where} must be a table")
            extra = sorted(set(raw) - _KEY_FIELDS)
            if extra:
                raise ConfigError(f"{source}: {where}: unknown key(s) {', '.join(extra)}; "
                                  f"known: {', '.join(sorted(_KEY_FIELDS))}")
            for required in ("name", "hash"):
                if not isinstance(raw.get(required), str) or not raw[required]:
                    raise ConfigError(f"{source}: {where}.{required} must be a non-empty string")
            keys.append(ApiKey(
                name=raw["name"], hash=raw["hash"], scopes=_scopes(source, f"{where}.scopes", raw.get("scopes", [])),
                rate=float(_number(source, f"keys[{index}].rate", raw.get("rate", 0.0))),
                burst=float(_number(source, f"keys[{index}].burst", raw.get("burst", 0.0))),
                max_in_flight=int(_number(source, f"keys[{index}].max_in_flight", raw.get("max_in_flight", 0),
                                          integer=True)),
            ))
        names = [key.name for key in keys]
        if ANONYMOUS in names:
            # keyless requests act as "anonymous": a key of that name would share their tasks
            raise ConfigError(f"{source}: server.keys: the name {ANONYMOUS!r} is reserved for requests "
                              "without a key; rename the key")
        if len(set(names)) != len(names):
            raise ConfigError(f"{source}: server.keys: names must be unique, got {names}")
        values["keys"] = tuple(keys)
        if values.get("allow_anonymous"):
            values["anonymous"] = ApiKey(
                name=ANONYMOUS, hash="",
                scopes=_scopes(source, "server.anonymous_scopes", data.get("anonymous_scopes", ["*"])),
                rate=float(_number(source, "anonymous_rate", data.get("anonymous_rate", 0.0))),
                burst=float(_number(source, "anonymous_burst", data.get("anonymous_burst", 0.0))),
                max_in_flight=int(_number(source, "anonymous_max_in_flight",
                                          data.get("anonymous_max_in_flight", 0), integer=True)))
        try:
            return cls(**values)
        except ValueError as exc:
            raise ConfigError(f"{source}: {exc}") from exc
