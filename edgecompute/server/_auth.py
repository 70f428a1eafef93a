"""API keys: stored as hashes, looked up by the hash of the presented key, scoped per algorithm.

Keys are 32 random bytes (``ec_`` + URL-safe base64), so a plain SHA-256 is a safe way to store
them: there is no dictionary to attack, and verifying costs one hash and one dict lookup, which
keeps per-request work tiny. ``edgecompute keys new`` prints a key and the hash for the config.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import secrets

import attrs

from ..errors import ConfigError

__all__ = ["ApiKey", "KeyRing", "hash_key", "new_key"]

_PREFIX = "sha256:"


def new_key() -> str:
    """A fresh high-entropy API key."""
    return "ec_" + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """The form a key is stored in: ``sha256:<hex>``."""
    return _PREFIX + hashlib.sha256(key.encode()).hexdigest()


@attrs.frozen
class ApiKey:
    """One configured key: who it is, what it may run, how fast, how much at once."""

    name: str
    hash: str
    scopes: tuple[str, ...] = ()
    rate: float = 0.0  # requests per second, 0: unlimited
    burst: float = 0.0  # bucket size; 0: max(1, rate)
    max_in_flight: int = 0  # 0: unlimited

    def __attrs_post_init__(self) -> None:
        if self.hash and (not self.hash.startswith(_PREFIX) or len(self.hash) != len(_PREFIX) + 64):
            raise ConfigError(f"key {self.name!r}: hash must be 'sha256:' + 64 hex digits "
                              "(make one with 'edgecompute keys new' or 'edgecompute keys hash')")

    def allows(self, algorithm: str) -> bool:
        """Whether this key may run (and see) ``executor/algorithm``."""
        return any(scope == algorithm or scope == "*" or fnmatch.fnmatchcase(algorithm, scope)
                   for scope in self.scopes)

    def allows_executor(self, executor: str) -> bool:
        """Whether any scope reaches into ``executor`` (for listing)."""
        return any(scope == "*" or scope.split("/", 1)[0] in (executor, "*")
                   or fnmatch.fnmatchcase(executor, scope.split("/", 1)[0]) for scope in self.scopes)

    @property
    def may_read_metrics(self) -> bool:
        return "metrics" in self.scopes or "*" in self.scopes


class KeyRing:
    """Finds the key behind an ``Authorization: Bearer <key>`` (or ``X-API-Key``) header."""

    def __init__(self, keys: tuple[ApiKey, ...]) -> None:
        self._by_hash = {key.hash: key for key in keys}
        # presented key -> ApiKey, for keys already verified: repeat requests skip the hash
        self._verified: dict[str, ApiKey] = {}

    def lookup(self, presented: str) -> ApiKey | None:
        key = self._verified.get(presented)
        if key is not None:
            return key
        digest = hash_key(presented)
        key = self._by_hash.get(digest)
        if key is None or not hmac.compare_digest(key.hash, digest):
            return None
        if len(self._verified) > 10_000:
            self._verified.clear()  # bounded: a flood of distinct valid keys cannot grow it forever
        self._verified[presented] = key
        return key
